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

measured_switch_gains checks such estimates by measurement: for each candidate layer, one forward
with that layer alone switched, scored by the KL divergence from the float model's outputs
(QuantConfig(a8_selection="measured")). Cost: one forward per candidate.
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


def _probe_parts(probe, x):
  """What both probes compute from x [..., K]: x as fp32 [M, K], its lo_bits and hi_bits fake
  quantizations, and the probe's dequantized kernel [K, N] fp32 (one layer at a time)."""
  x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  lo = fake_quant_activation(x2, probe.lo_bits, probe.group_size)
  hi = fake_quant_activation(x2, probe.hi_bits, probe.group_size)
  return x2, lo, hi, numerics.dequantize_weight(probe.q_w, probe.s_w, x2.shape[1]).T


@flax.struct.dataclass
class _SwitchProbe:
  q_w: jax.Array  # int8 [N, Kp]: the quantized weight (dequantized inside, one layer at a time)
  s_w: jax.Array  # fp16 [N, Kp / group]
  t: jax.Array  # [tokens] zeros: d loss / d t is the sensitivity signal
  flip: jax.Array  # scalar 0 or 1: 1 = this layer already switched (its base is lo_bits; its own score is moot)
  lo_bits: int = flax.struct.field(pytree_node=False)
  hi_bits: int = flax.struct.field(pytree_node=False)
  group_size: int | None = flax.struct.field(pytree_node=False)

  def __rmatmul__(self, x):
    x2, lo, hi, kernel = _probe_parts(self, x)
    # Arrays, not a branch: stacked layers share one scanned body (flip = 0: exactly hi and lo).
    base, other = hi + self.flip * (lo - hi), lo + self.flip * (hi - lo)
    x_base = x2 + jax.lax.stop_gradient(base - x2)  # straight-through
    x_in = x_base + self.t[:, None] * jax.lax.stop_gradient(other - base)  # toward the other width
    return (x_in @ kernel).astype(x.dtype).reshape(*x.shape[:-1], -1)


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
    switched: frozenset[str] = frozenset(),
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
    switched: layers already moved to lo_bits (their activations run at lo_bits in the pass; their
      own scores are returned but mean the way back).

  Returns:
    {path: LayerSensitivity}.
  """
  b, t = calib_batch.shape
  fisher = {p: 0.0 for p in kernels}
  first = {p: 0.0 for p in kernels}
  for start in range(0, b, batch_rows):
    tokens = jnp.asarray(calib_batch[start:start + batch_rows])
    grads = _grads(params, kernels, paths, loss_fn, tokens, lo_bits, hi_bits, group_size, switched)
    for p, g in grads.items():
      fisher[p] += 0.5 * float(jnp.sum(g * g))
      first[p] += float(jnp.sum(g))
  return {p: LayerSensitivity(p, fisher[p], first[p]) for p in kernels}


def _grads(params, kernels, paths, loss_fn, tokens, lo_bits, hi_bits, group_size, switched=frozenset()):
  n_tok = tokens.size
  ts = {p: jnp.zeros((n_tok,), jnp.float32) for p in kernels}
  return _grad_fn(loss_fn, tuple(paths[p] for p in kernels), tuple(kernels), lo_bits, hi_bits, group_size)(
      params, [(*kernels[p], jnp.float32(p in switched)) for p in kernels], ts, tokens)


@functools.lru_cache(maxsize=8)
def _grad_fn(loss_fn, index_paths, names, lo_bits, hi_bits, group_size):

  def with_probes(params, kernels, ts):
    out = copy_containers(params)
    for idx, name, (q_w, s_w, flip) in zip(index_paths, names, kernels):
      set_at(out, idx, _SwitchProbe(q_w, s_w, ts[name], flip, lo_bits, hi_bits, group_size))
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



@flax.struct.dataclass
class _MixProbe:
  q_w: jax.Array  # int8 [N, Kp]
  s_w: jax.Array  # fp16 [N, Kp / group]
  t: jax.Array  # scalar: 0 = lo_bits activations, 1 = hi_bits
  lo_bits: int = flax.struct.field(pytree_node=False)
  hi_bits: int = flax.struct.field(pytree_node=False)
  group_size: int | None = flax.struct.field(pytree_node=False)

  def __rmatmul__(self, x):
    _, lo, hi, kernel = _probe_parts(self, x)
    return ((lo + self.t * (hi - lo)) @ kernel).astype(x.dtype).reshape(*x.shape[:-1], -1)


def measured_switch_gains(
    params: Any,
    kernels: dict[str, tuple[jax.Array, jax.Array]],
    paths: dict[str, tuple],
    model_config,
    tokens: jax.Array,
    reference_hidden: jax.Array,
    candidates: list[str],
    *,
    lo_bits: int = 6,
    hi_bits: int = 8,
    group_size: int | None = 128,
) -> dict[str, float]:
  """The measured effect of moving each candidate layer alone from lo_bits to hi_bits activations.

  The model has every layer of `kernels` at lo_bits; for each candidate, one forward with that
  layer at hi_bits. The measure is the summed KL divergence of the model's next-token
  distributions from the float model's (whose final hidden states are `reference_hidden`; the
  lm_head in params turns them into logits), so a layer's gain is how much closer to the float
  model it brings the output, on real text, with every other layer quantized as deployed.

  Args:
    params: parameter pytree whose kernels at `paths` get replaced (lm_head / embedding float).
    kernels: {path: (q_w, s_w)} of every layer whose activation bits are chosen.
    paths: {path: index tuple into params}.
    model_config: the architecture (models.config.LlamaConfig).
    tokens: [B, T] int tokens to measure on.
    reference_hidden: [B, T, D] the float model's final normed hidden states on `tokens`.
    candidates: the paths (keys of kernels) to measure.
    lo_bits, hi_bits, group_size: the two activation widths and the activation group.

  Returns:
    {candidate: KL(all lo_bits) - KL(candidate at hi_bits)} in nats summed over tokens (positive:
    switching helps), plus the entry "" = KL of the all-lo_bits model itself.
  """
  names = tuple(kernels)
  unknown = [c for c in candidates if c not in kernels]
  if unknown:
    raise ValueError(f"candidates {unknown[:3]} are not among the layers whose bits are chosen")
  fn = _kl_fn(model_config, tuple(paths[p] for p in names), names, lo_bits, hi_bits, group_size)
  arrays = [tuple(kernels[p]) for p in names]
  tokens = jnp.asarray(tokens)
  base_ts = {p: jnp.zeros((), jnp.float32) for p in names}
  base = float(fn(params, arrays, base_ts, tokens, reference_hidden))
  gains = {"": base}
  for c in candidates:
    ts = dict(base_ts)
    ts[c] = jnp.ones((), jnp.float32)
    gains[c] = base - float(fn(params, arrays, ts, tokens, reference_hidden))
  return gains


@functools.lru_cache(maxsize=4)
def _kl_fn(model_config, index_paths, names, lo_bits, hi_bits, group_size):

  def kl(params, kernels, ts, tokens, reference_hidden):
    out = copy_containers(params)
    for idx, name, (q_w, s_w) in zip(index_paths, names, kernels):
      set_at(out, idx, _MixProbe(q_w, s_w, ts[name], lo_bits, hi_bits, group_size))
    try:  # one scanned block (fast to compile); layers a rule changed stay unrolled
      out = llama.stack_layers(out)
    except ValueError:
      pass

    def row(carry, xs):
      tok, ref = xs
      h, _ = llama.forward(out, model_config, tok[None], head=False)
      logq = jax.nn.log_softmax(llama.lm_head(out, model_config, h[0]), axis=-1)
      logp = jax.nn.log_softmax(llama.lm_head(out, model_config, ref), axis=-1)
      return carry + jnp.sum(jnp.exp(logp) * (logp - logq)), None

    total, _ = jax.lax.scan(row, jnp.zeros((), jnp.float32), (tokens, reference_hidden))
    return total

  return jax.jit(kl)
