"""flexq_jax.quantize: FlexQ post-training quantization of a LLaMA parameter pytree."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from flexq_jax import calibration, formats, gptq, numerics, sensitivity
from flexq_jax._tree import copy_containers, get_at, set_at
from flexq_jax.qlinear import QuantizedLinear
from models import llama
from models.config import LlamaConfig, PRESETS

WEIGHT_METHODS = ("rtn", "gptq")
A8_SELECTIONS = ("sensitivity", "down_proj", "none")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
  """What quantize() does. Frozen: make variants with dataclasses.replace."""

  w_bits: int = 6  # weight bits (every linear layer)
  group_size: int | None = 128  # K-group for weights and activations; None = per channel / token
  a_bits: int = 6  # activation bits of ordinary layers (16 = keep activations float)
  sensitive_a_bits: int = 8  # activation bits of the layers the selection marks sensitive
  a8_selection: str = "sensitivity"  # "sensitivity" (our analysis), "down_proj" (paper rule), "none"
  a8_budget: int | float | None = None  # A8 layers: a count, a fraction, or None = 1 in 7 (FlexQ's)
  # (regex on the layer path "layers/<i>/<proj>", activation bits); first match wins and
  # overrides the selection. Rules that match nothing are listed in the report.
  rules: tuple[tuple[str, int], ...] = ()
  weight_method: str = "gptq"  # "rtn" (round to nearest) or "gptq" (error compensation)
  gptq_damp: float = 0.01  # GPTQ diagonal damping (fraction of mean diag(H))
  gptq_act_order: bool = True  # GPTQ visits the most active input channels first
  smooth_alpha: float | None = 0.5  # SmoothQuant migration strength; None = no smoothing
  layout: str = "bitplanes"  # packed weight layout (flexq_jax.formats)

  def __post_init__(self):
    if not 2 <= self.w_bits <= 8:
      raise ValueError(f"w_bits must be in [2, 8], got {self.w_bits}")
    for name in ("a_bits", "sensitive_a_bits"):
      v = getattr(self, name)
      if not (2 <= v <= 8 or v == 16):
        raise ValueError(f"{name} must be in [2, 8] or 16 (float), got {v}")
    if self.weight_method not in WEIGHT_METHODS:
      raise ValueError(f"weight_method must be one of {WEIGHT_METHODS}, got {self.weight_method!r}")
    if self.a8_selection not in A8_SELECTIONS:
      raise ValueError(f"a8_selection must be one of {A8_SELECTIONS}, got {self.a8_selection!r}")
    if self.layout not in formats.LAYOUTS:
      raise ValueError(f"layout must be one of {formats.LAYOUTS}, got {self.layout!r}")
    if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
      raise ValueError(f"smooth_alpha must be in [0, 1], got {self.smooth_alpha}")
    for pattern, bits in self.rules:
      re.compile(pattern)
      if not (2 <= bits <= 8 or bits == 16):
        raise ValueError(f"rule {pattern!r}: activation bits must be in [2, 8] or 16, got {bits}")


@dataclasses.dataclass
class LayerReport:
  path: str
  in_features: int
  out_features: int
  w_bits: int
  a_bits: int
  why: str  # what set a_bits: "rule <regex>", "sensitivity", "down_proj rule", "default"
  sensitivity: float | None  # Fisher estimate of the A8 -> A6 loss increase (nats over the batch)
  float_bytes: int  # bf16 bytes of the float kernel
  packed_bytes: int  # packed weights + scales
  backend: str = "reference"  # the kernel that runs it (flexq_jax.matmul.BACKENDS)
  backend_why: str = ""  # why that one (dispatch.choose's reason for backend="auto")


@dataclasses.dataclass
class QuantReport:
  config: dict
  layers: list[LayerReport]
  unmatched_rules: list[str]
  seconds: dict[str, float]

  @property
  def sensitivity_map(self) -> dict[str, int]:
    """{layer path: activation bits}."""
    return {l.path: l.a_bits for l in self.layers}

  @property
  def linear_bf16_bytes(self) -> int:
    return sum(l.float_bytes for l in self.layers)

  @property
  def linear_packed_bytes(self) -> int:
    return sum(l.packed_bytes for l in self.layers)

  def to_json(self) -> str:
    return json.dumps({
        "config": self.config,
        "layers": [dataclasses.asdict(l) for l in self.layers],
        "unmatched_rules": self.unmatched_rules,
        "seconds": self.seconds,
        "linear_bf16_bytes": self.linear_bf16_bytes,
        "linear_packed_bytes": self.linear_packed_bytes,
    }, indent=1)

  def summary(self) -> str:
    n = len(self.layers)
    by_bits: dict[int, int] = {}
    for l in self.layers:
      by_bits[l.a_bits] = by_bits.get(l.a_bits, 0) + 1
    mix = ", ".join(f"{c} x W{self.config['w_bits']}A{b if b < 16 else 16}" for b, c in sorted(by_bits.items()))
    ratio = self.linear_packed_bytes / max(1, self.linear_bf16_bytes)
    lines = [
        f"quantized {n} linear layers: {mix}",
        f"linear weights: {self.linear_bf16_bytes / 2**20:.1f} MiB bf16 -> {self.linear_packed_bytes / 2**20:.1f} MiB "
        f"({ratio:.4f} of bf16 = {16 * ratio:.3f} bits/weight)",
        f"weight method: {self.config['weight_method']}, A8 selection: {self.config['a8_selection']}"
        + (f", smoothing alpha {self.config['smooth_alpha']}" if self.config.get("smooth_alpha") is not None else ""),
        "time: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items()),
    ]
    sens = [l for l in self.layers if l.a_bits != self.config["a_bits"]]
    if sens:
      lines.append("high-precision-activation layers: " + ", ".join(l.path for l in sens))
    kernels: dict[str, int] = {}
    for l in self.layers:
      kernels[l.backend] = kernels.get(l.backend, 0) + 1
    lines.append("backends: " + ", ".join(f"{c} x {b}" for b, c in sorted(kernels.items())))
    if self.unmatched_rules:
      lines.append("rules that matched no layer: " + ", ".join(self.unmatched_rules))
    return "\n".join(lines)


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


def infer_model_config(params: dict) -> LlamaConfig:
  """The preset whose shapes these params have; head counts cannot be read from shapes alone."""
  def shapes_of(cfg):
    p = jax.eval_shape(lambda: llama.init_params(cfg, jax.random.key(0)))
    return (len(p["layers"]), p["embed_tokens"].shape, p["layers"][0]["q_proj"].shape,
            p["layers"][0]["k_proj"].shape, p["layers"][0]["gate_proj"].shape, "lm_head" in p)

  ours = (len(params["layers"]), tuple(params["embed_tokens"].shape), tuple(params["layers"][0]["q_proj"].shape),
          tuple(params["layers"][0]["k_proj"].shape), tuple(params["layers"][0]["gate_proj"].shape),
          "lm_head" in params)
  for name, make in PRESETS.items():
    cfg = make()
    if shapes_of(cfg) == ours:
      return cfg
  raise ValueError(
      "cannot tell the model architecture from the parameter shapes (not a known preset: "
      f"{', '.join(PRESETS)}); pass model_config=LlamaConfig(...) to quantize()")


def _check_params(params: dict, paths: dict[str, tuple]) -> None:
  for path, idx in paths.items():
    w = get_at(params, idx)
    if isinstance(w, QuantizedLinear):
      raise ValueError(f"{path} is already quantized")
    if getattr(w, "ndim", None) != 2:
      raise ValueError(f"{path} must be a 2-D [in, out] kernel, got shape {getattr(w, 'shape', None)}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
      raise ValueError(f"{path} must be floating point, got {w.dtype}")
    numerics.check_finite(f"weights of {path}", w)


def _summed_nll(config: LlamaConfig):
  def loss(params, tokens):
    logits, _ = llama.forward(params, config, tokens)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
  return loss


def smooth(params: dict, stats: dict, alpha: float) -> tuple[dict, dict[str, np.ndarray]]:
  """SmoothQuant: moves activation outliers into the weights, folding 1/s into the op before.

  q/k/v fold into input_layernorm, gate/up into post_attention_layernorm, down into up_proj's
  output columns (down's input is silu(gate) * up, linear in up). o_proj is left alone: its
  input comes through attention, where a per-channel factor would have to be shared by every
  query head of a KV group.

  Returns:
    (smoothed params, {path: s [K]} per smoothed kernel, so input statistics can be rescaled).
  """
  params = copy_containers(params)
  factors = {}
  # (where 1/s is folded, the kernels whose input rows are multiplied by s)
  groups = (("input_layernorm", ("q_proj", "k_proj", "v_proj")),
            ("post_attention_layernorm", ("gate_proj", "up_proj")),
            ("up_proj", ("down_proj",)))
  for i, layer in enumerate(params["layers"]):
    for fold_into, projs in groups:
      act = np.asarray(stats[f"layers/{i}/{projs[0]}"].absmax, np.float64)
      wmax = np.max([np.max(np.abs(np.asarray(layer[p], np.float64)), axis=1) for p in projs], axis=0)
      s = np.where((act > 0) & (wmax > 0), act ** alpha / np.maximum(wmax, 1e-8) ** (1 - alpha), 1.0)
      s = np.clip(s, 1e-5, 1e5)
      for p in projs:
        layer[p] = jnp.asarray(np.asarray(layer[p], np.float64) * s[:, None], layer[p].dtype)
        factors[f"layers/{i}/{p}"] = s
      # A norm weight [D] scales channels; up_proj [D, F] scales its output columns.
      layer[fold_into] = jnp.asarray(np.asarray(layer[fold_into], np.float64) / s, layer[fold_into].dtype)
  return params, factors


def _budget(config: QuantConfig, n_layers: int) -> int:
  b = config.a8_budget
  if b is None:
    return round(n_layers / len(llama.PROJECTIONS))
  if isinstance(b, float) and b < 1:
    return round(b * n_layers)
  return int(b)


def quantize(
    params: dict,
    calib_batch,
    config: QuantConfig | None = None,
    *,
    model_config: LlamaConfig | None = None,
    progress: Callable[[str], None] | None = None,
    backend: str = "reference",
    decode_m: int = 1,
) -> tuple[dict, QuantReport]:
  """FlexQ: quantizes every linear layer of a models/ LLaMA pytree.

  Args:
    params: float parameter pytree (see models.llama).
    calib_batch: [B, T] int tokens of calibration text.
    config: QuantConfig (default: W6, g128, SmoothQuant smoothing (alpha 0.5) and GPTQ weights,
      A6 with 1/7 of the layers at A8 chosen by the sensitivity analysis).
    model_config: the architecture; inferred from the shapes for the known presets.
    progress: optional callback taking a status line.
    backend: the kernel every layer runs (flexq_jax.matmul.BACKENDS), or "auto": each layer's
      fastest on this device (flexq_jax.dispatch; the reference on CPU). Weights are packed for
      it here, once. The report lists each layer's choice and why.
    decode_m: the activation rows "auto" chooses for (1 = batch-1 decode).

  Returns:
    (quantized params: same tree, each projection kernel a QuantizedLinear; QuantReport).
  """
  config = config or QuantConfig()
  say = progress or (lambda msg: None)
  calib_batch = np.asarray(calib_batch)
  if calib_batch.ndim != 2 or not np.issubdtype(calib_batch.dtype, np.integer):
    raise ValueError(f"calib_batch must be [batch, seq] integer tokens, got {calib_batch.dtype} {calib_batch.shape}")
  if calib_batch.shape[1] < 2:
    raise ValueError("calib_batch needs at least 2 tokens per row")
  paths = linear_paths(params)
  _check_params(params, paths)
  model_config = model_config or infer_model_config(params)
  if calib_batch.max() >= model_config.vocab_size or calib_batch.min() < 0:
    raise ValueError(f"calib_batch has token ids outside [0, {model_config.vocab_size})")
  forward = lambda p, tokens: llama.forward(p, model_config, tokens)[0]
  seconds = {}

  stats = None
  if config.weight_method == "gptq" or config.smooth_alpha is not None:
    say("calibration statistics (one forward pass)")
    t0 = time.perf_counter()
    stats = calibration.collect_input_stats(params, paths, forward, calib_batch)
    seconds["calibration"] = time.perf_counter() - t0

  if config.smooth_alpha is not None:
    params, factors = smooth(params, stats, config.smooth_alpha)
  else:
    factors = {}

  say(f"quantizing {len(paths)} weights ({config.weight_method})")
  t0 = time.perf_counter()
  quantized = {}
  for path, idx in paths.items():
    w = jnp.asarray(get_at(params, idx)).T  # [N, K]
    if config.weight_method == "gptq":
      st = stats[path]
      h = st.hessian / max(1, st.count)
      if path in factors:  # the smoothed layer sees x / s
        inv = jnp.asarray(1.0 / factors[path], jnp.float32)
        h = h * inv[:, None] * inv[None, :]
      q, s = gptq.gptq_quantize(w, h, bits=config.w_bits, group=config.group_size or formats.padded_k(w.shape[1]),
                                damp=config.gptq_damp, act_order=config.gptq_act_order)
    else:
      q, s = numerics.quantize_weight(w, config.w_bits, config.group_size)
    quantized[path] = (q, s)
  jax.block_until_ready(quantized)
  seconds["weights"] = time.perf_counter() - t0

  a_bits, why, scores = _choose_activation_bits(params, paths, quantized, config, model_config, calib_batch, say,
                                                seconds)

  qparams = copy_containers(params)
  layers = []
  for path, idx in paths.items():
    q, s = quantized[path]
    k, n = get_at(params, idx).shape
    layer = QuantizedLinear(packed=formats.pack(q, config.w_bits, config.layout, k), scales=s, in_features=k,
                            out_features=n, w_bits=config.w_bits, a_bits=a_bits[path], group_size=config.group_size,
                            layout=config.layout)
    layer, how = _place(layer, backend, decode_m)
    set_at(qparams, idx, layer)
    layers.append(LayerReport(path, k, n, config.w_bits, a_bits[path], why[path], scores.get(path), 2 * k * n,
                              layer.nbytes, layer.backend, how))
  unmatched = [p for p, _ in config.rules if not any(re.search(p, path) for path in paths)]
  cfg = dataclasses.asdict(config)
  cfg["rules"] = [list(r) for r in config.rules]
  return qparams, QuantReport(cfg, layers, unmatched, seconds)


def _place(layer: QuantizedLinear, backend: str, m: int) -> tuple[QuantizedLinear, str]:
  """The layer repacked for `backend` ("auto": dispatch's choice), and why it runs there."""
  from flexq_jax import dispatch, matmul
  if backend == "auto":
    backend, how = dispatch.choose(layer, m)
  else:
    how = "asked for"
  placed = matmul.to_backend(layer, backend)
  if placed.backend != backend:
    how = f"{backend} cannot run it (w{layer.w_bits}a{layer.a_bits}, group {layer.group_size}, N {layer.out_features})"
  return placed, how


def _choose_activation_bits(params, paths, quantized, config, model_config, calib_batch, say, seconds):
  """Per-layer activation bits: rules first, then the A8 selection, else config.a_bits."""
  a_bits = {p: config.a_bits for p in paths}
  why = {p: "default" for p in paths}
  ruled = set()
  for path in paths:
    for pattern, bits in config.rules:
      if re.search(pattern, path):
        a_bits[path], why[path] = bits, f"rule {pattern}"
        ruled.add(path)
        break
  scores: dict[str, float] = {}
  free = [p for p in paths if p not in ruled]
  budget = _budget(config, len(paths)) - sum(1 for p in ruled if a_bits[p] == config.sensitive_a_bits)
  if config.a8_selection == "down_proj":
    for p in free:
      if p.endswith("/down_proj"):
        a_bits[p], why[p] = config.sensitive_a_bits, "down_proj rule"
  elif config.a8_selection == "sensitivity" and budget > 0 and config.a_bits < 16:
    say("sensitivity analysis (one forward + backward)")
    t0 = time.perf_counter()
    kernels = {p: numerics.dequantize_weight(*quantized[p], get_at(params, paths[p]).shape[0]).T for p in free}
    sens = sensitivity.activation_sensitivity(
        params, kernels, {p: paths[p] for p in free}, _summed_nll(model_config), calib_batch,
        lo_bits=config.a_bits, hi_bits=config.sensitive_a_bits, group_size=config.group_size)
    seconds["sensitivity"] = time.perf_counter() - t0
    scores = {p: s.fisher for p, s in sens.items()}
    for p in sorted(free, key=lambda p: -scores[p])[:budget]:
      a_bits[p], why[p] = config.sensitive_a_bits, "sensitivity"
  return a_bits, why, scores
