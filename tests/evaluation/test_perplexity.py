"""Tests for evaluation.perplexity on toy models whose perplexity is known."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evaluation import perplexity as ppl_lib
from flexq_jax.placement import place
from flexq_jax.qconfig import QuantConfig
from flexq_jax.quantize import quantize
from models import llama
from models.config import LlamaConfig

V = 37  # vocabulary of the toy models


def _windows(num_windows: int, seq_len: int, seed: int = 0) -> np.ndarray:
  ids = np.random.default_rng(seed).integers(0, V, size=num_windows * seq_len)
  return ppl_lib.eval_windows(ids, seq_len=seq_len, num_windows=num_windows)


def test_eval_windows_consecutive_non_overlapping():
  ids = np.arange(1000)
  windows = ppl_lib.eval_windows(ids, seq_len=128, num_windows=3)
  assert windows.shape == (3, 128) and windows.dtype == np.int32
  np.testing.assert_array_equal(windows.reshape(-1), ids[:384])
  every = ppl_lib.eval_windows(ids, seq_len=128, num_windows=None)
  assert every.shape == (7, 128)  # 1000 // 128; the 104-token tail is dropped
  np.testing.assert_array_equal(every.reshape(-1), ids[:896])


def test_eval_windows_errors():
  with pytest.raises(ValueError, match="has 100 tokens; one window of seq_len=128 needs 128"):
    ppl_lib.eval_windows(np.arange(100), seq_len=128)
  with pytest.raises(ValueError, match="enough for 7 windows.*needs 1024"):
    ppl_lib.eval_windows(np.arange(1000), seq_len=128, num_windows=8)
  with pytest.raises(ValueError, match="num_windows=0"):
    ppl_lib.eval_windows(np.arange(1000), seq_len=128, num_windows=0)
  with pytest.raises(ValueError, match="1-D integer"):
    ppl_lib.eval_windows(np.zeros((10, 10), np.int32), seq_len=4)


def test_uniform_logits_give_vocab_size():
  windows = _windows(3, 16)
  result = ppl_lib.perplexity(lambda t: jnp.zeros(t.shape + (V,), jnp.bfloat16), windows,
                              batch_size=2, progress=False)
  assert result.ppl == pytest.approx(V, rel=1e-6)
  assert result.nll == pytest.approx(math.log(V), rel=1e-6)
  assert result.num_tokens == 3 * 15  # T-1 targets per window
  assert result.num_windows == 3
  assert result.seconds > 0


def test_oracle_logits_give_one():
  def oracle(tokens):  # all mass on the true next token (the last position predicts nothing)
    return 100.0 * jax.nn.one_hot(jnp.roll(tokens, -1, axis=1), V)

  result = ppl_lib.perplexity(oracle, _windows(4, 32), batch_size=3, progress=True)
  assert result.ppl == pytest.approx(1.0, abs=1e-6)


def _numpy_ppl(table: np.ndarray, windows: np.ndarray) -> float:
  logits = table[windows[:, :-1]].astype(np.float64)  # [N, T-1, V]
  logits -= logits.max(-1, keepdims=True)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  target = np.take_along_axis(log_probs, windows[:, 1:, None], axis=-1)[..., 0]
  return float(np.exp(-target.mean()))


def test_random_logits_match_numpy_for_any_batch_size():
  table = np.random.default_rng(1).normal(size=(V, V)).astype(np.float32) * 3
  windows = _windows(7, 24, seed=2)
  traces = []

  def bigram(tokens):
    traces.append(tokens.shape)  # runs only while tracing
    return jnp.asarray(table)[tokens]

  expected = _numpy_ppl(table, windows)
  for batch_size in (1, 3, 7, 8):
    traces.clear()
    result = ppl_lib.perplexity(bigram, windows, batch_size=batch_size, progress=False)
    assert result.ppl == pytest.approx(expected, rel=1e-5), batch_size
    assert result.num_tokens == 7 * 23
    # The ragged last batch is padded, so each run compiles one shape.
    assert traces == [(batch_size, 24)], batch_size


def test_only_scalars_leave_the_device():
  call, arrays = ppl_lib._hoist_bound_arrays(lambda t: jnp.zeros(t.shape + (V,)))
  step = ppl_lib._make_batch_nll(call)
  nll, count = jax.eval_shape(step, arrays, jax.ShapeDtypeStruct((2, 2048), jnp.int32),
                              jax.ShapeDtypeStruct((2,), jnp.float32))
  assert nll.shape == () and nll.dtype == jnp.float32
  assert count.shape == ()


def _scaled_bigram(table, tokens, *, scale, config_name):
  assert config_name == "toy"  # a non-array binding reaches the function unchanged
  return scale * table[tokens]


def test_partial_bound_arrays_are_arguments_not_constants():
  table = jnp.asarray(np.random.default_rng(3).normal(size=(V, V)), jnp.float32)
  logits_fn = functools.partial(_scaled_bigram, table, scale=2.0, config_name="toy")
  call, arrays = ppl_lib._hoist_bound_arrays(logits_fn)
  assert len(arrays) == 1 and arrays[0] is table
  tokens = jnp.asarray(_windows(2, 8))
  np.testing.assert_array_equal(call(arrays, tokens), logits_fn(tokens))
  hlo = ppl_lib._make_batch_nll(call).lower(arrays, tokens, jnp.ones(2)).as_text()
  assert f"{V}x{V}xf32" in hlo  # the table is there, as a parameter...
  assert not [line for line in hlo.splitlines() if "constant" in line and f"{V}x{V}" in line]
  expected = _numpy_ppl(2.0 * np.asarray(table), np.asarray(tokens))
  result = ppl_lib.perplexity(logits_fn, np.asarray(tokens), progress=False)
  assert result.ppl == pytest.approx(expected, rel=1e-5)


def test_perplexity_argument_errors():
  with pytest.raises(ValueError, match="windows must be"):
    ppl_lib.perplexity(lambda t: t, np.zeros((3, 1), np.int32), progress=False)
  with pytest.raises(ValueError, match="batch_size=0"):
    ppl_lib.perplexity(lambda t: t, _windows(1, 8), batch_size=0, progress=False)


def test_chunked_perplexity_matches_the_whole_window_forward():
  config = LlamaConfig(vocab_size=V, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                       num_kv_heads=2, tie_word_embeddings=True)
  params = llama.init_params(config, jax.random.key(0), scale=0.3)
  windows = _windows(2, 64)
  qparams, _ = quantize(params, windows, QuantConfig(a8_selection="down_proj", weight_method="rtn", smooth_alpha=None),
                        model_config=config)
  for p in (params, place(qparams, "reference")[0]):
    whole = ppl_lib.perplexity(functools.partial(llama.logits_fn(config), p), windows, progress=False)
    chunked = ppl_lib.chunked_perplexity(config, p, windows, chunk=48, progress=False)  # chunks of 48 and 16
    assert chunked.num_tokens == whole.num_tokens == 2 * 63
    assert chunked.ppl == pytest.approx(whole.ppl, rel=1e-5)
    assert whole.ppl > 1.5  # not a degenerate model
  with pytest.raises(ValueError, match="chunk=0 must be a positive"):
    ppl_lib.chunked_perplexity(config, params, windows, chunk=0)
