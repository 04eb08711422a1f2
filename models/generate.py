"""Jit-compiled generation: one prefill over the (padded) prompts, then a lax.while_loop decode."""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from models import llama
from models.config import LlamaConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
  """How the next token is picked. temperature == 0 means greedy (argmax)."""

  temperature: float = 0.0
  top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens with this much mass
  top_k: int = 0  # keep only the k most likely tokens (0 = off)

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")


GREEDY = SamplingConfig()


@flax.struct.dataclass
class GenerateOutput:
  tokens: jax.Array  # [B, max_new_tokens] generated ids; pad_id after a row stopped
  num_generated: jax.Array  # [B] tokens generated per row, the EOS included
  prompt_logits: jax.Array  # [B, V] fp32 logits at each row's last prompt token


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, side: str = "left") -> tuple[np.ndarray, np.ndarray]:
  """Packs token lists into [B, P] ids and a [B, P] mask, padded on `side` ("left" or "right")."""
  if side not in ("left", "right"):
    raise ValueError(f"side must be 'left' or 'right', got {side!r}")
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  width = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  mask = np.zeros((len(prompts), width), bool)
  for i, p in enumerate(prompts):
    sl = slice(width - len(p), width) if side == "left" else slice(0, len(p))
    tokens[i, sl] = p
    mask[i, sl] = True
  return tokens, mask


def sample_token(logits: jax.Array, sampling: SamplingConfig, key: jax.Array) -> jax.Array:
  """logits [B, V] fp32 -> token ids [B] int32."""
  if sampling.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  if sampling.top_k:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Mass strictly before each token: a token is kept while that is below top_p, so the most
    # likely token always survives.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(mass_before < sampling.top_p, sorted_logits, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "sampling", "cache_dtype"))
def generate(
    params: llama.Params,
    config: LlamaConfig,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    key: jax.Array,
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = GREEDY,
    cache_dtype=jnp.bfloat16,
) -> GenerateOutput:
  """Generates up to `max_new_tokens` per row; a row stops at any of config.eos_token_ids.

  Args:
    params: model parameters (arrays or quantized leaves), list or stacked layers (llama.stack_layers:
      one lax.scan over the layers, a stacked [L, ...] KV cache).
    config: the architecture (static).
    prompt_tokens: [B, P] int32, padded on either side (see pad_prompts).
    prompt_mask: [B, P] bool, True for real prompt tokens; every row needs at least one.
    key: PRNG key for sampling (unused when greedy).
    max_new_tokens: how many tokens to generate at most (static).
    sampling: SamplingConfig (static).
    cache_dtype: KV cache dtype (static).

  Returns:
    GenerateOutput.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  b, p = prompt_tokens.shape
  cache = llama.init_cache(config, b, p + max_new_tokens, cache_dtype, stacked=llama.is_stacked(params))
  forward = lambda tokens, mask, cache: llama.forward(params, config, tokens, mask, cache)
  return decode_loop(forward, cache, config, prompt_tokens, prompt_mask, key, max_new_tokens=max_new_tokens,
                     sampling=sampling)


def decode_loop(forward, cache, config: LlamaConfig, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                key: jax.Array, *, max_new_tokens: int, sampling: SamplingConfig = GREEDY) -> GenerateOutput:
  """generate()'s prefill and lax.while_loop decode over any forward (to be traced inside a jit).

  forward(tokens [B, T], mask [B, T], cache) -> (logits [B, T, V] fp32, cache): llama.forward on one
  device (generate), or the tensor-parallel forward over a mesh (flexq_jax/sharding.py).
  cache: an empty cache of P + max_new_tokens slots that forward extends.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  b, p = prompt_tokens.shape
  pad_id = config.pad_token_id if config.pad_token_id is not None else 0
  eos = jnp.asarray(config.eos_token_ids or (-1,), jnp.int32)

  logits, cache = forward(prompt_tokens, prompt_mask, cache)
  last = p - 1 - jnp.argmax(prompt_mask[:, ::-1], axis=1)  # each row's last real prompt token
  next_logits = logits[jnp.arange(b), last]  # [B, V]

  def cond(state):
    step, _, done, *_ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, out, done, cache, next_logits, key = state
    key, sub = jax.random.split(key)
    token = jnp.where(done, pad_id, sample_token(next_logits, sampling, sub))
    out = out.at[:, step].set(token)
    live = ~done
    done = done | jnp.isin(token, eos)
    logits, cache = forward(token[:, None], live[:, None], cache)
    return step + 1, out, done, cache, logits[:, 0], key

  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
  state = (jnp.int32(0), out, jnp.zeros((b,), bool), cache, next_logits, key)
  step, out, done, _, _, _ = jax.lax.while_loop(cond, body, state)
  # Tokens up to and including the first EOS; rows that never stopped generated `step`.
  is_eos = jnp.isin(out, eos)
  first_eos = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, step)
  return GenerateOutput(tokens=out, num_generated=first_eos.astype(jnp.int32), prompt_logits=next_logits)


def generate_text(config: LlamaConfig, params, tokenizer, prompts: list[str], *, max_new_tokens: int, chat: bool,
                  sampling: SamplingConfig = GREEDY, seed: int = 0) -> list[str]:
  """Generates a completion for each prompt (batched, left-padded) and decodes it.

  tokenizer: a models.tokenizer.Tokenizer (encode, decode, pad_id, apply_chat_template).
  chat: wrap each prompt as a user message in the tokenizer's chat template.
  """
  if chat:
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
  ids = [tokenizer.encode(p) for p in prompts]
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  tokens, mask = pad_prompts(ids, pad, "left")
  llama.check_token_ids(tokens, config.vocab_size, "the encoded prompts")
  if tokens.shape[1] + max_new_tokens > config.max_position_embeddings:
    raise ValueError(f"a prompt of {tokens.shape[1]} tokens plus {max_new_tokens} new ones exceeds the model's "
                     f"{config.max_position_embeddings} positions (max_position_embeddings)")
  out = generate(params, config, tokens, mask, jax.random.key(seed), max_new_tokens=max_new_tokens,
                 sampling=sampling)
  n = jax.device_get(out.num_generated)
  toks = jax.device_get(out.tokens)
  return [tokenizer.decode(toks[i, :n[i]].tolist()) for i in range(len(prompts))]
