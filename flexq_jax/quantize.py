"""flexq_jax.quantize: FlexQ post-training quantization of a LLaMA parameter pytree (the pipeline).

    qparams, report = quantize(params, calib_batch, QuantConfig(...))

A rotated model (flexq_jax/rotation.py, a step before this one) is quantized like any other, with
the config rotate() returned. Steps: check the params and calibration tokens; gather input statistics in one forward pass
(flexq_jax/input_stats.py); smooth (flexq_jax/smoothing.py); optionally learn clipped weight
scales (flexq_jax/clipping.py); quantize every projection's weight
(round to nearest, or GPTQ: flexq_jax/gptq.py); choose each layer's activation bits (rules, then
the sensitivity analysis of flexq_jax/sensitivity.py or the down_proj rule); pack. The layers come
back in the canonical stored layout on the reference backend: where they run is placement's
business (flexq_jax/placement.py).
"""

from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from flexq_jax import clipping, formats, gptq, input_stats, numerics, sensitivity
from flexq_jax._tree import copy_containers, get_at, path_str, set_at
from flexq_jax.qconfig import QuantConfig
from flexq_jax.qlinear import QuantizedLinear
from flexq_jax.report import LayerReport, QuantReport
from flexq_jax.smoothing import smooth, smoothing_folds
from models import llama
from models.config import LlamaConfig
from pallas_kernels import core


def linear_paths(params: dict) -> dict[str, tuple]:
  """{"layers/<i>/<proj>": ("layers", i, proj)} for every projection kernel in the pytree."""
  if "layers" not in params or not isinstance(params["layers"], (list, tuple)):
    raise ValueError("params must be a models/ LLaMA pytree with a 'layers' list")
  out = {}
  for i, layer in enumerate(params["layers"]):
    for proj in llama.PROJECTIONS:
      if proj not in layer:
        raise ValueError(f"layer {i} has no {proj!r} kernel")
      out[f"layers/{i}/{proj}"] = ("layers", i, proj)
  return out


def _check_params(params: dict, paths: dict[str, tuple], w_bits: int) -> None:
  """Before any work: every projection a float 2-D kernel whose group scales fit fp16, and every
  float the model reads (norms, embeddings, lm_head too) finite."""
  fp16_max = float(np.finfo(np.float16).max)
  for path, idx in paths.items():
    w = get_at(params, idx)
    if isinstance(w, QuantizedLinear):
      raise ValueError(f"{path} is already quantized")
    if getattr(w, "ndim", None) != 2:
      raise ValueError(f"{path} must be a 2-D [in, out] kernel, got shape {getattr(w, 'shape', None)}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
      raise ValueError(f"{path} must be floating point, got {w.dtype}")
    numerics.check_finite(f"weights of {path}", w)
    biggest = float(jnp.max(jnp.abs(w)))
    if biggest / core.qrange(w_bits)[1] > fp16_max:
      raise ValueError(f"weights of {path} reach |w| = {biggest:.3g}: a {w_bits}-bit group scale (|w| / "
                       f"{core.qrange(w_bits)[1]}) would overflow fp16")
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  for keys, leaf in leaves:
    if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating):
      numerics.check_finite(path_str(keys), leaf)


def _summed_nll(config: LlamaConfig):
  def loss(params, tokens):
    logits, _ = llama.forward(params, config, tokens, remat=True)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
  return loss


def quantize(
    params: dict,
    calib_batch,
    config: QuantConfig | None = None,
    *,
    model_config: LlamaConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict, QuantReport]:
  """FlexQ: quantizes every linear layer of a models/ LLaMA pytree.

  Args:
    params: float parameter pytree (see models.llama).
    calib_batch: [B, T] int tokens of calibration text.
    config: QuantConfig (default: W6, g128, SmoothQuant smoothing (alpha 0.5) and GPTQ weights,
      A6 with 1/7 of the layers at A8 chosen by the sensitivity analysis).
    model_config: the architecture; inferred from the shapes for the known presets. A rotated model
      (flexq_jax.rotate) needs the config rotate() returned.
    progress: optional callback taking a status line.

  Returns:
    (quantized params: same tree, each projection kernel a QuantizedLinear in config.layout on
    the "reference" backend; QuantReport). Place them on a GPU kernel with flexq_jax.place.
  """
  config = config or QuantConfig()
  say = progress or (lambda msg: None)
  calib_batch = np.asarray(calib_batch)
  if calib_batch.ndim != 2 or not np.issubdtype(calib_batch.dtype, np.integer):
    raise ValueError(f"calib_batch must be [batch, seq] integer tokens, got {calib_batch.dtype} {calib_batch.shape}")
  if calib_batch.shape[0] < 1 or calib_batch.shape[1] < 2:
    raise ValueError(f"calib_batch needs at least 1 row of at least 2 tokens, got shape {calib_batch.shape}")
  paths = linear_paths(params)
  _check_params(params, paths, config.w_bits)
  model_config = model_config or llama.infer_config(params)
  if calib_batch.max() >= model_config.vocab_size or calib_batch.min() < 0:
    raise ValueError(f"calib_batch has token ids outside [0, {model_config.vocab_size})")
  forward = lambda p, tokens: llama.forward(p, model_config, tokens)[0]
  seconds = {}

  stats = None
  learned_clipping = config.weight_clipping == "learned"
  sequential = config.gptq_sequential and (config.weight_method == "gptq" or learned_clipping)
  if sequential and config.smooth_alpha is not None:
    raise ValueError("gptq_sequential=True does not combine with smooth_alpha (smoothing needs every layer's "
                     "float statistics first); use one or the other")
  # Sequential calibration takes its statistics block by block, inside the weight loop below.
  if not sequential and (config.weight_method == "gptq" or config.smooth_alpha is not None or learned_clipping):
    say("calibration statistics (one forward pass)")
    t0 = time.perf_counter()
    stats = input_stats.collect_input_stats(params, paths, forward, calib_batch)
    seconds["calibration"] = time.perf_counter() - t0

  reference = None
  if config.a8_selection == "measured" and config.a_bits < 16:
    # The float model's final hidden states on the measurement rows (before any weight changes).
    reference = (calib_batch[:config.measure_rows],
                 jax.jit(lambda p, t: llama.forward(p, model_config, t, head=False)[0])(
                     params, jnp.asarray(calib_batch[:config.measure_rows])))

  if config.smooth_alpha is not None:
    params, factors = smooth(params, stats, config.smooth_alpha, smoothing_folds(model_config))
  else:
    factors = {}

  say(f"quantizing {len(paths)} weights ({config.weight_method}"
      + (f", learned clipping: {config.clipping_steps} Adam steps each" if learned_clipping else "") + ")")
  t0 = time.perf_counter()
  quantized = {}
  clip_errors = []
  block_inputs = _SequentialInputs(params, model_config, calib_batch) if sequential else None
  for path, idx in paths.items():
    if block_inputs is not None and block_inputs.block != idx[1]:  # a new block: its inputs' statistics
      stats = block_inputs.enter(idx[1], quantized)
    w = jnp.asarray(get_at(params, idx)).T  # [N, K]
    group = config.group_size or core.padded_k(w.shape[1])
    h = scales = None
    if stats is not None:
      st = stats[path]
      h = st.hessian / max(1, st.count)
      if path in factors:  # the smoothed layer sees x / s
        inv = jnp.asarray(1.0 / factors[path], jnp.float32)
        h = h * inv[:, None] * inv[None, :]
    if learned_clipping:
      scales, e_plain, e_clip = clipping.learn_clipping(w, h, bits=config.w_bits, group=group,
                                                        steps=config.clipping_steps, lr=config.clipping_lr)
      clip_errors.append((float(e_plain), float(e_clip)))
    if config.weight_clipping == "mse":
      scales = clipping.mse_clipping(w, h, bits=config.w_bits, group=group)
    if config.weight_clipping == "full_range":
      scales = clipping.full_range_scales(w, bits=config.w_bits, group=group)
    if config.weight_method == "gptq":
      q, s = gptq.gptq_quantize(w, h, bits=config.w_bits, group=group, damp=config.gptq_damp,
                                act_order=config.gptq_act_order, scales=scales)
      if config.gptq_refit_scales:  # (round to nearest keeps max|w| / qmax: the option is GPTQ's)
        s = gptq.refit_scales(w, q, s, h, group=group, damp=config.gptq_damp)
    else:
      q, s = numerics.quantize_weight(w, config.w_bits, config.group_size, scales=scales)
    numerics.check_finite(f"the weight scales quantize() computed for {path}", s)
    quantized[path] = (q, s)
  jax.block_until_ready(quantized)
  seconds["weights"] = time.perf_counter() - t0
  if clip_errors:
    plain, clipped = np.mean(clip_errors, axis=0)
    say(f"learned clipping: mean relative output error of round-to-nearest {plain:.3e} -> {clipped:.3e}")
  del stats  # the Hessians (hundreds of MB for a small model) are done with
  # The float kernels are done with: keep only their shapes (a smoothed copy of every projection
  # would otherwise stay alive through the sensitivity analysis, which probes the quantized ones).
  params = copy_containers(params)
  for path, idx in paths.items():
    w = get_at(params, idx)
    set_at(params, idx, jax.ShapeDtypeStruct(w.shape, w.dtype))

  a_bits, why, scores = _choose_activation_bits(params, paths, quantized, config, model_config, calib_batch, say,
                                                seconds, reference)

  qparams = copy_containers(params)
  layers = []
  for path, idx in paths.items():
    q, s = quantized[path]
    k, n = get_at(params, idx).shape
    layer = QuantizedLinear(packed=formats.pack(q, config.w_bits, config.layout, k), scales=s, in_features=k,
                            out_features=n, w_bits=config.w_bits, a_bits=a_bits[path], group_size=config.group_size,
                            layout=config.layout)
    set_at(qparams, idx, layer)
    layers.append(LayerReport(path, k, n, config.w_bits, a_bits[path], why[path], scores.get(path), 2 * k * n,
                              layer.nbytes))
  return qparams, QuantReport(config.to_dict(), layers, config.unmatched_rules(paths), seconds)


class _SequentialInputs:
  """Sequential calibration (GPTQ's own practice): block i's statistics are taken on the hidden
  states that blocks 0..i-1 produce with their weights already quantized (dequantized, float
  activations), so each block's error compensation also sees the error of the blocks before it.
  One eager pass per block over its probes plus one jitted pass to move the hidden states on: about
  the cost of the single float pass it replaces."""

  def __init__(self, params: dict, model_config: LlamaConfig, calib_batch: np.ndarray, rows: int = 4):
    self.params, self.block = params, None
    self.chunks = []  # [run, h] a calibration chunk
    for start in range(0, calib_batch.shape[0], rows):
      h, run = llama.block_runner(params, model_config, jnp.asarray(calib_batch[start:start + rows]))
      self.chunks.append([run, h])
    self._jitted = {}

  def enter(self, block: int, quantized: dict) -> dict:
    """Moves the hidden states through the blocks before `block` (quantized) and returns the
    statistics of `block`'s projections on them."""
    if self.block is not None:
      layer = dict(self.params["layers"][self.block])
      for proj in llama.PROJECTIONS:
        q, s = quantized[f"layers/{self.block}/{proj}"]
        w = layer[proj]
        layer[proj] = numerics.dequantize_weight(q, s, w.shape[0]).T.astype(w.dtype)
      for chunk in self.chunks:
        run, h = chunk
        fn = self._jitted.setdefault(id(run), jax.jit(run))
        chunk[1] = fn(layer, h)
    if block != (0 if self.block is None else self.block + 1):
      raise ValueError(f"sequential calibration visits blocks in order; got block {block} after {self.block}")
    self.block = block
    layer = self.params["layers"][block]
    return input_stats.collect_block_stats(layer, {p: f"layers/{block}/{p}" for p in llama.PROJECTIONS},
                                           [tuple(c) for c in self.chunks])


def _choose_activation_bits(params, paths, quantized, config, model_config, calib_batch, say, seconds,
                            reference=None):
  """Per-layer activation bits: rules first, then the A8 selection, else config.a_bits."""
  a_bits = {p: config.a_bits for p in paths}
  why = {p: "default" for p in paths}
  ruled = set()
  for path in paths:
    rule = config.rule_for(path)
    if rule is not None:
      a_bits[path], why[path] = rule[1], f"rule {rule[0]}"
      ruled.add(path)
  scores: dict[str, float] = {}
  free = [p for p in paths if p not in ruled]
  ruled_a8 = sum(1 for p in ruled if a_bits[p] == config.sensitive_a_bits)
  budget = config.a8_count(len(paths), len(llama.PROJECTIONS)) - ruled_a8
  if config.a8_selection == "down_proj":
    for p in free:
      if p.endswith("/down_proj"):
        a_bits[p], why[p] = config.sensitive_a_bits, "down_proj rule"
  elif config.a8_selection in ("sensitivity", "measured") and budget > 0 and config.a_bits < 16:
    say("sensitivity analysis (one forward + backward)")
    t0 = time.perf_counter()
    kernels = {p: quantized[p] for p in free}
    params = copy_containers(params)
    for p in paths:  # layers a rule took out of the analysis run their quantized weight in float
      if p not in kernels:
        set_at(params, paths[p], numerics.dequantize_weight(*quantized[p], get_at(params, paths[p]).shape[0]).T)
    # The probe's base is its hi_bits: swapped, it differentiates the all-a_bits model instead.
    lo, hi = config.a_bits, config.sensitive_a_bits
    if config.sensitivity_from == "low":
      lo, hi = hi, lo
    # In rounds (sensitivity_rounds > 1): each round's pass runs the layers chosen so far at
    # sensitive_a_bits, scores the rest, and takes its share of the budget; a layer keeps the score of
    # the round that scored it last.
    rounds = config.sensitivity_rounds if config.a8_selection == "sensitivity" else 1
    chosen: list[str] = []
    for r in range(rounds):
      if r:
        say(f"sensitivity analysis, round {r + 1} of {rounds} ({len(chosen)} layers at A{config.sensitive_a_bits})")
      sens = sensitivity.activation_sensitivity(
          params, kernels, {p: paths[p] for p in free}, _summed_nll(model_config), calib_batch,
          lo_bits=lo, hi_bits=hi, group_size=config.group_size, switched=frozenset(chosen))
      scores.update({p: s.fisher for p, s in sens.items() if p not in chosen})
      rest = sorted((p for p in free if p not in chosen), key=lambda p: -scores[p])
      chosen += rest[:-(-(budget - len(chosen)) // (rounds - r))]
    seconds["sensitivity"] = time.perf_counter() - t0
    ranked = chosen + sorted((p for p in free if p not in chosen), key=lambda p: -scores[p])
    reason = "sensitivity"
    if config.a8_selection == "measured":
      candidates = ranked[:config.measure_candidates or 2 * budget]
      tokens, hidden = reference
      say(f"measuring {len(candidates)} candidate A{config.sensitive_a_bits} layers one by one "
          f"({tokens.shape[0]} x {tokens.shape[1]} tokens, KL from the float model)")
      t0 = time.perf_counter()
      gains = sensitivity.measured_switch_gains(
          params, kernels, {p: paths[p] for p in free}, model_config, tokens, hidden, candidates,
          lo_bits=config.a_bits, hi_bits=config.sensitive_a_bits, group_size=config.group_size)
      seconds["measured"] = time.perf_counter() - t0
      # The measured gain (nats of KL) is the layer's score; layers not measured rank after them.
      scores = {p: gains[p] for p in candidates}
      ranked = sorted(candidates, key=lambda p: -scores[p])
      reason = "measured"
    for p in ranked[:budget]:
      a_bits[p], why[p] = config.sensitive_a_bits, reason
  return a_bits, why, scores
