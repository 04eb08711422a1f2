// Compile-time tiling of the BMMA GEMM. Not yet tuned on a GPU.
#pragma once

namespace flexq {

// One K-group is 128 bits = 4 uint32 words of a plane row: exactly one m8n8k128 MMA, so
// the group scales apply once per MMA chain (FlexQ's "MMA K == group size").
constexpr int kGroupSize = 128;
constexpr int kWordBits = 32;
constexpr int kWordsPerGroup = kGroupSize / kWordBits;
constexpr int kWeightBits = 6;  // the kernel is W6 only; activations are 6 or 8 bits

// The "bitplanes_g4" layout (flexq_jax/formats.py) both operands use: a plane row's words in
// blocks of 4 groups with the 4 groups' words interleaved, word 4q + u of block b = word q of
// group 4b + u; rows are padded to whole blocks with zeros. A lane's fragment word q of 4
// consecutive groups is one 16-byte load.
constexpr int kInterleave = 4;
constexpr int kWordsPerBlock = kInterleave * kWordsPerGroup;
__host__ __device__ constexpr int padded_groups(int groups) { return (groups + kInterleave - 1) / kInterleave * kInterleave; }
__device__ __forceinline__ int word_index(int g, int quad) {
  return kWordsPerBlock * (g / kInterleave) + kInterleave * quad + g % kInterleave;
}

// A block is a kWarpsM x kWarpsN grid of warps; each warp owns kMmaM x kMmaN tiles of 8x8
// outputs (rows = tokens M, columns = output channels N).
template <int kWarpsM_, int kWarpsN_, int kMmaM_, int kMmaN_>
struct TileConfig {
  static constexpr int kWarpsM = kWarpsM_;
  static constexpr int kWarpsN = kWarpsN_;
  static constexpr int kMmaM = kMmaM_;
  static constexpr int kMmaN = kMmaN_;
  static constexpr int kWarpM = 8 * kMmaM;
  static constexpr int kWarpN = 8 * kMmaN;
  static constexpr int kBlockM = kWarpsM * kWarpM;
  static constexpr int kBlockN = kWarpsN * kWarpN;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
};

// M 9..16: warps split N so that every weight word is loaded once per block.
using DecodeM16Tile = TileConfig<1, 4, 2, 1>;  // M <= 16: block 16 x 32
// Larger M: each warp reuses its activation fragments over two N tiles and its weight
// fragments over two M tiles. A first guess (4 x 2 MMA tiles a warp took 255 registers under
// ptxas); prefill likely belongs to an int8 path anyway (flexq_jax/DESIGN.md; results/kernels/NOTES.md).
using LargeTile = TileConfig<2, 2, 2, 2>;  // block 32 x 32

// Decode (M <= 8), bmma_decode_kernel: a block owns 8 output channels and kDecodeSplit warps
// share its K range (group chunks interleaved, partial sums added in shared memory at the end),
// each warp one block of kInterleave groups a step: one 16-byte load a plane and lane. 70B
// 8192 x 8192: 1024 blocks x 4 warps, ~31 warps an SM streaming weights.
constexpr int kDecodeSplit = 4;
constexpr int kDecodeBlocksPerSM = 4;  // caps registers at 128 (150+ uncapped: 3 blocks an SM)

}  // namespace flexq
