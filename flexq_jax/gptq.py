"""GPTQ-style error compensation for group-wise weight quantization (the contract's numerics).

Columns are quantized left to right; each column's rounding error is spread over the columns
not yet quantized through the inverse Hessian of the layer input (H = X^T X), so the layer's
output error on the calibration data, not the weight error, is what gets minimized. Each
128-wide group takes its scale (max|w| / qmax) from its weights as updated when the group is
reached, which is what makes the result a valid contract weight: q_w in range, fp16 scales.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flexq_jax import formats
from flexq_jax.numerics import pad_k


@functools.partial(jax.jit, static_argnames=("bits", "group", "damp"))
def gptq_quantize(w: jax.Array, hessian: jax.Array, *, bits: int = 6, group: int = 128,
                  damp: float = 0.01) -> tuple[jax.Array, jax.Array]:
  """GPTQ quantization of one layer.

  Args:
    w: [N, K] float weights (out, in).
    hessian: [K, K] sum (or mean) of x^T x over calibration tokens.
    bits: weight bits.
    group: K-group size (a multiple of 128).
    damp: diagonal damping, as a fraction of the mean diagonal.

  Returns:
    (q int8 [N, Kp], scales fp16 [N, Kp / group]): same form as numerics.quantize_weight.
  """
  n, k = w.shape
  kp = formats.padded_k(k)
  qmin, qmax = formats.qrange(bits)
  w = pad_k(w.astype(jnp.float32), kp)
  h = jnp.zeros((kp, kp), jnp.float32).at[:k, :k].set(hessian.astype(jnp.float32))
  diag = jnp.diag(h)
  dead = diag <= 0  # channels never active (and the padding): fix them at zero
  h = h + jnp.diag(jnp.where(dead, 1.0, 0.0))
  w = jnp.where(dead[None, :], 0.0, w)
  h = h + jnp.eye(kp) * damp * jnp.mean(jnp.where(dead, 0.0, diag)) * kp / jnp.maximum(1, jnp.sum(~dead))
  # Upper Cholesky factor of H^-1: row i holds how column i's error moves the later columns.
  hinv = jnp.linalg.inv(h)
  hinv = jnp.linalg.cholesky(hinv, upper=True)

  qs, scales = [], []
  for start in range(0, kp, group):
    stop = start + group
    w_blk = w[:, start:stop]
    scale = (jnp.max(jnp.abs(w_blk), axis=1) / qmax).astype(jnp.float16)
    s = scale.astype(jnp.float32)
    safe = jnp.where(s > 0, s, 1.0)
    h_blk = hinv[start:stop, start:stop]

    def column(i, carry, s=s, safe=safe, h_blk=h_blk):
      w_blk, q_blk, err_blk = carry
      col = w_blk[:, i]
      q = jnp.where(s > 0, jnp.clip(jnp.round(col / safe), qmin, qmax), 0.0)
      err = (col - q * s) / h_blk[i, i]
      # Only columns after i change (h_blk is upper triangular).
      w_blk = w_blk - err[:, None] * h_blk[i][None, :]
      return w_blk, q_blk.at[:, i].set(q), err_blk.at[:, i].set(err)

    zeros = jnp.zeros((n, group), jnp.float32)
    _, q_blk, err_blk = jax.lax.fori_loop(0, group, column, (w_blk, zeros, zeros))
    w = w.at[:, stop:].add(-err_blk @ hinv[start:stop, stop:])
    qs.append(q_blk)
    scales.append(scale)
  return jnp.concatenate(qs, axis=1).astype(jnp.int8), jnp.stack(scales, axis=1)
