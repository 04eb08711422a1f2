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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

GROUP_ALIGN = 128  # K is padded to a multiple of this (the group size; BMMA's K per MMA)
WORD_BITS = 32
LAYOUTS = ("bitplanes", "pallas6")
PALLAS6_ROWS = 16  # rows of one contiguous "pallas6" tile (N must be a multiple)
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


def pack_pallas6(q: jax.Array) -> jax.Array:
  """int [N, Kp] in [-32, 31] (N % 16 == 0, Kp % 128 == 0) -> uint8 [N/16, Kp/128, 3, 16, 32]."""
  if q.ndim != 2 or q.shape[1] % GROUP_ALIGN or q.shape[0] % PALLAS6_ROWS:
    raise ValueError(f"pallas6 packs [N, Kp] with N a multiple of {PALLAS6_ROWS} and Kp a multiple of "
                     f"{GROUP_ALIGN}, got shape {q.shape}")
  n, kp = q.shape
  u = (jnp.asarray(q).astype(jnp.int32) + PALLAS6_OFFSET).astype(jnp.uint8)
  u = u.reshape(n, kp // GROUP_ALIGN, 32, 4)  # [N, G, t, phase], values 0..63
  lo, hi = u & 0xF, u >> 4
  planes = jnp.stack([lo[..., 0] | (lo[..., 1] << 4), lo[..., 2] | (lo[..., 3] << 4),
                      hi[..., 0] | (hi[..., 1] << 2) | (hi[..., 2] << 4) | (hi[..., 3] << 6)], axis=2)  # [N, G, 3, 32]
  return planes.reshape(n // PALLAS6_ROWS, PALLAS6_ROWS, kp // GROUP_ALIGN, 3, 32).transpose(0, 2, 3, 1, 4)


def unpack_pallas6(packed: jax.Array) -> jax.Array:
  """uint8 [N/16, Kp/128, 3, 16, 32] -> int8 [N, Kp], the exact inverse of pack_pallas6."""
  if packed.ndim != 5 or packed.dtype != jnp.uint8 or packed.shape[2:] != (3, PALLAS6_ROWS, 32):
    raise ValueError(f"pallas6 arrays are uint8 [N/16, groups, 3, 16, 32], got {packed.dtype} {packed.shape}")
  blocks, g = packed.shape[:2]
  p = packed.transpose(0, 3, 1, 2, 4).reshape(blocks * PALLAS6_ROWS, g, 3, 32)  # [N, G, plane, t]
  lo01, lo23, hi = p[:, :, 0], p[:, :, 1], p[:, :, 2]
  lo = jnp.stack([lo01 & 0xF, lo01 >> 4, lo23 & 0xF, lo23 >> 4], axis=-1)  # [N, G, t, phase]
  hi = jnp.stack([(hi >> (2 * ph)) & 3 for ph in range(4)], axis=-1)
  u = (lo | (hi << 4)).astype(jnp.int32) - PALLAS6_OFFSET
  return u.astype(jnp.int8).reshape(blocks * PALLAS6_ROWS, g * GROUP_ALIGN)


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
