// XLA FFI handlers: shape checks, tile choice, kernel launch.
//
// The BMMA kernel is two custom calls, so XLA owns the intermediate activation planes:
//   flexq_bmma_act_quant: x bf16 [M, K] -> planes u32 [a_bits, M, W], scales f32 [M, G]
//   flexq_bmma_gemm:      planes, scales, w_planes u32 [6, N, W], w_scales f16 [N, G]
//                         -> y bf16 [M, N]; attributes a_bits, k, m1_rows (0: M = 1 on the M <= 8 kernel; 1-4:
//                         bmma_decode_m1_kernel, 4 / 4 + prefetch / 8 / 8 + prefetch warps a block)
// G = K / 128 rounded up (pallas_kernels/core.py: padded_k), W = 4 x G rounded up to a multiple of 4: the
// "bitplanes_g4" layout of both operands (configs.h, flexq_jax/formats.py).
// The decode GEMV on "pallas6" weights (gemv_pallas6.cuh) is one more:
//   flexq_gemv_pallas6_{bf16,f32}: q_x i8 [Mp, Kp], s_x f32 [Mp, G], sum(q_x) i32 [Mp, G],
//                         w u8 [N/16, G, 3, 16, 32], w_scales f16 [N, G] -> y [M, N], M <= 8
//   flexq_gemv_pallas6_xq_{bf16,f32}: x [M, K] (quantized inside), w, w_scales -> y [M, N] of x's dtype; attributes a_bits, unroll (1, 2, 4: groups a warp loads ahead), warps (8, 16, 32 a block), ring (0, or 2 / 4 / 8 stages of a shared-memory weight ring, M <= 2),
//                                     pdl (1: programmatic dependent launch)
//   flexq_gemv_pallas6_fused_{bf16,f32}: x [M, K] (or [M, 2K]: gate, up), w, w_scales, gamma [K] (or [0]),
//                         residual [M, N] (or [0]) -> y [M, N] of x's dtype; attributes a_bits, prologue (0 plain,
//                         1 RMSNorm with gamma and eps, 2 SwiGLU), eps (f32): the producer and the residual add
//                         folded into the GEMV (gemv_pallas6_fused_kernel)
// and the small-M tensor-core GEMM on the same operands (gemm_small_pallas6.cuh), M <= 64:
//   flexq_gemm_small_pallas6_{bf16,f32}: q_x, s_x, sum(q_x), w, w_scales -> y [M, N]; attribute tiles_per_block
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "act_quant.cuh"
#include "bmma_gemm.cuh"
#include "configs.h"
#include "gemv_pallas6.cuh"
#include "gemm_small_pallas6.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace flexq {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

std::string dims_str(ffi::Span<const int64_t> d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

ffi::Error expect_dims(const char* name, ffi::Span<const int64_t> got, std::initializer_list<int64_t> want) {
  bool ok = got.size() == want.size();
  for (size_t i = 0; ok && i < got.size(); ++i) ok = got[i] == want.begin()[i];
  if (ok) return ffi::Error::Success();
  std::string w = "[";
  size_t i = 0;
  for (int64_t v : want) w += (i++ ? ", " : "") + std::to_string(v);
  return ffi::Error::InvalidArgument(std::string(name) + " has shape " + dims_str(got) + ", expected " + w + "]");
}

ffi::Error last_cuda_error(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string(what) + ": " + cudaGetErrorString(err));
}

ffi::Error ActQuantImpl(cudaStream_t stream, ffi::Buffer<ffi::BF16> x, ffi::ResultBuffer<ffi::U32> planes,
                        ffi::ResultBuffer<ffi::F32> scales, int32_t a_bits) {
  if (x.dimensions().size() != 2) return ffi::Error::InvalidArgument("x must be [M, K], got " + dims_str(x.dimensions()));
  const int64_t m = x.dimensions()[0], k = x.dimensions()[1];
  const int64_t groups = ceil_div(k, kGroupSize);
  const int64_t words = kWordsPerGroup * padded_groups(static_cast<int>(groups));
  if (auto e = expect_dims("activation planes", planes->dimensions(), {a_bits, m, words}); e.failure()) return e;
  if (auto e = expect_dims("activation scales", scales->dimensions(), {m, groups}); e.failure()) return e;
  if (m == 0 || groups == 0) return ffi::Error::Success();

  constexpr int kThreads = 256;  // 8 (token, group) tasks a block
  const int64_t blocks = ceil_div(m * padded_groups(static_cast<int>(groups)) * 32, kThreads);
  const auto* xp = reinterpret_cast<const __nv_bfloat16*>(x.typed_data());
  if (a_bits == 6) {
    act_quant_kernel<6><<<blocks, kThreads, 0, stream>>>(xp, planes->typed_data(), scales->typed_data(), m, k, groups);
  } else if (a_bits == 8) {
    act_quant_kernel<8><<<blocks, kThreads, 0, stream>>>(xp, planes->typed_data(), scales->typed_data(), m, k, groups);
  } else {
    return ffi::Error::InvalidArgument("a_bits must be 6 or 8, got " + std::to_string(a_bits));
  }
  return last_cuda_error("flexq_bmma_act_quant launch");
}

template <int kABits, class Tile>
void launch_gemm(cudaStream_t stream, const uint32_t* xp, const float* xs, const uint32_t* wp, const __half* ws,
                 __nv_bfloat16* y, int m, int n, int groups) {
  const dim3 grid(ceil_div(n, Tile::kBlockN), ceil_div(m, Tile::kBlockM));
  bmma_gemm_kernel<kABits, Tile><<<grid, Tile::kThreads, 0, stream>>>(xp, xs, wp, ws, y, m, n, groups);
}

// bmma_decode_m1_kernel: a block of kSplit warps on each 8 output channels.
template <int kABits, int kSplit, bool kPrefetch>
void launch_m1(cudaStream_t stream, const uint32_t* xp, const float* xs, const uint32_t* wp, const __half* ws,
               __nv_bfloat16* y, int n, int groups) {
  bmma_decode_m1_kernel<kABits, kSplit, kPrefetch><<<ceil_div(n, 8), 32 * kSplit, 0, stream>>>(xp, xs, wp, ws, y, n,
                                                                                              groups);
}

template <int kABits>
void launch_gemm_for_m(cudaStream_t stream, const uint32_t* xp, const float* xs, const uint32_t* wp,
                       const __half* ws, __nv_bfloat16* y, int m, int n, int groups, int m1_rows) {
  if (m == 1 && m1_rows != 0) {  // 1: kDecodeSplit warps; 2: with prefetch; 3: 8 warps; 4: 8 warps, prefetch
    switch (m1_rows) {
      case 2: launch_m1<kABits, kDecodeSplit, true>(stream, xp, xs, wp, ws, y, n, groups); break;
      case 3: launch_m1<kABits, 8, false>(stream, xp, xs, wp, ws, y, n, groups); break;
      case 4: launch_m1<kABits, 8, true>(stream, xp, xs, wp, ws, y, n, groups); break;
      default: launch_m1<kABits, kDecodeSplit, false>(stream, xp, xs, wp, ws, y, n, groups);
    }
  } else if (m <= 8) {
    bmma_decode_kernel<kABits, kDecodeSplit><<<ceil_div(n, 8), 32 * kDecodeSplit, 0, stream>>>(
        xp, xs, wp, ws, y, m, n, groups);
  } else if (m <= DecodeM16Tile::kBlockM) {
    launch_gemm<kABits, DecodeM16Tile>(stream, xp, xs, wp, ws, y, m, n, groups);
  } else {
    launch_gemm<kABits, LargeTile>(stream, xp, xs, wp, ws, y, m, n, groups);
  }
}

ffi::Error GemmImpl(cudaStream_t stream, ffi::Buffer<ffi::U32> x_planes, ffi::Buffer<ffi::F32> x_scales,
                    ffi::Buffer<ffi::U32> w_planes, ffi::Buffer<ffi::F16> w_scales, ffi::ResultBuffer<ffi::BF16> y,
                    int32_t a_bits, int32_t k, int32_t m1_rows) {
  if (a_bits != 6 && a_bits != 8) return ffi::Error::InvalidArgument("a_bits must be 6 or 8, got " + std::to_string(a_bits));
  if (k <= 0) return ffi::Error::InvalidArgument("k must be positive, got " + std::to_string(k));
  if (m1_rows < 0 || m1_rows > 4) return ffi::Error::InvalidArgument("m1_rows must be 0-4, got " + std::to_string(m1_rows));
  if (x_planes.dimensions().size() != 3 || w_planes.dimensions().size() != 3)
    return ffi::Error::InvalidArgument("plane arrays must be 3-D [bits, rows, words]");
  const int64_t m = x_planes.dimensions()[1], n = w_planes.dimensions()[1];
  const int64_t groups = ceil_div(k, kGroupSize);
  const int64_t words = kWordsPerGroup * padded_groups(static_cast<int>(groups));  // "bitplanes_g4" rows
  if (auto e = expect_dims("activation planes", x_planes.dimensions(), {a_bits, m, words}); e.failure()) return e;
  if (auto e = expect_dims("activation scales", x_scales.dimensions(), {m, groups}); e.failure()) return e;
  if (auto e = expect_dims("weight planes", w_planes.dimensions(), {kWeightBits, n, words}); e.failure()) return e;
  if (auto e = expect_dims("weight scales", w_scales.dimensions(), {n, groups}); e.failure()) return e;
  if (auto e = expect_dims("output", y->dimensions(), {m, n}); e.failure()) return e;
  if (m == 0 || n == 0) return ffi::Error::Success();

  const auto* ws = reinterpret_cast<const __half*>(w_scales.typed_data());
  auto* yp = reinterpret_cast<__nv_bfloat16*>(y->typed_data());
  if (a_bits == 6) {
    launch_gemm_for_m<6>(stream, x_planes.typed_data(), x_scales.typed_data(), w_planes.typed_data(), ws, yp, m, n,
                         groups, m1_rows);
  } else {
    launch_gemm_for_m<8>(stream, x_planes.typed_data(), x_scales.typed_data(), w_planes.typed_data(), ws, yp, m, n,
                         groups, m1_rows);
  }
  return last_cuda_error("flexq_bmma_gemm launch");
}

template <ffi::DataType kOut> struct GemvOut;
template <> struct GemvOut<ffi::BF16> { using T = __nv_bfloat16; };
template <> struct GemvOut<ffi::F32> { using T = float; };

// The operands the GEMV and the small-M GEMM share: q_x i8 [Mp, Kp], s_x f32 [Mp, G], sum(q_x) i32 [Mp, G],
// "pallas6" weights [N/16, G, 3, 16, 32], w_scales f16 [N, G], y [M, N] with M <= max_m; the kernel reads
// rows 0 .. m_read(M) - 1 of the activations.
template <ffi::DataType kOut>
ffi::Error check_pallas6_operands(const char* kernel, const ffi::Buffer<ffi::S8>& qx, const ffi::Buffer<ffi::F32>& sx,
                                  const ffi::Buffer<ffi::S32>& xsum, const ffi::Buffer<ffi::U8>& w,
                                  const ffi::Buffer<ffi::F16>& sw, const ffi::ResultBuffer<kOut>& y, int64_t max_m,
                                  int64_t (*m_read)(int64_t)) {
  if (qx.dimensions().size() != 2) return ffi::Error::InvalidArgument("q_x must be [Mp, Kp], got " + dims_str(qx.dimensions()));
  if (w.dimensions().size() != 5) return ffi::Error::InvalidArgument("weights must be 'pallas6' [N/16, G, 3, 16, 32], got " + dims_str(w.dimensions()));
  if (y->dimensions().size() != 2) return ffi::Error::InvalidArgument("y must be [M, N], got " + dims_str(y->dimensions()));
  const int64_t mp = qx.dimensions()[0], kp = qx.dimensions()[1];
  const int64_t tiles = w.dimensions()[0], groups = w.dimensions()[1];
  const int64_t n = tiles * kGemvTileRows, m = y->dimensions()[0];
  if (kp != groups * kGemvGroup) return ffi::Error::InvalidArgument("q_x has " + std::to_string(kp) + " columns, the weights " + std::to_string(groups) + " groups of 128");
  if (auto e = expect_dims("weights", w.dimensions(), {tiles, groups, 3, kGemvTileRows, kGemvPlaneBytes}); e.failure()) return e;
  if (auto e = expect_dims("activation scales", sx.dimensions(), {mp, groups}); e.failure()) return e;
  if (auto e = expect_dims("activation sums", xsum.dimensions(), {mp, groups}); e.failure()) return e;
  if (auto e = expect_dims("weight scales", sw.dimensions(), {n, groups}); e.failure()) return e;
  if (auto e = expect_dims("output", y->dimensions(), {m, n}); e.failure()) return e;
  if (m > max_m) return ffi::Error::InvalidArgument(std::string(kernel) + " takes M <= " + std::to_string(max_m) + " rows, got " + std::to_string(m));
  if (mp < m_read(m)) return ffi::Error::InvalidArgument("q_x has " + std::to_string(mp) + " rows; M = " + std::to_string(m) + " needs " + std::to_string(m_read(m)) + " (zero rows past M)");
  return ffi::Error::Success();
}

template <ffi::DataType kOut>
ffi::Error GemvImpl(cudaStream_t stream, ffi::Buffer<ffi::S8> qx, ffi::Buffer<ffi::F32> sx, ffi::Buffer<ffi::S32> xsum,
                    ffi::Buffer<ffi::U8> w, ffi::Buffer<ffi::F16> sw, ffi::ResultBuffer<kOut> y) {
  // The kernel reads rows 0 .. M' - 1 of the activations, M' = M rounded up to 1, 2, 4 or 8.
  auto m_read = [](int64_t m) -> int64_t { return m <= 1 ? 1 : m <= 2 ? 2 : m <= 4 ? 4 : 8; };
  if (auto e = check_pallas6_operands("the GEMV", qx, sx, xsum, w, sw, y, kGemvMaxM, m_read); e.failure()) return e;
  const int64_t kp = qx.dimensions()[1], groups = w.dimensions()[1];
  const int64_t n = w.dimensions()[0] * kGemvTileRows, m = y->dimensions()[0];
  if (m == 0 || n == 0) return ffi::Error::Success();
  launch_gemv_pallas6(stream, qx.typed_data(), sx.typed_data(), xsum.typed_data(), w.typed_data(),
                      reinterpret_cast<const __half*>(sw.typed_data()), reinterpret_cast<typename GemvOut<kOut>::T*>(y->typed_data()),
                      static_cast<int>(m), static_cast<int>(n), static_cast<int>(groups), static_cast<int>(kp));
  return last_cuda_error("flexq_gemv_pallas6 launch");
}

ffi::Error GemvBf16(cudaStream_t s, ffi::Buffer<ffi::S8> a, ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::S32> c,
                    ffi::Buffer<ffi::U8> d, ffi::Buffer<ffi::F16> e, ffi::ResultBuffer<ffi::BF16> y) {
  return GemvImpl<ffi::BF16>(s, a, b, c, d, e, y);
}
ffi::Error GemvF32(cudaStream_t s, ffi::Buffer<ffi::S8> a, ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::S32> c,
                   ffi::Buffer<ffi::U8> d, ffi::Buffer<ffi::F16> e, ffi::ResultBuffer<ffi::F32> y) {
  return GemvImpl<ffi::F32>(s, a, b, c, d, e, y);
}

template <ffi::DataType kT>
ffi::Error GemvXqImpl(cudaStream_t stream, ffi::Buffer<kT> x, ffi::Buffer<ffi::U8> w, ffi::Buffer<ffi::F16> sw,
                      ffi::ResultBuffer<kT> y, int32_t a_bits, int32_t unroll, int32_t warps, int32_t pdl,
                      int32_t ring) {
  if (a_bits != 6 && a_bits != 8) return ffi::Error::InvalidArgument("a_bits must be 6 or 8, got " + std::to_string(a_bits));
  if (unroll != 1 && unroll != 2 && unroll != 4) return ffi::Error::InvalidArgument("unroll must be 1, 2 or 4, got " + std::to_string(unroll));
  if (warps != 8 && warps != 16 && warps != 32) return ffi::Error::InvalidArgument("warps must be 8, 16 or 32, got " + std::to_string(warps));
  if (warps != 8 && unroll != 1) return ffi::Error::InvalidArgument("unroll 2 and 4 run at 8 warps a block only, got warps " + std::to_string(warps));
  if (pdl != 0 && pdl != 1) return ffi::Error::InvalidArgument("pdl must be 0 or 1, got " + std::to_string(pdl));
  if (x.dimensions().size() != 2) return ffi::Error::InvalidArgument("x must be [M, K], got " + dims_str(x.dimensions()));
  if (w.dimensions().size() != 5) return ffi::Error::InvalidArgument("weights must be 'pallas6' [N/16, G, 3, 16, 32], got " + dims_str(w.dimensions()));
  const int64_t m = x.dimensions()[0], k = x.dimensions()[1];
  const int64_t tiles = w.dimensions()[0], groups = w.dimensions()[1], n = tiles * kGemvTileRows;
  if (ceil_div(k, kGemvGroup) != groups) return ffi::Error::InvalidArgument("x has K=" + std::to_string(k) + ", the weights " + std::to_string(groups) + " groups of 128");
  if (auto e = expect_dims("weights", w.dimensions(), {tiles, groups, 3, kGemvTileRows, kGemvPlaneBytes}); e.failure()) return e;
  if (auto e = expect_dims("weight scales", sw.dimensions(), {n, groups}); e.failure()) return e;
  if (auto e = expect_dims("output", y->dimensions(), {m, n}); e.failure()) return e;
  if (m > kGemvMaxM) return ffi::Error::InvalidArgument("the GEMV takes M <= 8 rows, got " + std::to_string(m));
  if (m == 0 || n == 0) return ffi::Error::Success();
  using T = typename GemvOut<kT>::T;
  if (ring != 0) {  // the weights streamed through a shared-memory ring (gemv_pallas6.cuh)
    if (ring != 2 && ring != 4 && ring != 8) return ffi::Error::InvalidArgument("ring must be 0 (off), 2, 4 or 8 stages, got " + std::to_string(ring));
    if (unroll != 1 || warps != kRingWarps) return ffi::Error::InvalidArgument("the ring GEMV runs 8 warps a block at unroll 1, got warps " + std::to_string(warps) + ", unroll " + std::to_string(unroll));
    if (m > kGemvRingMaxM) return ffi::Error::InvalidArgument("the ring GEMV takes M <= " + std::to_string(kGemvRingMaxM) + " rows, got " + std::to_string(m));
    const size_t smem = gemv_ring_smem_bytes(ring, m <= 1 ? 1 : 2, static_cast<int>(groups));
    if (smem + 1024 > 227 * 1024) return ffi::Error::InvalidArgument("the ring GEMV needs " + std::to_string(smem) + " bytes of shared memory at K=" + std::to_string(k) + ", ring " + std::to_string(ring) + " (a Hopper block has 227 KB, 1 KB of it static here): use fewer stages");
    const cudaError_t e = launch_gemv_pallas6_ring(stream, reinterpret_cast<const T*>(x.typed_data()), w.typed_data(),
                                                   reinterpret_cast<const __half*>(sw.typed_data()), reinterpret_cast<T*>(y->typed_data()),
                                                   static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), static_cast<int>(groups), a_bits, ring, pdl != 0);
    if (e != cudaSuccess) return ffi::Error::Internal(std::string("flexq_gemv_pallas6_xq (ring) launch: ") + cudaGetErrorString(e));
    return last_cuda_error("flexq_gemv_pallas6_xq (ring) launch");
  }
  launch_gemv_pallas6_xq(stream, reinterpret_cast<const T*>(x.typed_data()), w.typed_data(),
                         reinterpret_cast<const __half*>(sw.typed_data()), reinterpret_cast<T*>(y->typed_data()),
                         static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), static_cast<int>(groups), a_bits, unroll, warps, pdl != 0);
  return last_cuda_error("flexq_gemv_pallas6_xq launch");
}

ffi::Error GemvXqBf16(cudaStream_t s, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::U8> w, ffi::Buffer<ffi::F16> sw,
                      ffi::ResultBuffer<ffi::BF16> y, int32_t a_bits, int32_t unroll, int32_t warps, int32_t pdl,
                      int32_t ring) {
  return GemvXqImpl<ffi::BF16>(s, x, w, sw, y, a_bits, unroll, warps, pdl, ring);
}
ffi::Error GemvXqF32(cudaStream_t s, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w, ffi::Buffer<ffi::F16> sw,
                     ffi::ResultBuffer<ffi::F32> y, int32_t a_bits, int32_t unroll, int32_t warps, int32_t pdl,
                      int32_t ring) {
  return GemvXqImpl<ffi::F32>(s, x, w, sw, y, a_bits, unroll, warps, pdl, ring);
}

template <ffi::DataType kT>
ffi::Error GemvFusedImpl(cudaStream_t stream, ffi::Buffer<kT> x, ffi::Buffer<ffi::U8> w, ffi::Buffer<ffi::F16> sw,
                         ffi::Buffer<kT> gamma, ffi::Buffer<kT> residual, ffi::ResultBuffer<kT> y, int32_t a_bits,
                         int32_t prologue, float eps) {
  if (a_bits != 6 && a_bits != 8) return ffi::Error::InvalidArgument("a_bits must be 6 or 8, got " + std::to_string(a_bits));
  if (prologue != kFusePlain && prologue != kFuseNorm && prologue != kFuseSwiglu)
    return ffi::Error::InvalidArgument("prologue must be 0 (plain), 1 (RMSNorm) or 2 (SwiGLU), got " + std::to_string(prologue));
  if (x.dimensions().size() != 2) return ffi::Error::InvalidArgument("x must be [M, K], got " + dims_str(x.dimensions()));
  if (w.dimensions().size() != 5) return ffi::Error::InvalidArgument("weights must be 'pallas6' [N/16, G, 3, 16, 32], got " + dims_str(w.dimensions()));
  const int64_t m = x.dimensions()[0], cols = x.dimensions()[1];
  if (prologue == kFuseSwiglu && cols % 2) return ffi::Error::InvalidArgument("the SwiGLU prologue takes x = [M, 2K] (gate, up), got " + std::to_string(cols) + " columns");
  const int64_t k = prologue == kFuseSwiglu ? cols / 2 : cols;
  const int64_t tiles = w.dimensions()[0], groups = w.dimensions()[1], n = tiles * kGemvTileRows;
  if (ceil_div(k, kGemvGroup) != groups) return ffi::Error::InvalidArgument("x has K=" + std::to_string(k) + ", the weights " + std::to_string(groups) + " groups of 128");
  if (auto e = expect_dims("weights", w.dimensions(), {tiles, groups, 3, kGemvTileRows, kGemvPlaneBytes}); e.failure()) return e;
  if (auto e = expect_dims("weight scales", sw.dimensions(), {n, groups}); e.failure()) return e;
  if (auto e = expect_dims("output", y->dimensions(), {m, n}); e.failure()) return e;
  if (prologue == kFuseNorm) {
    if (auto e = expect_dims("norm weight", gamma.dimensions(), {k}); e.failure()) return e;
  }
  const bool has_residual = residual.element_count() != 0;
  if (has_residual) {
    if (auto e = expect_dims("residual", residual.dimensions(), {m, n}); e.failure()) return e;
  }
  if (m > kGemvFusedMaxM) return ffi::Error::InvalidArgument("the fused GEMV takes M <= " + std::to_string(kGemvFusedMaxM) + " rows, got " + std::to_string(m));
  if (m == 0 || n == 0) return ffi::Error::Success();
  using T = typename GemvOut<kT>::T;
  const GemvFuse fuse{prologue == kFuseNorm ? gamma.untyped_data() : nullptr,
                      has_residual ? residual.untyped_data() : nullptr, eps, prologue};
  launch_gemv_pallas6_fused(stream, reinterpret_cast<const T*>(x.typed_data()), w.typed_data(),
                            reinterpret_cast<const __half*>(sw.typed_data()), reinterpret_cast<T*>(y->typed_data()),
                            static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), static_cast<int>(groups),
                            a_bits, fuse);
  return last_cuda_error("flexq_gemv_pallas6_fused launch");
}

ffi::Error GemvFusedBf16(cudaStream_t s, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::U8> w, ffi::Buffer<ffi::F16> sw,
                         ffi::Buffer<ffi::BF16> gamma, ffi::Buffer<ffi::BF16> residual, ffi::ResultBuffer<ffi::BF16> y,
                         int32_t a_bits, int32_t prologue, float eps) {
  return GemvFusedImpl<ffi::BF16>(s, x, w, sw, gamma, residual, y, a_bits, prologue, eps);
}
ffi::Error GemvFusedF32(cudaStream_t s, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w, ffi::Buffer<ffi::F16> sw,
                        ffi::Buffer<ffi::F32> gamma, ffi::Buffer<ffi::F32> residual, ffi::ResultBuffer<ffi::F32> y,
                        int32_t a_bits, int32_t prologue, float eps) {
  return GemvFusedImpl<ffi::F32>(s, x, w, sw, gamma, residual, y, a_bits, prologue, eps);
}

}  // namespace
template <ffi::DataType kOut>
ffi::Error GemmSmallImpl(cudaStream_t stream, ffi::Buffer<ffi::S8> qx, ffi::Buffer<ffi::F32> sx,
                         ffi::Buffer<ffi::S32> xsum, ffi::Buffer<ffi::U8> w, ffi::Buffer<ffi::F16> sw,
                         ffi::ResultBuffer<kOut> y, int32_t tiles_per_block) {
  // The kernel reads rows 0 .. 8 kNT - 1 of the activations (M rounded up to 8, 16, 32 or 64).
  auto m_read = [](int64_t m) -> int64_t { return 8 * small_token_tiles(static_cast<int>(m)); };
  if (auto e = check_pallas6_operands("the small-M GEMM", qx, sx, xsum, w, sw, y, kSmallMaxM, m_read); e.failure()) return e;
  const int64_t kp = qx.dimensions()[1], tiles = w.dimensions()[0], groups = w.dimensions()[1];
  const int64_t n = tiles * kGemvTileRows, m = y->dimensions()[0];
  const int kt = tiles_per_block;
  if ((kt != 1 && kt != 2 && kt != 4) || kt > small_max_tiles_per_block(static_cast<int>(m)) || tiles % kt)
    return ffi::Error::InvalidArgument("tiles_per_block=" + std::to_string(kt) + " must be 1, 2 or 4, at most " + std::to_string(small_max_tiles_per_block(static_cast<int>(m))) + " at M = " + std::to_string(m) + ", and divide the " + std::to_string(tiles) + " row tiles");
  if (m == 0 || n == 0) return ffi::Error::Success();
  launch_gemm_small_pallas6(stream, qx.typed_data(), sx.typed_data(), xsum.typed_data(), w.typed_data(),
                            reinterpret_cast<const __half*>(sw.typed_data()), reinterpret_cast<typename GemvOut<kOut>::T*>(y->typed_data()),
                            static_cast<int>(m), static_cast<int>(n), static_cast<int>(groups), static_cast<int>(kp), kt);
  return last_cuda_error("flexq_gemm_small_pallas6 launch");
}

ffi::Error GemmSmallBf16(cudaStream_t s, ffi::Buffer<ffi::S8> a, ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::S32> c,
                         ffi::Buffer<ffi::U8> d, ffi::Buffer<ffi::F16> e, ffi::ResultBuffer<ffi::BF16> y, int32_t kt) {
  return GemmSmallImpl<ffi::BF16>(s, a, b, c, d, e, y, kt);
}
ffi::Error GemmSmallF32(cudaStream_t s, ffi::Buffer<ffi::S8> a, ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::S32> c,
                        ffi::Buffer<ffi::U8> d, ffi::Buffer<ffi::F16> e, ffi::ResultBuffer<ffi::F32> y, int32_t kt) {
  return GemmSmallImpl<ffi::F32>(s, a, b, c, d, e, y, kt);
}

}  // namespace flexq

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlexqBmmaActQuant, flexq::ActQuantImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // x [M, K]
                                  .Ret<ffi::Buffer<ffi::U32>>()   // planes [a_bits, M, 4 * padded groups] ("bitplanes_g4")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // scales [M, Kp/128]
                                  .Attr<int32_t>("a_bits"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlexqBmmaGemm, flexq::GemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()  // activation planes [a_bits, M, 4 * padded groups]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // activation scales [M, Kp/128]
                                  .Arg<ffi::Buffer<ffi::U32>>()  // weight planes [6, N, 4 * padded groups]
                                  .Arg<ffi::Buffer<ffi::F16>>()  // weight scales [N, Kp/128]
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // y [M, N]
                                  .Attr<int32_t>("a_bits")
                                  .Attr<int32_t>("k")
                                  .Attr<int32_t>("m1_rows"));  // 0: M = 1 on bmma_decode_kernel; 1-4: bmma_decode_m1_kernel variants

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlexqGemvPallas6Bf16, flexq::GemvBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()   // q_x [Mp, Kp], phase-major within groups
                                  .Arg<ffi::Buffer<ffi::F32>>()  // s_x [Mp, G]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // sum(q_x) [Mp, G]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // "pallas6" weights [N/16, G, 3, 16, 32]
                                  .Arg<ffi::Buffer<ffi::F16>>()  // w_scales [N, G]
                                  .Ret<ffi::Buffer<ffi::BF16>>());  // y [M, N]

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlexqGemvPallas6F32, flexq::GemvF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()   // q_x [Mp, Kp], phase-major within groups
                                  .Arg<ffi::Buffer<ffi::F32>>()  // s_x [Mp, G]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // sum(q_x) [Mp, G]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // "pallas6" weights [N/16, G, 3, 16, 32]
                                  .Arg<ffi::Buffer<ffi::F16>>()  // w_scales [N, G]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y [M, N]

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlexqGemvPallas6XqBf16, flexq::GemvXqBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // x [M, K], quantized inside (a_bits)
                                  .Arg<ffi::Buffer<ffi::U8>>()   // "pallas6" weights [N/16, G, 3, 16, 32]
                                  .Arg<ffi::Buffer<ffi::F16>>()  // w_scales [N, G]
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // y [M, N]
                                  .Attr<int32_t>("a_bits")
                                  .Attr<int32_t>("unroll")
                                  .Attr<int32_t>("warps")
                                  .Attr<int32_t>("pdl")
                                  .Attr<int32_t>("ring"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlexqGemvPallas6XqF32, flexq::GemvXqF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, K], quantized inside (a_bits)
                                  .Arg<ffi::Buffer<ffi::U8>>()   // "pallas6" weights [N/16, G, 3, 16, 32]
                                  .Arg<ffi::Buffer<ffi::F16>>()  // w_scales [N, G]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [M, N]
                                  .Attr<int32_t>("a_bits")
                                  .Attr<int32_t>("unroll")
                                  .Attr<int32_t>("warps")
                                  .Attr<int32_t>("pdl")
                                  .Attr<int32_t>("ring"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlexqGemvPallas6FusedBf16, flexq::GemvFusedBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // x [M, K] (SwiGLU: [M, 2K]), quantized inside
                                  .Arg<ffi::Buffer<ffi::U8>>()   // "pallas6" weights [N/16, G, 3, 16, 32]
                                  .Arg<ffi::Buffer<ffi::F16>>()  // w_scales [N, G]
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // the norm's weight [K], or [0]
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // residual [M, N], or [0]
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // y [M, N]
                                  .Attr<int32_t>("a_bits")
                                  .Attr<int32_t>("prologue")
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlexqGemvPallas6FusedF32, flexq::GemvFusedF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, K] (SwiGLU: [M, 2K]), quantized inside
                                  .Arg<ffi::Buffer<ffi::U8>>()   // "pallas6" weights [N/16, G, 3, 16, 32]
                                  .Arg<ffi::Buffer<ffi::F16>>()  // w_scales [N, G]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // the norm's weight [K], or [0]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // residual [M, N], or [0]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [M, N]
                                  .Attr<int32_t>("a_bits")
                                  .Attr<int32_t>("prologue")
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlexqGemmSmallPallas6Bf16, flexq::GemmSmallBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()   // q_x [Mp, Kp], phase-major within groups
                                  .Arg<ffi::Buffer<ffi::F32>>()  // s_x [Mp, G]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // sum(q_x) [Mp, G]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // "pallas6" weights [N/16, G, 3, 16, 32]
                                  .Arg<ffi::Buffer<ffi::F16>>()  // w_scales [N, G]
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // y [M, N]
                                  .Attr<int32_t>("tiles_per_block"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlexqGemmSmallPallas6F32, flexq::GemmSmallF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()   // q_x [Mp, Kp], phase-major within groups
                                  .Arg<ffi::Buffer<ffi::F32>>()  // s_x [Mp, G]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // sum(q_x) [Mp, G]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // "pallas6" weights [N/16, G, 3, 16, 32]
                                  .Arg<ffi::Buffer<ffi::F16>>()  // w_scales [N, G]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [M, N]
                                  .Attr<int32_t>("tiles_per_block"));
