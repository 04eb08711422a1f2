import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import config as config_lib
from models import llama
from tests.models.hf_reference import hf_logits

# Small, but with every feature the real models use: GQA (4 query heads share 2 KV heads),
# a non-default RoPE theta, untied head.
SMALL = config_lib.LlamaConfig(
    vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
    num_kv_heads=2, rope_theta=5000.0, rms_norm_eps=1e-6,
)
forward = jax.jit(llama.forward, static_argnums=1)


def small_params(config=SMALL, seed=0, dtype=jnp.float32):
  return llama.init_params(config, jax.random.key(seed), dtype=dtype, scale=0.2)


def rel_err(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.mark.parametrize("tied", [False, True])
def test_matches_transformers_flax_llama(tied):
  config = dataclasses.replace(SMALL, tie_word_embeddings=tied)
  params = small_params(config)
  tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 19))
  ours, _ = forward(params, config, tokens)
  ref = hf_logits(config, params, tokens)
  print(f"max abs logit diff vs transformers Flax (tied={tied}): {np.abs(ours - ref).max():.3g}")
  assert rel_err(ours, ref) < 1e-4


def test_kv_cache_decoding_equals_full_forward():
  params = small_params()
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, SMALL.vocab_size, (3, 14)))
  full, _ = forward(params, SMALL, tokens)
  cache = llama.init_cache(SMALL, 3, 16, jnp.float32)
  # A 9-token prefill, then one token at a time.
  logits, cache = forward(params, SMALL, tokens[:, :9], None, cache)
  steps = [logits]
  for t in range(9, 14):
    logits, cache = forward(params, SMALL, tokens[:, t:t + 1], None, cache)
    steps.append(logits)
  assert int(cache.length) == 14
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=0, atol=1e-4 * np.abs(full).max())


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_a_rows_logits(side):
  params = small_params()
  rng = np.random.default_rng(3)
  short = rng.integers(0, SMALL.vocab_size, 5)
  long = rng.integers(0, SMALL.vocab_size, 11)
  tokens = np.zeros((2, 11), np.int32)
  mask = np.zeros((2, 11), bool)
  tokens[0] = long
  mask[0] = True
  sl = slice(6, 11) if side == "left" else slice(0, 5)
  tokens[1, sl] = short
  mask[1, sl] = True
  batched, _ = forward(params, SMALL, tokens, mask)
  alone, _ = forward(params, SMALL, short[None])
  np.testing.assert_allclose(batched[1, sl], alone[0], atol=1e-4 * np.abs(alone).max())
  alone_long, _ = forward(params, SMALL, long[None])
  np.testing.assert_allclose(batched[0], alone_long[0], atol=1e-4 * np.abs(alone_long).max())


def test_bfloat16_forward_tracks_float32():
  params = small_params()
  tokens = np.random.default_rng(4).integers(0, SMALL.vocab_size, (2, 16))
  f32, _ = forward(params, SMALL, tokens)
  bf16, _ = forward(jax.tree.map(lambda a: a.astype(jnp.bfloat16), params), SMALL, tokens)
  assert bf16.dtype == jnp.float32  # logits are always fp32
  assert 1e-5 < rel_err(bf16, f32) < 5e-2  # bf16 really ran, and stayed close


def test_llama3_rope_scaling_bands():
  base = config_lib.llama3_8b()
  unscaled = llama.rope_inv_freq(dataclasses.replace(base, rope_scaling=None))
  scaled = llama.rope_inv_freq(base)
  rs = base.rope_scaling
  wavelen = 2 * np.pi / unscaled
  high = wavelen < rs.original_max_position_embeddings / rs.high_freq_factor
  low = wavelen > rs.original_max_position_embeddings / rs.low_freq_factor
  np.testing.assert_array_equal(scaled[high], unscaled[high])
  np.testing.assert_allclose(scaled[low], unscaled[low] / rs.factor)
  mid = ~high & ~low
  assert mid.any()
  assert np.all(scaled[mid] < unscaled[mid]) and np.all(scaled[mid] > unscaled[mid] / rs.factor)


@pytest.mark.parametrize("preset", sorted(config_lib.PRESETS))
def test_real_architectures_have_the_right_shapes(preset):
  config = config_lib.PRESETS[preset]()
  params = jax.eval_shape(lambda k: llama.init_params(config, k, jnp.bfloat16), jax.random.key(0))
  tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)
  logits, _ = jax.eval_shape(lambda p, t: llama.forward(p, config, t), params, tokens)
  assert logits.shape == (2, 8, config.vocab_size)
  n = sum(np.prod(a.shape) for a in jax.tree.leaves(params))
  expected = {"smollm2-135m": 134.5e6, "llama2-7b": 6.74e9, "llama2-13b": 13.0e9,
              "llama2-70b": 69.0e9, "llama3-8b": 8.03e9}[preset]
  assert abs(n - expected) / expected < 0.01, n


def test_bad_inputs_give_clear_errors():
  params = small_params()
  with pytest.raises(ValueError, match=r"tokens must be \[batch, seq\]"):
    llama.forward(params, SMALL, jnp.zeros((5,), jnp.int32))
  with pytest.raises(ValueError, match="tokens must be integers"):
    llama.forward(params, SMALL, jnp.zeros((1, 5), jnp.float32))
  with pytest.raises(ValueError, match="mask shape"):
    llama.forward(params, SMALL, jnp.zeros((1, 5), jnp.int32), jnp.ones((1, 4), bool))
  with pytest.raises(ValueError, match="multiple of"):
    config_lib.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=4, num_kv_heads=3)
