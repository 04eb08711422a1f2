// Dynamic activation quantization to bit planes. Ran on an H200 (2026-11-27).
//
// One warp per (token m, K-group g). Lane t holds the 4 elements k = 128g + 32e + t
// (e = 0..3), so __ballot_sync over the lanes yields word e of group g of a plane with bit t =
// element 128g + 32e + t, stored at word_index(g, e): the "bitplanes_g4" layout of
// flexq_jax/formats.py (bitplanes with 4 groups' words interleaved, configs.h), shape
// [b, M, 4 * padded_groups]. Elements past K read as zero, which changes neither the group max
// nor any sum; the groups that pad the last block get zero words (scales only for real groups).
#pragma once

#include <cuda_bf16.h>
#include <cstdint>

#include "configs.h"

namespace flexq {

// The contract (flexq_jax/numerics.py: activation_scale, round_to_nearest_quotient): s keeps
// 15 significant bits, so (c +- 1/2) s is exact in fp32; a guess from the reciprocal is
// corrected by exact comparisons and exact ties go to the even neighbour, which makes q the
// same integer as the jnp reference's on any platform. A zero group gets s = 0 and q = 0.
template <int kQMax>
__device__ __forceinline__ float contract_scale(float amax) {
  return __uint_as_float(__float_as_uint(amax * (1.0f / static_cast<float>(kQMax))) & 0xFFFFFE00u);
}

// q for x in a group of scale s (sb = s or 1 where s = 0, inv = 1 / sb), clamped to kABits.
template <int kQMax>
__device__ __forceinline__ int contract_round(float x, float s, float sb, float inv) {
  float q = floorf(x * inv + 0.5f);
  q = x > (q + 0.5f) * sb ? q + 1.f : (x < (q - 0.5f) * sb ? q - 1.f : q);
  const bool odd = (static_cast<int>(q) & 1) != 0;
  q = odd && x == (q + 0.5f) * sb ? q + 1.f : (odd && x == (q - 0.5f) * sb ? q - 1.f : q);
  q = s > 0.f ? fminf(fmaxf(q, static_cast<float>(-kQMax - 1)), static_cast<float>(kQMax)) : 0.f;
  return static_cast<int>(q);
}

template <int kABits>
__global__ void act_quant_kernel(const __nv_bfloat16* __restrict__ x,  // [M, K]
                                 uint32_t* __restrict__ planes,        // [kABits, M, 4 * padded_groups]
                                 float* __restrict__ scales,           // [M, groups]
                                 int m, int k, int groups) {
  static_assert(kWordsPerGroup * kABits <= 32, "one lane stores each plane word");
  const int lane = threadIdx.x & 31;
  const long task = (static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  // A whole warp shares `task`, so it leaves together and the ballots below stay full-mask.
  const int groups_p = padded_groups(groups);
  if (task >= static_cast<long>(m) * groups_p) return;
  const int row = static_cast<int>(task / groups_p);
  const int g = static_cast<int>(task % groups_p);

  float v[kWordsPerGroup];
  float amax = 0.f;
#pragma unroll
  for (int e = 0; e < kWordsPerGroup; ++e) {
    const int kk = g * kGroupSize + e * kWordBits + lane;
    v[e] = kk < k ? __bfloat162float(x[static_cast<long>(row) * k + kk]) : 0.f;
    amax = fmaxf(amax, fabsf(v[e]));
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));

  constexpr int kQMax = (1 << (kABits - 1)) - 1;
  const float s = contract_scale<kQMax>(amax);
  const float sb = s > 0.f ? s : 1.f;
  const float inv = 1.0f / sb;
  if (lane == 0 && g < groups) scales[static_cast<long>(row) * groups + g] = s;

  uint32_t my_word = 0;  // lane e * kABits + i keeps word e of plane i
#pragma unroll
  for (int e = 0; e < kWordsPerGroup; ++e) {
    const int q = contract_round<kQMax>(v[e], s, sb, inv);
    const uint32_t u = static_cast<uint32_t>(q) & ((1u << kABits) - 1u);
#pragma unroll
    for (int i = 0; i < kABits; ++i) {
      const uint32_t word = __ballot_sync(0xffffffffu, (u >> i) & 1u);
      if (lane == e * kABits + i) my_word = word;
    }
  }
  if (lane < kWordsPerGroup * kABits) {
    const int e = lane / kABits, i = lane % kABits;
    planes[(static_cast<long>(i) * m + row) * (kWordsPerGroup * groups_p) + word_index(g, e)] = my_word;
  }
}

}  // namespace flexq
