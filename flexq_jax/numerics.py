"""The numerics contract (flexq_jax/DESIGN.md) in pure jnp: the definition every backend matches.

Weights W [N, K]: symmetric, one fp16 scale per (output channel, group of g along K),
    s_w = max|W_group| / qmax_w,  q_w = clip(round_half_even(W / s_w), qmin, qmax).
Activations X [M, K]: dynamic, symmetric, per token and group, fp32 scales,
    s_x = fl32(max|X_group| * fl32(1 / qmax_a)) with the low 9 mantissa bits cleared (15
    significant bits),  q_x = the integer nearest to the exact quotient X / s_x, ties to even.
Output: Y[m, n] = sum_j s_x[m, j] * s_w[n, j] * (sum_{k in group j} q_x[m, k] q_w[n, k]).

Why the activation rule reads that way: it must give the same integers on every platform and in
every kernel. A plain fp32 x / s is not one number across compilers (XLA rewrites x / s into
x * (1 / s), its GPU reciprocal differs from the CPU's, Triton divides approximately), and with
bf16 inputs the ways disagree on ~1e-4 of the elements, the near-ties. With 15 significant bits in
s_x, every half-integer boundary (c +- 1/2) s_x is exact in fp32, so any guess within one of the
answer (here floor(x * (1 / s) + 1/2)) is corrected by two exact comparisons, and exact ties are
seen as ties (pallas_kernels/core.py: round_to_nearest_quotient, the one definition every kernel
calls). Clearing 9 bits lowers s_x by less than 2^-14 relative.

K is zero-padded to a multiple of 128 (GROUP) for both operands. group_size is
128 (FlexQ) or any multiple of 128, or None for one group over the whole row (per-channel
weights / per-token activations, the W8A8 SmoothQuant baseline).

Why the integer sums are exact in fp32 here: products of <= 8-bit integers are at most
2^14 in magnitude, so a 128-long sum stays below 2^21 < 2^24, and every partial sum of
integers below 2^24 is exactly representable in fp32. Each 128-chunk is therefore summed in
a float matmul (fast on any backend) at HIGHEST precision, and chunks are combined in int32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flexq_jax import formats
from pallas_kernels import core
from pallas_kernels.core import GROUP


def _group(group_size: int | None, kp: int) -> int:
  if group_size is None:
    return kp
  if group_size <= 0 or group_size % GROUP:
    raise ValueError(f"group_size must be a positive multiple of {GROUP} or None, got {group_size}")
  if kp % group_size:
    raise ValueError(f"padded K={kp} is not a multiple of group_size={group_size}")
  return group_size


def pad_k(a: jax.Array, k_to: int) -> jax.Array:
  """Zero-pads the last axis to length k_to."""
  extra = k_to - a.shape[-1]
  if extra == 0:
    return a
  return jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, extra)])


def check_finite(name: str, a) -> None:
  """Raises a clear error for NaN/Inf in a concrete array (no-op while tracing)."""
  if isinstance(a, jax.core.Tracer):
    return
  a = np.asarray(a, np.float32)
  if not np.isfinite(a).all():
    bad = np.argwhere(~np.isfinite(a))[0]
    raise ValueError(f"{name} contains NaN or Inf (first at index {tuple(int(i) for i in bad)})")


def quantize_weight(w: jax.Array, bits: int = 6, group_size: int | None = 128,
                    scales: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Symmetric group-wise round-to-nearest weight quantization.

  Args:
    w: [N, K] float weights (out, in).
    bits: weight bits (2..8).
    group_size: K-group (multiple of 128) or None for one scale per output channel.
    scales: optional precomputed fp16 scales [N, G] (clipping search / GPTQ pick their own).

  Returns:
    (q int8 [N, Kp], scales fp16 [N, Kp / group]); all-zero groups get scale 0 and q 0.
  """
  if w.ndim != 2:
    raise ValueError(f"weights must be [N, K], got shape {w.shape}")
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f"weights must be floating point, got {w.dtype}")
  check_finite("weights", w)
  n, k = w.shape
  kp = core.padded_k(k)
  g = _group(group_size, kp)
  qmin, qmax = core.qrange(bits)
  wg = pad_k(w.astype(jnp.float32), kp).reshape(n, kp // g, g)
  if scales is None:
    scales = jnp.max(jnp.abs(wg), axis=-1) / qmax
    if not isinstance(scales, jax.core.Tracer) and float(jnp.max(scales)) > float(jnp.finfo(jnp.float16).max):
      raise ValueError("a weight group's scale overflows fp16 (|w| > 2e6): weights this large are not supported")
  scales = scales.astype(jnp.float16)
  s = scales.astype(jnp.float32)[..., None]
  q = jnp.where(s > 0, jnp.round(wg / jnp.where(s > 0, s, 1.0)), 0.0)  # jnp.round: half to even
  q = jnp.clip(q, qmin, qmax).astype(jnp.int8).reshape(n, kp)
  return q, scales


def dequantize_weight(q: jax.Array, scales: jax.Array, k: int | None = None) -> jax.Array:
  """int [N, Kp] + fp16 scales [N, G] -> fp32 [N, k] (k = original K; default Kp)."""
  n, kp = q.shape
  g = kp // scales.shape[1]
  w = q.astype(jnp.float32).reshape(n, -1, g) * scales.astype(jnp.float32)[..., None]
  return w.reshape(n, kp)[:, : (k or kp)]


def quantize_activation(x: jax.Array, bits: int, group_size: int | None = 128) -> tuple[jax.Array, jax.Array]:
  """Dynamic symmetric per-token-group activation quantization.

  Args:
    x: [M, K] float activations.
    bits: 6 or 8 (any 2..8 works).
    group_size: as in quantize_weight.

  Returns:
    (q int8 [M, Kp], scales fp32 [M, Kp / group]).
  """
  m, k = x.shape
  kp = core.padded_k(k)
  g = _group(group_size, kp)
  qmin, qmax = core.qrange(bits)
  xg = pad_k(x.astype(jnp.float32), kp).reshape(m, kp // g, g)
  q, s = core.quantize_groups(xg, qmax)
  q = jnp.clip(q, qmin, qmax).astype(jnp.int8).reshape(m, kp)
  return q, s


def chunk_dots(qx: jax.Array, qw: jax.Array) -> jax.Array:
  """Exact 128-chunk integer dot products: int [M, Kp], int [N, Kp] -> int32 [Kp/128, M, N]."""
  m, kp = qx.shape
  n = qw.shape[0]
  c = kp // GROUP
  xs = qx.astype(jnp.float32).reshape(m, c, GROUP)
  ws = qw.astype(jnp.float32).reshape(n, c, GROUP)
  sums = jnp.einsum("MCK,NCK->CMN", xs, ws, precision=jax.lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32)
  return sums.astype(jnp.int32)


def group_dots(qx: jax.Array, qw: jax.Array, group: int) -> jax.Array:
  """int [M, Kp], int [N, Kp] -> exact int32 sums per K-group [Kp/group, M, N]."""
  chunks = chunk_dots(qx, qw)
  c, m, n = chunks.shape
  return chunks.reshape(c // (group // GROUP), group // GROUP, m, n).sum(axis=1, dtype=jnp.int32)


def reference_matmul(x: jax.Array, q_w: jax.Array, s_w: jax.Array, *, a_bits: int,
                     group_size: int | None = 128, out_dtype=None) -> jax.Array:
  """The contract: x [M, K] float, q_w int [N, Kp], s_w fp16 [N, G] -> [M, N] in out_dtype.

  a_bits = 16 means weight-only quantization: x stays float and meets the dequantized weight.
  """
  if x.ndim != 2:
    raise ValueError(f"activations must be [M, K], got shape {x.shape}")
  m, k = x.shape
  n, kp = q_w.shape
  if core.padded_k(k) != kp:
    raise ValueError(f"activation K={k} does not match the weight's padded K={kp}")
  out_dtype = out_dtype or x.dtype
  g = _group(group_size, kp)
  if a_bits >= 16:
    w = dequantize_weight(q_w, s_w, k)
    return jnp.dot(x, w.T.astype(x.dtype), preferred_element_type=jnp.float32).astype(out_dtype)
  q_x, s_x = quantize_activation(x, a_bits, group_size)
  sums = group_dots(q_x, q_w, g).astype(jnp.float32)  # [G, M, N], exact integers
  y = jnp.einsum("GMN,MG,NG->MN", sums, s_x, s_w.astype(jnp.float32))
  return y.astype(out_dtype)


def dequant_matmul(x: jax.Array, q_w: jax.Array, s_w: jax.Array, *, a_bits: int,
                   group_size: int | None = 128, out_dtype=None) -> jax.Array:
  """reference_matmul's numbers multiplied as floats: (s_x q_x) @ (s_w q_w)^T in one fp32 dot.

  Equal to the reference up to fp32 rounding and summation order (no integer sums).
  """
  m, k = x.shape
  n, kp = q_w.shape
  out_dtype = out_dtype or x.dtype
  if a_bits >= 16:
    return reference_matmul(x, q_w, s_w, a_bits=a_bits, group_size=group_size, out_dtype=out_dtype)
  g = _group(group_size, kp)
  q_x, s_x = quantize_activation(x, a_bits, group_size)
  x_deq = (q_x.astype(jnp.float32).reshape(m, kp // g, g) * s_x[..., None]).reshape(m, kp)
  w_deq = dequantize_weight(q_w, s_w)
  return jnp.dot(x_deq, w_deq.T, preferred_element_type=jnp.float32).astype(out_dtype)


def bitplane_group_dots(x_planes: jax.Array, w_planes: jax.Array, group: int = 128) -> jax.Array:
  """sum_k qx*qw per group from bit planes: sum_ij c_i c_j popc(X_i AND W_j) (BMMA's identity).

  Args:
    x_planes: uint32 [a_bits, M, Kp/32].
    w_planes: uint32 [w_bits, N, Kp/32].
    group: K-group size (multiple of 32).

  Returns:
    int32 [Kp/group, M, N].
  """
  a_bits, m, words = x_planes.shape
  w_bits, n, _ = w_planes.shape
  wpg = group // core.WORD_BITS
  anded = x_planes[:, None, :, None, :] & w_planes[None, :, None, :, :]  # [a, w, M, N, W]
  pop = jax.lax.population_count(anded).astype(jnp.int32)
  pop = pop.reshape(a_bits, w_bits, m, n, words // wpg, wpg).sum(-1)  # [a, w, M, N, G]
  coeff = (jnp.asarray(formats.plane_coefficients(a_bits))[:, None]
           * jnp.asarray(formats.plane_coefficients(w_bits))[None, :])
  return jnp.einsum("AW,AWMNG->GMN", coeff, pop)


def bitplane_matmul(x: jax.Array, w_planes: jax.Array, s_w: jax.Array, *, a_bits: int,
                    group_size: int = 128, out_dtype=None) -> jax.Array:
  """reference_matmul computed the BMMA way: activation bit planes AND weight bit planes."""
  m, k = x.shape
  out_dtype = out_dtype or x.dtype
  q_x, s_x = quantize_activation(x, a_bits, group_size)
  x_planes = formats.pack_bitplanes(q_x, a_bits)
  sums = bitplane_group_dots(x_planes, w_planes, group_size).astype(jnp.float32)
  y = jnp.einsum("GMN,MG,NG->MN", sums, s_x, s_w.astype(jnp.float32))
  return y.astype(out_dtype)
