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
      "lm_head": [D, V],                # when config.tie_word_embeddings is False; or a quantized
                                        # copy of the embeddings (flexq_jax/lm_head.py), which wins
    }

The seven projections of every block go through `linear`, and nothing else in this file knows
what a weight is: a quantized weight leaf that defines `__rmatmul__` replaces an array without
any change here. RoPE follows the Hugging Face convention (rotate the two halves of each head).
For inference, `fuse_projections` joins q/k/v into one "qkv_proj" [D, (Hq+2Hkv)*hd] and gate/up
into one "gate_up_proj" [D, 2F] (fewer, larger GEMMs); a block may hold either form.

Stacked layers: `stack_layers` turns the list of blocks into one dict whose leaves carry a leading
[L] axis (quantized leaves stacked child by child). `forward` then runs the blocks with one
jax.lax.scan, so XLA compiles one block instead of L, and the KV cache is two [L, B, S, Hkv, hd]
arrays (init_cache(..., stacked=True)). Both forms compute the same ops (`_decoder_block`).

Padding and the KV cache: every call takes a boolean `mask` [B, T] (True = real token). The
cache keeps, per row, which slots hold real tokens (`valid`), and positions are counted over
real tokens only, so left padding, right padding and prompts of mixed length all give each
row exactly the positions and context it would have alone.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import layout as jax_layout

from models import hadamard
from models.config import PRESETS, LlamaConfig
from pallas_kernels import decode_attention as decode_kernel
from pallas_kernels.core import GROUP

Params = dict[str, Any]

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Projections that read the same input, and the one kernel each group becomes (fuse_projections).
FUSIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# Where a per-input-channel factor of projections can be folded into the op producing their input,
# leaving the float model unchanged (SmoothQuant smoothing, flexq_jax/smoothing.py): (op, projections).
# A norm weight scales channels; up_proj's output columns scale down_proj's input, since that input
# silu(gate) * up is linear in up. o_proj has none: its input comes through attention, where one
# factor would have to be shared by every query head of a KV group.
SMOOTHING_FOLDS = (("input_layernorm", ("q_proj", "k_proj", "v_proj")),
                   ("post_attention_layernorm", ("gate_proj", "up_proj")),
                   ("up_proj", ("down_proj",)))
# Finite, so a query row with no visible key (a pad before any real token) softmaxes to a uniform
# distribution instead of NaN; such rows are padding and their outputs are never used.
_MASK_VALUE = -1e30


def linear(x: jax.Array, w: Any) -> jax.Array:
  """The one matmul every projection goes through: x [..., K] @ w [K, N] -> [..., N]."""
  return x @ w


def row_parallel_linear(x: jax.Array, w: Any, axis: str | None) -> jax.Array:
  """linear() of a layer whose input features are split over mesh axis `axis` (tensor parallelism):
  each shard's partial sums in fp32, one all-reduce (psum), then the cast to x's dtype.

  axis None: plain linear(). Called inside shard_map (flexq_jax/sharding.py), where x and w are one
  shard's slices along K. A float kernel runs one dot with fp32 accumulation; a weight leaf with a
  `matmul(x, out_dtype=...)` method (flexq_jax/qlinear.py) returns its fp32 partial sums; any other
  leaf runs linear() and is widened (partials rounded to x's dtype first).
  """
  if axis is None:
    return linear(x, w)
  if isinstance(w, (jax.Array, np.ndarray)):
    part = jnp.matmul(x, w, preferred_element_type=jnp.float32)
  elif hasattr(type(w), "matmul"):
    part = w.matmul(x, out_dtype=jnp.float32)
  else:
    part = linear(x, w).astype(jnp.float32)
  return jax.lax.psum(part, axis).astype(x.dtype)


@flax.struct.dataclass
class KVCache:
  """Per-layer key/value cache with a shared write index.

  k, v: one [B, S, Hkv, hd] array per layer (list form, for list params), or one
  [L, B, S, Hkv, hd] array each (stacked form, for stacked params). valid: [B, S] True where a
  slot holds a real token. length: [] int32, slots written so far (the same for every row).
  """

  k: list[jax.Array] | jax.Array
  v: list[jax.Array] | jax.Array
  valid: jax.Array
  length: jax.Array

  @property
  def max_length(self) -> int:
    return self.valid.shape[1]

  @property
  def stacked(self) -> bool:
    """True for the stacked form (k, v are [L, B, S, Hkv, hd] arrays)."""
    return not isinstance(self.k, (list, tuple))


def init_cache(config: LlamaConfig, batch_size: int, max_length: int, dtype=jnp.bfloat16, *,
               stacked: bool = False) -> KVCache:
  """An empty cache for `batch_size` rows of up to `max_length` tokens (prompt + generated).

  stacked=False gives the list form (for list params), True the [L, B, S, Hkv, hd] form that
  stacked params need (see stack_layers); `init_cache(..., stacked=is_stacked(params))` fits both.
  """
  if max_length > config.max_position_embeddings:
    raise ValueError(f"{max_length} tokens (prompt + new) exceed the model's {config.max_position_embeddings} "
                     f"positions (max_position_embeddings)")
  shape = (batch_size, max_length, config.num_kv_heads, config.resolved_head_dim)
  if stacked:
    k = jnp.zeros((config.num_layers, *shape), dtype)
    v = jnp.zeros((config.num_layers, *shape), dtype)
  else:
    k = [jnp.zeros(shape, dtype) for _ in range(config.num_layers)]
    v = [jnp.zeros(shape, dtype) for _ in range(config.num_layers)]
  return KVCache(
      k=k,
      v=v,
      valid=jnp.zeros((batch_size, max_length), bool),
      length=jnp.zeros((), jnp.int32),
  )


def is_stacked(params: Params) -> bool:
  """True when params["layers"] is one dict of [L, ...] leaves (see stack_layers)."""
  return isinstance(params["layers"], dict)


def _static_fields(leaf) -> dict[str, Any]:
  """A dataclass pytree node's static (non-pytree) fields, e.g. a QuantizedLinear's a_bits."""
  if not dataclasses.is_dataclass(leaf):
    return {}
  return {f.name: getattr(leaf, f.name) for f in dataclasses.fields(leaf) if not f.metadata.get("pytree_node", True)}


def _difference(a, b) -> str | None:
  """Why subtree `b` cannot be stacked with subtree `a` (None when it can)."""
  arrays = (np.ndarray, jax.Array, np.generic)
  if type(a) is not type(b) and not (isinstance(a, arrays) and isinstance(b, arrays)):
    return f"type {type(a).__name__} vs {type(b).__name__}"
  fa, fb = _static_fields(a), _static_fields(b)
  diffs = [f"{name} {fa[name]!r} vs {fb[name]!r}" for name in fa if fa[name] != fb.get(name)]
  if diffs:
    return ", ".join(diffs)
  if jax.tree.structure(a) != jax.tree.structure(b):
    return f"tree structure {jax.tree.structure(a)} vs {jax.tree.structure(b)}"
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    where = jax.tree_util.keystr(path)
    sx, sy = (np.shape(x), jnp.result_type(x)), (np.shape(y), jnp.result_type(y))
    if sx != sy:
      return f"{where or 'array'} {sx[1]}{list(sx[0])} vs {sy[1]}{list(sy[0])}"
  return None


def stack_layers(params: Params) -> Params:
  """params with params["layers"] (a list of block dicts) turned into one dict of [L, ...] leaves.

  Quantized leaves (QuantizedLinear) are stacked child by child, so every layer must have the
  same tree: the same keys, the same leaf types and static fields (w_bits, a_bits, group_size,
  layout, backend, ...), shapes and dtypes. Raises ValueError naming the first layer and
  projection that differ from layer 0 otherwise (keep the list form for mixed-precision models).
  Already stacked params come back unchanged. Returns a new top-level dict (leaves are new arrays).

  The stacked form compiles one block for all layers (fast to compile), but on a GPU decode was
  measured 1.35-2.5x slower with it (H200, LLaMA-2-7B: XLA copies each layer's weight slice out of
  the stack every step; results/e2e/NOTES.md): serve with the list form.
  """
  if is_stacked(params):
    return dict(params)
  layers = list(params["layers"])
  if not layers:
    raise ValueError("stack_layers: params['layers'] is empty")
  first = layers[0]
  for i, layer in enumerate(layers[1:], start=1):
    if set(layer) != set(first):
      extra, missing = sorted(set(layer) - set(first)), sorted(set(first) - set(layer))
      raise ValueError(f"stack_layers: layer {i} has different entries than layer 0 (extra {extra}, missing "
                       f"{missing}); stacking needs identical layers")
    for name in first:
      why = _difference(first[name], layer[name])
      if why is not None:
        raise ValueError(f"stack_layers: layer {i} {name} differs from layer 0 {name}: {why}. Scanned layers must "
                         f"share structure, static fields (bits, group size, layout, backend), shapes and dtypes; "
                         f"keep the list form (unstacked params) for such models")
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return {**params, "layers": stacked}


def unstack_layers(params: Params) -> Params:
  """The inverse of stack_layers: params["layers"] back to a list of per-layer dicts.

  Params already in list form come back unchanged (as a new top-level dict).
  """
  if not is_stacked(params):
    return dict(params)
  stacked = params["layers"]
  leaves = jax.tree.leaves(stacked)
  if not leaves:
    raise ValueError("unstack_layers: params['layers'] has no arrays")
  n = leaves[0].shape[0]
  layers = [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)]
  return {**params, "layers": layers}


def concatenate_outputs(kernels: list) -> Any:
  """One kernel computing the given kernels' outputs side by side: x @ fused == concat(x @ each).

  Float [K, N_i] arrays are concatenated along N; a weight leaf type (QuantizedLinear, a baseline's
  int8 leaf) concatenates itself through its `concatenate` static method. Raises ValueError saying
  why when the kernels cannot be one (different types, K, dtypes, or quantization settings).
  """
  first = kernels[0]
  if all(isinstance(k, (jax.Array, np.ndarray)) for k in kernels):
    shapes = [tuple(k.shape) for k in kernels]
    if any(len(s) != 2 or s[0] != shapes[0][0] for s in shapes):
      raise ValueError(f"kernels must be [K, N] with one K, got shapes {shapes}")
    dtypes = {jnp.result_type(k) for k in kernels}
    if len(dtypes) != 1:
      raise ValueError(f"kernels have different dtypes {sorted(map(str, dtypes))}")
    return jnp.concatenate(kernels, axis=1)
  types = {type(k).__name__ for k in kernels}
  if len(types) != 1:
    raise ValueError(f"kernels of different types {sorted(types)}")
  concatenate = getattr(type(first), "concatenate", None)
  if concatenate is None:
    raise ValueError(f"{type(first).__name__} has no `concatenate`: it cannot be fused")
  return concatenate(list(kernels))


def fuse_projections(params: Params) -> Params:
  """params with each block's q/k/v kernels made one `qkv_proj` and gate/up one `gate_up_proj`.

  An inference transform (exact: a fused quantized kernel quantizes the shared input once, with
  the same per-token group scales, and every output channel keeps its own weights and scales):
  one GEMM instead of three (two) per block, so fewer, larger kernels, which is faster at decode
  where each small GEMV launch pays its own ramp-up and tail. A group whose kernels cannot be one
  (say k_proj kept at 8-bit activations by the sensitivity analysis and q_proj at 6) stays
  separate in that block; the forward takes either form. Blocks already fused are left as they
  are. Stacked params are unstacked, fused and stacked again. Checkpoints store the unfused form
  (fuse after loading). Returns a new top-level dict.
  """
  if is_stacked(params):
    return stack_layers(fuse_projections(unstack_layers(params)))
  layers = []
  for layer in params["layers"]:
    layer = dict(layer)
    for fused, parts in FUSIONS.items():
      if fused in layer or not all(p in layer for p in parts):
        continue
      try:
        kernel = concatenate_outputs([layer[p] for p in parts])
      except ValueError:
        continue  # kept separate (see docstring)
      for p in parts:
        del layer[p]
      layer[fused] = kernel
    layers.append(layer)
  return {**params, "layers": layers}


def fused_count(params: Params) -> dict[str, int]:
  """How many blocks hold each fused kernel, e.g. {"qkv_proj": 30, "gate_up_proj": 30}."""
  layers = [params["layers"]] if is_stacked(params) else params["layers"]
  n = jax.tree.leaves(params["layers"])[0].shape[0] if is_stacked(params) else 1
  return {f: n * sum(f in layer for layer in layers) for f in FUSIONS}


def projection_shapes(config: LlamaConfig, fused: bool = False) -> dict[str, tuple[int, int]]:
  """{projection: (K, N)} of one block's kernels; fused: as fuse_projections makes them."""
  d, f, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
  shapes = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
  if fused:
    for name, parts in FUSIONS.items():
      shapes[name] = (d, sum(shapes.pop(p)[1] for p in parts))
  return shapes


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def infer_config(params: Params) -> LlamaConfig:
  """The preset of models.config.PRESETS whose shapes these (unstacked) params have.

  Head counts cannot be read from shapes alone, so only known presets are recognized; a clear
  error otherwise.
  """
  def shapes(layers, embed, block, lm_head):
    return (layers, tuple(embed), {p: tuple(block[p]) for p in PROJECTIONS}, lm_head)

  first = params["layers"][0]
  head = params.get("lm_head")
  quantized_head = head is not None and not _is_array(head)  # a quantized copy: tied or not, it says nothing
  ours = shapes(len(params["layers"]), params["embed_tokens"].shape, {p: first[p].shape for p in PROJECTIONS},
                head is not None)
  for make in PRESETS.values():
    cfg = make()
    if shapes(cfg.num_layers, (cfg.vocab_size, cfg.hidden_size), projection_shapes(cfg),
              quantized_head or not cfg.tie_word_embeddings) == ours:
      return cfg
  raise ValueError(
      "cannot tell the model architecture from the parameter shapes (not a known preset: "
      f"{', '.join(PRESETS)}); pass model_config=LlamaConfig(...)")


def init_params(config: LlamaConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> Params:
  """Random parameters (normal(0, scale) kernels, unit norms) at the config's real shapes."""
  d = config.hidden_size
  shapes = projection_shapes(config)
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


def normed_input(h: jax.Array, weight: jax.Array, eps: float, consumer: Any) -> Any:
  """rms_norm(h, weight, eps) as the input of the one projection that reads it (a fused q/k/v or
  gate/up). A kernel leaf with a `norm_input(h, weight, eps)` method may return its input already
  quantized by a kernel that fuses the norm with the quantization (flexq_jax's QuantizedLinear,
  where its backend says so); otherwise, and for every other leaf, the plain rms_norm."""
  hook = getattr(consumer, "norm_input", None)
  fused = hook(h, weight, eps) if hook is not None else None
  return rms_norm(h, weight, eps) if fused is None else fused


def residual_linear(h: jax.Array, x: Any, w: Any, tp_axis: str | None = None) -> jax.Array:
  """h + row_parallel_linear(x, w, tp_axis): the residual add after o_proj and down_proj. A kernel leaf with a
  `residual_matmul(x, h)` method may return the sum from one kernel that adds h in its store (flexq_jax's
  QuantizedLinear, where its backend says so: the CUDA GEMV at batch 1); not under tensor parallelism, where the
  add follows the all-reduce."""
  hook = getattr(w, "residual_matmul", None) if tp_axis is None else None
  fused = hook(x, h) if hook is not None else None
  return h + row_parallel_linear(x, w, tp_axis) if fused is None else fused


def swiglu_input(gate_up: jax.Array, consumer: Any) -> Any:
  """silu(gate) * up from a fused gate/up projection's output [..., 2I] (gate first), as the input of the
  one projection that reads it (down_proj). A kernel leaf with a `swiglu_input(gate_up)` method may return
  it already quantized by one kernel that reads gate and up (flexq_jax's QuantizedLinear, where its backend
  says so); otherwise, and for every other leaf, the plain product."""
  hook = getattr(consumer, "swiglu_input", None)
  fused = hook(gate_up) if hook is not None else None
  if fused is not None:
    return fused
  gate, up = jnp.split(gate_up, 2, axis=-1)
  return jax.nn.silu(gate) * up


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


# Which attention a decode step (one query token) runs: "auto" (the Pallas decode kernel,
# pallas_kernels/decode_attention.py, on a GPU; XLA's einsums elsewhere), "pallas" (the kernel everywhere:
# interpret mode off the GPU, for tests) or "xla" (the einsums). Read at trace time.
DECODE_ATTENTION_ENV = "FLEXQ_DECODE_ATTENTION"
DECODE_ATTENTION_MODES = ("auto", "pallas", "xla")


def decode_attention_mode() -> str:
  """$FLEXQ_DECODE_ATTENTION, checked: one of DECODE_ATTENTION_MODES (default "auto")."""
  mode = os.environ.get(DECODE_ATTENTION_ENV, "auto")
  if mode not in DECODE_ATTENTION_MODES:
    raise ValueError(f"${DECODE_ATTENTION_ENV} must be one of {', '.join(DECODE_ATTENTION_MODES)}, got {mode!r}")
  return mode


def _decode_kernel_runs(q: jax.Array, k: jax.Array) -> bool:
  """Whether attention() runs the Pallas decode kernel: one query token, decode_attention_mode() "pallas" (or
  "auto" on a GPU), and shapes the kernel takes."""
  mode = decode_attention_mode() if q.shape[1] == 1 else "xla"
  return (mode == "pallas" or (mode == "auto" and jax.default_backend() == "gpu")) and decode_kernel.supported(
      q[:, 0].shape, k.shape, k.dtype) is None


def attention_input(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array, consumer: Any) -> Any:
  """attention(q, k, v, visible) as [B, T, Hq * hd], the input of the one projection that reads it (o_proj).
  Where the decode kernel runs, a head is one quantization group (hd = 128) and the consumer has an
  `input_quantization(m, dtype, "attention")` hook that returns how it takes quantized rows (flexq_jax's
  QuantizedLinear, where its backend and card table say so), the kernel's merge of its splits quantizes the
  output on its way out (pallas_kernels.decode_attention.decode_attention_quantized), and this returns what
  the hook's `wrap` makes of it; otherwise the float output."""
  b, t, hq, hd = q.shape
  hook = getattr(consumer, "input_quantization", None)
  if hook is not None and hd == GROUP and _decode_kernel_runs(q, k):
    spec = hook(b * t, q.dtype, "attention")
    if spec is not None:
      out = decode_kernel.decode_attention_quantized(
          q[:, 0], k, v.astype(k.dtype), visible[:, 0], a_bits=spec.a_bits, rows=spec.rows, act_t=spec.act_t,
          phase_major=spec.phase_major, interpret=jax.default_backend() != "gpu")
      return spec.wrap((b, t), q.dtype, *out)
  return attention(q, k, v, visible).reshape(b, t, hq * hd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
  """Grouped-query attention.

  Args:
    q: [B, T, Hq, hd] queries.
    k, v: [B, S, Hkv, hd] keys and values.
    visible: [B, T, S] True where query t may attend to key s.

  Returns:
    [B, T, Hq, hd] in q's dtype.

  With one query token (a decode step) this runs the Pallas decode kernel where decode_attention_mode()
  says so and the shapes allow (its numerics: the same products, fp32 sums in another order).
  """
  b, t, hq, hd = q.shape
  if _decode_kernel_runs(q, k):
    out = decode_kernel.decode_attention(q[:, 0], k, v.astype(k.dtype), visible[:, 0],
                                         interpret=jax.default_backend() != "gpu")
    return out[:, None]
  hkv = k.shape[2]
  # [B, T, Hkv, G, hd]: the G query heads that share one KV head.
  qg = q.reshape(b, t, hkv, hq // hkv, hd)
  scores = jnp.einsum("BTKGD,BSKD->BKGTS", qg, k, preferred_element_type=jnp.float32)
  scores = scores / math.sqrt(hd)
  scores = jnp.where(visible[:, None, None, :, :], scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("BKGTS,BSKD->BTKGD", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, hq, hd).astype(q.dtype)


def check_token_ids(tokens, vocab_size: int, what: str = "tokens") -> None:
  """Raises a clear error for token ids outside [0, vocab_size) in a concrete array (no-op while
  tracing: inside jit the embedding lookup turns such ids into NaN, see forward)."""
  if isinstance(tokens, jax.core.Tracer):
    return
  a = np.asarray(tokens)
  if a.size and (a.min() < 0 or a.max() >= vocab_size):
    bad = a[(a < 0) | (a >= vocab_size)].ravel()[0]
    raise ValueError(f"{what} hold id {int(bad)} outside the model's vocabulary [0, {vocab_size}) "
                     f"(ids in [{int(a.min())}, {int(a.max())}]): a tokenizer that does not match the model?")


def _check_inputs(config: LlamaConfig, tokens: jax.Array, mask: jax.Array | None):
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [batch, seq] int, got shape {tokens.shape}")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
  if mask is not None and mask.shape != tokens.shape:
    raise ValueError(f"mask shape {mask.shape} must equal tokens shape {tokens.shape}")
  check_token_ids(tokens, config.vocab_size)


def _decoder_block(layer, h, config: LlamaConfig, positions, inv_freq, visible, write_kv, tp_axis=None):
  """One decoder block (attention + MLP, pre-norm residuals): the math both layer forms share.

  Args:
    layer: one block's weights (arrays or quantized leaves, no leading layer axis).
    h: [B, T, D] hidden states.
    config, positions [B, T], inv_freq, visible [B, T, S]: as computed by forward.
    write_kv: None (no cache: attend over this chunk's keys), or a function taking the chunk's
      (k, v) [B, T, Hkv, hd] (after RoPE) that stores them in the cache and returns
      (k, v) [B, S, Hkv, hd] to attend over plus anything the caller wants back.
    tp_axis: None, or the mesh axis the block is split over (inside shard_map; see forward): then
      config holds one shard's heads and intermediate size, and o_proj / down_proj are
      row-parallel (row_parallel_linear: fp32 partial sums, one psum each).

  Returns:
    (h [B, T, D], what write_kv returned third, or None).
  """
  b, t, _ = h.shape
  hq, hkv, hd = config.num_heads, config.num_kv_heads, config.resolved_head_dim
  if "qkv_proj" in layer:  # fused (fuse_projections): one GEMM, its output split
    x = normed_input(h, layer["input_layernorm"], config.rms_norm_eps, layer["qkv_proj"])
    q, k, v = jnp.split(linear(x, layer["qkv_proj"]), [hq * hd, (hq + hkv) * hd], axis=-1)
  else:
    x = rms_norm(h, layer["input_layernorm"], config.rms_norm_eps)
    q, k, v = linear(x, layer["q_proj"]), linear(x, layer["k_proj"]), linear(x, layer["v_proj"])
  q = q.reshape(b, t, hq, hd)  # [B, T, Hq, hd]
  k = k.reshape(b, t, hkv, hd)  # [B, T, Hkv, hd]
  v = v.reshape(b, t, hkv, hd)
  q = apply_rope(q, positions, inv_freq)
  k = apply_rope(k, positions, inv_freq)
  extra = None
  if write_kv is not None:
    k, v, extra = write_kv(k, v)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
  a = attention_input(q, k, v, visible, None if tp_axis is not None else layer["o_proj"])
  h = residual_linear(h, a, layer["o_proj"], tp_axis)
  if "gate_up_proj" in layer:
    x = normed_input(h, layer["post_attention_layernorm"], config.rms_norm_eps, layer["gate_up_proj"])
    gate_up = linear(x, layer["gate_up_proj"])
    # down_proj may take silu(gate) * up quantized by one kernel; not through the online Hadamard or a
    # row-parallel split, which need the float product
    plain = config.down_proj_hadamard or tp_axis is not None
    u = swiglu_input(gate_up, None if plain else layer["down_proj"])
  else:
    x = rms_norm(h, layer["post_attention_layernorm"], config.rms_norm_eps)
    u = jax.nn.silu(linear(x, layer["gate_proj"])) * linear(x, layer["up_proj"])
  if config.down_proj_hadamard:  # a rotated model (flexq_jax/rotation.py): down_proj holds H^T W
    u = hadamard.hadamard_transform(u)
  h = residual_linear(h, u, layer["down_proj"], tp_axis)
  return h, extra


def _row_major(x: jax.Array) -> jax.Array:
  """x with its physical layout pinned to row-major (the head dimension minor), as the KV cache is
  written. Without it XLA may carry a decode loop's value cache with the sequence dimension minor:
  on an H200 (2026-12-02, LLaMA-2-7B, batch 64, quantized linears) it did, which made the
  probabilities x values reduction 2.6x slower (73 vs 28 us a layer) and each cache write 4x slower
  (results/e2e/NOTES.md, "The value cache's layout")."""
  return jax_layout.with_layout_constraint(x, jax_layout.Layout(major_to_minor=tuple(range(x.ndim))))


def _scan_layers(layers, h, block, cache: KVCache | None):
  """Stacked layers: one lax.scan over (layer params, layer index).

  With a cache, the whole [L, B, S, Hkv, hd] k/v arrays ride in the scan carry and each step
  writes its new keys/values at [i, :, length] with dynamic_update_slice, so XLA updates the
  buffers in place (also inside generate's while_loop); nothing per layer is emitted as a scan
  output, which would hold a second copy of the cache.
  """
  n = jax.tree.leaves(layers)[0].shape[0]
  index = jnp.arange(n, dtype=jnp.int32)
  if cache is None:

    def step(h, xs):
      layer, _ = xs
      h, _ = block(layer, h, None)
      return h, None

    h, _ = jax.lax.scan(step, h, (layers, index))
    return h, None, None

  if cache.k.shape[0] != n:
    raise ValueError(f"stacked cache has {cache.k.shape[0]} layers, params have {n}")

  def step(carry, xs):
    h, k_all, v_all = carry
    layer, i = xs

    def write(k, v):
      start = (i, 0, cache.length, 0, 0)
      k_new = _row_major(jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype)[None], start))
      v_new = _row_major(jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype)[None], start))
      k_i = jax.lax.dynamic_index_in_dim(k_new, i, 0, keepdims=False)
      v_i = jax.lax.dynamic_index_in_dim(v_new, i, 0, keepdims=False)
      return k_i, v_i, (k_new, v_new)

    h, (k_all, v_all) = block(layer, h, write)
    return (h, k_all, v_all), None

  (h, k_all, v_all), _ = jax.lax.scan(step, (h, cache.k, cache.v), (layers, index))
  return h, k_all, v_all


def forward(
    params: Params,
    config: LlamaConfig,
    tokens: jax.Array,
    mask: jax.Array | None = None,
    cache: KVCache | None = None,
    *,
    remat: bool = False,
    tp_axis: str | None = None,
    head: bool = True,
) -> tuple[jax.Array, KVCache | None]:
  """Runs the decoder over a chunk of tokens.

  Args:
    params: the parameter pytree (see module docstring), list or stacked layers; float32 or bfloat16.
    config: the architecture.
    tokens: [B, T] int token ids.
    mask: [B, T] bool, True for real tokens (default: all real).
    cache: a KVCache to extend (stacked form for stacked params), or None for a standalone
      causal forward.
    remat: recompute each block in a backward pass instead of storing its activations (memory
      for gradients over long sequences; cache-less forwards only).
    tp_axis: tensor parallelism, for a call inside shard_map over a mesh with this axis (what
      flexq_jax/sharding.py does): params and cache are one shard's, config its local view (heads,
      KV heads and intermediate size of one shard), o_proj and down_proj all-reduced over the axis.
      The lm_head may hold a slice of the vocabulary: then the logits are that slice.
    head: False returns the final (normed) hidden states [B, T, D] instead of the logits, for
      callers that need logits at a few positions only (`lm_head` on those).

  Returns:
    (logits [B, T, V] float32 (hidden states [B, T, D] if head=False), the updated cache or None).
  """
  _check_inputs(config, tokens, mask)
  b, t = tokens.shape
  if mask is None:
    mask = jnp.ones((b, t), bool)
  mask = mask.astype(bool)
  inv_freq = rope_inv_freq(config)

  if cache is None:
    if t > config.max_position_embeddings:
      raise ValueError(f"{t} tokens exceed the model's {config.max_position_embeddings} positions "
                       f"(max_position_embeddings)")
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

  # Out-of-range ids (only possible under jit; concrete ones are refused above) give NaN rows, so a
  # wrong tokenizer shows as non-finite logits instead of silently clamped embeddings.
  h = jnp.take(params["embed_tokens"], tokens, axis=0, mode="fill", fill_value=jnp.nan)  # [B, T, D]
  block = lambda layer, h, kv: _decoder_block(layer, h, config, positions, inv_freq, visible, kv, tp_axis)
  if remat:  # a backward pass recomputes each block from its input instead of keeping its activations
    if cache is not None:
      raise ValueError("remat=True is for cache-less forwards (gradients over whole sequences)")
    plain = block
    block = lambda layer, h, kv: jax.checkpoint(lambda layer, h: plain(layer, h, None))(layer, h)
  if is_stacked(params):
    if cache is not None and not cache.stacked:
      raise ValueError("stacked params need a stacked cache: init_cache(..., stacked=True)")
    h, new_k, new_v = _scan_layers(params["layers"], h, block, cache)
  else:
    if cache is not None and cache.stacked:
      raise ValueError("list (unstacked) params need a list cache: init_cache(..., stacked=False)")
    new_k, new_v = [], []
    for i, layer in enumerate(params["layers"]):
      if cache is None:
        h, _ = block(layer, h, None)
        continue

      def write(k, v, i=i):
        k = _row_major(jax.lax.dynamic_update_slice(cache.k[i], k.astype(cache.k[i].dtype), (0, cache.length, 0, 0)))
        v = _row_major(jax.lax.dynamic_update_slice(cache.v[i], v.astype(cache.v[i].dtype), (0, cache.length, 0, 0)))
        return k, v, (k, v)

      h, (k, v) = block(layer, h, write)
      new_k.append(k)
      new_v.append(v)

  h = rms_norm(h, params["norm"], config.rms_norm_eps)
  logits = lm_head(params, config, h) if head else h

  if cache is None:
    return logits, None
  return logits, KVCache(k=new_k, v=new_v, valid=key_valid, length=cache.length + t)


def block_runner(params: Params, config: LlamaConfig, tokens: jax.Array):
  """The cache-less causal forward one decoder block at a time, for calibration passes that change
  the weights between blocks (flexq_jax/quantize.py, sequential GPTQ): returns (h, run) with h the
  embeddings [B, T, D] of `tokens` (all real) and run(layer, h) -> h one block as `forward` runs it.
  List-form params only."""
  _check_inputs(config, tokens, None)
  if is_stacked(params):
    raise ValueError("block_runner takes list (unstacked) params")
  t = tokens.shape[1]
  positions = jnp.broadcast_to(jnp.arange(t), tokens.shape)
  visible = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool))[None], (tokens.shape[0], t, t))
  inv_freq = rope_inv_freq(config)
  h = jnp.take(params["embed_tokens"], tokens, axis=0, mode="fill", fill_value=jnp.nan)
  return h, lambda layer, h: _decoder_block(layer, h, config, positions, inv_freq, visible, None)[0]


def lm_head(params: Params, config: LlamaConfig, h: jax.Array) -> jax.Array:
  """Logits [..., V] float32 of final (normed) hidden states h [..., D]: params["lm_head"] when
  present (untied, or a quantized copy of tied embeddings, flexq_jax/lm_head.py), else the tied
  embedding."""
  head = params.get("lm_head")
  if head is None:
    return jnp.einsum("...D,VD->...V", h, params["embed_tokens"], preferred_element_type=jnp.float32)
  if _is_array(head):
    return jnp.einsum("...D,DV->...V", h, head, preferred_element_type=jnp.float32)
  return (h @ head).astype(jnp.float32)  # a quantized weight leaf


def logits_fn(config: LlamaConfig):
  """(params, tokens [B, T]) -> logits [B, T, V]: the causal forward without a cache (the form
  perplexity evaluations take)."""
  return lambda params, tokens: forward(params, config, tokens)[0]
