"""Rotation (incoherence processing, after QuaRot): orthogonal transforms folded into the weights so
that every quantized layer sees activations and weights without outlier channels.

    rparams, rconfig = rotate(params, config)        # exact for the float model
    qparams, report = quantize(rparams, calib, model_config=rconfig)

What is rotated (x @ W with kernels [in, out]; every matrix orthogonal, computed in float64):

  * RMSNorm weights are folded first: input_layernorm into q/k/v's input rows,
    post_attention_layernorm into gate/up's, the final norm into lm_head; the norms become ones.
    An RMSNorm without weight commutes with any orthogonal Q (it only divides by the vector's norm).
  * The residual stream is rotated by Q = diag(random signs) H / sqrt(D) (H: models/hadamard.py;
    a seeded random orthogonal matrix when D has no Hadamard order here): the embedding becomes
    E Q; the projections reading the residual (q/k/v, gate/up, lm_head) get Q^T W; those writing
    into it (o_proj, down_proj) get W Q.
  * Per head, v_proj's output columns and o_proj's input rows are rotated by the same Hadamard
    of order head_dim (attention mixes tokens, not channels, so v's rotation passes through it).
  * down_proj's input: an online Hadamard transform in the forward (LlamaConfig.down_proj_hadamard,
    models/llama.py), whose transpose is folded into down_proj's rows.

The embedding is no longer lm_head's transpose (the final norm's weight is folded into the head), so
the rotated model unties them: params gain "lm_head" and the config says tie_word_embeddings=False
(+ V x D floats). The rotated config must be used with the rotated params everywhere (forward,
checkpoints). SmoothQuant's up_proj -> down_proj fold no longer applies (down_proj reads the
transformed input); flexq_jax/smoothing.py skips it for such models.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from flexq_jax.qlinear import QuantizedLinear
from models import hadamard, llama
from models.config import LlamaConfig


def orthogonal(n: int, seed: int) -> tuple[np.ndarray, str]:
  """A seeded orthogonal n x n matrix (float64): diag(random signs) H / sqrt(n) with the Hadamard
  matrix of models/hadamard.py where one of order n is built, else the Q of a Gaussian's QR; and
  which of the two it is."""
  rng = np.random.default_rng(seed)
  if hadamard.has_order(n):
    signs = rng.choice([-1.0, 1.0], size=n)
    return signs[:, None] * hadamard.hadamard_matrix(n) / np.sqrt(n), "randomized Hadamard"
  q, r = np.linalg.qr(rng.standard_normal((n, n)))
  return q * np.sign(np.diag(r))[None, :], "random orthogonal"


def rotate(params: dict, config: LlamaConfig, *, seed: int = 0) -> tuple[dict, LlamaConfig]:
  """The rotated float model (same function up to float rounding) and its config.

  Args:
    params: float LLaMA params (list of per-layer dicts, unfused, unquantized).
    config: its architecture (not already rotated).
    seed: the residual rotation's random signs.

  Returns:
    (params with every projection, the embedding and lm_head rotated and the norms set to ones;
     config with tie_word_embeddings=False and down_proj_hadamard=True).
  """
  if config.down_proj_hadamard:
    raise ValueError("rotate: the model is already rotated (config.down_proj_hadamard is set)")
  layers = params.get("layers") if isinstance(params, dict) else None
  if not isinstance(layers, (list, tuple)):
    raise ValueError("rotate: params must be a models/ LLaMA pytree with a 'layers' list (unstack_layers first)")
  for i, layer in enumerate(layers):
    for name in llama.PROJECTIONS:
      if name not in layer:
        raise ValueError(f"rotate: layer {i} has no {name!r} (fused projections? rotate before fuse_projections)")
      if isinstance(layer[name], QuantizedLinear):
        raise ValueError(f"rotate: layers/{i}/{name} is quantized; rotate the float model, then quantize")
  if not hadamard.has_order(config.intermediate_size):
    raise ValueError(f"rotate: no Hadamard transform of order intermediate_size {config.intermediate_size} for "
                     f"down_proj's input (orders 2^a * 12^b * 20^c only)")
  dtype = params["embed_tokens"].dtype
  f64 = lambda a: np.asarray(a, np.float64)
  back = lambda a: jnp.asarray(a, dtype)
  d, hd = config.hidden_size, config.resolved_head_dim
  q_res, _ = orthogonal(d, seed)
  h_head = hadamard.hadamard_matrix(hd) / np.sqrt(hd) if hadamard.has_order(hd) else np.eye(hd)
  h_ffn = hadamard.hadamard_matrix(config.intermediate_size) / np.sqrt(config.intermediate_size)

  out = {k: v for k, v in params.items() if k not in ("layers", "embed_tokens", "lm_head", "norm")}
  # The vocabulary-sized matrices in blocks of rows: float64 copies of a whole [V, D] matrix would
  # add hundreds of MB to the peak memory of quantizing a small model.
  embed = np.asarray(params["embed_tokens"])
  head = np.asarray(params["embed_tokens"]).T if config.tie_word_embeddings else np.asarray(params["lm_head"])
  gamma = f64(params["norm"])[:, None]
  block = 8192
  out["embed_tokens"] = jnp.concatenate([back(f64(embed[i:i + block]) @ q_res) for i in range(0, embed.shape[0], block)])
  out["lm_head"] = jnp.concatenate([back(q_res.T @ (gamma * f64(head[:, i:i + block])))
                                    for i in range(0, head.shape[1], block)], axis=1)
  out["norm"] = jnp.ones_like(params["norm"])
  new_layers = []
  for layer in layers:
    new = dict(layer)
    g1 = f64(layer["input_layernorm"])[:, None]
    for name in ("q_proj", "k_proj", "v_proj"):
      new[name] = q_res.T @ (g1 * f64(layer[name]))
    # v's output / o's input, head by head (GQA: every query head reads its KV head's rotated v).
    v = new["v_proj"]
    new["v_proj"] = np.concatenate([v[:, j:j + hd] @ h_head for j in range(0, v.shape[1], hd)], axis=1)
    o = f64(layer["o_proj"])
    o = np.concatenate([h_head.T @ o[j:j + hd] for j in range(0, o.shape[0], hd)], axis=0)
    new["o_proj"] = o @ q_res
    g2 = f64(layer["post_attention_layernorm"])[:, None]
    for name in ("gate_proj", "up_proj"):
      new[name] = q_res.T @ (g2 * f64(layer[name]))
    new["down_proj"] = h_ffn.T @ f64(layer["down_proj"]) @ q_res
    for name in llama.PROJECTIONS:
      new[name] = back(new[name])
    new["input_layernorm"] = jnp.ones_like(layer["input_layernorm"])
    new["post_attention_layernorm"] = jnp.ones_like(layer["post_attention_layernorm"])
    new_layers.append(new)
  out["layers"] = new_layers
  return out, dataclasses.replace(config, tie_word_embeddings=False, down_proj_hadamard=True)
