"""Layer-wise sensitivity of the loss to 6-bit (vs 8-bit) activations, in one forward/backward.

Every quantized projection is replaced by a probe computing

    y = (x8 + t * (x6 - x8)) @ W_q

where x8 / x6 are x fake-quantized to 8 / 6 bits (the contract's per-token-group rounding,
with a straight-through gradient) and t is a per-token scalar, zero in the pass. At t = 0 the
model is the W6A8 model; t = 1 moves that layer (at that token) to A6. One backward gives
dL/dt for every token of every layer at once, and

    score(layer) = 1/2 * sum_tokens (dL/dt_token)^2

is the Fisher (outer-product) estimate of the loss increase when that layer goes to A6; the
first-order term sum_tokens dL/dt is reported too. Cost: one forward and one backward over the
calibration batch, whatever the number of layers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp

from flexq_jax import numerics
from flexq_jax._tree import copy_containers, set_at
from models import llama


def fake_quant_activation(x: jax.Array, bits: int, group_size: int | None) -> jax.Array:
  """x [M, K] -> s_x * q_x, same shape: exactly the contract's activation quantization
  (numerics.quantize_activation: the integers every kernel computes), dequantized."""
  m, k = x.shape
  q, s = numerics.quantize_activation(x, bits, group_size)
  kp = q.shape[1]
  g = kp // s.shape[1]
  return (q.astype(jnp.float32).reshape(m, kp // g, g) * s[..., None]).reshape(m, kp)[:, :k]


@flax.struct.dataclass
class _SwitchProbe:
  q_w: jax.Array  # int8 [N, Kp]: the quantized weight (dequantized inside, one layer at a time)
  s_w: jax.Array  # fp16 [N, Kp / group]
  t: jax.Array  # [tokens] zeros: d loss / d t is the sensitivity signal
  lo_bits: int = flax.struct.field(pytree_node=False)
  hi_bits: int = flax.struct.field(pytree_node=False)
  group_size: int | None = flax.struct.field(pytree_node=False)

  def __rmatmul__(self, x):
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    hi = fake_quant_activation(x2, self.hi_bits, self.group_size)
    lo = fake_quant_activation(x2, self.lo_bits, self.group_size)
    x_hi = x2 + jax.lax.stop_gradient(hi - x2)  # straight-through
    x_in = x_hi + self.t[:, None] * jax.lax.stop_gradient(lo - hi)
    kernel = numerics.dequantize_weight(self.q_w, self.s_w, x2.shape[1]).T  # [K, N] fp32
    return (x_in @ kernel).astype(x.dtype).reshape(*lead, -1)


@dataclasses.dataclass(frozen=True)
class LayerSensitivity:
  path: str
  fisher: float  # 1/2 sum (dL/dt)^2: estimated loss increase (nats, summed over tokens)
  first_order: float  # sum dL/dt


def activation_sensitivity(
    params: Any,
    kernels: dict[str, jax.Array],
    paths: dict[str, tuple],
    loss_fn: Callable[[Any, jax.Array], jax.Array],
    calib_batch: jax.Array,
    *,
    lo_bits: int = 6,
    hi_bits: int = 8,
    group_size: int | None = 128,
    batch_rows: int = 1,
) -> dict[str, LayerSensitivity]:
  """Scores every layer in `kernels` by the estimated loss increase of going hi_bits -> lo_bits.

  Args:
    params: the parameter pytree (float; its kernels at `paths` are replaced by probes).
    kernels: {path: (q_w int8 [N, Kp], s_w fp16 [N, G])}: the quantized weight to probe with (kept
      in its integer form; each layer dequantizes it inside the probe, so the analysis never holds
      a float copy of every layer).
    paths: {path: index tuple into params}.
    loss_fn: loss_fn(params, tokens) -> summed NLL (scalar).
    calib_batch: [B, T] int tokens.
    lo_bits, hi_bits: the two activation widths compared.
    group_size: activation group size.
    batch_rows: rows per forward/backward (bounds memory); scores add up over chunks.

  Returns:
    {path: LayerSensitivity}.
  """
  b, t = calib_batch.shape
  fisher = {p: 0.0 for p in kernels}
  first = {p: 0.0 for p in kernels}
  for start in range(0, b, batch_rows):
    tokens = jnp.asarray(calib_batch[start:start + batch_rows])
    grads = _grads(params, kernels, paths, loss_fn, tokens, lo_bits, hi_bits, group_size)
    for p, g in grads.items():
      fisher[p] += 0.5 * float(jnp.sum(g * g))
      first[p] += float(jnp.sum(g))
  return {p: LayerSensitivity(p, fisher[p], first[p]) for p in kernels}


def _grads(params, kernels, paths, loss_fn, tokens, lo_bits, hi_bits, group_size):
  n_tok = tokens.size
  ts = {p: jnp.zeros((n_tok,), jnp.float32) for p in kernels}
  return _grad_fn(loss_fn, tuple(paths[p] for p in kernels), tuple(kernels), lo_bits, hi_bits, group_size)(
      params, [tuple(kernels[p]) for p in kernels], ts, tokens)


@functools.lru_cache(maxsize=8)
def _grad_fn(loss_fn, index_paths, names, lo_bits, hi_bits, group_size):

  def with_probes(params, kernels, ts):
    out = copy_containers(params)
    for idx, name, (q_w, s_w) in zip(index_paths, names, kernels):
      set_at(out, idx, _SwitchProbe(q_w, s_w, ts[name], lo_bits, hi_bits, group_size))
    # One scanned block instead of every layer unrolled: the backward of the unrolled model took
    # ~8 GB to compile on CPU for the default model. Layers whose trees differ (a rule took some
    # projections out of the analysis) stay unrolled.
    try:
      return llama.stack_layers(out)
    except ValueError:
      return out

  def loss(ts, params, kernels, tokens):
    return loss_fn(with_probes(params, kernels, ts), tokens)

  return jax.jit(lambda params, kernels, ts, tokens: jax.grad(loss)(ts, params, kernels, tokens))

