"""The optional quantized lm_head (flexq_jax/lm_head.py): tied and untied models, the forward,
checkpoints, and bad options."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexq_jax import checkpoint, numerics
from flexq_jax.lm_head import quantize_lm_head
from flexq_jax.qconfig import QuantConfig
from flexq_jax.qlinear import QuantizedLinear
from flexq_jax.quantize import quantize
from models import llama
from models.config import LlamaConfig

TIED = LlamaConfig(vocab_size=300, hidden_size=192, intermediate_size=256, num_layers=1, num_heads=3,
                   num_kv_heads=1, head_dim=64, tie_word_embeddings=True)  # K = 192: a ragged 1.5 groups
UNTIED = dataclasses.replace(TIED, tie_word_embeddings=False)
CALIB = np.random.default_rng(1).integers(0, 300, (2, 40))
CHEAP = QuantConfig(a8_selection="none", smooth_alpha=None)


def _setup(config):
  params = llama.init_params(config, jax.random.key(3), scale=0.1)
  qparams, report = quantize(params, CALIB, CHEAP, model_config=config)
  return params, qparams, report


@pytest.mark.parametrize("config,fmt,w_bits", [(TIED, "w6a8", 6), (UNTIED, "w8a8", 8)], ids=["tied-w6a8", "untied-w8a8"])
def test_the_forward_runs_the_quantized_head(config, fmt, w_bits):
  params, qparams, report = _setup(config)
  qhead, report2 = quantize_lm_head(qparams, params, CALIB, report, fmt=fmt, model_config=config)
  head = qhead["lm_head"]
  assert isinstance(head, QuantizedLinear) and (head.w_bits, head.a_bits) == (w_bits, 8)
  assert head.shape == (192, 300) and report2.config["lm_head"] == f"{fmt} gptq" and "lm_head" not in report.config
  assert qhead["embed_tokens"] is params["embed_tokens"]  # tied: the input embedding stays float
  tokens = jnp.asarray(CALIB[:1, :16])
  logits, _ = llama.forward(qhead, config, tokens)
  # The same model by hand: the blocks as quantize() left them, then the contract's matmul for the head.
  h_logits, _ = llama.forward(dict(qparams, lm_head=jnp.eye(192, dtype=jnp.float32)), config, tokens)
  want = numerics.reference_matmul(h_logits[0], head.logical_weight(), head.scales, a_bits=8)
  np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(want), rtol=1e-5, atol=1e-5)
  # and close to the float head (8-bit activations, GPTQ weights)
  float_logits, _ = llama.forward(qparams, config, tokens)
  err = float(jnp.linalg.norm(logits - float_logits) / jnp.linalg.norm(float_logits))
  assert err < (0.02 if w_bits == 8 else 0.06), err


def test_gptq_head_beats_round_to_nearest():
  params, qparams, report = _setup(TIED)
  tokens = jnp.asarray(CALIB)
  ref, _ = llama.forward(qparams, TIED, tokens)
  errs = {}
  for method in ("gptq", "rtn"):
    q, _ = quantize_lm_head(qparams, params, CALIB, fmt="w6a8", method=method, model_config=TIED)
    errs[method] = float(jnp.linalg.norm(llama.forward(q, TIED, tokens)[0] - ref))
  assert errs["gptq"] < errs["rtn"], errs


@pytest.mark.parametrize("config", [TIED], ids=["tied"])
def test_checkpoint_round_trip_and_a_report_that_disagrees(config, tmp_path):
  params, qparams, report = _setup(config)
  qhead, report = quantize_lm_head(qparams, params, CALIB, report, fmt="w6a8", method="rtn", model_config=config)
  checkpoint.save(tmp_path / "ok", qhead, config, report)
  loaded, cfg, meta = checkpoint.load(tmp_path / "ok")
  assert cfg == config and isinstance(loaded["lm_head"], QuantizedLinear)
  tokens = jnp.asarray(CALIB[:1, :12])
  np.testing.assert_array_equal(np.asarray(llama.forward(loaded, config, tokens)[0]),
                                np.asarray(llama.forward(qhead, config, tokens)[0]))
  bad = dataclasses.replace(report, config={**report.config, "lm_head": "w8a8 rtn"})
  with pytest.raises(ValueError, match="W6A8 lm_head, but the stored report"):
    checkpoint.save(tmp_path / "bad", qhead, config, bad)


def test_bad_options_and_double_quantization():
  params, qparams, report = _setup(TIED)
  with pytest.raises(ValueError, match="lm_head format 'w4a4'"):
    quantize_lm_head(qparams, params, CALIB, fmt="w4a4", model_config=TIED)
  with pytest.raises(ValueError, match="lm_head method"):
    quantize_lm_head(qparams, params, CALIB, method="awq", model_config=TIED)
  with pytest.raises(ValueError, match="calib_batch must be"):
    quantize_lm_head(qparams, params, np.zeros((4,)), model_config=TIED)
  q, _ = quantize_lm_head(qparams, params, CALIB, fmt="w8a8", method="rtn", model_config=TIED)
  with pytest.raises(ValueError, match="already hold a quantized lm_head"):
    quantize_lm_head(q, q, CALIB, model_config=TIED)
  nan = dict(params, embed_tokens=params["embed_tokens"].at[3, 5].set(jnp.nan))
  with pytest.raises(ValueError, match="lm_head weights"):
    quantize_lm_head(qparams, nan, CALIB, method="rtn", model_config=TIED)


def test_infer_config_ignores_a_quantized_head():
  from models.config import PRESETS
  cfg = PRESETS["smollm2-135m"]()  # tied embeddings
  shapes = jax.eval_shape(lambda: llama.init_params(cfg, jax.random.key(0)))
  head = QuantizedLinear(packed=jnp.zeros((8, 1, 1), jnp.uint32), scales=jnp.zeros((1, 1), jnp.float16),
                         in_features=cfg.hidden_size, out_features=cfg.vocab_size, w_bits=8, a_bits=8, group_size=128,
                         layout="bitplanes")
  assert llama.infer_config(dict(shapes, lm_head=head)) == cfg
