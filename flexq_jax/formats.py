r"""Weight storage layouts: the one module that owns how quantized weights sit in memory.

Canonical logical form (every layout round-trips to it exactly):
    q      int8  [N, Kp]      signed values in [-2^(b-1), 2^(b-1) - 1] (b = weight bits)
    scales fp16  [N, Kp / g]  one scale per output channel and K-group
Kp is K rounded up to a multiple of GROUP; the padding holds zeros.

The int8 array above is a transient of packing and of the reference path; a quantized
checkpoint and a quantized model in device memory hold only packed layouts (b bits a weight).
"bitplanes" stores K only up to the next multiple of 32 (K32); the zero padding up to Kp is
restored on unpacking, so a K of 576 costs 576, not 640, weights a row. "pallas6" and "pallas8"
store Kp.

Layout "bitplanes" (b bits/weight; the binary-tensor-core layout, any b from 2 to 8):
    Two's complement bit i of every weight, packed along K into uint32 words:

        planes[i, n, w] bit t  =  bit i of (q[n, 32*w + t] mod 2^b)      t = 0 (LSB) .. 31

        plane i      row n:  | word 0: k=0..31 | word 1: k=32..63 | word 2 | word 3 | ...
                              \______________ one 128-wide group = 4 words ______/

    shape [b, N, K32 / 32] uint32. Value: q = -2^(b-1) * plane_(b-1) + sum_(i<b-1) 2^i * plane_i.
    Shards along N split rows; shards along K split words on group boundaries (4 words).

Layout "bitplanes_g4" (b bits/weight; what the BMMA CUDA kernel reads, weights and activations):
    "bitplanes" with the words of every 4 consecutive groups interleaved, rows padded with zero
    words to whole blocks of 4 groups (16 words, 512 weights):

        g4[i, n, 16 b + 4 q + u]  =  planes[i, n, 4 (4 b + u) + q]      word q of group 4b + u

        plane i   row n:  | block 0: g0.w0 g1.w0 g2.w0 g3.w0 | g0.w1 g1.w1 ... | g0.w3 .. g3.w3 | block 1 ...

    shape [b, N, g4_words(K)] uint32, g4_words(K) = 16 * ceil(Kp / 512). A warp lane's MMA
    fragment is word q of a group, so its words of 4 consecutive groups are one 16-byte load.
    Costs up to 3 groups of zero words a row where Kp / 128 is not a multiple of 4.

Layout "pallas6" (6 bits/weight only; the Pallas/Triton GPU kernels' layout):
    Weights are stored offset, u = q + 32 in [0, 63] (no sign extension; a kernel subtracts
    32 * sum(q_x) per group), split 4 + 2 bits into three byte planes. Group j (k = 128j ..
    128j+127) of row n has three 32-byte planes; byte t of each describes the four weights
    k = 128j + 4t + p, phases p = 0..3:

        plane 0, byte t :  lo4(u[4t])     | lo4(u[4t + 1]) << 4                           phases 0, 1
        plane 1, byte t :  lo4(u[4t + 2]) | lo4(u[4t + 3]) << 4                           phases 2, 3
        plane 2, byte t :  hi2(u[4t]) | hi2(u[4t + 1]) << 2 | hi2(u[4t + 2]) << 4 | hi2(u[4t + 3]) << 6
        (k relative to 128j; lo4 = low 4 bits, hi2 = high 2 bits of the 6-bit u)

    Tiles of 16 rows x 1 group are contiguous (1536 bytes), so a kernel streams long runs of
    memory and loads K-contiguous [16, 32] byte blocks, what an int8 tensor-core operand wants:

        packed[b, j, plane, i, t]  =  the byte above for row n = 16b + i, group j
        shape [N / 16, Kp / 128, 3, 16, 32] uint8     (N a multiple of 16)
        memory: | b=0: j=0 [plane 0: 16x32 | plane 1: 16x32 | plane 2: 16x32] | j=1 ... | b=1 ...

    Exactly 6 bits a weight. Phase p unpacks with byte-lane-local operations only (four weights
    per 32-bit word): u_p = ((plane[p // 2] >> 4 (p % 2)) & 0xF) | (((plane[2] >> 2p) & 3) << 4),
    q = u - 32; the phases interleave back to K order as interleave(interleave(u_0, u_2),
    interleave(u_1, u_3)) (interleave(a, b) = stack([a, b], -1) flattened), or each meets the
    matching phase of the activations. Unlike "bitplanes", this layout stores the whole padded
    K (Kp). Shards along N split axis 0 (16-row blocks); shards along K split axis 1 (groups).

Layout "pallas8" (8 bits/weight only; the Pallas kernels' W8A8 path, a benchmark baseline: it is
an int8 container, which a deployed 6-bit checkpoint does not use):
    The signed q itself, one int8 a weight (no offset), in the tiles of "pallas6" (16 rows x 1
    group), each group's 128 weights in PHASE-MAJOR order, the order in which the Pallas
    activation quantizer writes phase-major q_x: column 32p + t holds k = 128j + 4t + p.

        packed[b, j, i, 32p + t]  =  q[16b + i, 128j + 4t + p]       p = 0..3, t = 0..31

        row n, group j:  | p=0: k=0,4,..,124 | p=1: k=1,5,..,125 | p=2: k=2,..,126 | p=3: k=3,..,127 |
        shape [N / 16, Kp / 128, 16, 128] int8     (N a multiple of 16)
        memory: | b=0: j=0 [16x128] | j=1 [16x128] | ... | b=1 ...      (2048-byte tiles)

    So one K = 128 dot of a phase-major q_x group [M, 128] against the [16, 128] tile, or dp4a on
    matching 4-byte words (bytes 4w..4w+3 of both), gives the exact group sum. Stores the padded
    K (Kp); shards along N split axis 0, along K axis 1, as "pallas6".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import core
from pallas_kernels.core import G4, GROUP, PHASES, TILE_ROWS, WORD_BITS, g4_words, padded_k, qrange, stored_k

LAYOUTS = ("bitplanes", "bitplanes_g4", "pallas6", "pallas8")
# The axes of each layout's packed array that run along N (output channels) and along K (input
# channels, in whole groups): where a tensor-parallel shard splits it (flexq_jax/sharding.py). A
# shard's packed slice is the layout of that shard's own [N_s, K_s] weights: for "bitplanes",
# "pallas6" and "pallas8" also the slice of the whole layer's array; for "bitplanes_g4" along K only
# when every shard holds whole blocks of 4 groups (sharded layers are packed per shard).
SHARD_AXES = {"bitplanes": (1, 2), "bitplanes_g4": (1, 2), "pallas6": (0, 1), "pallas8": (0, 1)}


def shard_axes(layout: str) -> tuple[int, int]:
  """(axis of N, axis of K) of a packed array in `layout`."""
  if layout not in SHARD_AXES:
    raise ValueError(f"unknown layout {layout!r}; known: {LAYOUTS}")
  return SHARD_AXES[layout]


def _check_logical(q: jax.Array, bits: int):
  if q.ndim != 2:
    raise ValueError(f"quantized weights must be [N, K], got shape {q.shape}")
  if q.shape[1] % WORD_BITS:
    raise ValueError(f"K={q.shape[1]} must be a multiple of {WORD_BITS} (cut or pad to stored_k first)")
  if not 2 <= bits <= 8:
    raise ValueError(f"bits must be in [2, 8], got {bits}")


def pack_bitplanes(q: jax.Array, bits: int) -> jax.Array:
  """int [N, K32] in the signed `bits`-bit range -> uint32 [bits, N, K32/32] bit planes."""
  _check_logical(q, bits)
  n, kp = q.shape
  u = jnp.asarray(q).astype(jnp.int32) & ((1 << bits) - 1)  # two's complement in `bits` bits
  shifts = jnp.arange(bits, dtype=jnp.int32)[:, None, None, None]
  bit = (u.reshape(1, n, kp // WORD_BITS, WORD_BITS) >> shifts) & 1  # [b, N, W, 32]
  weights = jnp.left_shift(jnp.uint32(1), jnp.arange(WORD_BITS, dtype=jnp.uint32))
  return jnp.sum(bit.astype(jnp.uint32) * weights, axis=-1, dtype=jnp.uint32)


def plane_coefficients(bits: int) -> np.ndarray:
  """c_i = 2^i for i < b-1 and c_(b-1) = -2^(b-1): q = sum_i c_i * plane_i (two's complement)."""
  c = (1 << np.arange(bits)).astype(np.int32)
  c[-1] = -c[-1]
  return c


def unpack_bitplanes(planes: jax.Array) -> jax.Array:
  """uint32 [b, N, K32/32] bit planes -> int8 [N, K32], the exact inverse of pack_bitplanes."""
  if planes.ndim != 3 or planes.dtype != jnp.uint32:
    raise ValueError(f"bit planes must be uint32 [bits, N, Kp/32], got {planes.dtype} {planes.shape}")
  bits, n, words = planes.shape
  t = jnp.arange(WORD_BITS, dtype=jnp.uint32)
  bit = ((planes[..., None] >> t) & 1).astype(jnp.int32)  # [b, N, W, 32]
  q = jnp.tensordot(jnp.asarray(plane_coefficients(bits)), bit, axes=1)  # [N, W, 32]
  return q.reshape(n, words * WORD_BITS).astype(jnp.int8)


def interleave_groups(planes: jax.Array) -> jax.Array:
  """"bitplanes" words [..., W] (W <= 4 x groups) -> "bitplanes_g4" [..., g4_words]: zero-padded to
  whole blocks of 4 groups, word q of group 4b + u moved to 16b + 4q + u."""
  wpg = GROUP // WORD_BITS
  block = G4 * wpg
  words = -(-planes.shape[-1] // block) * block
  p = jnp.pad(planes, [(0, 0)] * (planes.ndim - 1) + [(0, words - planes.shape[-1])])
  p = p.reshape(*planes.shape[:-1], words // block, G4, wpg)  # [..., block, u (group), q (word)]
  return jnp.swapaxes(p, -1, -2).reshape(*planes.shape[:-1], words)


def deinterleave_groups(g4: jax.Array, words: int) -> jax.Array:
  """The inverse of interleave_groups, keeping the first `words` words of each row."""
  wpg = GROUP // WORD_BITS
  p = g4.reshape(*g4.shape[:-1], g4.shape[-1] // (G4 * wpg), wpg, G4)  # [..., block, q, u]
  return jnp.swapaxes(p, -1, -2).reshape(g4.shape)[..., :words]


def pack_pallas6(q: jax.Array) -> jax.Array:
  """int [N, Kp] in [-32, 31] (N % 16 == 0, Kp % 128 == 0) -> uint8 [N/16, Kp/128, 3, 16, 32]."""
  if q.ndim != 2 or q.shape[1] % GROUP or q.shape[0] % TILE_ROWS:
    raise ValueError(f"pallas6 packs [N, Kp] with N a multiple of {TILE_ROWS} and Kp a multiple of "
                     f"{GROUP}, got shape {q.shape}")
  n, kp = q.shape
  u = (jnp.asarray(q).astype(jnp.int32) + core.PALLAS6_OFFSET).astype(jnp.uint8)
  u = u.reshape(n, kp // GROUP, 32, 4)  # [N, G, t, phase], values 0..63
  lo, hi = u & 0xF, u >> 4
  planes = jnp.stack([lo[..., 0] | (lo[..., 1] << 4), lo[..., 2] | (lo[..., 3] << 4),
                      hi[..., 0] | (hi[..., 1] << 2) | (hi[..., 2] << 4) | (hi[..., 3] << 6)], axis=2)  # [N, G, 3, 32]
  return planes.reshape(n // TILE_ROWS, TILE_ROWS, kp // GROUP, 3, 32).transpose(0, 2, 3, 1, 4)


def unpack_pallas6(packed: jax.Array) -> jax.Array:
  """uint8 [N/16, Kp/128, 3, 16, 32] -> int8 [N, Kp], the exact inverse of pack_pallas6."""
  if packed.ndim != 5 or packed.dtype != jnp.uint8 or packed.shape[2:] != (3, TILE_ROWS, 32):
    raise ValueError(f"pallas6 arrays are uint8 [N/16, groups, 3, 16, 32], got {packed.dtype} {packed.shape}")
  blocks, g = packed.shape[:2]
  p = packed.transpose(0, 3, 1, 2, 4).reshape(blocks * TILE_ROWS, g, 3, 32)  # [N, G, plane, t]
  lo01, lo23, hi = p[:, :, 0], p[:, :, 1], p[:, :, 2]
  lo = jnp.stack([lo01 & 0xF, lo01 >> 4, lo23 & 0xF, lo23 >> 4], axis=-1)  # [N, G, t, phase]
  hi = jnp.stack([(hi >> (2 * ph)) & 3 for ph in range(4)], axis=-1)
  u = (lo | (hi << 4)).astype(jnp.int32) - core.PALLAS6_OFFSET
  return u.astype(jnp.int8).reshape(blocks * TILE_ROWS, g * GROUP)


def pack_pallas8(q: jax.Array) -> jax.Array:
  """int [N, Kp] in [-128, 127] (N % 16 == 0, Kp % 128 == 0) -> int8 [N/16, Kp/128, 16, 128], phase-major."""
  if q.ndim != 2 or q.shape[1] % GROUP or q.shape[0] % TILE_ROWS:
    raise ValueError(f"pallas8 packs [N, Kp] with N a multiple of {TILE_ROWS} and Kp a multiple of "
                     f"{GROUP}, got shape {q.shape}")
  n, kp = q.shape
  g = kp // GROUP
  q = jnp.asarray(q)
  if q.dtype != jnp.int8:
    lo, hi = qrange(8)
    if not isinstance(q, jax.core.Tracer) and q.size and (int(jnp.min(q)) < lo or int(jnp.max(q)) > hi):
      raise ValueError(f"pallas8 holds 8-bit weights in [{lo}, {hi}], got values in "
                       f"[{int(jnp.min(q))}, {int(jnp.max(q))}]")
    q = q.astype(jnp.int8)
  t = q.reshape(n // TILE_ROWS, TILE_ROWS, g, GROUP // PHASES, PHASES)  # [b, i, j, t, p]
  return t.transpose(0, 2, 1, 4, 3).reshape(n // TILE_ROWS, g, TILE_ROWS, GROUP)


def unpack_pallas8(packed: jax.Array) -> jax.Array:
  """int8 [N/16, Kp/128, 16, 128] -> int8 [N, Kp], the exact inverse of pack_pallas8."""
  if packed.ndim != 4 or packed.dtype != jnp.int8 or packed.shape[2:] != (TILE_ROWS, GROUP):
    raise ValueError(f"pallas8 arrays are int8 [N/16, groups, 16, 128], got {packed.dtype} {packed.shape}")
  blocks, g = packed.shape[:2]
  t = packed.reshape(blocks, g, TILE_ROWS, PHASES, GROUP // PHASES)  # [b, j, i, p, t]
  return t.transpose(0, 2, 1, 4, 3).reshape(blocks * TILE_ROWS, g * GROUP)


def _check_layout_bits(layout: str, bits: int):
  want = {"pallas6": 6, "pallas8": 8}.get(layout)
  if want is not None and bits != want:
    raise ValueError(f"layout {layout!r} holds {want}-bit weights only, got {bits=}")


def pack(q: jax.Array, bits: int, layout: str, k: int) -> jax.Array:
  """Logical int [N, Kp] of a layer with real K = k -> the layout's packed array.

  Only the first stored_k(k) columns are kept: the rest is padding, zero by construction.
  """
  if layout == "bitplanes":
    return pack_bitplanes(q[:, : stored_k(k)], bits)
  if layout == "bitplanes_g4":
    planes = interleave_groups(pack_bitplanes(q[:, : stored_k(k)], bits))
    if planes.shape[-1] != g4_words(k):
      raise ValueError(f"q has {q.shape[1]} columns, too few for K={k}")
    return planes
  _check_layout_bits(layout, bits)
  if layout == "pallas6":
    return pack_pallas6(q[:, : padded_k(k)])
  if layout == "pallas8":
    return pack_pallas8(q[:, : padded_k(k)])
  raise ValueError(f"unknown layout {layout!r}; known: {LAYOUTS}")


def unpack(packed: jax.Array, bits: int, layout: str, k: int) -> jax.Array:
  """The exact inverse of pack: int8 [N, Kp] with zeros past K (k = the layer's real K)."""
  if layout == "bitplanes":
    if packed.shape[0] != bits:
      raise ValueError(f"bitplanes array has {packed.shape[0]} planes, expected {bits}")
    q = unpack_bitplanes(packed)
  elif layout == "bitplanes_g4":
    if packed.shape[0] != bits or packed.shape[-1] != g4_words(k):
      raise ValueError(f"bitplanes_g4 array {packed.shape} does not hold {bits} planes of K={k} "
                       f"({g4_words(k)} words a row)")
    q = unpack_bitplanes(deinterleave_groups(packed, stored_k(k) // WORD_BITS))
  elif layout in ("pallas6", "pallas8"):
    _check_layout_bits(layout, bits)
    q = unpack_pallas6(packed) if layout == "pallas6" else unpack_pallas8(packed)
  else:
    raise ValueError(f"unknown layout {layout!r}; known: {LAYOUTS}")
  return jnp.pad(q, [(0, 0), (0, padded_k(k) - q.shape[1])])


def packed_bytes_per_weight(bits: int, layout: str) -> float:
  _check_layout_bits(layout, bits)
  if layout in LAYOUTS:
    return bits / 8  # pallas6 / pallas8: for K a multiple of 128 (they store the padded Kp)
  raise ValueError(f"unknown layout {layout!r}; known: {LAYOUTS}")
