import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexq_jax import checkpoint
from flexq_jax.qconfig import QuantConfig
from flexq_jax.quantize import quantize
from flexq_jax.rotation import orthogonal, rotate
from flexq_jax.smoothing import smoothing_folds
from models import llama
from models.config import LlamaConfig

# Widths with Hadamard orders (192 = 12 * 16, 384 = 12 * 32, head_dim 48 = 12 * 4), GQA, tied
# embeddings like SmolLM2, and norms that are not ones (so the folds are exercised).
CONFIG = LlamaConfig(vocab_size=97, hidden_size=192, intermediate_size=384, num_layers=2, num_heads=4,
                     num_kv_heads=2, tie_word_embeddings=True)
CALIB = np.random.default_rng(0).integers(0, 97, (4, 40))


def _params(outlier: float = 1.0):
  params = llama.init_params(CONFIG, jax.random.key(1), scale=0.08)
  rng = np.random.default_rng(2)
  params["norm"] = jnp.asarray(rng.uniform(0.5, 1.5, 192), jnp.float32)
  for layer in params["layers"]:
    for name in ("input_layernorm", "post_attention_layernorm"):
      w = rng.uniform(0.5, 1.5, 192)
      w[[3, 77]] *= outlier  # outlier channels in what q/k/v and gate/up read
      layer[name] = jnp.asarray(w, jnp.float32)
  return params


def test_rotated_float_model_is_the_same_function():
  params = _params()
  rparams, rconfig = rotate(params, CONFIG)
  assert rconfig.down_proj_hadamard and not rconfig.tie_word_embeddings and "lm_head" in rparams
  assert not np.allclose(rparams["layers"][0]["q_proj"], params["layers"][0]["q_proj"])
  a, _ = llama.forward(params, CONFIG, CALIB)
  b, _ = llama.forward(rparams, rconfig, CALIB)
  np.testing.assert_allclose(b, a, rtol=0, atol=2e-5 * float(jnp.abs(a).max()))
  # Stacked (scanned) form and the KV cache path agree too.
  c, _ = llama.forward(llama.stack_layers(rparams), rconfig, CALIB)
  np.testing.assert_allclose(c, a, rtol=0, atol=2e-5 * float(jnp.abs(a).max()))


def test_orthogonal_is_orthogonal_and_seeded():
  for n in (192, 100):  # a randomized Hadamard; a random orthogonal (no Hadamard of order 100 here)
    q, kind = orthogonal(n, 0)
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-12)
    np.testing.assert_array_equal(q, orthogonal(n, 0)[0])
    assert not np.array_equal(q, orthogonal(n, 1)[0])
    assert kind == ("randomized Hadamard" if n == 192 else "random orthogonal")


@pytest.mark.slow  # ~18 s on the shared 2-core CPU
def test_rotation_removes_the_damage_of_activation_outliers():
  """Outlier channels in the norm weights hurt W6A6 round-to-nearest; rotated, they are spread."""
  params = _params(outlier=40.0)
  fp, _ = llama.forward(params, CONFIG, CALIB)
  cfg = QuantConfig(a8_selection="none", weight_method="rtn", smooth_alpha=None)
  q, _ = quantize(params, CALIB, cfg, model_config=CONFIG)
  rparams, rconfig = rotate(params, CONFIG)
  rq, _ = quantize(rparams, CALIB, cfg, model_config=rconfig)
  err = lambda p, c: float(jnp.sqrt(jnp.mean((llama.forward(p, c, CALIB)[0] - fp) ** 2)))
  assert err(rq, rconfig) < 0.7 * err(q, CONFIG)  # measured 0.26 vs 0.47


@pytest.mark.slow  # ~23 s; tests/evaluation/test_cli.py covers the rotated checkpoint round trip by default
def test_rotated_quantized_model_saves_and_loads_with_its_config(tmp_path):
  rparams, rconfig = rotate(_params(), CONFIG)
  assert smoothing_folds(rconfig) == tuple(f for f in llama.SMOOTHING_FOLDS if f[0] != "up_proj")
  qparams, report = quantize(rparams, CALIB, QuantConfig(), model_config=rconfig)  # GPTQ + smoothing
  checkpoint.save(tmp_path, qparams, rconfig, report)
  loaded, config, _ = checkpoint.load(tmp_path)
  assert config == rconfig
  a, _ = llama.forward(qparams, rconfig, CALIB)
  b, _ = llama.forward(loaded, config, CALIB)
  np.testing.assert_array_equal(a, b)


def test_bad_inputs_are_refused_clearly():
  params = _params()
  rparams, rconfig = rotate(params, CONFIG)
  with pytest.raises(ValueError, match="already rotated"):
    rotate(rparams, rconfig)
  qparams, _ = quantize(params, CALIB, QuantConfig(a8_selection="none", weight_method="rtn", smooth_alpha=None),
                        model_config=CONFIG)
  with pytest.raises(ValueError, match="is quantized"):
    rotate(qparams, CONFIG)
  with pytest.raises(ValueError, match="fuse_projections"):
    rotate(llama.fuse_projections(params), CONFIG)
  odd = dataclasses.replace(CONFIG, intermediate_size=360)
  with pytest.raises(ValueError, match="intermediate_size 360"):
    rotate(llama.init_params(odd, jax.random.key(0)), odd)
