// Decode GEMV on CUDA cores for "pallas6" weights: y[m, n] = sum_g s_x[m,g] s_w[n,g] * (exact int32
// sum over group g of q_x q_w), for M <= 8 token rows. Not yet run on a GPU (written 2026-12-01);
// flexq_jax/cuda/gemv.py's `gemv_plan` restates its arithmetic lane by lane in numpy, tested on CPU.
//
// Operands (the ones the Pallas GEMV reads, pallas_kernels/w6a_matmul.py; so the Pallas prefill
// kernels and this one share one stored copy of the weights):
//   qx    int8  [Mp, Kp]   q_x, phase-major within each group: byte 32p + t of a group = k 4t + p
//   sx    f32   [Mp, G]    s_x
//   xsum  int32 [Mp, G]    sum of q_x over each group
//   w     uint8 [N/16, G, 3, 16, 32]  "pallas6": u = q_w + 32; plane 0 byte t = lo(4t) | lo(4t+1) << 4,
//                          plane 1 = lo(4t+2) | lo(4t+3) << 4, plane 2 = hi(4t + p) at bits 2p (p = 0..3)
//   sw    f16   [N, G]     s_w
//
// Work: a block owns one 16-row tile of N and all of K; its kWarps warps take the groups in turn
// (warp w: groups w, w + kWarps, ...), kUnroll groups at a time with all their weight loads issued
// first. A warp reads a tile-group (1536 bytes) as three coalesced 512-byte plane loads: lane l
// gets 16 bytes of each plane, row r = l / 2, bytes 16h .. 16h + 15 (h = l % 2), i.e. words j = 4h ..
// 4h + 3 of the row's 8 words a plane. Word j of phase p unpacks to the four u bytes of k = 4(4j + i)
// + p (i = 0..3), which meet q_x word (p, j) = bytes 32p + 4j .. of the group in one dp4a (u <= 63 is
// a non-negative signed byte). The two lanes of a row add their sums (shuffle): the exact group
// sum of u q_x; minus 32 sum(q_x) it is sum q_w q_x, scaled by s_x s_w into an fp32 accumulator
// per token row. At the end the warps' accumulators meet in shared memory and are added in warp
// order (deterministic; no split-K partial sums in global memory, no second kernel).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "act_quant.cuh"

namespace flexq {

constexpr int kGemvTileRows = 16;                                    // "pallas6" rows of one tile
constexpr int kGemvPlaneBytes = 32;                                  // one plane of a row and group
constexpr int kGemvPlaneTileBytes = kGemvTileRows * kGemvPlaneBytes;  // 512
constexpr int kGemvTileGroupBytes = 3 * kGemvPlaneTileBytes;         // 1536
constexpr int kGemvOffset = 32;                                      // stored u = q + 32
constexpr int kGemvGroup = 128;
constexpr int kGemvWarps = 8;
constexpr int kGemvUnroll = 2;
constexpr int kGemvMaxM = 8;

// The four u bytes of phase p from a word of lo bytes (plane 0 for p < 2, plane 1 otherwise) and
// the word of hi bytes at the same t. Every step stays inside its byte.
__device__ __forceinline__ uint32_t gemv_unpack(uint32_t lo, uint32_t hi, int p) {
  const uint32_t lo4 = ((p & 1) ? (lo >> 4) : lo) & 0x0F0F0F0Fu;
  const uint32_t hi2 = ((hi >> (2 * p)) & 0x03030303u) << 4;
  return lo4 | hi2;
}

// Programmatic dependent launch (sm_90): wait until the grids this one depends on have finished and
// their writes are visible. A no-op when the kernel was launched without the PDL attribute (or when
// they have already finished), so the kernel always calls it before its first read of x and its first
// write of y; with PDL its blocks start while the previous kernel drains and load weights meanwhile.
__device__ __forceinline__ void gemv_wait_prerequisites() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void gemv_store(float v, __nv_bfloat16* p) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void gemv_store(float v, float* p) { *p = v; }

// The 16 u words (phase p, word j) of a lane's three 16-byte plane loads.
__device__ __forceinline__ void gemv_unpack_planes(const uint4 (&planes)[3], uint32_t (&uw)[4][4]) {
  const uint32_t lo01[4] = {planes[0].x, planes[0].y, planes[0].z, planes[0].w};
  const uint32_t lo23[4] = {planes[1].x, planes[1].y, planes[1].z, planes[1].w};
  const uint32_t hi[4] = {planes[2].x, planes[2].y, planes[2].z, planes[2].w};
#pragma unroll
  for (int p = 0; p < 4; ++p)
#pragma unroll
    for (int j = 0; j < 4; ++j) uw[p][j] = gemv_unpack(p < 2 ? lo01[j] : lo23[j], hi[j], p);
}

// The exact group sum of u q_x for the lane's row: dp4a over its 16 words with the phase-major q_x
// words at xg + 32p (xg = the group's q_x + 16h, global or shared memory), then the row's two lanes.
__device__ __forceinline__ int gemv_group_dot(const uint32_t (&uw)[4][4], const int8_t* xg) {
  int dot = 0;
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const uint4 xv = *reinterpret_cast<const uint4*>(xg + 32 * p);
    dot = __dp4a(static_cast<int>(uw[p][0]), static_cast<int>(xv.x), dot);
    dot = __dp4a(static_cast<int>(uw[p][1]), static_cast<int>(xv.y), dot);
    dot = __dp4a(static_cast<int>(uw[p][2]), static_cast<int>(xv.z), dot);
    dot = __dp4a(static_cast<int>(uw[p][3]), static_cast<int>(xv.w), dot);
  }
  return dot + __shfl_xor_sync(0xffffffffu, dot, 1);
}

// The warps' accumulators of a block added in warp order (shared memory), rows < m written.
template <int kM, int kWarps, typename OutT>
__device__ __forceinline__ void gemv_reduce_store(const float (&acc)[kM], OutT* __restrict__ y, int m, int n, int tile) {
  __shared__ float red[kWarps][kM][kGemvTileRows];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if ((lane & 1) == 0) {
#pragma unroll
    for (int i = 0; i < kM; ++i) red[warp][i][lane >> 1] = acc[i];
  }
  __syncthreads();
  for (int t = threadIdx.x; t < kM * kGemvTileRows; t += blockDim.x) {
    const int i = t / kGemvTileRows, rr = t % kGemvTileRows;
    if (i >= m) continue;
    float s = 0.f;
#pragma unroll
    for (int ww = 0; ww < kWarps; ++ww) s += red[ww][i][rr];
    gemv_store(s, y + static_cast<long>(i) * n + static_cast<long>(tile) * kGemvTileRows + rr);
  }
}

template <int kM, typename OutT>
__global__ void __launch_bounds__(32 * kGemvWarps)
gemv_pallas6_kernel(const int8_t* __restrict__ qx, const float* __restrict__ sx, const int32_t* __restrict__ xsum,
                    const uint8_t* __restrict__ w, const __half* __restrict__ sw, OutT* __restrict__ y,
                    int m, int n, int groups, int kp) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int tile = blockIdx.x;
  const int r = lane >> 1, h = lane & 1;
  const long row_n = static_cast<long>(tile) * kGemvTileRows + r;

  float acc[kM];
#pragma unroll
  for (int i = 0; i < kM; ++i) acc[i] = 0.f;

  const uint8_t* w_tile = w + static_cast<long>(tile) * groups * kGemvTileGroupBytes + lane * 16;
  for (int g0 = warp; g0 < groups; g0 += kGemvWarps * kGemvUnroll) {
    uint4 planes[kGemvUnroll][3];
#pragma unroll
    for (int u = 0; u < kGemvUnroll; ++u) {  // every load of the step first: bytes in flight
      const int g = g0 + u * kGemvWarps;
      if (g < groups) {
        const uint8_t* src = w_tile + static_cast<long>(g) * kGemvTileGroupBytes;
#pragma unroll
        for (int pl = 0; pl < 3; ++pl) planes[u][pl] = __ldg(reinterpret_cast<const uint4*>(src + pl * kGemvPlaneTileBytes));
      }
    }
#pragma unroll
    for (int u = 0; u < kGemvUnroll; ++u) {
      const int g = g0 + u * kGemvWarps;
      if (g >= groups) break;  // warp-uniform
      uint32_t uw[4][4];  // [phase][word]
      gemv_unpack_planes(planes[u], uw);
      const float s_w = __half2float(sw[row_n * groups + g]);
#pragma unroll
      for (int i = 0; i < kM; ++i) {
        const int dot = gemv_group_dot(uw, qx + static_cast<long>(i) * kp + static_cast<long>(g) * kGemvGroup + 16 * h);
        const long mg = static_cast<long>(i) * groups + g;
        const int exact = dot - kGemvOffset * xsum[mg];
        acc[i] += static_cast<float>(exact) * (sx[mg] * s_w);
      }
    }
  }

  gemv_reduce_store<kM, kGemvWarps>(acc, y, m, n, tile);
}

template <typename OutT>
void launch_gemv_pallas6(cudaStream_t stream, const int8_t* qx, const float* sx, const int32_t* xsum,
                         const uint8_t* w, const __half* sw, OutT* y, int m, int n, int groups, int kp) {
  const dim3 grid(n / kGemvTileRows), block(32 * kGemvWarps);
  if (m <= 1) {
    gemv_pallas6_kernel<1, OutT><<<grid, block, 0, stream>>>(qx, sx, xsum, w, sw, y, m, n, groups, kp);
  } else if (m <= 2) {
    gemv_pallas6_kernel<2, OutT><<<grid, block, 0, stream>>>(qx, sx, xsum, w, sw, y, m, n, groups, kp);
  } else if (m <= 4) {
    gemv_pallas6_kernel<4, OutT><<<grid, block, 0, stream>>>(qx, sx, xsum, w, sw, y, m, n, groups, kp);
  } else {
    gemv_pallas6_kernel<8, OutT><<<grid, block, 0, stream>>>(qx, sx, xsum, w, sw, y, m, n, groups, kp);
  }
}

// The same GEMV with the activation quantization inside (issue: a decode linear as one kernel):
// x bf16 or fp32 [M, K] in, y [M, N] out. Each warp quantizes the groups it takes, by the
// contract's rule (the steps of act_quant.cuh: s_x = max|x| / qmax with 9 low mantissa bits
// cleared, q = the integer nearest to the exact x / s_x, ties to even), into a per-warp
// shared-memory group in the phase-major order the dot reads (byte 32p + t = k 4t + p), and keeps
// s_x and sum(q_x) in registers. Every block quantizes all of x again (N / 16 times in all): cheap
// next to the weights at M <= 2, which is where a benchmark must show it pays.
__device__ __forceinline__ float gemv_load_x(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float gemv_load_x(const float* p) { return *p; }

// One token row's group quantized by the contract's rule (act_quant.cuh) across a warp: lane l holds
// v[e] = x[k = 128 g + 4 l + e] and writes q to dst[32 e + l] (the phase-major order the dot reads);
// returns sum(q) over the group (every lane) and s_x in `scale`.
template <int kQMax>
__device__ __forceinline__ int gemv_quantize_group(const float (&v)[4], int8_t* dst, int lane, float& scale) {
  float amax = 0.f;
#pragma unroll
  for (int e = 0; e < 4; ++e) amax = fmaxf(amax, fabsf(v[e]));
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  const float s = contract_scale<kQMax>(amax);
  const float sb = s > 0.f ? s : 1.f;
  const float inv = 1.0f / sb;
  int sum = 0;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int qi = contract_round<kQMax>(v[e], s, sb, inv);
    sum += qi;
    dst[32 * e + lane] = static_cast<int8_t>(qi);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  scale = s;
  return sum;
}

template <int kM, int kABits, int kUnroll, int kWarps, typename InT, typename OutT>
__global__ void __launch_bounds__(32 * kWarps)
gemv_pallas6_xq_kernel(const InT* __restrict__ x, const uint8_t* __restrict__ w, const __half* __restrict__ sw,
                       OutT* __restrict__ y, int m, int n, int k, int groups) {
  // kUnroll: groups a warp has in flight. Each step issues the weight loads and the x loads of its
  // kUnroll groups (g0, g0 + kWarps, ...) first, then quantizes and dots them in turn: the same groups
  // per warp, in the same order, as kUnroll = 1 (same sums), with fewer dependent memory round trips.
  // kWarps: warps of a block (8, 16, 32). More warps give each fewer groups of a layer's K: more of a
  // narrow layer's weights in flight at once (N = 4096 is 256 blocks for 132 SMs); the fp32 sums are
  // then added in another order (gemv_plan's `warps`).
  constexpr int kQMax = (1 << (kABits - 1)) - 1;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int tile = blockIdx.x;
  const int r = lane >> 1, h = lane & 1;
  const long row_n = static_cast<long>(tile) * kGemvTileRows + r;
  __shared__ __align__(16) int8_t xq[kWarps][kM][kGemvGroup];

  float acc[kM];
#pragma unroll
  for (int i = 0; i < kM; ++i) acc[i] = 0.f;

  const uint8_t* w_tile = w + static_cast<long>(tile) * groups * kGemvTileGroupBytes + lane * 16;
  bool waited = false;
  for (int g0 = warp; g0 < groups; g0 += kWarps * kUnroll) {
    uint4 planes[kUnroll][3];
    float v[kUnroll][kM][4];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // every load of the step first: bytes in flight
      const int g = g0 + u * kWarps;
      if (g < groups) {
        const uint8_t* src = w_tile + static_cast<long>(g) * kGemvTileGroupBytes;
#pragma unroll
        for (int pl = 0; pl < 3; ++pl) planes[u][pl] = __ldg(reinterpret_cast<const uint4*>(src + pl * kGemvPlaneTileBytes));
      }
    }
    if (!waited) {  // the weights are parameters; x is the previous kernel's output
      gemv_wait_prerequisites();
      waited = true;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int g = g0 + u * kWarps;
#pragma unroll
      for (int i = 0; i < kM; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) {  // lane l holds k = 128g + 4l + e: phase e, t = l
          const int kk = g * kGemvGroup + 4 * lane + e;
          v[u][i][e] = (g < groups && i < m && kk < k) ? gemv_load_x(x + static_cast<long>(i) * k + kk) : 0.f;
        }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int g = g0 + u * kWarps;
      if (g >= groups) break;  // warp-uniform
      // Quantize this group of every row (the contract's rule, act_quant.cuh).
      float s_x[kM];
      int q_sum[kM];
#pragma unroll
      for (int i = 0; i < kM; ++i) q_sum[i] = gemv_quantize_group<kQMax>(v[u][i], xq[warp][i], lane, s_x[i]);
      __syncwarp();
      uint32_t uw[4][4];
      gemv_unpack_planes(planes[u], uw);
      const float s_w = __half2float(sw[row_n * groups + g]);
#pragma unroll
      for (int i = 0; i < kM; ++i) {
        const int dot = gemv_group_dot(uw, &xq[warp][i][16 * h]);
        const int exact = dot - kGemvOffset * q_sum[i];
        acc[i] += static_cast<float>(exact) * (s_x[i] * s_w);
      }
      __syncwarp();  // the group's q_x is read by every lane before the next group overwrites it
    }
  }

  if (!waited) gemv_wait_prerequisites();  // a warp without groups: y may be memory the previous kernel reads
  gemv_reduce_store<kM, kWarps>(acc, y, m, n, tile);
}

// One GEMV launch, with programmatic dependent launch (pdl: the blocks may start before the previous
// kernel in the stream has finished; the kernel waits for it before reading x, see above) or without.
template <int kM, int kABits, int kUnroll, int kWarps, typename InT, typename OutT>
void launch_gemv_pallas6_xq_one(cudaStream_t stream, bool pdl, const InT* x, const uint8_t* w, const __half* sw,
                                OutT* y, int m, int n, int k, int groups) {
  if (!pdl) {  // the plain launch (what ran before PDL existed)
    gemv_pallas6_xq_kernel<kM, kABits, kUnroll, kWarps, InT, OutT>
        <<<dim3(n / kGemvTileRows), dim3(32 * kWarps), 0, stream>>>(x, w, sw, y, m, n, k, groups);
    return;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(n / kGemvTileRows);
  config.blockDim = dim3(32 * kWarps);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  cudaLaunchKernelEx(&config, gemv_pallas6_xq_kernel<kM, kABits, kUnroll, kWarps, InT, OutT>, x, w, sw, y, m, n, k,
                     groups);
}

template <int kABits, int kUnroll, int kWarps, typename InT, typename OutT>
void launch_gemv_pallas6_xq_unrolled(cudaStream_t stream, bool pdl, const InT* x, const uint8_t* w, const __half* sw,
                                     OutT* y, int m, int n, int k, int groups) {
  if (m <= 1) {
    launch_gemv_pallas6_xq_one<1, kABits, kUnroll, kWarps>(stream, pdl, x, w, sw, y, m, n, k, groups);
  } else if (m <= 2) {
    launch_gemv_pallas6_xq_one<2, kABits, kUnroll, kWarps>(stream, pdl, x, w, sw, y, m, n, k, groups);
  } else if (m <= 4) {
    launch_gemv_pallas6_xq_one<4, kABits, kUnroll, kWarps>(stream, pdl, x, w, sw, y, m, n, k, groups);
  } else {
    launch_gemv_pallas6_xq_one<8, kABits, kUnroll, kWarps>(stream, pdl, x, w, sw, y, m, n, k, groups);
  }
}

// unroll 2 / 4 at 8 warps a block only (they measured slower there: results/kernels/NOTES.md); 16 and 32 warps
// at unroll 1 (the FFI handler refuses other pairs).
template <int kABits, typename InT, typename OutT>
void launch_gemv_pallas6_xq_bits(cudaStream_t stream, const InT* x, const uint8_t* w, const __half* sw, OutT* y,
                                 int m, int n, int k, int groups, int unroll, int warps, bool pdl) {
  if (warps == 32) {
    launch_gemv_pallas6_xq_unrolled<kABits, 1, 32>(stream, pdl, x, w, sw, y, m, n, k, groups);
  } else if (warps == 16) {
    launch_gemv_pallas6_xq_unrolled<kABits, 1, 16>(stream, pdl, x, w, sw, y, m, n, k, groups);
  } else if (unroll == 4) {
    launch_gemv_pallas6_xq_unrolled<kABits, 4, kGemvWarps>(stream, pdl, x, w, sw, y, m, n, k, groups);
  } else if (unroll == 2) {
    launch_gemv_pallas6_xq_unrolled<kABits, 2, kGemvWarps>(stream, pdl, x, w, sw, y, m, n, k, groups);
  } else {
    launch_gemv_pallas6_xq_unrolled<kABits, 1, kGemvWarps>(stream, pdl, x, w, sw, y, m, n, k, groups);
  }
}

// ---------------------------------------------------------------------------------------------------
// The quantizer-inside GEMV with its weights streamed through a shared-memory ring (`ring` stages).
//
// Why (issue 14; results/e2e/h200-2026-12-02-e2e-profile-b16-b64.md): at M = 1 the kernel above reaches
// 45-64% of the HBM floor on the narrow layers, ~4 us over their bytes whatever their size. Each of its
// warps holds one group's weights (1.5 KB) in flight and then quantizes that group's x and dots it, so a
// 16-row tile's K is a chain of dependent round trips to memory (4 on K = 4096, 11 on 11008).
//
// Here a block first issues asynchronous copies (cp.async, sm_80+) of its tile's weights and weight
// scales for the first kRing stages (a stage: one group a warp, 12 KB; at K = 4096, kRing = 4 is the
// whole tile), then quantizes x once for the block into shared memory (the contract's rule, as above,
// while those bytes are on their way), then runs the stages: wait for the stage, every warp dots its group
// from shared memory, refill the slot with stage + kRing. Warp w still takes groups w, w + 8, ... in
// order, quantizes them by the same steps and adds in the same order, so the result is bit-identical
// to gemv_pallas6_xq_kernel at 8 warps, unroll 1 (a GPU test compares them, and both with gemv_plan).
// Shared memory: kRing * 12 KB + kM * Kp (q_x) + 8 kM G (s_x, sum) + 32 G (the tile's weight scales).
// Measured (H200, 2026-12-02, results/kernels/NOTES.md "Ring GEMV"): bit-identical in the GPU tests, but not
// faster: 7.1-7.9 vs 7.5 us on 7b.o, 15.4-16.0 vs 13.6 on 7b.qkv, decode 2.82 vs 2.58 ms a step. No table sets it.
constexpr int kRingWarps = 8;
constexpr int kRingStageBytes = kRingWarps * kGemvTileGroupBytes;  // 12288

__device__ __forceinline__ void ring_copy16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void ring_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void ring_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory"); }

inline size_t gemv_ring_smem_bytes(int ring, int rows, int groups) {
  return static_cast<size_t>(ring) * kRingStageBytes + static_cast<size_t>(rows) * groups * kGemvGroup +
         static_cast<size_t>(rows) * groups * 8 + static_cast<size_t>(groups) * kGemvTileRows * 2;
}

template <int kM, int kABits, int kRing, typename InT, typename OutT>
__global__ void __launch_bounds__(32 * kRingWarps)
gemv_pallas6_ring_kernel(const InT* __restrict__ x, const uint8_t* __restrict__ w, const __half* __restrict__ sw,
                         OutT* __restrict__ y, int m, int n, int k, int groups) {
  constexpr int kQMax = (1 << (kABits - 1)) - 1;
  extern __shared__ __align__(16) uint8_t ring_smem[];
  // Every cp.async destination and uint4 read below is 16-byte aligned: 12288 and 32 G are multiples of 16.
  uint8_t* ring = ring_smem;                                                                // [kRing][12288]
  __half* sws = reinterpret_cast<__half*>(ring_smem + kRing * kRingStageBytes);            // [16][G]
  int8_t* xq = reinterpret_cast<int8_t*>(sws + kGemvTileRows * groups);                    // [kM][G * 128]
  float* sxs = reinterpret_cast<float*>(xq + kM * groups * kGemvGroup);                     // [kM][G]
  int* qsums = reinterpret_cast<int*>(sxs + kM * groups);                                   // [kM][G]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tile = blockIdx.x;
  const int r = lane >> 1, h = lane & 1;
  const int kp = groups * kGemvGroup;
  const uint8_t* w_tile = w + static_cast<long>(tile) * groups * kGemvTileGroupBytes;
  const int tile_bytes = groups * kGemvTileGroupBytes;
  const int stages = (groups + kRingWarps - 1) / kRingWarps;

  auto issue = [&](int s) {  // stage s into slot s % kRing; one commit group a stage, empty or not
    if (s < stages) {
      const int base = s * kRingStageBytes;
      const int bytes = min(kRingStageBytes, tile_bytes - base);  // whole groups: a multiple of 16
      uint8_t* dst = ring + (s % kRing) * kRingStageBytes;
      for (int off = tid * 16; off < bytes; off += 32 * kRingWarps * 16) ring_copy16(dst + off, w_tile + base + off);
    }
    ring_commit();
  };
  // x quantized once for the block: warp w takes groups w, w + 8, ..., 4 at a time with their loads first.
  // The first 4 groups' x loads go out before the weight copies, so they do not queue behind the tile's bytes.
  float v[4][kM][4];
  auto load_x = [&](int g0) {
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int i = 0; i < kM; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) {  // lane l holds k = 128 g + 4 l + e: phase e, t = l
          const int g = g0 + u * kRingWarps, kk = g * kGemvGroup + 4 * lane + e;
          v[u][i][e] = (g < groups && i < m && kk < k) ? gemv_load_x(x + static_cast<long>(i) * k + kk) : 0.f;
        }
  };
  gemv_wait_prerequisites();  // x is the previous kernel's output (a no-op without PDL)
  load_x(warp);
  {  // the tile's weight scales (16 rows x G fp16, contiguous, 32 G bytes) ride with stage 0
    const uint8_t* src = reinterpret_cast<const uint8_t*>(sw + static_cast<long>(tile) * kGemvTileRows * groups);
    for (int off = tid * 16; off < 32 * groups; off += 32 * kRingWarps * 16)
      ring_copy16(reinterpret_cast<uint8_t*>(sws) + off, src + off);
  }
#pragma unroll
  for (int s = 0; s < kRing; ++s) issue(s);

  for (int g0 = warp; g0 < groups; g0 += 4 * kRingWarps) {
    if (g0 != warp) load_x(g0);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int g = g0 + u * kRingWarps;
      if (g >= groups) break;  // warp-uniform
#pragma unroll
      for (int i = 0; i < kM; ++i) {
        float s;
        const int sum = gemv_quantize_group<kQMax>(v[u][i], xq + i * kp + g * kGemvGroup, lane, s);
        if (lane == 0) {
          sxs[i * groups + g] = s;
          qsums[i * groups + g] = sum;
        }
      }
    }
  }

  float acc[kM];
#pragma unroll
  for (int i = 0; i < kM; ++i) acc[i] = 0.f;
  for (int s = 0; s < stages; ++s) {
    ring_wait<kRing - 1>();  // this thread's copies of stage s (and of the scales) have landed
    __syncthreads();         // everyone's; at s = 0 also the quantized x
    const int g = s * kRingWarps + warp;
    if (g < groups) {
      const uint8_t* src = ring + (s % kRing) * kRingStageBytes + warp * kGemvTileGroupBytes + lane * 16;
      uint4 planes[3];
#pragma unroll
      for (int pl = 0; pl < 3; ++pl) planes[pl] = *reinterpret_cast<const uint4*>(src + pl * kGemvPlaneTileBytes);
      uint32_t uw[4][4];
      gemv_unpack_planes(planes, uw);
      const float s_w = __half2float(sws[r * groups + g]);
#pragma unroll
      for (int i = 0; i < kM; ++i) {
        const int dot = gemv_group_dot(uw, xq + i * kp + g * kGemvGroup + 16 * h);
        const int exact = dot - kGemvOffset * qsums[i * groups + g];
        acc[i] += static_cast<float>(exact) * (sxs[i * groups + g] * s_w);
      }
    }
    __syncthreads();  // slot s % kRing read by every warp
    issue(s + kRing);
  }
  ring_wait<0>();
  gemv_reduce_store<kM, kRingWarps>(acc, y, m, n, tile);
}

template <int kM, int kABits, int kRing, typename InT, typename OutT>
cudaError_t launch_gemv_pallas6_ring_one(cudaStream_t stream, bool pdl, const InT* x, const uint8_t* w,
                                         const __half* sw, OutT* y, int m, int n, int k, int groups) {
  auto* kernel = gemv_pallas6_ring_kernel<kM, kABits, kRing, InT, OutT>;
  const size_t smem = gemv_ring_smem_bytes(kRing, kM, groups);
  // More than 48 KB of dynamic shared memory needs an opt-in, which must leave room for the kernel's static
  // shared memory (the warps' sums): raised to what a launch asks for, once per size and kernel.
  static size_t opted_in = 48 * 1024;
  if (smem > opted_in) {
    if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
        e != cudaSuccess)
      return e;
    opted_in = smem;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(n / kGemvTileRows);
  config.blockDim = dim3(32 * kRingWarps);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, x, w, sw, y, m, n, k, groups);
}

template <int kABits, int kRing, typename InT, typename OutT>
cudaError_t launch_gemv_pallas6_ring_rows(cudaStream_t stream, bool pdl, const InT* x, const uint8_t* w,
                                          const __half* sw, OutT* y, int m, int n, int k, int groups) {
  if (m <= 1) return launch_gemv_pallas6_ring_one<1, kABits, kRing>(stream, pdl, x, w, sw, y, m, n, k, groups);
  return launch_gemv_pallas6_ring_one<2, kABits, kRing>(stream, pdl, x, w, sw, y, m, n, k, groups);
}

// ring: 2, 4 or 8 stages in flight; m <= kGemvRingMaxM (the FFI handler checks both).
constexpr int kGemvRingMaxM = 2;
template <typename InT, typename OutT>
cudaError_t launch_gemv_pallas6_ring(cudaStream_t stream, const InT* x, const uint8_t* w, const __half* sw, OutT* y,
                                     int m, int n, int k, int groups, int a_bits, int ring, bool pdl) {
#define FLEXQ_RING(BITS, STAGES) \
  if (a_bits == BITS && ring == STAGES) \
    return launch_gemv_pallas6_ring_rows<BITS, STAGES>(stream, pdl, x, w, sw, y, m, n, k, groups);
  FLEXQ_RING(6, 2) FLEXQ_RING(6, 4) FLEXQ_RING(6, 8) FLEXQ_RING(8, 2) FLEXQ_RING(8, 4) FLEXQ_RING(8, 8)
#undef FLEXQ_RING
  return cudaErrorInvalidValue;
}

// ---------------------------------------------------------------------------------------------------
// The quantizer-inside GEMV with its producer and its consumer folded in (issue 14 item 1 at batch 1).
//
// Why: at M = 1 a LLaMA layer's four GEMVs are ~60% of a decode step's kernel time and the small XLA kernels
// around them (the residual adds, the two RMSNorms, SwiGLU) are launches of ~2 us each that move almost no
// bytes (results/e2e/NOTES.md, "Glue and ragged splits"). Here the GEMV computes its input from what the
// model's producer would have read, and adds the residual in its store:
//   prologue kFuseNorm:   x = rms_norm(h, gamma, eps) (models/llama.py rms_norm: fp32 sum of squares over the
//                         row, h * rsqrt(mean + eps) rounded to x's dtype, times gamma rounded again); every block
//                         forms the row's sum of squares itself (its 256 threads stride over the row; K = 4096
//                         bf16: 8 KB from L2), after its first groups' weights are in flight: no extra kernel;
//   prologue kFuseSwiglu: x = silu(gate) * up from the fused gate/up output [M, 2K] (gate first), rounded as
//                         pallas_kernels/w6a_matmul.py _swiglu rounds it;
//   residual:             y = residual + (x @ W) with x @ W rounded to y's dtype first: what XLA's add of the
//                         two tensors gives.
// The arithmetic after the prologue is gemv_pallas6_xq_kernel's at 8 warps, unroll 1 (same groups per warp,
// same order, same quantizer), so with the plain prologue and no residual the two are bit-identical (a GPU
// test checks it). The norm's sum of squares is added in another order than XLA's reduction, so its rsqrt
// may differ in the last bit and move a rounding of x now and then (the GPU tests bound it).
constexpr int kFusePlain = 0, kFuseNorm = 1, kFuseSwiglu = 2;

struct GemvFuse {
  const void* gamma;     // kFuseNorm: the norm's weight [K], x's dtype
  const void* residual;  // non-null: [M, N] of y's dtype, added in the store
  float eps;             // kFuseNorm: the norm's epsilon
  int prologue;          // kFusePlain, kFuseNorm or kFuseSwiglu
};

__device__ __forceinline__ float gemv_round(float v, const __nv_bfloat16*) { return __bfloat162float(__float2bfloat16_rn(v)); }
__device__ __forceinline__ float gemv_round(float v, const float*) { return v; }

// This thread's share of sum(v * v) over a row: 16-byte loads, the block's 256 threads striding over the row
// (chunk c of 8 bf16 to thread c mod 256); the caller adds the shares.
__device__ __forceinline__ float gemv_sum_squares_part(const __nv_bfloat16* row, int k) {
  float s = 0.f;
  if ((k & 7) == 0 && (reinterpret_cast<uintptr_t>(row) & 15) == 0) {
    const uint4* p = reinterpret_cast<const uint4*>(row);
#pragma unroll 2
    for (int c = threadIdx.x; c < k / 8; c += blockDim.x) {
      const uint4 u = __ldg(p + c);
      const __nv_bfloat162* b = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 f = __bfloat1622float2(b[j]);
        s += f.x * f.x;
        s += f.y * f.y;
      }
    }
  } else {
    for (int kk = threadIdx.x; kk < k; kk += blockDim.x) {
      const float v = __bfloat162float(row[kk]);
      s += v * v;
    }
  }
  return s;
}
__device__ __forceinline__ float gemv_sum_squares_part(const float* row, int k) {
  float s = 0.f;
  for (int kk = threadIdx.x; kk < k; kk += blockDim.x) s += row[kk] * row[kk];
  return s;
}

// 1 / rms of each of the block's rows (every thread gets the same numbers): the threads' shares, added across a
// warp by a butterfly and across the warps in shared memory in warp order.
template <int kM, typename InT>
__device__ __forceinline__ void gemv_row_rstd(const InT* __restrict__ x, int m, int k, float eps, float (&rstd)[kM]) {
  __shared__ float part[kGemvWarps][kM];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < kM; ++i) {
    float s = i < m ? gemv_sum_squares_part(x + static_cast<long>(i) * k, k) : 0.f;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) part[warp][i] = s;
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kM; ++i) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kGemvWarps; ++w) s += part[w][i];
    rstd[i] = rsqrtf(s / static_cast<float>(k) + eps);
  }
}

// Group g of row i of the GEMV's input as lane `lane` holds it (k = 128g + 4 lane + e, zero past K and M), formed
// by the prologue: every load of the group first, then the arithmetic (no branch between them).
template <int kPro, int kM, typename InT>
__device__ __forceinline__ void gemv_fused_group(const InT* __restrict__ x, const GemvFuse& f, const float (&rstd)[kM],
                                                 int g, int lane, int m, int k, float (&v)[kM][4]) {
  const InT* tag = nullptr;  // selects gemv_round's dtype
  const int k0 = g * kGemvGroup + 4 * lane;
  const long stride = kPro == kFuseSwiglu ? 2L * k : k;
  float a[kM][4], b[kM][4], gm[4];
#pragma unroll
  for (int i = 0; i < kM; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const bool in = i < m && k0 + e < k;
      a[i][e] = in ? gemv_load_x(x + i * stride + k0 + e) : 0.f;
      b[i][e] = (kPro == kFuseSwiglu && in) ? gemv_load_x(x + i * stride + k + k0 + e) : 0.f;
    }
  if (kPro == kFuseNorm) {
#pragma unroll
    for (int e = 0; e < 4; ++e) gm[e] = k0 + e < k ? gemv_load_x(static_cast<const InT*>(f.gamma) + k0 + e) : 0.f;
  }
#pragma unroll
  for (int i = 0; i < kM; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (kPro == kFuseSwiglu) {
        const float sig = gemv_round(1.0f / gemv_round(gemv_round(expf(-a[i][e]), tag) + 1.0f, tag), tag);
        v[i][e] = gemv_round(gemv_round(a[i][e] * sig, tag) * b[i][e], tag);
      } else if (kPro == kFuseNorm) {
        v[i][e] = gemv_round(gm[e] * gemv_round(a[i][e] * rstd[i], tag), tag);
      } else {
        v[i][e] = a[i][e];
      }
    }
}

template <int kM, int kABits, int kPro, typename InT, typename OutT>
__global__ void __launch_bounds__(32 * kGemvWarps)
gemv_pallas6_fused_kernel(const InT* __restrict__ x, const uint8_t* __restrict__ w, const __half* __restrict__ sw,
                          OutT* __restrict__ y, int m, int n, int k, int groups, GemvFuse fuse) {
  constexpr int kQMax = (1 << (kABits - 1)) - 1;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int tile = blockIdx.x;
  const int r = lane >> 1, h = lane & 1;
  const long row_n = static_cast<long>(tile) * kGemvTileRows + r;
  __shared__ __align__(16) int8_t xq[kGemvWarps][kM][kGemvGroup];

  float acc[kM];
#pragma unroll
  for (int i = 0; i < kM; ++i) acc[i] = 0.f;

  const uint8_t* w_tile = w + static_cast<long>(tile) * groups * kGemvTileGroupBytes + lane * 16;
  uint4 planes[3];
  auto load = [&](int g) {
    const uint8_t* src = w_tile + static_cast<long>(g) * kGemvTileGroupBytes;
#pragma unroll
    for (int pl = 0; pl < 3; ++pl) planes[pl] = __ldg(reinterpret_cast<const uint4*>(src + pl * kGemvPlaneTileBytes));
  };
  if (warp < groups) load(warp);  // the first group's weights in flight while the norm's sums are formed
  float rstd[kM];
  if (kPro == kFuseNorm) {
    gemv_row_rstd<kM>(x, m, k, fuse.eps, rstd);
  } else {
#pragma unroll
    for (int i = 0; i < kM; ++i) rstd[i] = 1.f;
  }
  for (int g = warp; g < groups; g += kGemvWarps) {
    if (g != warp) load(g);
    float v[kM][4];
    gemv_fused_group<kPro, kM>(x, fuse, rstd, g, lane, m, k, v);
    float s_x[kM];
    int q_sum[kM];
#pragma unroll
    for (int i = 0; i < kM; ++i) q_sum[i] = gemv_quantize_group<kQMax>(v[i], xq[warp][i], lane, s_x[i]);
    __syncwarp();
    uint32_t uw[4][4];
    gemv_unpack_planes(planes, uw);
    const float s_w = __half2float(sw[row_n * groups + g]);
#pragma unroll
    for (int i = 0; i < kM; ++i) {
      const int dot = gemv_group_dot(uw, &xq[warp][i][16 * h]);
      const int exact = dot - kGemvOffset * q_sum[i];
      acc[i] += static_cast<float>(exact) * (s_x[i] * s_w);
    }
    __syncwarp();
  }

  // gemv_reduce_store's order, then the residual added to the rounded product.
  __shared__ float red[kGemvWarps][kM][kGemvTileRows];
  if ((lane & 1) == 0) {
#pragma unroll
    for (int i = 0; i < kM; ++i) red[warp][i][lane >> 1] = acc[i];
  }
  __syncthreads();
  const OutT* res = static_cast<const OutT*>(fuse.residual);
  for (int t = threadIdx.x; t < kM * kGemvTileRows; t += blockDim.x) {
    const int i = t / kGemvTileRows, rr = t % kGemvTileRows;
    if (i >= m) continue;
    float s = 0.f;
#pragma unroll
    for (int ww = 0; ww < kGemvWarps; ++ww) s += red[ww][i][rr];
    const long at = static_cast<long>(i) * n + static_cast<long>(tile) * kGemvTileRows + rr;
    if (res != nullptr) s = gemv_load_x(res + at) + gemv_round(s, res);
    gemv_store(s, y + at);
  }
}

constexpr int kGemvFusedMaxM = 2;  // rows the fused GEMV takes (the decode steps of batch 1 and 2)

template <int kABits, int kPro, typename InT, typename OutT>
void launch_gemv_pallas6_fused_pro(cudaStream_t stream, const InT* x, const uint8_t* w, const __half* sw, OutT* y,
                                   int m, int n, int k, int groups, const GemvFuse& fuse) {
  const dim3 grid(n / kGemvTileRows), block(32 * kGemvWarps);
  if (m <= 1) {
    gemv_pallas6_fused_kernel<1, kABits, kPro, InT, OutT><<<grid, block, 0, stream>>>(x, w, sw, y, m, n, k, groups, fuse);
  } else {
    gemv_pallas6_fused_kernel<2, kABits, kPro, InT, OutT><<<grid, block, 0, stream>>>(x, w, sw, y, m, n, k, groups, fuse);
  }
}

// k: the GEMV's K (x has 2k columns with kFuseSwiglu); m <= kGemvFusedMaxM (the FFI handler checks).
template <typename InT, typename OutT>
void launch_gemv_pallas6_fused(cudaStream_t stream, const InT* x, const uint8_t* w, const __half* sw, OutT* y, int m,
                               int n, int k, int groups, int a_bits, const GemvFuse& fuse) {
#define FLEXQ_FUSED(BITS, PRO) \
  if (a_bits == BITS && fuse.prologue == PRO) \
    return launch_gemv_pallas6_fused_pro<BITS, PRO>(stream, x, w, sw, y, m, n, k, groups, fuse);
  FLEXQ_FUSED(6, kFusePlain) FLEXQ_FUSED(6, kFuseNorm) FLEXQ_FUSED(6, kFuseSwiglu)
  FLEXQ_FUSED(8, kFusePlain) FLEXQ_FUSED(8, kFuseNorm) FLEXQ_FUSED(8, kFuseSwiglu)
#undef FLEXQ_FUSED
}

template <typename InT, typename OutT>
void launch_gemv_pallas6_xq(cudaStream_t stream, const InT* x, const uint8_t* w, const __half* sw, OutT* y, int m,
                            int n, int k, int groups, int a_bits, int unroll, int warps, bool pdl) {
  if (a_bits == 6) {
    launch_gemv_pallas6_xq_bits<6>(stream, x, w, sw, y, m, n, k, groups, unroll, warps, pdl);
  } else {
    launch_gemv_pallas6_xq_bits<8>(stream, x, w, sw, y, m, n, k, groups, unroll, warps, pdl);
  }
}

}  // namespace flexq
