"""GPTQ-style error compensation for group-wise weight quantization (the contract's numerics).

Columns are quantized one at a time; each column's rounding error is spread over the columns
not yet quantized through the inverse Hessian of the layer input (H = X^T X), so the layer's
output error on the calibration data, not the weight error, is what gets minimized.

Two column orders:
  in order   (act_order=False) left to right; each 128-wide group takes its scale
             (max|w| / qmax) from its weights as updated when the group is reached.
  act order  (act_order=True) columns with the largest H diagonal (the most active inputs) go
             first, while they can still be compensated; the group scales are fixed up front
             from the original weights ("static groups"), since a group's columns are then
             visited out of order.
Either way the result is a contract weight: q_w in range, one fp16 scale per group.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flexq_jax.numerics import pad_k
from pallas_kernels import core

BLOCK = 128  # columns updated together before the lazy update of the rest


def _padded_hessian(hessian: jax.Array, k: int, kp: int) -> jax.Array:
  """H [K, K] as fp32 [Kp, Kp], zeros in the padding."""
  return jnp.zeros((kp, kp), jnp.float32).at[:k, :k].set(hessian.astype(jnp.float32))


def _damping(diag: jax.Array, damp: float) -> jax.Array:
  """GPTQ's diagonal damping: damp times the mean of the live (positive) diagonal, as a [Kp, Kp] matrix."""
  live = diag > 0
  live_mean = jnp.sum(jnp.where(live, diag, 0.0)) / jnp.maximum(1, jnp.sum(live))
  return jnp.eye(diag.shape[0]) * damp * live_mean


@functools.partial(jax.jit, static_argnames=("bits", "group", "damp", "act_order"))
def gptq_quantize(w: jax.Array, hessian: jax.Array, *, bits: int = 6, group: int = 128,
                  damp: float = 0.01, act_order: bool = True,
                  scales: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """GPTQ quantization of one layer.

  Args:
    w: [N, K] float weights (out, in).
    hessian: [K, K] sum (or mean) of x^T x over calibration tokens.
    bits: weight bits.
    group: K-group size (a multiple of 128).
    damp: diagonal damping, as a fraction of the mean diagonal.
    act_order: visit columns by decreasing H diagonal (with static group scales).
    scales: optional fp16 [N, Kp / group] static group scales to quantize with (e.g. learned
      clipping, flexq_jax/clipping.py) instead of max|w| / qmax; weights beyond a scale's range clip.

  Returns:
    (q int8 [N, Kp], scales fp16 [N, Kp / group]): same form as numerics.quantize_weight.
  """
  n, k = w.shape
  kp = core.padded_k(k)
  qmin, qmax = core.qrange(bits)
  w = pad_k(w.astype(jnp.float32), kp)
  h = _padded_hessian(hessian, k, kp)
  diag = jnp.diag(h)
  dead = diag <= 0  # channels never active (and the padding): fix them at zero
  w = jnp.where(dead[None, :], 0.0, w)
  h = h + jnp.diag(jnp.where(dead, 1.0, 0.0)) + _damping(diag, damp)

  # Scales fixed up front: with act order, and whenever a group is not exactly one block.
  static = act_order or group != BLOCK or scales is not None
  if scales is not None:
    if scales.shape != (n, kp // group):
      raise ValueError(f"scales must be [N, Kp / group] = {(n, kp // group)}, got {scales.shape}")
    static_scales = scales.astype(jnp.float16)
  elif static:
    static_scales = (jnp.max(jnp.abs(w.reshape(n, kp // group, group)), axis=-1) / qmax).astype(jnp.float16)
  else:
    static_scales = None
  perm = jnp.argsort(-jnp.where(dead, -1.0, diag)) if act_order else jnp.arange(kp)
  w = w[:, perm]
  h = h[perm][:, perm]
  # Upper Cholesky factor of H^-1: row i holds how column i's error moves the later columns.
  hinv = jnp.linalg.cholesky(jnp.linalg.inv(h), upper=True)

  qs, block_scales = [], []
  for start in range(0, kp, BLOCK):
    stop = start + BLOCK
    w_blk = w[:, start:stop]
    if static:
      # [BLOCK, N]: the scale of each column's own (original) group.
      col_scales = static_scales.astype(jnp.float32)[:, perm[start:stop] // group].T
    else:
      scale = (jnp.max(jnp.abs(w_blk), axis=1) / qmax).astype(jnp.float16)
      block_scales.append(scale)
      col_scales = jnp.broadcast_to(scale.astype(jnp.float32), (BLOCK, n))
    h_blk = hinv[start:stop, start:stop]

    def column(i, carry, col_scales=col_scales, h_blk=h_blk):
      w_blk, q_blk, err_blk = carry
      col = w_blk[:, i]
      s = col_scales[i]
      q = jnp.where(s > 0, jnp.clip(jnp.round(col / jnp.where(s > 0, s, 1.0)), qmin, qmax), 0.0)
      err = (col - q * s) / h_blk[i, i]
      # Only columns after i change (h_blk is upper triangular).
      w_blk = w_blk - err[:, None] * h_blk[i][None, :]
      return w_blk, q_blk.at[:, i].set(q), err_blk.at[:, i].set(err)

    zeros = jnp.zeros((n, BLOCK), jnp.float32)
    _, q_blk, err_blk = jax.lax.fori_loop(0, BLOCK, column, (w_blk, zeros, zeros))
    w = w.at[:, stop:].add(-err_blk @ hinv[start:stop, stop:])
    qs.append(q_blk)
  q = jnp.concatenate(qs, axis=1)
  q = q[:, jnp.argsort(perm)].astype(jnp.int8)  # back to the original column order
  if static:
    return q, static_scales
  return q, jnp.stack(block_scales, axis=1)


@functools.partial(jax.jit, static_argnames=("group", "damp"))
def refit_scales(w: jax.Array, q: jax.Array, scales: jax.Array, hessian: jax.Array, *, group: int = 128,
                 damp: float = 0.1) -> jax.Array:
  """The group scales that best fit fixed integer codes: per output row, the s minimizing
  (w - w_hat)^T (H + damp * mean(diag H) I) (w - w_hat) with w_hat = s_g q over each group g (GPTQ's damped
  objective, all of a row's groups jointly: a G x G linear system a row).

  The codes stay; only the fp16 scales change, so the result is a contract weight as before. The
  scales given are one solution of the same objective, so the refit never makes the (damped, fp32)
  objective worse beyond the fp16 rounding of the new scales; a group of all-zero codes, or a solution
  that is not positive and finite, keeps its scale.

  Args:
    w: [N, K] float weights (out, in), as given to gptq_quantize.
    q: int8 [N, Kp] codes; scales: fp16 [N, Kp / group].
    hessian: [K, K] mean x^T x over calibration tokens.
    group, damp: as for gptq_quantize.

  Returns:
    fp16 [N, Kp / group] scales.
  """
  n, k = w.shape
  kp = q.shape[1]
  g = kp // group
  if scales.shape != (n, g) or kp % group:
    raise ValueError(f"refit_scales: scales {scales.shape} do not match codes {q.shape} in groups of {group}")
  h = _padded_hessian(hessian, k, kp)
  h = h + _damping(jnp.diag(h), damp)
  hb = h.reshape(g, group, g, group)
  wp = pad_k(w.astype(jnp.float32), kp)
  qf = q.astype(jnp.float32)
  hw = wp @ h  # [N, Kp]: H w of each row (H symmetric)
  b = jnp.einsum("rgi,rgi->rg", qf.reshape(n, g, group), hw.reshape(n, g, group))  # q_g . (H w)_g

  def system(rows):  # A[r, g, h] = q_{r,g} . H_{gh} q_{r,h}, a few rows at a time (bounded memory)
    qr = rows.reshape(rows.shape[0], g, group)
    return jnp.einsum("rgi,gihj,rhj->rgh", qr, hb, qr)

  chunk = max(1, (1 << 24) // (g * group * g))
  pad = -n % chunk
  qc = jnp.pad(qf, ((0, pad), (0, 0))).reshape(-1, chunk, kp)
  a = jax.lax.map(system, qc).reshape(-1, g, g)[:n]
  ad = jnp.diagonal(a, axis1=1, axis2=2)
  live = ad > 0
  a = a + jax.vmap(jnp.diag)(jnp.where(live, 1e-6 * ad, 1.0))  # a zero group: its own equation s = 0
  s = jnp.linalg.solve(a, jnp.where(live, b, 0.0)[..., None])[..., 0]
  old = scales.astype(jnp.float32)
  new = jnp.where(live & jnp.isfinite(s) & (s > 0), s, old).astype(jnp.float16)
  return jnp.where(jnp.isfinite(new.astype(jnp.float32)), new, scales)
