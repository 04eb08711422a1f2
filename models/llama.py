"""Functional LLaMA-family decoder: parameters are a plain pytree, the forward is a pure function.

Parameter pytree (kernels are [in, out]: the model computes `x @ w`):

    params = {
      "embed_tokens": [V, D],
      "layers": [                       # one dict per decoder block
        {"input_layernorm": [D],
         "q_proj": [D, Hq*hd], "k_proj": [D, Hkv*hd], "v_proj": [D, Hkv*hd], "o_proj": [Hq*hd, D],
         "post_attention_layernorm": [D],
         "gate_proj": [D, F], "up_proj": [D, F], "down_proj": [F, D]},
        ...],
      "norm": [D],
      "lm_head": [D, V],                # only when config.tie_word_embeddings is False
    }

The seven projections of every block go through `linear`, and nothing else in this file knows
what a weight is: a quantized weight leaf that defines `__rmatmul__` replaces an array without
any change here. RoPE follows the Hugging Face convention (rotate the two halves of each head).

Padding and the KV cache: every call takes a boolean `mask` [B, T] (True = real token). The
cache keeps, per row, which slots hold real tokens (`valid`), and positions are counted over
real tokens only, so left padding, right padding and prompts of mixed length all give each
row exactly the positions and context it would have alone.
"""

from __future__ import annotations

import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from models.config import LlamaConfig

Params = dict[str, Any]

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Finite, so a query row with no visible key (a pad before any real token) softmaxes to a uniform
# distribution instead of NaN; such rows are padding and their outputs are never used.
_MASK_VALUE = -1e30


def linear(x: jax.Array, w: Any) -> jax.Array:
  """The one matmul every projection goes through: x [..., K] @ w [K, N] -> [..., N]."""
  return x @ w


@flax.struct.dataclass
class KVCache:
  """Per-layer key/value cache with a shared write index.

  k, v: one [B, S, Hkv, hd] array per layer. valid: [B, S] True where a slot holds a real
  token. length: [] int32, slots written so far (the same for every row).
  """

  k: list[jax.Array]
  v: list[jax.Array]
  valid: jax.Array
  length: jax.Array

  @property
  def max_length(self) -> int:
    return self.valid.shape[1]


def init_cache(config: LlamaConfig, batch_size: int, max_length: int, dtype=jnp.bfloat16) -> KVCache:
  """An empty cache for `batch_size` rows of up to `max_length` tokens (prompt + generated)."""
  shape = (batch_size, max_length, config.num_kv_heads, config.resolved_head_dim)
  return KVCache(
      k=[jnp.zeros(shape, dtype) for _ in range(config.num_layers)],
      v=[jnp.zeros(shape, dtype) for _ in range(config.num_layers)],
      valid=jnp.zeros((batch_size, max_length), bool),
      length=jnp.zeros((), jnp.int32),
  )


def init_params(config: LlamaConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> Params:
  """Random parameters (normal(0, scale) kernels, unit norms) at the config's real shapes."""
  d, f, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
  shapes = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
  keys = iter(jax.random.split(key, 2 + config.num_layers * len(shapes)))

  def normal(shape):
    return (scale * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

  layers = []
  for _ in range(config.num_layers):
    layer = {name: normal(shape) for name, shape in shapes.items()}
    layer["input_layernorm"] = jnp.ones((d,), dtype)
    layer["post_attention_layernorm"] = jnp.ones((d,), dtype)
    layers.append(layer)
  params = {"embed_tokens": normal((config.vocab_size, d)), "layers": layers, "norm": jnp.ones((d,), dtype)}
  if not config.tie_word_embeddings:
    params["lm_head"] = normal((d, config.vocab_size))
  return params


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return weight * x32.astype(x.dtype)


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """Inverse frequencies [hd/2] (fp64 numpy, a compile-time constant), with LLaMA-3 scaling."""
  hd = config.resolved_head_dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
  rs = config.rope_scaling
  if rs is None:
    return inv_freq
  # LLaMA-3: long wavelengths are slowed by `factor`, short ones kept, the band between
  # interpolated linearly in (original context / wavelength).
  wavelen = 2 * math.pi / inv_freq
  low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
  high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
  smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
      rs.high_freq_factor - rs.low_freq_factor)
  interpolated = (1 - smooth) * inv_freq / rs.factor + smooth * inv_freq
  return np.where(wavelen > low_wavelen, inv_freq / rs.factor,
                  np.where(wavelen < high_wavelen, inv_freq, interpolated))


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """x [B, T, H, hd], positions [B, T] -> x rotated (HF convention: halves, not pairs)."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [B, T, hd/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
  """Grouped-query attention.

  Args:
    q: [B, T, Hq, hd] queries.
    k, v: [B, S, Hkv, hd] keys and values.
    visible: [B, T, S] True where query t may attend to key s.

  Returns:
    [B, T, Hq, hd] in q's dtype.
  """
  b, t, hq, hd = q.shape
  hkv = k.shape[2]
  # [B, T, Hkv, G, hd]: the G query heads that share one KV head.
  qg = q.reshape(b, t, hkv, hq // hkv, hd)
  scores = jnp.einsum("BTKGD,BSKD->BKGTS", qg, k, preferred_element_type=jnp.float32)
  scores = scores / math.sqrt(hd)
  scores = jnp.where(visible[:, None, None, :, :], scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("BKGTS,BSKD->BTKGD", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, hq, hd).astype(q.dtype)


def _check_inputs(config: LlamaConfig, tokens: jax.Array, mask: jax.Array | None):
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [batch, seq] int, got shape {tokens.shape}")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
  if mask is not None and mask.shape != tokens.shape:
    raise ValueError(f"mask shape {mask.shape} must equal tokens shape {tokens.shape}")


def forward(
    params: Params,
    config: LlamaConfig,
    tokens: jax.Array,
    mask: jax.Array | None = None,
    cache: KVCache | None = None,
) -> tuple[jax.Array, KVCache | None]:
  """Runs the decoder over a chunk of tokens.

  Args:
    params: the parameter pytree (see module docstring); float32 or bfloat16.
    config: the architecture.
    tokens: [B, T] int token ids.
    mask: [B, T] bool, True for real tokens (default: all real).
    cache: a KVCache to extend, or None for a standalone causal forward.

  Returns:
    (logits [B, T, V] float32, the updated cache or None).
  """
  _check_inputs(config, tokens, mask)
  b, t = tokens.shape
  if mask is None:
    mask = jnp.ones((b, t), bool)
  mask = mask.astype(bool)
  hq, hkv, hd = config.num_heads, config.num_kv_heads, config.resolved_head_dim
  inv_freq = rope_inv_freq(config)

  if cache is None:
    positions = jnp.cumsum(mask, axis=1) - 1
    key_valid = mask
    causal = jnp.tril(jnp.ones((t, t), bool))
  else:
    if cache.valid.shape[0] != b:
      raise ValueError(f"cache batch {cache.valid.shape[0]} != tokens batch {b}")
    positions = jnp.sum(cache.valid, axis=1, keepdims=True) + jnp.cumsum(mask, axis=1) - 1
    key_valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, cache.length))
    slots = jnp.arange(cache.max_length)
    causal = slots[None, :] <= (cache.length + jnp.arange(t))[:, None]  # [T, S]
  positions = jnp.maximum(positions, 0)
  visible = causal[None] & key_valid[:, None, :]  # [B, T, S]

  h = params["embed_tokens"][tokens]  # [B, T, D]
  new_k, new_v = [], []
  for i, layer in enumerate(params["layers"]):
    x = rms_norm(h, layer["input_layernorm"], config.rms_norm_eps)
    q = linear(x, layer["q_proj"]).reshape(b, t, hq, hd)  # [B, T, Hq, hd]
    k = linear(x, layer["k_proj"]).reshape(b, t, hkv, hd)  # [B, T, Hkv, hd]
    v = linear(x, layer["v_proj"]).reshape(b, t, hkv, hd)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    if cache is not None:
      k = jax.lax.dynamic_update_slice(cache.k[i], k.astype(cache.k[i].dtype), (0, cache.length, 0, 0))
      v = jax.lax.dynamic_update_slice(cache.v[i], v.astype(cache.v[i].dtype), (0, cache.length, 0, 0))
      new_k.append(k)
      new_v.append(v)
      k, v = k.astype(q.dtype), v.astype(q.dtype)
    a = attention(q, k, v, visible).reshape(b, t, hq * hd)
    h = h + linear(a, layer["o_proj"])
    x = rms_norm(h, layer["post_attention_layernorm"], config.rms_norm_eps)
    h = h + linear(jax.nn.silu(linear(x, layer["gate_proj"])) * linear(x, layer["up_proj"]), layer["down_proj"])

  h = rms_norm(h, params["norm"], config.rms_norm_eps)
  if config.tie_word_embeddings:
    logits = jnp.einsum("BTD,VD->BTV", h, params["embed_tokens"], preferred_element_type=jnp.float32)
  else:
    logits = jnp.einsum("BTD,DV->BTV", h, params["lm_head"], preferred_element_type=jnp.float32)

  if cache is None:
    return logits, None
  return logits, KVCache(k=new_k, v=new_v, valid=key_valid, length=cache.length + t)
