// Small-M GEMM on the int8 tensor cores (mma.sync m16n8k32) for "pallas6" weights, M <= 64 token rows:
// y[m, n] = sum_g s_x[m,g] s_w[n,g] * (exact int32 sum over group g of q_x q_w). Written 2026-12-02 on
// a machine without a GPU; flexq_jax/cuda/gemm_small.py's `gemm_small_plan` restates its arithmetic
// lane by lane in numpy (tested on CPU against the contract); the GPU tests are its first real check.
//
// Why (issue 13: decode batches faster than bf16): the Mosaic GPU small-M kernel's TMA ring streams
// the weights at 2.4-2.7 TB/s on an H200 whatever its depth (results/kernels/NOTES.md), while the
// CUDA decode GEMV's plain 16-byte loads from many warps reach 88-97% of HBM on large layers. This
// kernel keeps the GEMV's structure (a block owns whole 16-row tiles and all of K, its warps take the
// K-groups in turn, fp32 partials added in shared memory in warp order: no split-K pass) and replaces
// its per-token dp4a with one tensor-core instruction per 16 weight rows x 8 tokens x 32 k.
//
// Operands: those of gemv_pallas6.cuh (one stored copy of the weights):
//   qx    int8  [Mp, Kp]   q_x, phase-major within each group: byte 32p + t of a group = k 4t + p
//   sx    f32   [Mp, G]    s_x;   xsum int32 [Mp, G]: sum of q_x over each group
//   w     uint8 [N/16, G, 3, 16, 32]  "pallas6" (u = q_w + 32; planes lo01, lo23, hi)
//   sw    f16   [N, G]     s_w
//
// Fragments (PTX ISA, mma.m16n8k32 .s8): with gid = lane / 4 and c = lane % 4, A (16 x 32, row major)
// a0 = row gid, k 4c..4c+3; a1 = row gid+8, same k; a2 = row gid, k 16+4c..; a3 = row gid+8, k 16+4c..;
// B (32 x 8, column major) b0 = k 4c..4c+3 of column gid, b1 = k 16+4c..; D d0, d1 = row gid, columns
// 2c, 2c+1; d2, d3 = row gid+8. One mma covers one phase p of a group: its 32 columns t = 0..31 of the
// phase-major order. The k order inside an mma is ours to choose as long as A and B agree: logical
// k 4c+i is byte t = 8c+i and 16+4c+i is byte 8c+4+i, so a lane reads 8 consecutive bytes of a
// weight row per plane (one 8-byte load: words t 8c..8c+3 and 8c+4..8c+7) and 8 consecutive q_x
// bytes of a token per phase. A = the unpacked u (0..63, a valid s8) of 16 weight rows, B = q_x of 8
// tokens; the exact group sum is the mma's s32 result minus 32 sum(q_x).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "gemv_pallas6.cuh"

namespace flexq {

constexpr int kSmallWarps = 8;     // warps of a block; warp w takes groups w, w + 8, ...
constexpr int kSmallMaxM = 64;     // 8 token tiles of 8

// D = C + A B on one m16n8k32 s8 tile, s32 accumulate (sm_80+).
__device__ __forceinline__ void mma_s8_m16n8k32(int32_t (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// kNT token tiles of 8 (M <= 8 kNT), kT weight tiles of 16 rows per block (every warp works on all
// kT tiles for its groups, so each q_x fragment it loads serves kT tiles).
template <int kNT, int kT, typename OutT>
__global__ void __launch_bounds__(32 * kSmallWarps)
gemm_small_pallas6_kernel(const int8_t* __restrict__ qx, const float* __restrict__ sx,
                          const int32_t* __restrict__ xsum, const uint8_t* __restrict__ w,
                          const __half* __restrict__ sw, OutT* __restrict__ y, int m, int n, int groups, int kp) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int gid = lane >> 2, c = lane & 3;
  const int tile0 = blockIdx.x * kT;

  float acc[kT][kNT][4] = {};

  // This lane's bytes of a tile-group: plane pl, row gid + 8h, bytes 8c .. 8c + 7.
  const uint8_t* w_lane = w + static_cast<long>(tile0) * groups * kGemvTileGroupBytes + gid * kGemvPlaneBytes + 8 * c;
  const long tile_stride = static_cast<long>(groups) * kGemvTileGroupBytes;

  for (int g = warp; g < groups; g += kSmallWarps) {
    uint2 wr[kT][3][2];  // every weight load of the group first: bytes in flight
#pragma unroll
    for (int t = 0; t < kT; ++t)
#pragma unroll
      for (int pl = 0; pl < 3; ++pl)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          wr[t][pl][h] = __ldg(reinterpret_cast<const uint2*>(
              w_lane + t * tile_stride + static_cast<long>(g) * kGemvTileGroupBytes + pl * kGemvPlaneTileBytes +
              h * 8 * kGemvPlaneBytes));

    int32_t sums[kT][kNT][4] = {};

    const int8_t* xg = qx + static_cast<long>(g) * kGemvGroup + 8 * c;
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      uint2 b[kNT];  // token 8j + gid, bytes 32p + 8c .. + 7 of the group
#pragma unroll
      for (int j = 0; j < kNT; ++j)
        b[j] = __ldg(reinterpret_cast<const uint2*>(xg + static_cast<long>(8 * j + gid) * kp + 32 * p));
#pragma unroll
      for (int t = 0; t < kT; ++t) {
        const uint2 lo0 = wr[t][p < 2 ? 0 : 1][0], lo1 = wr[t][p < 2 ? 0 : 1][1];
        const uint2 hi0 = wr[t][2][0], hi1 = wr[t][2][1];
        const uint32_t a0 = gemv_unpack(lo0.x, hi0.x, p), a1 = gemv_unpack(lo1.x, hi1.x, p);
        const uint32_t a2 = gemv_unpack(lo0.y, hi0.y, p), a3 = gemv_unpack(lo1.y, hi1.y, p);
#pragma unroll
        for (int j = 0; j < kNT; ++j) mma_s8_m16n8k32(sums[t][j], a0, a1, a2, a3, b[j].x, b[j].y);
      }
    }

#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      const long m0 = static_cast<long>(8 * j + 2 * c) * groups + g, m1 = m0 + groups;  // tokens 2c, 2c + 1
      const float sx0 = sx[m0], sx1 = sx[m1];
      const int xs0 = kGemvOffset * xsum[m0], xs1 = kGemvOffset * xsum[m1];
#pragma unroll
      for (int t = 0; t < kT; ++t) {
        const long row = static_cast<long>(tile0 + t) * kGemvTileRows + gid;
        const float sw0 = __half2float(sw[row * groups + g]), sw1 = __half2float(sw[(row + 8) * groups + g]);
        acc[t][j][0] += static_cast<float>(sums[t][j][0] - xs0) * (sx0 * sw0);
        acc[t][j][1] += static_cast<float>(sums[t][j][1] - xs1) * (sx1 * sw0);
        acc[t][j][2] += static_cast<float>(sums[t][j][2] - xs0) * (sx0 * sw1);
        acc[t][j][3] += static_cast<float>(sums[t][j][3] - xs1) * (sx1 * sw1);
      }
    }
  }

  // The warps' accumulators added in warp order, one weight tile at a time (deterministic).
  __shared__ float red[kSmallWarps][kGemvTileRows][8 * kNT];
#pragma unroll
  for (int t = 0; t < kT; ++t) {
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      red[warp][gid][8 * j + 2 * c] = acc[t][j][0];
      red[warp][gid][8 * j + 2 * c + 1] = acc[t][j][1];
      red[warp][gid + 8][8 * j + 2 * c] = acc[t][j][2];
      red[warp][gid + 8][8 * j + 2 * c + 1] = acc[t][j][3];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < kGemvTileRows * 8 * kNT; i += blockDim.x) {
      const int tok = i / kGemvTileRows, rr = i % kGemvTileRows;  // consecutive threads: consecutive rows of y
      if (tok < m) {
        float s = 0.f;
#pragma unroll
        for (int ww = 0; ww < kSmallWarps; ++ww) s += red[ww][rr][tok];
        gemv_store(s, y + static_cast<long>(tok) * n + static_cast<long>(tile0 + t) * kGemvTileRows + rr);
      }
    }
    __syncthreads();
  }
}

// Token tiles for M rows: 8 kNT >= M, kNT in {1, 2, 4, 8}.
inline int small_token_tiles(int m) { return m <= 8 ? 1 : m <= 16 ? 2 : m <= 32 ? 4 : 8; }

template <int kNT, typename OutT>
void launch_gemm_small_nt(cudaStream_t stream, const int8_t* qx, const float* sx, const int32_t* xsum,
                          const uint8_t* w, const __half* sw, OutT* y, int m, int n, int groups, int kp, int kt) {
  const dim3 block(32 * kSmallWarps);
  const int tiles = n / kGemvTileRows;
  if constexpr (kNT <= 2) {  // kT x kNT <= 8: the fp32 and int32 accumulators stay in registers
    if (kt == 4) {
      gemm_small_pallas6_kernel<kNT, 4, OutT><<<tiles / 4, block, 0, stream>>>(qx, sx, xsum, w, sw, y, m, n, groups, kp);
      return;
    }
  }
  if constexpr (kNT <= 4) {
    if (kt == 2) {
      gemm_small_pallas6_kernel<kNT, 2, OutT><<<tiles / 2, block, 0, stream>>>(qx, sx, xsum, w, sw, y, m, n, groups, kp);
      return;
    }
  }
  gemm_small_pallas6_kernel<kNT, 1, OutT><<<tiles, block, 0, stream>>>(qx, sx, xsum, w, sw, y, m, n, groups, kp);
}

// The largest weight tiles a block kT (1, 2 or 4) the launcher takes for M rows: kT x token tiles <= 8.
inline int small_max_tiles_per_block(int m) { return 8 / small_token_tiles(m) >= 4 ? 4 : 8 / small_token_tiles(m); }

// kt: weight tiles a block (1, 2 or 4, at most small_max_tiles_per_block(m); must divide N / 16; the
// caller checks).
template <typename OutT>
void launch_gemm_small_pallas6(cudaStream_t stream, const int8_t* qx, const float* sx, const int32_t* xsum,
                               const uint8_t* w, const __half* sw, OutT* y, int m, int n, int groups, int kp, int kt) {
  switch (small_token_tiles(m)) {
    case 1: launch_gemm_small_nt<1>(stream, qx, sx, xsum, w, sw, y, m, n, groups, kp, kt); break;
    case 2: launch_gemm_small_nt<2>(stream, qx, sx, xsum, w, sw, y, m, n, groups, kp, kt); break;
    case 4: launch_gemm_small_nt<4>(stream, qx, sx, xsum, w, sw, y, m, n, groups, kp, kt); break;
    default: launch_gemm_small_nt<8>(stream, qx, sx, xsum, w, sw, y, m, n, groups, kp, kt); break;
  }
}

}  // namespace flexq
