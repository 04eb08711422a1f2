r"""Weight storage layouts: the one module that owns how quantized weights sit in memory.

Canonical logical form (every layout round-trips to it exactly):
    q      int8  [N, Kp]      signed values in [-2^(b-1), 2^(b-1) - 1] (b = weight bits)
    scales fp16  [N, Kp / g]  one scale per output channel and K-group
Kp is K rounded up to a multiple of GROUP_ALIGN; the padding holds zeros.

The int8 array above is a transient of packing and of the reference path; a quantized
checkpoint and a quantized model in device memory hold only packed layouts (b bits a weight).
"bitplanes" stores K only up to the next multiple of 32 (K32); the zero padding up to Kp is
restored on unpacking, so a K of 576 costs 576, not 640, weights a row. "pallas6" stores Kp.

Layout "bitplanes" (b bits/weight; the binary-tensor-core layout, any b from 2 to 8):
    Two's complement bit i of every weight, packed along K into uint32 words:

        planes[i, n, w] bit t  =  bit i of (q[n, 32*w + t] mod 2^b)      t = 0 (LSB) .. 31

        plane i      row n:  | word 0: k=0..31 | word 1: k=32..63 | word 2 | word 3 | ...
                              \______________ one 128-wide group = 4 words ______/

    shape [b, N, K32 / 32] uint32. Value: q = -2^(b-1) * plane_(b-1) + sum_(i<b-1) 2^i * plane_i.
    Shards along N split rows; shards along K split words on group boundaries (4 words).

Layout "pallas6" (6 bits/weight only; the Pallas/Triton GPU kernels' layout):
    K-major bytes, N contiguous, so a kernel loads [32, block_n] byte tiles along whole rows.
    Weights are stored offset, u = q + 32 in [0, 63] (no sign extension; a kernel subtracts
    32 * sum(q_x) per group), split 4 + 2 bits. Group j covers k = 128j .. 128j+127, in four
    32-row quarters r = 0..3 (k = 128j + 32r + t, t = 0..31); it takes 96 byte rows:

        row 96j      + t :  lo4(u[q0, t])  | lo4(u[q1, t]) << 4                     quarters 0, 1
        row 96j + 32 + t :  lo4(u[q2, t])  | lo4(u[q3, t]) << 4                     quarters 2, 3
        row 96j + 64 + t :  hi2(u[q0, t])  | hi2(u[q1, t]) << 2 | hi2(u[q2, t]) << 4 | hi2(u[q3, t]) << 6

        columns: n = 0 .. N-1 (one byte per output channel in every row)

    shape [96 * Kp / 128, N] uint8 = [3 Kp / 4, N]: exactly 6 bits a weight. Quarter r of a
    group unpacks without any reshape or interleave:
        u = ((lo[r // 2] >> 4 (r % 2)) & 0xF) | (((hi >> 2r) & 3) << 4),   q = u - 32,
    and since every byte lane is independent, four weights in a 32-bit word unpack in a few
    word operations. Unlike "bitplanes", this layout stores the whole padded K (Kp, a multiple
    of 128): one group is the unit of every row block. Shards along N split columns; shards
    along K split rows on group boundaries (96 rows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

GROUP_ALIGN = 128  # K is padded to a multiple of this (the group size; BMMA's K per MMA)
WORD_BITS = 32
LAYOUTS = ("bitplanes", "pallas6")
PALLAS6_ROWS_PER_GROUP = 96  # byte rows per 128-group in "pallas6": lo 0|1, lo 2|3, hi 0..3
PALLAS6_OFFSET = 32  # "pallas6" stores u = q + 32


def padded_k(k: int) -> int:
  """K rounded up to a multiple of GROUP_ALIGN."""
  return -(-k // GROUP_ALIGN) * GROUP_ALIGN


def qrange(bits: int) -> tuple[int, int]:
  """(min, max) of a signed `bits`-bit integer."""
  return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def stored_k(k: int) -> int:
  """K rounded up to a multiple of WORD_BITS: how much of each row a packed layout keeps."""
  return -(-k // WORD_BITS) * WORD_BITS


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


def unpack_bitplanes(planes: jax.Array) -> jax.Array:
  """uint32 [b, N, K32/32] bit planes -> int8 [N, K32], the exact inverse of pack_bitplanes."""
  if planes.ndim != 3 or planes.dtype != jnp.uint32:
    raise ValueError(f"bit planes must be uint32 [bits, N, Kp/32], got {planes.dtype} {planes.shape}")
  bits, n, words = planes.shape
  t = jnp.arange(WORD_BITS, dtype=jnp.uint32)
  bit = ((planes[..., None] >> t) & 1).astype(jnp.int32)  # [b, N, W, 32]
  coeff = (1 << np.arange(bits)).astype(np.int32)
  coeff[-1] = -coeff[-1]  # the top plane carries -2^(b-1)
  q = jnp.tensordot(jnp.asarray(coeff), bit, axes=1)  # [N, W, 32]
  return q.reshape(n, words * WORD_BITS).astype(jnp.int8)


def pack_pallas6(q: jax.Array) -> jax.Array:
  """int [N, Kp] in [-32, 31] (Kp a multiple of 128) -> uint8 [3 Kp / 4, N] ("pallas6" above)."""
  if q.ndim != 2 or q.shape[1] % GROUP_ALIGN:
    raise ValueError(f"pallas6 packs [N, Kp] with Kp a multiple of {GROUP_ALIGN}, got shape {q.shape}")
  n, kp = q.shape
  u = (jnp.asarray(q).astype(jnp.int32) + PALLAS6_OFFSET).astype(jnp.uint8)  # [N, Kp] in 0..63
  u = u.reshape(n, kp // GROUP_ALIGN, 4, 32).transpose(1, 2, 3, 0)  # [G, quarter, t, N]
  lo, hi = u & 0xF, u >> 4
  lo01 = lo[:, 0] | (lo[:, 1] << 4)
  lo23 = lo[:, 2] | (lo[:, 3] << 4)
  hi4 = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
  return jnp.stack([lo01, lo23, hi4], axis=1).reshape(3 * kp // 4, n)  # [G, 3, 32, N] -> rows


def unpack_pallas6(packed: jax.Array) -> jax.Array:
  """uint8 [3 Kp / 4, N] -> int8 [N, Kp], the exact inverse of pack_pallas6."""
  if packed.ndim != 2 or packed.dtype != jnp.uint8 or packed.shape[0] % PALLAS6_ROWS_PER_GROUP:
    raise ValueError(f"pallas6 arrays are uint8 [96 * groups, N], got {packed.dtype} {packed.shape}")
  rows, n = packed.shape
  g = rows // PALLAS6_ROWS_PER_GROUP
  p = packed.reshape(g, 3, 32, n)
  lo = jnp.stack([p[:, 0] & 0xF, p[:, 0] >> 4, p[:, 1] & 0xF, p[:, 1] >> 4], axis=1)  # [G, 4, 32, N]
  hi = jnp.stack([(p[:, 2] >> (2 * r)) & 3 for r in range(4)], axis=1)
  u = (lo | (hi << 4)).astype(jnp.int32) - PALLAS6_OFFSET
  return u.astype(jnp.int8).transpose(3, 0, 1, 2).reshape(n, g * GROUP_ALIGN)


def pack(q: jax.Array, bits: int, layout: str, k: int) -> jax.Array:
  """Logical int [N, Kp] of a layer with real K = k -> the layout's packed array.

  Only the first stored_k(k) columns are kept: the rest is padding, zero by construction.
  """
  if layout == "bitplanes":
    return pack_bitplanes(q[:, : stored_k(k)], bits)
  if layout == "pallas6":
    if bits != 6:
      raise ValueError(f"layout 'pallas6' holds 6-bit weights only, got {bits=}")
    return pack_pallas6(q[:, : padded_k(k)])
  raise ValueError(f"unknown layout {layout!r}; known: {LAYOUTS}")


def unpack(packed: jax.Array, bits: int, layout: str, k: int) -> jax.Array:
  """The exact inverse of pack: int8 [N, Kp] with zeros past K (k = the layer's real K)."""
  if layout == "bitplanes":
    if packed.shape[0] != bits:
      raise ValueError(f"bitplanes array has {packed.shape[0]} planes, expected {bits}")
    q = unpack_bitplanes(packed)
  elif layout == "pallas6":
    if bits != 6:
      raise ValueError(f"layout 'pallas6' holds 6-bit weights only, got {bits=}")
    q = unpack_pallas6(packed)
  else:
    raise ValueError(f"unknown layout {layout!r}; known: {LAYOUTS}")
  return jnp.pad(q, [(0, 0), (0, padded_k(k) - q.shape[1])])


def packed_bytes_per_weight(bits: int, layout: str) -> float:
  if layout in ("bitplanes", "pallas6"):
    return bits / 8  # pallas6: for K a multiple of 128 (it stores the padded Kp)
  raise ValueError(f"unknown layout {layout!r}; known: {LAYOUTS}")
