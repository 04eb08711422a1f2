"""Learned weight clipping (flexq_jax/clipping.py) and GPTQ on given scales."""

import jax.numpy as jnp
import numpy as np
import pytest

from flexq_jax import clipping, gptq, numerics
from flexq_jax.qconfig import QuantConfig


def _layer(seed, n=64, k=256, tokens=1024):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((tokens, k)) * np.where(rng.random(k) < 0.05, 8.0, 1.0)  # a few loud channels
  w = rng.standard_t(3, (n, k)) / np.sqrt(k)  # heavy tails: a little clipping pays
  return jnp.asarray(w, jnp.float32), jnp.asarray(x, jnp.float32)


def _output_error(w, x, q, s):
  return float(jnp.sum((x @ (w - numerics.dequantize_weight(q, s, w.shape[1])).T) ** 2))


def test_learned_clipping_lowers_the_output_error_of_rounding():
  w, x = _layer(0)
  h = x.T @ x
  scales, e_plain, e_learned = clipping.learn_clipping(w, h, steps=300)
  assert scales.dtype == jnp.float16 and scales.shape == (64, 2)
  plain_q, plain_s = numerics.quantize_weight(w, 6, 128)
  assert np.all(np.asarray(scales, np.float32) <= np.asarray(plain_s, np.float32))  # clipping only shrinks
  q, s = numerics.quantize_weight(w, 6, 128, scales=scales)
  before, after = _output_error(w, x, plain_q, plain_s), _output_error(w, x, q, s)
  assert after < 0.97 * before, (before, after)  # 7% lower here (6-bit grids leave little to gain)
  # The reported errors are the same quantities, relative to ||x w^T||^2.
  norm = float(jnp.sum((x @ w.T) ** 2))
  assert float(e_plain) == pytest.approx(before / norm, rel=1e-3)
  assert float(e_learned) == pytest.approx(after / norm, rel=1e-3)


def test_gptq_quantizes_with_given_scales():
  w, x = _layer(1)
  h = x.T @ x
  scales, _, _ = clipping.learn_clipping(w, h, steps=300)
  q, s = gptq.gptq_quantize(w, h, scales=scales)
  np.testing.assert_array_equal(np.asarray(s), np.asarray(scales))
  assert int(jnp.max(q)) <= 31 and int(jnp.min(q)) >= -32
  q0, s0 = gptq.gptq_quantize(w, h)
  assert _output_error(w, x, q, s) < _output_error(w, x, q0, s0)  # the clipped grid wins here too
  with pytest.raises(ValueError, match=r"scales must be \[N, Kp / group\]"):
    gptq.gptq_quantize(w, h, scales=scales[:, :1])


def test_clipping_options_are_checked():
  with pytest.raises(ValueError, match="weight_clipping must be one of"):
    QuantConfig(weight_clipping="omni")
  with pytest.raises(ValueError, match="clipping_steps must be an integer >= 1"):
    QuantConfig(clipping_steps=0)
  with pytest.raises(ValueError, match="clipping_lr must be a positive"):
    QuantConfig(clipping_lr=float("nan"))
  with pytest.raises(ValueError, match="measure_candidates must be"):
    QuantConfig(measure_candidates=0)
  with pytest.raises(ValueError, match="measure_rows must be"):
    QuantConfig(measure_rows=True)


def test_mse_clipping_never_raises_a_groups_weighted_error():
  w, x = _layer(2)
  h = x.T @ x
  d = np.diag(np.asarray(h)).reshape(2, 128)
  plain_q, plain_s = numerics.quantize_weight(w, 6, 128)
  scales = clipping.mse_clipping(w, h)
  assert scales.dtype == jnp.float16 and scales.shape == plain_s.shape
  assert np.all(np.asarray(scales, np.float32) <= np.asarray(plain_s, np.float32))
  q, s = numerics.quantize_weight(w, 6, 128, scales=scales)

  def group_errors(q, s):  # [N, G]: sum_j d_j (w_j - Q(w_j))^2 per group
    e = np.asarray(w - numerics.dequantize_weight(q, s, w.shape[1]), np.float64).reshape(64, 2, 128)
    return np.sum(d * e * e, axis=-1)

  before, after = group_errors(plain_q, plain_s), group_errors(q, s)
  assert np.all(after <= before * (1 + 1e-6)) and after.sum() < 0.95 * before.sum()  # heavy tails: clipping pays
  assert np.any(np.asarray(scales) != np.asarray(plain_s))
  QuantConfig(weight_clipping="mse")  # accepted


def test_full_range_scales_use_both_ends_of_the_range():
  """A group whose largest magnitude is negative maps it to -32 (a 31/32 finer step than max|w| / 31);
  every q stays in [-32, 31]; a group whose largest magnitude is positive keeps max(w) / 31."""
  w = np.zeros((3, 256), np.float32)
  w[0, :128] = np.linspace(-3.2, 1.0, 128)  # negative extreme
  w[1, :128] = np.linspace(-1.0, 3.1, 128)  # positive extreme
  w[2] = np.random.default_rng(0).standard_normal(256)
  s = clipping.full_range_scales(jnp.asarray(w), bits=6, group=128)
  assert s.dtype == jnp.float16 and s.shape == (3, 2)
  np.testing.assert_allclose(float(s[0, 0]), 3.2 / 32, rtol=1e-3)
  np.testing.assert_allclose(float(s[1, 0]), 3.1 / 31, rtol=1e-3)
  assert float(s[0, 1]) == 0.0  # an all-zero group
  q, s2 = numerics.quantize_weight(jnp.asarray(w), 6, 128, scales=s)
  assert int(q.min()) == -32 and int(q.max()) <= 31
  err = lambda q, s: float(jnp.sum((numerics.dequantize_weight(q, s, 256) - w) ** 2))
  assert err(q, s2) < err(*numerics.quantize_weight(jnp.asarray(w), 6, 128))
