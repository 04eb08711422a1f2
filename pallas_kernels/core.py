"""The dependency-free core: the group size, the packed layouts' constants and the activation
quantization rule of the numerics contract (flexq_jax/DESIGN.md, "Numerics contract").

Every kernel (pallas_kernels/, flexq_jax/cuda/) and the library's reference (flexq_jax/numerics.py)
and layouts (flexq_jax/formats.py) take these names from here, so there is one of each. This module
imports only jax and numpy; nothing of the project imports into it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

GROUP = 128  # the K-group of weights and activations; K is zero-padded to a multiple of it
WORD_BITS = 32  # "bitplanes": weights of one plane packed along K into uint32 words
G4 = 4  # "bitplanes_g4": groups whose words interleave
TILE_ROWS = 16  # "pallas6" / "pallas8": rows of one contiguous tile (N must be a multiple)
PHASES = 4  # "pallas6" / "pallas8": k = 4t + p within a group, p = phase
PALLAS6_OFFSET = 32  # "pallas6" stores u = q + 32 (no sign extension when unpacking)
PALLAS6_PLANES = 3  # "pallas6": two 4-bit planes and one 2-bit plane a group and row
PALLAS6_PLANE_BYTES = GROUP // PHASES  # 32: one byte a plane per 4 weights (the phases)

# Activation scales keep 15 significant bits: see round_to_nearest_quotient for why.
SCALE_MASK = np.uint32(0xFFFFFE00)


def padded_k(k: int) -> int:
  """K rounded up to a multiple of GROUP."""
  return -(-k // GROUP) * GROUP


def stored_k(k: int) -> int:
  """K rounded up to a multiple of WORD_BITS: how much of each row "bitplanes" keeps."""
  return -(-k // WORD_BITS) * WORD_BITS


def qrange(bits: int) -> tuple[int, int]:
  """(min, max) of a signed `bits`-bit integer."""
  return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def g4_words(k: int) -> int:
  """uint32 words a "bitplanes_g4" row of a layer with real K = k holds (whole blocks of 4 groups)."""
  groups = padded_k(k) // GROUP
  return -(-groups // G4) * G4 * (GROUP // WORD_BITS)


def activation_scale(amax: jax.Array, qmax: int) -> jax.Array:
  """The contract's s_x from max|x| (fp32): amax * fl32(1 / qmax), low 9 mantissa bits cleared."""
  s = amax.astype(jnp.float32) * np.float32(1.0 / qmax)
  return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(s, jnp.uint32) & SCALE_MASK, jnp.float32)


def round_to_nearest_quotient(x: jax.Array, s: jax.Array) -> jax.Array:
  """The integer nearest to the exact x / s, ties to even, as fp32 (0 where s == 0).

  Why this and not round(x / s): a plain fp32 x / s is not one number across compilers (XLA
  rewrites x / s into x * (1 / s), its GPU reciprocal differs from the CPU's, Triton divides
  approximately), and near ties the ways disagree. s must have at most 15 significant bits
  (activation_scale) and |x / s| <= 2^8: then every boundary (c +- 1/2) s is exact in fp32, so a
  guess within one of the answer (from any reciprocal) is corrected by two exact comparisons,
  and exact ties are seen as ties. The CUDA kernel restates these steps
  (flexq_jax/cuda/csrc/act_quant.cuh); its GPU test compares its planes bit for bit.
  """
  live = s > 0
  s = jnp.where(live, s, 1.0)
  c = jnp.floor(x * (1.0 / s) + 0.5)  # within one of the answer, however 1 / s was rounded
  c = jnp.where(x > (c + 0.5) * s, c + 1.0, jnp.where(x < (c - 0.5) * s, c - 1.0, c))
  odd = (c - 2.0 * jnp.floor(c * 0.5)) != 0
  c = jnp.where(odd & (x == (c + 0.5) * s), c + 1.0, jnp.where(odd & (x == (c - 0.5) * s), c - 1.0, c))
  return jnp.where(live, c, 0.0)


def quantize_groups(x: jax.Array, qmax: int) -> tuple[jax.Array, jax.Array]:
  """The contract's activation quantization of groups along the last axis.

  Args:
    x: fp32 [..., g], one group per row of the last axis (zeros where K was padded).
    qmax: 31 (A6) or 127 (A8).

  Returns:
    (q fp32 [..., g] integers, s fp32 [...]). |x| <= max|x| <= (qmax + 2^-14) s keeps q within
    [-qmax, qmax], so no clip is needed (the reference clips anyway, as a guard of its int8 cast).
  """
  s = activation_scale(jnp.max(jnp.abs(x), axis=-1), qmax)
  return round_to_nearest_quotient(x, s[..., None]), s
