// Raw PTX for the binary tensor cores. Runs on sm_90a (H200, 2026-11-27).
#pragma once

#include <cstdint>

namespace flexq {

// D = C + popc(A AND B) on one 8x8x128-bit tile, s32 accumulate (sm_80+).
// Fragments (PTX ISA, "mma.m8n8k128"): with group = lane / 4 and quad = lane % 4,
//   a: the 32 bits k = 32*quad .. 32*quad+31 of row `group` of A (8 x 128, row major);
//   b: the same 32 bits k of column `group` of B (128 x 8, column major);
//   c, d: elements (row group, columns 2*quad and 2*quad+1) of the 8x8 tile.
// A and B use the same bit-to-k mapping, and AND+POPC is blind to the order of k, so a
// lane can hand over a raw bitplanes word as is: no bit reversal, no shuffle.
__device__ __forceinline__ void mma_b1_and_popc_m8n8k128(int32_t (&d)[2], uint32_t a, uint32_t b,
                                                         const int32_t (&c)[2]) {
  asm(  // pure: no volatile, so the compiler may interleave independent MMA chains
      "mma.sync.aligned.m8n8k128.row.col.s32.b1.b1.s32.and.popc "
      "{%0, %1}, {%2}, {%3}, {%4, %5};\n"
      : "=r"(d[0]), "=r"(d[1])
      : "r"(a), "r"(b), "r"(c[0]), "r"(c[1]));
}

}  // namespace flexq
