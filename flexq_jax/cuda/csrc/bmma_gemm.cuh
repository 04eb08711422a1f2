// W6A6 / W6A8 GEMM on binary tensor cores.
//
//   y[m, n] = sum_g s_x[m, g] * s_w[n, g] * D_g[m, n],
//   D_g = sum_k q_x q_w over group g = sum_ij c_i c_j popc(X_i[m, g] AND W_j[n, g]),
//   c_i = 2^i, c_(b-1) = -2^(b-1) (two's complement planes).
//
// Planes come straight from global memory in the "bitplanes_g4" layout (uint32 [b, rows,
// words]; configs.h: word q of group g, bits k = 128g + 32q .. +31, sits at word_index(g, q),
// rows padded with zero words to whole blocks of 4 groups): for group g, lane (group r, quad q)
// of a warp reads word q of group g of row r, which is its m8n8k128 fragment as is
// (ptx_mma.cuh). Rows past M or N read as zero and are never stored.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "configs.h"
#include "ptx_mma.cuh"

namespace flexq {

// D_g for one 8x8 tile: Horner over both plane indices, top plane first, so every step
// multiplies the running sum by +-2 (-2 right after the negative top plane) and the MMA's
// accumulator input adds the next popcount. One int multiply per MMA, no table of c_i c_j.
template <int kABits, int kWBits>
__device__ __forceinline__ void group_dot(const uint32_t (&xf)[kABits], const uint32_t (&wf)[kWBits],
                                          int32_t (&out)[2]) {
#pragma unroll
  for (int i = kABits - 1; i >= 0; --i) {
    int32_t t[2] = {0, 0};
#pragma unroll
    for (int j = kWBits - 1; j >= 0; --j) {
      const int32_t mul = j == kWBits - 2 ? -2 : 2;
      const int32_t c[2] = {t[0] * mul, t[1] * mul};
      mma_b1_and_popc_m8n8k128(t, xf[i], wf[j], c);
    }
    if (i == kABits - 1) {
      out[0] = t[0];
      out[1] = t[1];
    } else {
      const int32_t mul = i == kABits - 2 ? -2 : 2;
      out[0] = out[0] * mul + t[0];
      out[1] = out[1] * mul + t[1];
    }
  }
}

// Word u of a 16-byte load (u a compile-time constant after unrolling).
__device__ __forceinline__ uint32_t component(const uint4& v, int u) {
  return u == 0 ? v.x : u == 1 ? v.y : u == 2 ? v.z : v.w;
}

template <int kABits, class Tile>
__global__ void __launch_bounds__(Tile::kThreads)
bmma_gemm_kernel(const uint32_t* __restrict__ x_planes,  // [kABits, M, x_words]  x_words = 4 * groups
                 const float* __restrict__ x_scales,     // [M, groups]
                 const uint32_t* __restrict__ w_planes,  // [kWeightBits, N, x_words]
                 const __half* __restrict__ w_scales,    // [N, groups]
                 __nv_bfloat16* __restrict__ y,          // [M, N]
                 int m, int n, int groups) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int lane_row = lane >> 2;  // fragment row (A) / column (B) of this lane
  const int lane_quad = lane & 3;  // which 32-bit word of the group
  const int row0 = blockIdx.y * Tile::kBlockM + (warp / Tile::kWarpsN) * Tile::kWarpM;
  const int col0 = blockIdx.x * Tile::kBlockN + (warp % Tile::kWarpsN) * Tile::kWarpN;
  const int x_words = kWordsPerGroup * padded_groups(groups);

  float acc[Tile::kMmaM][Tile::kMmaN][2] = {};
  for (int g = 0; g < groups; ++g) {
    const int word = word_index(g, lane_quad);
    uint32_t xf[Tile::kMmaM][kABits];
#pragma unroll
    for (int mi = 0; mi < Tile::kMmaM; ++mi) {
      const int r = row0 + mi * 8 + lane_row;
#pragma unroll
      for (int i = 0; i < kABits; ++i)
        xf[mi][i] = r < m ? __ldg(x_planes + (static_cast<long>(i) * m + r) * x_words + word) : 0u;
    }
    uint32_t wf[Tile::kMmaN][kWeightBits];
#pragma unroll
    for (int ni = 0; ni < Tile::kMmaN; ++ni) {
      const int c = col0 + ni * 8 + lane_row;
#pragma unroll
      for (int j = 0; j < kWeightBits; ++j)
        wf[ni][j] = c < n ? __ldg(w_planes + (static_cast<long>(j) * n + c) * x_words + word) : 0u;
    }
    // Output element e of a tile sits at (row lane_row, column 2 * lane_quad + e).
    float sx[Tile::kMmaM];
#pragma unroll
    for (int mi = 0; mi < Tile::kMmaM; ++mi) {
      const int r = row0 + mi * 8 + lane_row;
      sx[mi] = r < m ? x_scales[static_cast<long>(r) * groups + g] : 0.f;
    }
    float sw[Tile::kMmaN][2];
#pragma unroll
    for (int ni = 0; ni < Tile::kMmaN; ++ni)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = col0 + ni * 8 + 2 * lane_quad + e;
        sw[ni][e] = c < n ? __half2float(w_scales[static_cast<long>(c) * groups + g]) : 0.f;
      }
#pragma unroll
    for (int mi = 0; mi < Tile::kMmaM; ++mi)
#pragma unroll
      for (int ni = 0; ni < Tile::kMmaN; ++ni) {
        int32_t d[2];
        group_dot<kABits, kWeightBits>(xf[mi], wf[ni], d);
        // The group scale fused here: the integer sum is exact, then fp32 from here on.
#pragma unroll
        for (int e = 0; e < 2; ++e) acc[mi][ni][e] += (sx[mi] * sw[ni][e]) * static_cast<float>(d[e]);
      }
  }

#pragma unroll
  for (int mi = 0; mi < Tile::kMmaM; ++mi) {
    const int r = row0 + mi * 8 + lane_row;
    if (r >= m) continue;
#pragma unroll
    for (int ni = 0; ni < Tile::kMmaN; ++ni)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = col0 + ni * 8 + 2 * lane_quad + e;
        if (c < n) y[static_cast<long>(r) * n + c] = __float2bfloat16_rn(acc[mi][ni][e]);
      }
  }
}

// The scales of a decode step's kUnroll groups g0, g0 + 1, ...: s_x of one token row and s_w of
// the lane's two output channels c_first, c_first + 1 (an m8n8 accumulator's columns); groups past
// `groups`, a dead token row and channels past n read as zero.
template <int kUnroll>
__device__ __forceinline__ void load_step_scales(const float* x_scale_row, bool x_live, const __half* w_scales,
                                                 int groups, int g0, int n, int c_first, float (&sx)[kUnroll],
                                                 float (&sw)[kUnroll][2]) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int g = g0 + u;
    const bool live = g < groups;
    sx[u] = live && x_live ? __ldg(x_scale_row + g) : 0.f;
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int ce = c_first + e;
      sw[u][e] = live && ce < n ? __half2float(__ldg(w_scales + static_cast<long>(ce) * groups + g)) : 0.f;
    }
  }
}

// Decode, M <= 8: one m8 tile of tokens, a block of kSplit warps on 8 output channels. Warp w
// takes the blocks of kInterleave groups w, w + kSplit, ...; a step loads its block's planes
// with one 16-byte load a plane and lane (the lane's fragment word for all 4 groups: the
// "bitplanes_g4" interleave), 6 + kABits loads a lane in flight, before the 4 groups' MMA
// chains, which are independent. The warps' fp32 partial sums meet in shared memory, added in
// warp order.
template <int kABits, int kSplit>
__global__ void __launch_bounds__(32 * kSplit, kDecodeBlocksPerSM)
bmma_decode_kernel(const uint32_t* __restrict__ x_planes,  // [kABits, M, x_words]
                   const float* __restrict__ x_scales,     // [M, groups]
                   const uint32_t* __restrict__ w_planes,  // [kWeightBits, N, x_words]
                   const __half* __restrict__ w_scales,    // [N, groups]
                   __nv_bfloat16* __restrict__ y,          // [M, N], M <= 8
                   int m, int n, int groups) {
  constexpr int kUnroll = kInterleave;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int lane_row = lane >> 2;  // A: token row; B: output channel col0 + lane_row
  const int lane_quad = lane & 3;
  const int col0 = blockIdx.x * 8;
  const int c = col0 + lane_row;
  const bool row_live = lane_row < m, col_live = c < n;
  const int x_words = kWordsPerGroup * padded_groups(groups);

  float acc[2] = {0.f, 0.f};
  for (int g0 = warp * kUnroll; g0 < groups; g0 += kSplit * kUnroll) {
    // Padded rows hold whole blocks, so a block's 16 bytes are in bounds even past `groups`.
    const int word = kWordsPerBlock * (g0 / kInterleave) + kInterleave * lane_quad;
    uint4 xv[kABits], wv[kWeightBits];
#pragma unroll
    for (int i = 0; i < kABits; ++i)
      xv[i] = row_live ? __ldg(reinterpret_cast<const uint4*>(x_planes + (static_cast<long>(i) * m + lane_row) * x_words + word))
                       : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
    for (int j = 0; j < kWeightBits; ++j)
      wv[j] = col_live ? __ldg(reinterpret_cast<const uint4*>(w_planes + (static_cast<long>(j) * n + c) * x_words + word))
                       : make_uint4(0u, 0u, 0u, 0u);
    float sx[kUnroll], sw[kUnroll][2];
    load_step_scales(x_scales + static_cast<long>(lane_row) * groups, row_live, w_scales, groups, g0, n,
                     col0 + 2 * lane_quad, sx, sw);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      uint32_t xf[kABits], wf[kWeightBits];
#pragma unroll
      for (int i = 0; i < kABits; ++i) xf[i] = component(xv[i], u);
#pragma unroll
      for (int j = 0; j < kWeightBits; ++j) wf[j] = component(wv[j], u);
      int32_t d[2];
      group_dot<kABits, kWeightBits>(xf, wf, d);
#pragma unroll
      for (int e = 0; e < 2; ++e) acc[e] += (sx[u] * sw[u][e]) * static_cast<float>(d[e]);
    }
  }

  __shared__ float partial[kSplit][32][2];
  partial[warp][lane][0] = acc[0];
  partial[warp][lane][1] = acc[1];
  __syncthreads();
  if (warp != 0 || !row_live) return;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    float sum = partial[0][lane][e];
#pragma unroll
    for (int w = 1; w < kSplit; ++w) sum += partial[w][lane][e];
    const int ce = col0 + 2 * lane_quad + e;
    if (ce < n) y[static_cast<long>(lane_row) * n + ce] = __float2bfloat16_rn(sum);
  }
}

// Decode, M = 1: the token's activation bit planes as the MMA's rows. Row i of A is plane i of
// the group (rows kABits..7 zero for A6), so one m8n8k128 MMA gives popc(X_i AND W_j[c]) for
// every plane i at once, and a group takes kWeightBits MMAs (Horner over j through the
// accumulator) instead of bmma_decode_kernel's kABits x kWeightBits, 7 of whose 8 rows are
// empty at M = 1. Each row's sum is then weighted by its plane's c_i and the rows are added
// across the lanes that hold them (3 xor-shuffles): the exact D_g of group_dot, so with the same
// groups a warp, the same fp32 update and the same warp order at the end, the output equals
// bmma_decode_kernel's bit for bit (at kSplit = kDecodeSplit). Loads: one 16-byte activation
// load a lane (its plane's word of 4 groups) instead of kABits, and the step's scales in vector
// loads where the groups fill whole blocks. kPrefetch: the next step's
// words are loaded before this step's MMAs (registers double-buffered).
template <int kABits, int kSplit, bool kPrefetch>
__global__ void __launch_bounds__(32 * kSplit, kDecodeBlocksPerSM * kDecodeSplit / kSplit)
bmma_decode_m1_kernel(const uint32_t* __restrict__ x_planes,  // [kABits, 1, x_words]
                      const float* __restrict__ x_scales,     // [1, groups]
                      const uint32_t* __restrict__ w_planes,  // [kWeightBits, N, x_words]
                      const __half* __restrict__ w_scales,    // [N, groups]
                      __nv_bfloat16* __restrict__ y,          // [1, N]
                      int n, int groups) {
  static_assert(kABits <= 8, "one activation plane a row of the m8 tile");
  constexpr int kUnroll = kInterleave;
  constexpr int kStride = kSplit * kUnroll;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int lane_row = lane >> 2;  // A: activation plane lane_row; B: output channel col0 + lane_row
  const int lane_quad = lane & 3;
  const int col0 = blockIdx.x * 8;
  const int c = col0 + lane_row;
  const bool plane_live = lane_row < kABits, col_live = c < n;
  // c_i of the plane this lane's row holds: 2^i, the top plane -2^(kABits-1) (two's complement).
  const int32_t plane_weight = lane_row == kABits - 1 ? -(1 << lane_row) : (1 << lane_row);
  const int x_words = kWordsPerGroup * padded_groups(groups);
  const uint32_t* x_row = x_planes + static_cast<long>(lane_row) * x_words + kInterleave * lane_quad;
  const uint32_t* w_row = w_planes + static_cast<long>(c) * x_words + kInterleave * lane_quad;
  const long plane_stride = static_cast<long>(n) * x_words;
  // Whole blocks of 4 groups and aligned scale arrays: a step's scales in vector loads.
  const bool vector_scales = groups % kUnroll == 0 && (reinterpret_cast<uintptr_t>(x_scales) & 15) == 0 &&
                             (reinterpret_cast<uintptr_t>(w_scales) & 7) == 0;
  // A step's words: one 16-byte load a plane and lane, 4 groups (the block of g0).
  auto load = [&](int g0, uint4& xv, uint4 (&wv)[kWeightBits]) {
    const int word = kWordsPerBlock * (g0 / kInterleave);
    xv = plane_live ? __ldg(reinterpret_cast<const uint4*>(x_row + word)) : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
    for (int j = 0; j < kWeightBits; ++j)
      wv[j] = col_live ? __ldg(reinterpret_cast<const uint4*>(w_row + j * plane_stride + word))
                       : make_uint4(0u, 0u, 0u, 0u);
  };

  float acc[2] = {0.f, 0.f};
  uint4 xv, wv[kWeightBits];
  int g0 = warp * kUnroll;
  if (g0 < groups) load(g0, xv, wv);
  for (; g0 < groups; g0 += kStride) {
    const int next = g0 + kStride;
    uint4 xn, wn[kWeightBits];
    if (kPrefetch && next < groups) load(next, xn, wn);
    float sx[kUnroll], sw[kUnroll][2];
    if (vector_scales) {  // the step's 4 groups: one 16-byte s_x load, one 8-byte s_w load a channel
      const float4 s4 = __ldg(reinterpret_cast<const float4*>(x_scales + g0));
      sx[0] = s4.x, sx[1] = s4.y, sx[2] = s4.z, sx[3] = s4.w;
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int ce = col0 + 2 * lane_quad + e;
        const uint2 h = ce < n ? __ldg(reinterpret_cast<const uint2*>(w_scales + static_cast<long>(ce) * groups + g0))
                               : make_uint2(0u, 0u);
        const __half2 lo = *reinterpret_cast<const __half2*>(&h.x), hi = *reinterpret_cast<const __half2*>(&h.y);
        sw[0][e] = __low2float(lo), sw[1][e] = __high2float(lo), sw[2][e] = __low2float(hi), sw[3][e] = __high2float(hi);
      }
    } else {
      load_step_scales(x_scales, true, w_scales, groups, g0, n, col0 + 2 * lane_quad, sx, sw);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const uint32_t xf = component(xv, u);
      int32_t t[2] = {0, 0};
#pragma unroll
      for (int j = kWeightBits - 1; j >= 0; --j) {
        const int32_t mul = j == kWeightBits - 2 ? -2 : 2;
        const int32_t cin[2] = {t[0] * mul, t[1] * mul};
        mma_b1_and_popc_m8n8k128(t, xf, component(wv[j], u), cin);
      }
      int32_t d[2] = {t[0] * plane_weight, t[1] * plane_weight};
#pragma unroll
      for (int offset = 4; offset < 32; offset <<= 1)  // across lane_row: lanes 4 apart
#pragma unroll
        for (int e = 0; e < 2; ++e) d[e] += __shfl_xor_sync(0xffffffffu, d[e], offset);
#pragma unroll
      for (int e = 0; e < 2; ++e) acc[e] += (sx[u] * sw[u][e]) * static_cast<float>(d[e]);
    }
    if (next < groups) {
      if (kPrefetch) {
        xv = xn;
#pragma unroll
        for (int j = 0; j < kWeightBits; ++j) wv[j] = wn[j];
      } else {
        load(next, xv, wv);
      }
    }
  }

  __shared__ float partial[kSplit][4][2];
  if (lane_row == 0) {
    partial[warp][lane_quad][0] = acc[0];
    partial[warp][lane_quad][1] = acc[1];
  }
  __syncthreads();
  if (warp != 0 || lane_row != 0) return;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    float sum = partial[0][lane_quad][e];
#pragma unroll
    for (int w = 1; w < kSplit; ++w) sum += partial[w][lane_quad][e];
    const int ce = col0 + 2 * lane_quad + e;
    if (ce < n) y[ce] = __float2bfloat16_rn(sum);
  }
}

}  // namespace flexq
