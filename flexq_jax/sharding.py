"""Tensor parallelism over a jax.sharding.Mesh: a (quantized) LLaMA split across devices.

    mesh = sharding.make_mesh(4)                              # 4 devices on axis "tp"
    params, plan, meta = sharding.load(checkpoint_dir, mesh)  # each shard's slice straight to its device
    params, placement = sharding.place(params, plan, "auto")  # per shard, by the card's table at shard shapes
    params = sharding.fuse(params, plan)                      # q/k/v and gate/up per shard
    out = sharding.generate(params, plan, tokens, mask, key, max_new_tokens=64)

Or, for params already in memory: `params, plan = sharding.shard(params, config, mesh)`.

How the model is split (Megatron-style: flexq_jax/DESIGN.md, "Tensor parallelism"):
  - column parallel (split by output features): q/k/v, gate/up (and their fused forms) and the
    lm_head (when the vocabulary divides evenly; else it is replicated). Shard s holds its query
    heads [s Hq/tp, (s+1) Hq/tp), the KV heads they read, and its slice of the intermediate size.
    A fused qkv_proj / gate_up_proj holds, shard after shard, that shard's [q | k | v] / [gate | up].
  - row parallel (split by input features): o_proj and down_proj. Each shard's K slice is whole
    128-groups, so the activation quantization (per token and 128-group) is local to the shard and
    gives the integers and scales of the unsplit layer. The shard's partial sums are kept in fp32
    and all-reduced (one psum after each row-parallel GEMM, models.llama.row_parallel_linear).
  - the intermediate size is zero-padded to a multiple of 128 * tp (gate/up get zero output rows,
    down_proj zero input columns, all with zero scales): a zero weight with a zero scale is exact,
    the padded activations are exactly 0 (silu(0) * 0), and a zero group quantizes to 0 with scale
    0. So F = 5 groups on 2 shards runs as 6 groups, 3 a shard, with the unsplit model's numbers.
    o_proj's K = Hq hd is never padded: Hq / tp * hd must be a multiple of 128 (always so for
    head_dim 128), else the plan refuses (a group would straddle two shards).
  - KV heads: split when tp divides them; with fewer KV heads than shards (tp a multiple of Hkv)
    each KV head is replicated on the tp / Hkv shards whose query heads read it (k/v weights and
    KV cache alike). Any other count is refused.
  - embeddings and norms are replicated; the KV cache is split on its head axis.

Sharded params are one shard's model per device: every QuantizedLinear's static fields (in/out
features) are a shard's, and its arrays are the shards side by side along the split axis of its
layout (flexq_jax.formats.SHARD_AXES). They run only through this module (forward, generate,
place, fuse), where every op runs per device inside jax.shard_map.

Equality with one device (tests/flexq_jax/test_sharding.py): column-parallel outputs are the same
numbers (each output element is the unsplit layer's); a row-parallel output adds tp fp32 partial
sums in another order than one device's single fp32 sum, so it equals the unsplit layer's up to
fp32 rounding (then rounding to the activation dtype); logits agree to a tight tolerance and
greedy tokens are identical.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flexq_jax import checkpoint, formats, placement
from flexq_jax.qlinear import QuantizedLinear
from models import generate as gen
from models import llama
from models.config import LlamaConfig
from pallas_kernels.core import GROUP, WORD_BITS

AXIS = "tp"
COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "qkv_proj", "gate_up_proj")
ROW = ("o_proj", "down_proj")
STORED_LAYOUT = "bitplanes"


@dataclasses.dataclass(frozen=True)
class TPPlan:
  """How a model is split over one mesh axis (hashable: a static argument of jit)."""

  mesh: Mesh
  axis: str
  config: LlamaConfig  # the model's
  local_config: LlamaConfig  # one shard's view: its heads, KV heads, padded intermediate size / tp
  kv_repeat: int  # shards holding each KV head (1: the KV heads are split)
  padded_intermediate: int  # F zero-padded to a multiple of 128 * tp
  vocab_sharded: bool  # lm_head split by vocabulary (else replicated)

  @property
  def tp(self) -> int:
    return self.mesh.shape[self.axis]

  @property
  def cache_kv_heads(self) -> int:
    """KV heads of the sharded cache, all shards together (Hkv, or tp when replicated)."""
    return self.local_config.num_kv_heads * self.tp


def make_mesh(tp: int, devices=None, axis: str = AXIS) -> Mesh:
  """A 1-D mesh of the first `tp` devices (default jax.devices()) on axis `axis`."""
  devices = list(jax.devices() if devices is None else devices)
  if not isinstance(tp, int) or tp < 1:
    raise ValueError(f"the tensor-parallel size (--tp) must be a positive integer, got {tp!r}")
  if len(devices) < tp:
    platform = devices[0].platform if devices else "no"
    raise ValueError(f"--tp {tp} (tensor-parallel size) needs {tp} devices, {len(devices)} {platform} device(s) "
                     f"are visible; lower --tp (or, on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count="
                     f"{tp} before jax starts)")
  return Mesh(np.array(devices[:tp]), (axis,))


def make_plan(config: LlamaConfig, mesh: Mesh, axis: str = AXIS) -> TPPlan:
  """The split of `config` over `mesh`'s axis; a ValueError naming --tp for a split it cannot do."""
  if axis not in mesh.axis_names:
    raise ValueError(f"mesh has axes {mesh.axis_names}, not {axis!r}")
  tp = mesh.shape[axis]
  hq, hkv, hd = config.num_heads, config.num_kv_heads, config.resolved_head_dim
  if hq % tp:
    raise ValueError(f"--tp {tp} (tensor-parallel size) must divide the model's {hq} attention heads (num_heads)")
  if hkv % tp and tp % hkv:
    raise ValueError(f"--tp {tp} (tensor-parallel size) and the model's {hkv} KV heads (num_kv_heads): one must "
                     f"divide the other (KV heads are split, or replicated when fewer than the shards)")
  if (hq // tp * hd) % GROUP:
    raise ValueError(f"--tp {tp} (tensor-parallel size): o_proj's input per shard ({hq // tp} heads x head_dim "
                     f"{hd} = {hq // tp * hd}) is not whole {GROUP}-groups, so a quantization group would "
                     f"straddle two shards; choose a --tp with (num_heads / tp) * head_dim a multiple of {GROUP}")
  unit = GROUP * tp
  fp = -(-config.intermediate_size // unit) * unit
  local = dataclasses.replace(config, num_heads=hq // tp, num_kv_heads=max(hkv // tp, 1), head_dim=hd,
                              intermediate_size=fp // tp)
  vocab_sharded = not config.tie_word_embeddings and config.vocab_size % tp == 0
  return TPPlan(mesh, axis, config, local, max(tp // hkv, 1), fp, vocab_sharded)


# ------------------------------------------------------------------------------------ the split


def _column_rows(name: str, plan: TPPlan) -> np.ndarray:
  """Output channels (rows of W [N, K]) of a column-parallel layer in sharded order: shard after
  shard, each shard's rows; -1 for a zero-padded row."""
  c, loc, tp = plan.config, plan.local_config, plan.tp
  hd = c.resolved_head_dim
  f, fl = c.intermediate_size, loc.intermediate_size

  def q(s):
    return np.arange(s * loc.num_heads * hd, (s + 1) * loc.num_heads * hd)

  def kv(s):
    first = s * loc.num_kv_heads if plan.kv_repeat == 1 else s // plan.kv_repeat
    return np.arange(first * hd, (first + loc.num_kv_heads) * hd)

  def inter(s):
    r = np.arange(s * fl, (s + 1) * fl)
    return np.where(r < f, r, -1)

  def shift(rows, by):
    return np.where(rows >= 0, rows + by, -1)

  parts = {"q_proj": lambda s: q(s), "k_proj": kv, "v_proj": kv, "gate_proj": inter, "up_proj": inter,
           "qkv_proj": lambda s: np.concatenate([q(s), shift(kv(s), c.q_size), shift(kv(s), c.q_size + c.kv_size)]),
           "gate_up_proj": lambda s: np.concatenate([inter(s), shift(inter(s), f)]),
           "lm_head": lambda s: np.arange(s * c.vocab_size // tp, (s + 1) * c.vocab_size // tp)}
  return np.concatenate([parts[name](s) for s in range(tp)])


def _row_k(name: str, plan: TPPlan) -> int:
  """The K (all shards together) a row-parallel layer is padded to."""
  return plan.config.q_size if name == "o_proj" else plan.padded_intermediate


def _kind(name: str, plan: TPPlan) -> str | None:
  """"column", "row" or None (replicated) for a parameter name (the last key of its path)."""
  if name in COLUMN or (name == "lm_head" and plan.vocab_sharded):
    return "column"
  if name in ROW:
    return "row"
  return None


def _take(a: np.ndarray, rows: np.ndarray, axis: int) -> np.ndarray:
  out = np.take(a, np.maximum(rows, 0), axis=axis)
  shape = [1] * a.ndim
  shape[axis] = len(rows)
  return np.where((rows >= 0).reshape(shape), out, np.zeros((), a.dtype))


def _pad(a: np.ndarray, axis: int, size: int) -> np.ndarray:
  pad = [(0, 0)] * a.ndim
  pad[axis] = (0, size - a.shape[axis])
  return np.pad(a, pad)


def split_leaf(name: str, leaf, plan: TPPlan):
  """One parameter rearranged on the host for `plan` (numpy; nothing on a device): column layers'
  rows in sharded order (KV heads repeated, padding rows zero), row layers' K zero-padded; a
  QuantizedLinear in the stored "bitplanes" layout with a shard's static fields. Replicated
  parameters come back as they are."""
  kind = _kind(name, plan)
  if kind is None:
    if isinstance(leaf, QuantizedLinear):
      return leaf.replace(packed=np.asarray(leaf.packed), scales=np.asarray(leaf.scales))
    return np.asarray(leaf)
  tp = plan.tp
  if isinstance(leaf, QuantizedLinear):
    if leaf.layout != STORED_LAYOUT:  # exact repack (a placed model); the shards are placed again after
      leaf = leaf.with_layout(STORED_LAYOUT)
    packed, scales = np.asarray(leaf.packed), np.asarray(leaf.scales)
    if kind == "column":
      rows = _column_rows(name, plan)
      _check_rows(name, rows, leaf.out_features)
      return leaf.replace(packed=_take(packed, rows, 1), scales=_take(scales, rows, 0),
                          out_features=len(rows) // tp)
    k = _row_k(name, plan)
    _check_k(name, leaf.in_features, k)
    g = leaf.group_size
    if g is None or (k // tp) % g:
      raise ValueError(f"{name}: a row-parallel layer splits K into whole groups; group_size {g} does not divide "
                       f"a shard's K of {k // tp} (--tp {tp})")
    return leaf.replace(packed=_pad(packed, 2, k // WORD_BITS), scales=_pad(scales, 1, k // g), in_features=k // tp)
  w = np.asarray(leaf)  # a float kernel [K, N]
  if kind == "column":
    rows = _column_rows(name, plan)
    _check_rows(name, rows, w.shape[1])
    return _take(w, rows, 1)
  k = _row_k(name, plan)
  _check_k(name, w.shape[0], k)
  return _pad(w, 0, k)


def _check_rows(name, rows, n):
  if rows.max() >= n:
    raise ValueError(f"{name} has {n} output features; the model config implies at least {rows.max() + 1}")


def _check_k(name, k, padded):
  if k > padded or (name == "o_proj" and k != padded):
    raise ValueError(f"{name} has {k} input features; the model config implies {padded} (padded)")


def leaf_spec(name: str, leaf, plan: TPPlan):
  """The PartitionSpec (a QuantizedLinear of specs for a quantized layer) of a sharded parameter."""
  kind, ax = _kind(name, plan), plan.axis
  if isinstance(leaf, QuantizedLinear):
    if kind is None:
      return leaf.replace(packed=P(), scales=P())
    n_axis, k_axis = formats.shard_axes(leaf.layout)
    at = n_axis if kind == "column" else k_axis
    spec = [None] * len(leaf.packed.shape)
    spec[at] = ax
    return leaf.replace(packed=P(*spec), scales=P(ax, None) if kind == "column" else P(None, ax))
  if kind is None:
    return P()
  return P(None, ax) if kind == "column" else P(ax, None)


def _last_key(path) -> str:
  keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
  return str(keys[-1]) if keys else ""


def param_specs(tree, plan: TPPlan):
  """The spec tree of sharded params (or any subtree of them, e.g. one layer), by parameter name."""
  def spec(path, leaf):
    return leaf_spec(_last_key(path), leaf, plan)
  return jax.tree_util.tree_map_with_path(spec, tree, is_leaf=lambda x: isinstance(x, QuantizedLinear))


def _local_shape(shape, spec, tp):
  return tuple(d // tp if (i < len(spec) and spec[i] is not None) else d for i, d in enumerate(shape))


def local_abstract(tree, plan: TPPlan):
  """One shard's view of sharded params as ShapeDtypeStructs (for eval_shape)."""
  specs = param_specs(tree, plan)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(_local_shape(a.shape, s, plan.tp), a.dtype), tree, specs)


def _to_mesh(host: np.ndarray, spec, plan: TPPlan) -> jax.Array:
  """A host array onto the mesh, each device given only its slice (no device sees the whole)."""
  host = np.asarray(host)
  return jax.make_array_from_callback(host.shape, NamedSharding(plan.mesh, spec), lambda index: host[index])


def put_leaf(name: str, leaf, plan: TPPlan):
  """split_leaf, then onto the mesh by leaf_spec."""
  leaf = split_leaf(name, leaf, plan)
  spec = leaf_spec(name, leaf, plan)
  if isinstance(leaf, QuantizedLinear):
    return leaf.replace(packed=_to_mesh(leaf.packed, spec.packed, plan), scales=_to_mesh(leaf.scales, spec.scales, plan))
  return _to_mesh(leaf, spec, plan)


def replicate_local(name: str, leaf, plan: TPPlan):
  """A sharded parameter whose every shard is a copy of `leaf`, one shard's parameter (static
  fields and shapes a shard's): what benchmarks with random weights build, one shard's worth made
  once and copied to every device, never the whole model in one place. Not a real model's split
  (its shards would differ): use shard / load for those."""
  spec = leaf_spec(name, leaf, plan)
  devices = list(plan.mesh.devices.flat)

  def spread(a, spec):
    shape = tuple(d * plan.tp if (i < len(spec) and spec[i] is not None) else d for i, d in enumerate(a.shape))
    if isinstance(a, jax.core.Tracer):  # abstract evaluation (jax.eval_shape of a maker): the shape is all
      return jnp.zeros(shape, a.dtype)
    return jax.make_array_from_single_device_arrays(shape, NamedSharding(plan.mesh, spec),
                                                    [jax.device_put(a, d) for d in devices])
  if isinstance(leaf, QuantizedLinear):
    return leaf.replace(packed=spread(leaf.packed, spec.packed), scales=spread(leaf.scales, spec.scales))
  return spread(leaf, spec)


def _check_params(params):
  if llama.is_stacked(params):
    raise ValueError("tensor parallelism runs list-form layers (the served form): llama.unstack_layers first")


def shard(params, config: LlamaConfig, mesh: Mesh, axis: str = AXIS) -> tuple[dict, TPPlan]:
  """Params in memory (float or quantized, fused or not, list layers) split over `mesh`, one
  parameter at a time through the host. Quantized layers come back in the stored layout on their
  backend of before, repacked: sharding.place them."""
  plan = make_plan(config, mesh, axis)
  _check_params(params)

  def one(path, leaf):
    return put_leaf(_last_key(path), leaf, plan)
  out = jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: isinstance(x, QuantizedLinear))
  return out, plan


def load(path: str | os.PathLike, mesh: Mesh, axis: str = AXIS) -> tuple[dict, TPPlan, dict]:
  """A quantized checkpoint (flexq_jax/checkpoint.py) read straight into its shards: the plan is
  made (and refused) from the metadata before any tensor is read, then every tensor, as read and
  verified, is split on the host and each device given only its slice.

  Returns (sharded params in the stored layout on "reference", plan, metadata)."""
  plan = make_plan(checkpoint.load_config(path), mesh, axis)
  params, _, meta = checkpoint.load(path, convert=lambda name, value: put_leaf(name.rsplit(".", 1)[-1], value, plan))
  return params, plan, meta


# ------------------------------------------------------------------------- per-shard transforms


def _per_layer_op(op: tuple):
  """The one-shard function of a per-shard transform: ("place", backend, m, dtype) or ("fuse",)."""
  if op[0] == "place":
    _, backend, m, dtype = op
    return lambda layer: placement.place(layer, backend, m=m, dtype=dtype)[0]
  return lambda layer: llama.fuse_projections({"layers": [layer]})["layers"][0]


@functools.lru_cache(maxsize=64)
def _per_shard_program(op: tuple, plan: TPPlan, treedef, avals: tuple):
  """The jitted shard_map of a per-shard transform for one tree structure and shapes, made once
  (every layer of a model shares it: one compile, not one a layer); its output sharded by the same
  naming rules."""
  fn = _per_layer_op(op)
  tree = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in avals])
  out = jax.eval_shape(fn, local_abstract(tree, plan))
  return jax.jit(jax.shard_map(fn, mesh=plan.mesh, in_specs=(param_specs(tree, plan),),
                               out_specs=param_specs(out, plan), check_vma=False))


def _shard_mapped(op: tuple, tree, plan: TPPlan):
  leaves, treedef = jax.tree.flatten(tree)
  return _per_shard_program(op, plan, treedef, tuple((a.shape, a.dtype) for a in leaves))(tree)


def place(params, plan: TPPlan, backend: str = placement.AUTO, *, m: int = 1, dtype=None):
  """flexq_jax.place on every shard: each layer's backend chosen for a shard's shape (the card's
  tuning table at [N / tp, K] or [N, K / tp]) and repacked on its device, one layer at a time.

  Returns (placed params, the Placement of one shard, every shard's being the same)."""
  _check_params(params)
  decided = {}

  def decide(local):
    placed, rec = placement.place(local, backend, m=m, dtype=dtype)
    decided["record"] = rec
    return placed

  jax.eval_shape(decide, local_abstract(params, plan))  # the record, with every layer's path
  op = ("place", backend, m, None if dtype is None else jnp.dtype(dtype))
  return {**params, "layers": [_shard_mapped(op, layer, plan) for layer in params["layers"]]}, decided["record"]


def fuse(params, plan: TPPlan):
  """models.llama.fuse_projections on every shard: each shard's [q | k | v] and [gate | up] one
  kernel (exact, as on one device), one layer at a time."""
  _check_params(params)
  return {**params, "layers": [_shard_mapped(("fuse",), layer, plan) for layer in params["layers"]]}


# ---------------------------------------------------------------------------------- running


def cache_specs(cache: llama.KVCache, plan: TPPlan):
  kv = P(None, None, plan.axis, None)
  return llama.KVCache(k=[kv] * len(cache.k), v=[kv] * len(cache.v), valid=P(), length=P())


def init_cache(plan: TPPlan, batch_size: int, max_length: int, dtype=jnp.bfloat16) -> llama.KVCache:
  """An empty KV cache for the sharded model (its KV heads split over the mesh axis)."""
  cfg = dataclasses.replace(plan.config, num_kv_heads=plan.cache_kv_heads, num_heads=plan.config.num_heads,
                            head_dim=plan.config.resolved_head_dim)
  cache = llama.init_cache(cfg, batch_size, max_length, dtype)
  shardings = jax.tree.map(lambda s: NamedSharding(plan.mesh, s), cache_specs(cache, plan))
  return jax.device_put(cache, shardings)


def forward(params, plan: TPPlan, tokens: jax.Array, mask: jax.Array | None = None,
            cache: llama.KVCache | None = None) -> tuple[jax.Array, llama.KVCache | None]:
  """models.llama.forward over the mesh: each device runs its shard (jax.shard_map), o_proj and
  down_proj all-reduced. Logits [B, T, V] fp32 (split by vocabulary when the lm_head is)."""
  llama.check_token_ids(tokens, plan.config.vocab_size)
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [batch, seq] int, got shape {tokens.shape}")
  if mask is None:
    mask = jnp.ones(tokens.shape, bool)
  specs = param_specs(params, plan)
  logits_spec = P(None, None, plan.axis) if plan.vocab_sharded else P()
  run = functools.partial(llama.forward, config=plan.local_config, tp_axis=plan.axis)
  # check_vma=False: the kernels inside (pallas_call, the BMMA jax.ffi call) declare no varying mesh
  # axes; what leaves as replicated (P()) is, since every device computes it from all-reduced values.
  if cache is None:
    f = jax.shard_map(lambda p, t, m: run(p, tokens=t, mask=m)[0], mesh=plan.mesh, in_specs=(specs, P(), P()),
                      out_specs=logits_spec, check_vma=False)
    return f(params, tokens, mask), None
  cspecs = cache_specs(cache, plan)
  f = jax.shard_map(lambda p, t, m, c: run(p, tokens=t, mask=m, cache=c), mesh=plan.mesh,
                    in_specs=(specs, P(), P(), cspecs), out_specs=(logits_spec, cspecs), check_vma=False)
  return f(params, tokens, mask, cache)


@functools.partial(jax.jit, static_argnames=("plan", "max_new_tokens", "sampling", "cache_dtype"))
def generate(params, plan: TPPlan, prompt_tokens: jax.Array, prompt_mask: jax.Array, key: jax.Array, *,
             max_new_tokens: int, sampling: gen.SamplingConfig = gen.GREEDY,
             cache_dtype=jnp.bfloat16) -> gen.GenerateOutput:
  """models.generate.generate over the mesh (one jit: prefill and the decode loop)."""
  b, p = prompt_tokens.shape
  cache = init_cache(plan, b, p + max_new_tokens, cache_dtype)
  return gen.decode_loop(lambda t, m, c: forward(params, plan, t, m, c), cache, plan.config, prompt_tokens,
                         prompt_mask, key, max_new_tokens=max_new_tokens, sampling=sampling)


def device_bytes(params) -> dict:
  """{device: bytes of the parameters it holds} (its shards plus the replicated parameters)."""
  out: dict = {}
  for a in jax.tree.leaves(params):
    for s in a.addressable_shards:
      out[s.device] = out.get(s.device, 0) + s.data.nbytes
  return out
