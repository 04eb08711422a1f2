import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import generate as gen
from models import llama
from models.config import LlamaConfig

CONFIG = LlamaConfig(
    vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
    num_kv_heads=2, eos_token_id=5, pad_token_id=0,
)
PARAMS = llama.init_params(CONFIG, jax.random.key(0), scale=0.3)
PROMPTS = [list(np.random.default_rng(0).integers(6, 97, n)) for n in (3, 7, 5)]


def run(prompts, side="left", config=CONFIG, n=6, sampling=gen.GREEDY, seed=1):
  tokens, mask = gen.pad_prompts(prompts, 0, side)
  return gen.generate(PARAMS, config, tokens, mask, jax.random.key(seed), max_new_tokens=n,
                      sampling=sampling, cache_dtype=jnp.float32)


def greedy_by_full_forward(prompt, n):
  seq = list(prompt)
  for _ in range(n):
    logits, _ = llama.forward(PARAMS, CONFIG, jnp.asarray([seq]))
    seq.append(int(jnp.argmax(logits[0, -1])))
  return seq[len(prompt):]


def test_greedy_equals_argmax_of_full_forwards():
  out = run(PROMPTS[:1])
  assert list(np.asarray(out.tokens[0])) == greedy_by_full_forward(PROMPTS[0], 6)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_padded_generation_equals_one_row_at_a_time(side):
  batched = run(PROMPTS, side)
  for i, prompt in enumerate(PROMPTS):
    alone = run([prompt])
    np.testing.assert_array_equal(batched.tokens[i], alone.tokens[0])
    np.testing.assert_allclose(batched.prompt_logits[i], alone.prompt_logits[0], atol=1e-4)


def test_stops_at_eos_and_pads_after_it():
  free = np.asarray(run(PROMPTS[:1], n=6).tokens[0])
  eos = int(free[2])  # make the third greedy token the end-of-sequence token
  config = dataclasses.replace(CONFIG, eos_token_id=eos)
  out = run(PROMPTS[:1], config=config, n=6)
  first = int(np.argmax(free == eos))  # greedy may hit this id earlier than step 2
  assert int(out.num_generated[0]) == first + 1
  np.testing.assert_array_equal(out.tokens[0, : first + 1], free[: first + 1])
  assert np.all(np.asarray(out.tokens[0, first + 1:]) == CONFIG.pad_token_id)


def test_sampling_is_seeded():
  hot = gen.SamplingConfig(temperature=1.5, top_p=0.95)
  a = run(PROMPTS, sampling=hot, n=8, seed=7).tokens
  b = run(PROMPTS, sampling=hot, n=8, seed=7).tokens
  c = run(PROMPTS, sampling=hot, n=8, seed=8).tokens
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_tiny_top_p_and_top_k_1_are_greedy():
  greedy = run(PROMPTS, n=5).tokens
  for sampling in (gen.SamplingConfig(temperature=1.0, top_p=1e-6), gen.SamplingConfig(temperature=1.0, top_k=1)):
    np.testing.assert_array_equal(run(PROMPTS, sampling=sampling, n=5, seed=3).tokens, greedy)


def test_top_p_keeps_only_the_nucleus():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  sampling = gen.SamplingConfig(temperature=1.0, top_p=0.7)  # nucleus = {0, 1}
  draws = jax.vmap(lambda k: gen.sample_token(logits, sampling, k))(jax.random.split(jax.random.key(0), 400))
  assert set(np.unique(draws)) == {0, 1}


def test_bad_arguments():
  with pytest.raises(ValueError, match="top_p"):
    gen.SamplingConfig(top_p=0.0)
  with pytest.raises(ValueError, match="temperature"):
    gen.SamplingConfig(temperature=-1.0)
  with pytest.raises(ValueError, match="at least one token"):
    gen.pad_prompts([[1, 2], []], 0)
  with pytest.raises(ValueError, match="side"):
    gen.pad_prompts([[1]], 0, "middle")


STACKED = llama.stack_layers(PARAMS)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("sampling", [gen.GREEDY, gen.SamplingConfig(temperature=1.0, top_k=20)],
                         ids=["greedy", "sampled"])
def test_stacked_params_generate_the_same_tokens(side, sampling):
  tokens, mask = gen.pad_prompts(PROMPTS, 0, side)
  outs = [gen.generate(p, CONFIG, tokens, mask, jax.random.key(3), max_new_tokens=7, sampling=sampling,
                       cache_dtype=jnp.float32) for p in (PARAMS, STACKED)]
  np.testing.assert_array_equal(outs[1].tokens, outs[0].tokens)
  np.testing.assert_array_equal(outs[1].num_generated, outs[0].num_generated)
  np.testing.assert_allclose(outs[1].prompt_logits, outs[0].prompt_logits, rtol=0, atol=1e-5)


def test_stacked_params_generate_with_bfloat16_cache_and_eos():
  free = np.asarray(run(PROMPTS[:1], n=6).tokens[0])
  config = dataclasses.replace(CONFIG, eos_token_id=int(free[2]))
  tokens, mask = gen.pad_prompts(PROMPTS, 0)
  outs = [gen.generate(p, config, tokens, mask, jax.random.key(0), max_new_tokens=6) for p in (PARAMS, STACKED)]
  np.testing.assert_array_equal(outs[1].tokens, outs[0].tokens)
  np.testing.assert_array_equal(outs[1].num_generated, outs[0].num_generated)
