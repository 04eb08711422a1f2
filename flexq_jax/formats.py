r"""Weight storage layouts: the one module that owns how quantized weights sit in memory.

Canonical logical form (every layout round-trips to it exactly):
    q      int8  [N, Kp]      signed values in [-2^(b-1), 2^(b-1) - 1] (b = weight bits)
    scales fp16  [N, Kp / g]  one scale per output channel and K-group
Kp is K rounded up to a multiple of GROUP_ALIGN; the padding holds zeros.

The int8 array above is a transient of packing and of the reference path; a quantized
checkpoint and a quantized model in device memory hold only packed layouts (b bits a weight).
Packed layouts store K only up to the next multiple of 32 (K32); the zero padding up to Kp is
restored on unpacking, so a K of 576 costs 576, not 640, weights a row.

Layout "bitplanes" (b bits/weight; the binary-tensor-core layout, any b from 2 to 8):
    Two's complement bit i of every weight, packed along K into uint32 words:

        planes[i, n, w] bit t  =  bit i of (q[n, 32*w + t] mod 2^b)      t = 0 (LSB) .. 31

        plane i      row n:  | word 0: k=0..31 | word 1: k=32..63 | word 2 | word 3 | ...
                              \______________ one 128-wide group = 4 words ______/

    shape [b, N, K32 / 32] uint32. Value: q = -2^(b-1) * plane_(b-1) + sum_(i<b-1) 2^i * plane_i.
    Shards along N split rows; shards along K split words on group boundaries (4 words).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

GROUP_ALIGN = 128  # K is padded to a multiple of this (the group size; BMMA's K per MMA)
WORD_BITS = 32
LAYOUTS = ("bitplanes",)


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


def pack(q: jax.Array, bits: int, layout: str, k: int) -> jax.Array:
  """Logical int [N, Kp] of a layer with real K = k -> the layout's packed array.

  Only the first stored_k(k) columns are kept: the rest is padding, zero by construction.
  """
  if layout == "bitplanes":
    return pack_bitplanes(q[:, : stored_k(k)], bits)
  raise ValueError(f"unknown layout {layout!r}; known: {LAYOUTS}")


def unpack(packed: jax.Array, bits: int, layout: str, k: int) -> jax.Array:
  """The exact inverse of pack: int8 [N, Kp] with zeros past K (k = the layer's real K)."""
  if layout == "bitplanes":
    if packed.shape[0] != bits:
      raise ValueError(f"bitplanes array has {packed.shape[0]} planes, expected {bits}")
    q = unpack_bitplanes(packed)
  else:
    raise ValueError(f"unknown layout {layout!r}; known: {LAYOUTS}")
  return jnp.pad(q, [(0, 0), (0, padded_k(k) - q.shape[1])])


def packed_bytes_per_weight(bits: int, layout: str) -> float:
  if layout == "bitplanes":
    return bits / 8
  raise ValueError(f"unknown layout {layout!r}; known: {LAYOUTS}")
