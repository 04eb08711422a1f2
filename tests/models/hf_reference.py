"""transformers' FlaxLlamaForCausalLM (4.57.x) as an independent reference implementation.

The reference hard-codes RoPE theta = 10000 and has no tied embeddings; for other thetas we
swap its sin/cos table builder for one with the right theta (the only change), and tied models
get the embedding copied into its lm_head.
"""

from __future__ import annotations

import contextlib

import numpy as np

from models.config import LlamaConfig


@contextlib.contextmanager
def _rope_theta(theta: float):
  from transformers.models.llama import modeling_flax_llama as m

  original = m.create_sinusoidal_positions

  def with_theta(num_pos, dim):
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2) / dim))
    freqs = np.einsum("i,j->ij", np.arange(num_pos), inv_freq).astype("float32")
    emb = np.concatenate((freqs, freqs), axis=-1)
    out = np.concatenate((np.sin(emb)[:, None, :], np.cos(emb)[:, None, :]), axis=-1)
    return m.jnp.array(out[:, :, :num_pos])

  m.create_sinusoidal_positions = with_theta
  try:
    yield
  finally:
    m.create_sinusoidal_positions = original


def hf_logits(config: LlamaConfig, params: dict, tokens: np.ndarray, attention_mask=None) -> np.ndarray:
  """Logits [B, T, V] (fp32) of transformers' Flax LLaMA with our parameters."""
  import transformers
  from transformers import FlaxLlamaForCausalLM

  assert config.rope_scaling is None, "the Flax reference has no rope scaling"
  hf_config = transformers.LlamaConfig(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size,
      intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
      rms_norm_eps=config.rms_norm_eps,
      # The reference slices its sin/cos table's last axis (2 * head_dim wide) to this length.
      max_position_embeddings=max(tokens.shape[1], 2 * config.resolved_head_dim),
      rope_theta=config.rope_theta, tie_word_embeddings=False,
  )
  f32 = lambda a: np.asarray(a, np.float32)
  layers = {}
  for i, layer in enumerate(params["layers"]):
    layers[str(i)] = {
        "input_layernorm": {"weight": f32(layer["input_layernorm"])},
        "post_attention_layernorm": {"weight": f32(layer["post_attention_layernorm"])},
        "self_attn": {p: {"kernel": f32(layer[p])} for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
        "mlp": {p: {"kernel": f32(layer[p])} for p in ("gate_proj", "up_proj", "down_proj")},
    }
  embed = f32(params["embed_tokens"])
  lm_head = embed.T if config.tie_word_embeddings else f32(params["lm_head"])
  hf_params = {
      "model": {"embed_tokens": {"embedding": embed}, "layers": layers, "norm": {"weight": f32(params["norm"])}},
      "lm_head": {"kernel": lm_head},
  }
  with _rope_theta(config.rope_theta):
    model = FlaxLlamaForCausalLM(hf_config, _do_init=False)
    out = model(np.asarray(tokens), attention_mask=attention_mask, params=hf_params)
  return np.asarray(out.logits, np.float32)
