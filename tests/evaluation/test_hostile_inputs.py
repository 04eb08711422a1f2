"""Hostile and broken inputs outside files: options, parameters, tokens, shapes (issue 15).

Each case asserts the error type and that the message names the option, tensor or limit; the
file-format cases live in tests/models/test_hostile_files.py and
tests/flexq_jax/test_hostile_checkpoint.py.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evaluation import cli, perplexity
from flexq_jax import formats, numerics
from flexq_jax.qconfig import QuantConfig
from flexq_jax.qlinear import QuantizedLinear
from flexq_jax.quantize import quantize
from models import generate as gen
from models import llama
from models.config import LlamaConfig

CONFIG = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_layers=1, num_heads=2,
                     num_kv_heads=1, max_position_embeddings=32)
PARAMS = llama.init_params(CONFIG, jax.random.key(0), scale=0.05)
CALIB = np.random.default_rng(0).integers(0, 64, (2, 16))
RTN = QuantConfig(weight_method="rtn", a8_selection="none", smooth_alpha=None)


def _with(path, value):
  params = jax.tree.map(lambda a: a, PARAMS)
  node = params
  for key in path[:-1]:
    node = node[key]
  node[path[-1]] = value
  return params


@pytest.mark.parametrize("path,name", [(("norm",), "norm"), (("embed_tokens",), "embed_tokens"),
                                       (("layers", 0, "input_layernorm"), "layers/0/input_layernorm")])
def test_quantize_refuses_nan_in_any_float_it_reads(path, name):
  bad = np.asarray(PARAMS[path[0]] if len(path) == 1 else PARAMS["layers"][0][path[2]]).copy()
  bad.flat[3] = np.nan
  with pytest.raises(ValueError, match=f"{name} contains NaN or Inf"):
    quantize(_with(path, jnp.asarray(bad)), CALIB, RTN, model_config=CONFIG)


def test_quantize_refuses_weights_whose_scales_overflow_fp16_before_any_work():
  w = np.asarray(PARAMS["layers"][0]["up_proj"]).copy()
  w[0, 0] = 1e30
  start = time.perf_counter()
  with pytest.raises(ValueError, match=r"layers/0/up_proj reach \|w\| = 1e\+30.*overflow fp16"):
    quantize(_with(("layers", 0, "up_proj"), jnp.asarray(w)), CALIB, QuantConfig(), model_config=CONFIG)
  assert time.perf_counter() - start < 5  # refused before calibration and GPTQ


def test_quantize_refuses_empty_calibration_and_bad_budgets():
  with pytest.raises(ValueError, match="at least 1 row"):
    quantize(PARAMS, np.zeros((0, 16), np.int32), RTN, model_config=CONFIG)
  with pytest.raises(ValueError, match="outside"):
    quantize(PARAMS, CALIB + 64, RTN, model_config=CONFIG)
  for bad in (-3, -0.5, float("nan"), 2.5, True):
    with pytest.raises(ValueError, match="a8_budget"):
      QuantConfig(a8_budget=bad)
  with pytest.raises(ValueError, match="not a valid regular expression"):
    QuantConfig(rules=(("layers/(", 8),))


@pytest.mark.parametrize("argv,option", [
    (["quantize", "--a8-budget", "-3"], "--a8-budget"),
    (["quantize", "--rule", "layers/(=8"], "--rule"),
    (["run", "--a-bits", "5", "--smooth-alpha", "2"], "--smooth-alpha"),
    (["eval", "--windows", "-1"], "--windows"),
    (["generate", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["quantize", "--calib-batch", "0"], "--calib-batch"),
])
def test_cli_refuses_bad_options_before_loading_anything(argv, option, capsys):
  start = time.perf_counter()
  assert cli.main(argv + ["--model", "/nonexistent/model.gguf"]) == 2  # the option is checked first
  err = capsys.readouterr().err
  assert option in err and "Traceback" not in err and "model path" not in err
  assert time.perf_counter() - start < 5


def test_cli_out_pointing_at_a_file_fails_at_once(tmp_path, capsys):
  existing = tmp_path / "a-file"
  existing.write_text("x")
  assert cli.main(["quantize", "--model", "/nonexistent/model.gguf", "--out", str(existing)]) == 2
  err = capsys.readouterr().err
  assert f"--out {existing} exists and is not a directory" in err


def test_token_ids_outside_the_vocabulary_are_refused_or_visible():
  tokens = jnp.asarray([[1, 2, 64]])
  with pytest.raises(ValueError, match=r"id 64 outside the model's vocabulary \[0, 64\)"):
    llama.forward(PARAMS, CONFIG, tokens)
  with pytest.raises(ValueError, match=r"id -1 outside"):
    llama.forward(PARAMS, CONFIG, jnp.asarray([[-1, 2]]))
  # Under jit the ids are not known: the embedding lookup makes them NaN instead of clamping.
  logits = jax.jit(llama.forward, static_argnums=1)(PARAMS, CONFIG, tokens)[0]
  assert np.isnan(np.asarray(logits[0, 2])).all()  # (and through attention's masked scores, the other rows)
  # ... and a perplexity over them is an error, not a figure.
  windows = np.asarray([[1, 2, 3, 64]])
  with pytest.raises(ValueError, match="perplexity is not finite"):
    perplexity.perplexity(lambda t: llama.forward(PARAMS, CONFIG, t)[0], windows, progress=False)


def test_prompts_longer_than_the_models_positions_are_refused():
  with pytest.raises(ValueError, match="33 tokens exceed the model's 32 positions"):
    llama.forward(PARAMS, CONFIG, jnp.ones((1, 33), jnp.int32))
  with pytest.raises(ValueError, match="40 tokens .* exceed the model's 32 positions"):
    gen.generate(PARAMS, CONFIG, jnp.ones((1, 30), jnp.int32), jnp.ones((1, 30), bool), jax.random.key(0),
                 max_new_tokens=10)


def test_quantized_matmul_edge_shapes():
  w = np.random.default_rng(1).standard_normal((32, 256)).astype(np.float32)
  q, s = numerics.quantize_weight(jnp.asarray(w), 6, 128)
  layer = QuantizedLinear(packed=formats.pack(q, 6, "pallas6", 256), scales=s, in_features=256, out_features=32,
                          w_bits=6, a_bits=6, group_size=128, layout="pallas6", backend="pallas")
  empty = jnp.zeros((0, 256), jnp.bfloat16) @ layer  # M = 0: no kernel launch
  assert empty.shape == (0, 32) and empty.dtype == jnp.bfloat16
  assert (jnp.zeros((2, 0, 256), jnp.float32) @ layer).shape == (2, 0, 32)
  with pytest.raises(ValueError, match="got a scalar"):
    layer.__rmatmul__(jnp.float32(1.0))
