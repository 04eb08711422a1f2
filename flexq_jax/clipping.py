"""Learnable weight clipping (after OmniQuant's LWC): per-group clipping factors of the weight
scales, learned on calibration statistics.

A group's scale is normally max|w_group| / qmax (the contract's round-to-nearest weight). Here it is

    s = gamma * max|w_group| / qmax,    gamma = sigmoid(theta) in (0, 1), one per (row, K-group)

so the largest weights of a group may be clipped in exchange for a finer grid for the rest. theta is
optimized with optax's Adam to minimize the layer's output error on the calibration inputs,

    || X W^T - X Q(W)^T ||^2 = tr((W - Q(W)) H (W - Q(W))^T),   H = X^T X,

(H is what GPTQ already collects: no activations are kept), rounding passed through with a
straight-through estimator, as OmniQuant does. The loss is divided by tr(W H W^T), so one learning
rate fits every layer. The result is a set of fp16 scales; the weights are then rounded with them
(round to nearest) or quantized by GPTQ with them as its static group scales
(flexq_jax/gptq.py): the contract's numbers either way, only the scales differ.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from flexq_jax.numerics import pad_k
from pallas_kernels import core

INIT_LOGIT = 4.0  # sigmoid(4) = 0.982: OmniQuant's initialization, close to no clipping


def _fake_quant(w, gamma, amax, bits):
  """w [N, G, g], gamma / amax [N, G] -> the dequantized weight; straight-through rounding."""
  qmin, qmax = core.qrange(bits)
  s = gamma * amax / qmax
  s_safe = jnp.where(s > 0, s, 1.0)[..., None]
  x = w / s_safe
  q = jnp.clip(x + jax.lax.stop_gradient(jnp.round(x) - x), qmin, qmax)
  return q * s_safe


@functools.partial(jax.jit, static_argnames=("bits", "group", "steps", "lr"))
def learn_clipping(w: jax.Array, hessian: jax.Array, *, bits: int = 6, group: int = 128, steps: int = 100,
                   lr: float = 5e-3) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Learned group scales of one layer.

  Args:
    w: [N, K] float weights (out, in).
    hessian: [K, K] sum or mean of x^T x over the calibration tokens (only its direction matters).
    bits: weight bits.
    group: K-group size (a multiple of 128).
    steps: Adam steps.
    lr: Adam learning rate on the clipping logits.

  Returns:
    (scales fp16 [N, Kp / group], the normalized output error with the round-to-nearest scales,
     the same with the learned scales): the learned scales are kept only where they lower the
     error (else the plain max|w| / qmax scales come back).
  """
  n, k = w.shape
  kp = core.padded_k(k)
  _, qmax = core.qrange(bits)
  w = pad_k(w.astype(jnp.float32), kp)
  h = jnp.zeros((kp, kp), jnp.float32).at[:k, :k].set(hessian.astype(jnp.float32))
  h = h / jnp.maximum(jnp.trace(h) / k, 1e-30)  # scale-free: only relative errors are optimized
  wg = w.reshape(n, kp // group, group)
  amax = jnp.max(jnp.abs(wg), axis=-1)
  norm = jnp.maximum(jnp.sum((w @ h) * w), 1e-30)

  def loss(theta):
    e = w - _fake_quant(wg, jax.nn.sigmoid(theta), amax, bits).reshape(n, kp)
    return jnp.sum((e @ h) * e) / norm

  opt = optax.adam(lr)
  theta = jnp.full(amax.shape, INIT_LOGIT, jnp.float32)

  def step(_, carry):
    theta, state = carry
    g = jax.grad(loss)(theta)
    updates, state = opt.update(g, state)
    return optax.apply_updates(theta, updates), state

  theta, _ = jax.lax.fori_loop(0, steps, step, (theta, opt.init(theta)))

  def error(scales):  # the loss of fp16 scales, rounding as the contract rounds
    s = jnp.where(scales > 0, scales.astype(jnp.float32), 1.0)[..., None]
    e = w - (jnp.clip(jnp.round(wg / s), *core.qrange(bits)) * s).reshape(n, kp)
    return jnp.sum((e @ h) * e) / norm

  plain = (amax / qmax).astype(jnp.float16)
  learned = (jax.nn.sigmoid(theta) * amax / qmax).astype(jnp.float16)
  e_plain, e_learned = error(plain), error(learned)
  return jnp.where(e_learned < e_plain, learned, plain), e_plain, jnp.minimum(e_learned, e_plain)


MSE_GRID = tuple(1.0 - 0.02 * i for i in range(16))  # clipping factors tried: 1.0, 0.98, ..., 0.70


@functools.partial(jax.jit, static_argnames=("bits", "group", "grid"))
def mse_clipping(w: jax.Array, hessian: jax.Array | None = None, *, bits: int = 6, group: int = 128,
                 grid: tuple[float, ...] = MSE_GRID) -> jax.Array:
  """Group scales by grid search: for each (row, K-group) the factor gamma in `grid` whose scale
  gamma * max|w_group| / qmax rounds the group with the least error sum_j d_j (w_j - Q(w_j))^2,
  d = diag(hessian) (each input channel weighted by its mean square activation; None: 1). Unlike
  learn_clipping it sees the calibration data only through that diagonal, a per-channel energy,
  so it cannot fit the calibration text's cross-channel structure.

  Returns fp16 scales [N, Kp / group] (gamma = 1.0, the plain max|w| / qmax, is in the grid, so no
  group's weighted error grows)."""
  n, k = w.shape
  kp = core.padded_k(k)
  qmin, qmax = core.qrange(bits)
  wg = pad_k(w.astype(jnp.float32), kp).reshape(n, kp // group, group)
  d = jnp.ones((kp,), jnp.float32) if hessian is None else jnp.zeros((kp,), jnp.float32).at[:k].set(
      jnp.diag(hessian).astype(jnp.float32))
  d = d.reshape(kp // group, group)
  amax = jnp.max(jnp.abs(wg), axis=-1)

  def error(gamma):  # [N, G]: the weighted error of each group at this factor, fp16 scales as stored
    s = (gamma * amax / qmax).astype(jnp.float16).astype(jnp.float32)
    s_safe = jnp.where(s > 0, s, 1.0)[..., None]
    e = wg - jnp.clip(jnp.round(wg / s_safe), qmin, qmax) * s_safe
    return jnp.sum(d * e * e, axis=-1)

  errors = jnp.stack([error(g) for g in grid])  # [len(grid), N, G]
  best = jnp.asarray(grid, jnp.float32)[jnp.argmin(errors, axis=0)]  # first minimum: the least clipping wins ties
  return (best * amax / qmax).astype(jnp.float16)


def full_range_scales(w: jax.Array, *, bits: int = 6, group: int = 128) -> jax.Array:
  """Group scales that use both ends of the signed range: s = max(max(w) / qmax, -min(w) / -qmin)
  (6 bits: max(w) / 31 or -min(w) / 32), so a group whose largest magnitude is negative maps it to
  -32 instead of -31 and gets a 31/32 finer step. fp16 [N, Kp / group]; all-zero groups 0."""
  n, k = w.shape
  kp = core.padded_k(k)
  qmin, qmax = core.qrange(bits)
  wg = pad_k(w.astype(jnp.float32), kp).reshape(n, kp // group, group)
  s = jnp.maximum(jnp.max(wg, axis=-1) / qmax, jnp.min(wg, axis=-1) / qmin)
  s16 = s.astype(jnp.float16)
  # rounded up to the next fp16 where rounding went down, so the extremes stay inside the range
  return jnp.where(s16.astype(jnp.float32) < s, jnp.nextafter(s16, jnp.float16(jnp.inf)), s16)

