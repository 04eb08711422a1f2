"""The built-in SmolLM2-135M-Instruct: logits against transformers, cache, generation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import generate as gen
from models import llama, loaders
from tests.models.hf_reference import hf_logits


@functools.lru_cache(maxsize=1)
def real_model():
  return loaders.load_model(None, jnp.float32)


def test_real_smollm2_logits_match_transformers_flax():
  config, params, tokenizer = real_model()
  tokens = np.asarray([tokenizer.encode("The capital of France is Paris. The capital of Germany is")])
  ours, _ = jax.jit(llama.forward, static_argnums=1)(params, config, tokens)
  ref = hf_logits(config, params, tokens)
  diff = float(np.abs(ours - ref).max())
  print(f"SmolLM2-135M max abs logit difference vs transformers Flax: {diff:.3g} (max |logit| {np.abs(ref).max():.1f})")
  assert diff / np.abs(ref).max() < 1e-4
  # The model knows the answer: a check on the weights (Q/K un-permutation), not only the code.
  assert tokenizer.decode([int(np.argmax(ours[0, -1]))]).strip() == "Berlin"


def test_real_model_cached_decode_matches_full_forward():
  config, params, tokenizer = real_model()
  tokens = jnp.asarray([tokenizer.encode("Once upon a time, in a small village by the sea, there lived")])
  t = tokens.shape[1]
  full, _ = jax.jit(llama.forward, static_argnums=1)(params, config, tokens)
  cache = llama.init_cache(config, 1, t, jnp.float32)
  step = jax.jit(llama.forward, static_argnums=1)
  logits, cache = step(params, config, tokens[:, : t - 3], None, cache)
  outs = [logits]
  for i in range(t - 3, t):
    logits, cache = step(params, config, tokens[:, i:i + 1], None, cache)
    outs.append(logits)
  np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=1e-4 * float(jnp.abs(full).max()))


def test_real_model_greedy_generation_is_english():
  config, params, tokenizer = real_model()
  prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
  tokens, mask = gen.pad_prompts([tokenizer.encode(prompt)], tokenizer.pad_id)
  out = gen.generate(params, config, tokens, mask, jax.random.key(0), max_new_tokens=24)
  text = tokenizer.decode(np.asarray(out.tokens[0, : int(out.num_generated[0])]).tolist())
  print("generated:", text)
  assert "Paris" in text
