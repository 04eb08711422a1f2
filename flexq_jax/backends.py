"""The backends: every way a QuantizedLinear's `x @ layer` can run, one object each, in one registry.

A backend knows the layout it reads for each weight width, says whether it can run a layer (and
why not), and runs the matmul of the numerics contract (flexq_jax/numerics.py). REGISTRY lists
them in order of preference; placement (flexq_jax/placement.py) tries them in that order, the
CLI's choices and the benchmarks' names come from it, and `x @ layer` (QuantizedLinear.__rmatmul__)
runs the backend named in the layer's `backend` field. See flexq_jax/DESIGN.md, "Backends".

  pallas     Pallas GPU kernels on "pallas6" (or "pallas8") weights, chosen by M at trace time:
             the Triton kernels of pallas_kernels/w6a_matmul.py (dp4a GEMVs in decode, int8
             mma.sync at small M; any NVIDIA GPU), and from the card's tuning-table threshold
             "mosaic_min_m" on Hopper the Mosaic GPU GEMM of pallas_kernels/w6a_gemm_mgpu.py
             (int8 WGMMA). Up to a table's "cuda_gemv_xq_max_m" / "cuda_gemv_max_m" (none sets
             them yet: not measured), the CUDA decode GEMV of flexq_jax/cuda/gemv.py on the same
             weights, with or without the activation quantizer inside. Off the GPU the
             Triton kernels run in Pallas interpret mode (tests).
  bmma       the CUDA kernel on binary tensor cores (flexq_jax/cuda/, jax.ffi): W6, A6/A8, bf16
             activations, reads "bitplanes_g4".
  reference  unpack the layout, then numerics.reference_matmul: the definition, exact int32 group
             sums; any layout, any bits. What "auto" picks where no kernel runs.
  dequant    the same numbers dequantized and multiplied in one fp32 dot (equal to the reference
             up to fp32 summation order): fast long evaluations on CPU. Never chosen by "auto".

A new kernel is one more Backend subclass here, placed in REGISTRY by preference.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import flax
import jax.numpy as jnp

from flexq_jax import numerics, tuning
from flexq_jax.cuda import bmma
from flexq_jax.cuda import gemv as cuda_gemv
from flexq_jax.cuda import gemm_small
from pallas_kernels import w6a_gemm_mgpu, w6a_gemm_mgpu_small, w6a_matmul
from pallas_kernels.core import GROUP, TILE_ROWS

ANY_PLATFORM = ("cpu", "gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class Backend:
  """One way to run a quantized linear. Subclasses refuse what they cannot run and run the rest."""

  name: str
  layouts: Mapping[int, str]  # weight bits -> the layout it reads; empty: any layout (it unpacks)
  platforms: tuple[str, ...]  # where it runs compiled; "auto" placement considers it only there
  auto: bool = True  # whether "auto" placement may choose it
  doc: str = ""

  def layout_for(self, w_bits: int) -> str | None:
    """The layout a layer of `w_bits` must be in to run here; None: whatever it is in."""
    return self.layouts.get(w_bits)

  def can_run(self, layer: Any, dtype=None, device: jax.Device | None = None) -> tuple[bool, str]:
    """(True, "") if this backend runs `layer` (once repacked to layout_for(layer.w_bits)) on
    activations of `dtype` on `device`, else (False, the reason). dtype / device None: not checked."""
    if device is not None and device.platform not in self.platforms:
      return False, f"runs on {'/'.join(self.platforms)}, not {device.platform}"
    reason = self._refusal(layer, None if dtype is None else jnp.dtype(dtype), device)
    return (reason is None), (reason or "")

  def _refusal(self, layer: Any, dtype, device) -> str | None:
    return None

  def matmul(self, x: jax.Array, layer: Any, out_dtype=None) -> jax.Array:
    """x [M, K] float -> [M, N] in out_dtype (default x's dtype). Called by quantized_matmul after
    its checks. out_dtype float32 gives the fp32 sums before any rounding to x's dtype where the
    kernel can (tensor parallelism adds shards' partial sums in fp32: flexq_jax/sharding.py)."""
    raise NotImplementedError


def _a6a8_group128(layer) -> str | None:
  if layer.group_size != GROUP:
    return f"needs group {GROUP}, the layer has group {layer.group_size}"
  if layer.a_bits not in (6, 8):
    return f"needs 6- or 8-bit activations, the layer has a_bits={layer.a_bits}"
  return None


def _after_input(x, layer):
  """(x, layer) unchanged, but the layer's unpacking can only start once x exists.

  The jnp backends unpack each layer's weight to int8 and float inside the model's program. The
  unpacking depends only on the parameters, so XLA is free to schedule every layer's at the start
  of the program, and then every unpacked weight of the model is alive at once: 2.6 GB of
  temporaries in one 512-token forward of the 135M default model (`make run` peaked at 5.2 GB).
  The barrier ties each layer's unpacking to its input, so one layer's unpacked weight at a time.
  """
  x, packed, scales = jax.lax.optimization_barrier((x, layer.packed, layer.scales))
  return x, layer.replace(packed=packed, scales=scales)


class Reference(Backend):

  def matmul(self, x, layer, out_dtype=None):
    x, layer = _after_input(x, layer)
    return numerics.reference_matmul(x, layer.logical_weight(), layer.scales, a_bits=layer.a_bits,
                                     group_size=layer.group_size, out_dtype=out_dtype or x.dtype)


class Dequant(Backend):

  def matmul(self, x, layer, out_dtype=None):
    x, layer = _after_input(x, layer)
    return numerics.dequant_matmul(x, layer.logical_weight(), layer.scales, a_bits=layer.a_bits,
                                   group_size=layer.group_size, out_dtype=out_dtype or x.dtype)


def _has_nvcc() -> bool:
  try:
    bmma.find_nvcc()
  except RuntimeError:
    return False
  return True


class Pallas(Backend):

  def kernel_for(self, m: int, device: jax.Device | None = None, *, w_bits: int = 6,
                 dtype=None, n: int | None = None, k: int | None = None) -> tuple[str, str]:
    """("mosaic", "mosaic_small", "cuda_gemv(_xq)", "cuda_small" or "triton", why) for M activation rows of a layer with `w_bits`-bit
    weights, N output and K input features (None: not known) and activations of `dtype` on `device` (default: the first
    device)."""
    device = device or jax.devices()[0]
    if device.platform != "gpu":
      return "triton", f"{device.platform}: the Triton kernels in interpret mode"
    card = tuning.card_name(device)
    table = tuning.load_table(card) or {}
    # The CUDA decode GEMV (flexq_jax/cuda/gemv.py) reads the same "pallas6" weights; a card's
    # table turns it on (cuda_gemv_max_m) once a benchmark there shows it faster.
    # cuda_gemv_xq_max_m: its variant with the activation quantizer inside (one kernel a linear).
    # It is compiled on first use, so without nvcc the Triton kernels run instead (say why).
    if w_bits == 6 and (dtype is None or jnp.dtype(dtype) in (jnp.bfloat16, jnp.float32)):
      for kernel, key in (("cuda_gemv_xq", "cuda_gemv_xq_max_m"), ("cuda_gemv", "cuda_gemv_max_m")):
        if m <= table.get(key, 0):
          if not _has_nvcc():
            return "triton", f"M={m}: the {card} table picks the CUDA GEMV, but there is no nvcc to build it"
          return kernel, f"M={m} <= {table[key]} ({card} table): the CUDA GEMV" + (
              ", quantizer inside" if kernel == "cuda_gemv_xq" else "")
      # The small-M CUDA GEMM on the int8 tensor cores (flexq_jax/cuda/gemm_small.py), M <= 64: off until a
      # card's table sets cuda_small_max_m from a benchmark there (kernel_bench --cuda-small).
      small_lo, small_hi = table.get("cuda_small_min_m", 1), min(table.get("cuda_small_max_m", 0), gemm_small.MAX_M)
      if small_lo <= m <= small_hi:
        if not _has_nvcc():
          return "triton", f"M={m}: the {card} table picks the small-M CUDA GEMM, but there is no nvcc to build it"
        return "cuda_small", f"{small_lo} <= M={m} <= {small_hi} ({card} table): the small-M CUDA GEMM (mma.sync)"
    cc = getattr(device, "compute_capability", "")
    if cc != "9.0":
      return "triton", f"the Mosaic GPU GEMM needs sm_90 (Hopper), this GPU is sm_{cc.replace('.', '')}"
    # The small-M Mosaic kernel (weights unpacked in registers, tokens as the WGMMA's N) for decode
    # batches and short prompts: up to the table's mosaic_small_max_m, 6-bit weights only.
    # Its CTAs each run the whole K (one per 128 weight rows), so a narrow layer leaves SMs idle:
    # the table's mosaic_small_min_n keeps those on the Triton kernels, mosaic_small_min_m the M
    # at which it starts to win.
    small_min, small_max = table.get("mosaic_small_min_m", 1), table.get("mosaic_small_max_m", 0)
    small_min_n = table.get("mosaic_small_min_n", 0)
    # "mosaic_small_skip": [[N, K, max M], ...]: layer shapes on which the Triton kernels beat it up to that M
    # (measured side by side in kernel_bench --cuda-small / --sweep-mgpu-small).
    small = w_bits == 6 and small_min <= m <= small_max
    skip = next((mm for nn, kk, mm in table.get("mosaic_small_skip", ()) if (nn, kk) == (n, k) and m <= mm), None)
    if small and skip is not None:
      return "triton", f"M={m} <= {skip} on {n} x {k} ({card} table's mosaic_small_skip): the Triton kernels"
    if small and (n or 0) >= small_min_n:
      return "mosaic_small", (f"{small_min} <= M={m} <= {small_max}" + (f", N={n} >= {small_min_n}" if small_min_n else "")
                              + f" ({card} table): the small-M Mosaic GPU GEMM")
    min_m = table.get("mosaic_min_m")
    if min_m is None:
      return "triton", f"no mosaic_min_m in a {card} tuning table"
    if m < min_m:
      return "triton", f"M={m} < {min_m} ({card} table): the Triton kernels"
    return "mosaic", f"M={m} >= {min_m} ({card} table): the Mosaic GPU GEMM"

  def _refusal(self, layer, dtype, device):
    if layer.w_bits not in self.layouts:
      return f"needs {' or '.join(map(str, self.layouts))}-bit weights, the layer has w_bits={layer.w_bits}"
    if layer.out_features % TILE_ROWS:
      return f"needs N a multiple of {TILE_ROWS}, the layer has N={layer.out_features}"
    return _a6a8_group128(layer)

  def matmul(self, x, layer, out_dtype=None):
    # The kernels write x's dtype: fp32 out from fp32 x (the same q_x and s_x: the contract
    # quantizes the fp32 value of every activation).
    if out_dtype is not None and jnp.dtype(out_dtype) != x.dtype:
      return self.matmul(x.astype(out_dtype), layer).astype(out_dtype)
    kernel = self.kernel_for(x.shape[0], w_bits=layer.w_bits, dtype=x.dtype, n=layer.out_features,
                             k=layer.in_features)[0]  # M static under jit
    if kernel == "mosaic":
      return w6a_gemm_mgpu.w6a_gemm(x, layer.packed, layer.scales, a_bits=layer.a_bits)
    if kernel == "mosaic_small":
      return w6a_gemm_mgpu_small.w6a_gemm_small(x, layer.packed, layer.scales, a_bits=layer.a_bits,
                                                config=_small_config(x.shape[0], layer))
    if kernel == "cuda_small":
      return gemm_small.w6a_gemm_small_cuda(x, layer.packed, layer.scales, a_bits=layer.a_bits)
    if kernel in ("cuda_gemv", "cuda_gemv_xq"):
      table = _card_table()
      unroll, warps = int(table.get("cuda_gemv_unroll", 1)), cuda_gemv.WARPS
      # cuda_gemv_wide_warps: wider blocks (16 or 32 warps, quantizer-inside kernel) on layers of at most
      # cuda_gemv_wide_max_tiles 16-row tiles (absent: every layer); unroll is 1 there.
      wide = int(table.get("cuda_gemv_wide_warps", 0))
      if kernel == "cuda_gemv_xq" and wide and layer.out_features // TILE_ROWS <= table.get("cuda_gemv_wide_max_tiles",
                                                                                            float("inf")):
        unroll, warps = 1, wide
      # cuda_gemv_ring: the quantizer-inside kernel's weights through a shared-memory ring of that many stages
      # (M <= 2, 8 warps, unroll 1; where it fits the card's shared memory).
      ring = int(table.get("cuda_gemv_ring", 0))
      if not (kernel == "cuda_gemv_xq" and warps == cuda_gemv.WARPS and unroll == 1 and x.shape[0] <= cuda_gemv.RING_MAX_M
              and cuda_gemv.ring_smem_bytes(ring, x.shape[0], layer.packed.shape[1]) <= cuda_gemv.RING_SMEM_LIMIT):
        ring = 0
      return cuda_gemv.w6a_gemv(x, layer.packed, layer.scales, a_bits=layer.a_bits,
                                fused_quant=kernel == "cuda_gemv_xq", unroll=unroll, warps=warps,
                                pdl=bool(table.get("cuda_gemv_pdl")), ring=ring)
    # Interpret mode off the GPU: slow, but the same kernel code (tests; on CPU "auto" picks the reference).
    return w6a_matmul.w6a_matmul(x, layer.packed, layer.scales, a_bits=layer.a_bits,
                                 interpret=jax.default_backend() != "gpu")


def _card_table(device: Any = None) -> dict:
  """The tuning table of `device`'s card (default: the first device), {} where there is none."""
  return tuning.load_table(tuning.card_name(device or jax.devices()[0])) or {}


def _small_config(m: int, layer: Any):
  """The small-M Mosaic GEMM's tiling: its default, split along K where the card's table sets
  "mosaic_small_split" (w6a_gemm_mgpu_small.split_for: enough CTAs for every SM; with "mosaic_small_ragged"
  split_ragged's cost model, any split count; with "mosaic_small_stream_k" streamed in equal runs a CTA
  where split_config's cost model prefers that to the split), reading the fp16
  weight scales where it sets "mosaic_small_sw_f16" (SmallConfig.sw_f16), and with the quantizer writing
  the fused TMA's [G, 2, M] operand where it sets "mosaic_small_quant_t" (SmallConfig.quant_t)."""
  table = _card_table()
  if not table.get("mosaic_small_split"):
    cfg = w6a_gemm_mgpu_small.default_config(m)
  else:
    cfg = w6a_gemm_mgpu_small.split_config(m, layer.out_features, layer.packed.shape[1],
                                           ragged=bool(table.get("mosaic_small_ragged")),
                                           stream_k=bool(table.get("mosaic_small_stream_k")))
  return dataclasses.replace(cfg, sw_f16=bool(table.get("mosaic_small_sw_f16")),
                             quant_t=bool(table.get("mosaic_small_quant_t")) and cfg.fused_tma)


class Bmma(Backend):

  def _refusal(self, layer, dtype, device):
    if layer.w_bits != bmma.W_BITS:
      return f"needs {bmma.W_BITS}-bit weights, the layer has w_bits={layer.w_bits}"
    if dtype is not None and dtype != jnp.bfloat16:
      return f"needs bf16 activations, got {dtype}"
    if device is not None and float(getattr(device, "compute_capability", "0")) < 8.0:
      return f"needs binary-tensor-core AND+POPC (sm_80 or newer), {device.device_kind} has not"
    return _a6a8_group128(layer)

  def matmul(self, x, layer, out_dtype=None):  # bf16 out only: wider out_dtype is a cast of it
    y = bmma.bmma_matmul(x, layer.packed, layer.scales, a_bits=layer.a_bits, k=layer.in_features)
    return y if out_dtype is None else y.astype(out_dtype)


PALLAS = Pallas("pallas", {6: "pallas6", 8: "pallas8"}, ("gpu",),
                      doc="Pallas kernels (Triton; Mosaic GPU for large M on Hopper): W6 or W8, A6/A8, group 128, "
                          "N a multiple of 16")
BMMA = Bmma("bmma", {6: "bitplanes_g4"}, ("gpu",), doc="CUDA binary-tensor-core kernel: W6, A6/A8, group 128, bf16")
REFERENCE = Reference("reference", {}, ANY_PLATFORM, doc="the jnp definition, exact int32 group sums")
DEQUANT = Dequant("dequant", {}, ANY_PLATFORM, auto=False, doc="the contract's numbers in one fp32 dot (CPU evaluations)")

REGISTRY: tuple[Backend, ...] = (PALLAS, BMMA, REFERENCE, DEQUANT)  # in order of preference


def names() -> tuple[str, ...]:
  """Every backend's name, in order of preference."""
  return tuple(b.name for b in REGISTRY)


def get(name: str) -> Backend:
  for b in REGISTRY:
    if b.name == name:
      return b
  raise ValueError(f"unknown backend {name!r}; known: {', '.join(names())}")


@flax.struct.dataclass
class QuantizedActivation:
  """Activations x [..., K] as the numerics contract quantizes them (q_x, s_x, sum(q_x) in the
  layout of the kernel that will read them), made by the op that produced x
  (fused_norm_input, fused_swiglu_input, models.llama.attention_input through input_quantization).
  `qx @ layer` runs that layer's GEMM on them; only the layer they
  were made for (its backend, a_bits and tiling) can take them."""

  qx: jax.Array  # int8 [Mp, Kp]
  sx: jax.Array | None  # f32 [Mp, G] (the Triton GEMMs; None for the small-M Mosaic GEMM)
  xsum: jax.Array | None  # int32 [Mp, G] (likewise)
  lead: tuple[int, ...] = flax.struct.field(pytree_node=False)  # x.shape[:-1]
  in_features: int = flax.struct.field(pytree_node=False)  # K
  a_bits: int = flax.struct.field(pytree_node=False)
  dtype: jnp.dtype = flax.struct.field(pytree_node=False)  # the dtype x would have had (the output's)
  config: object = flax.struct.field(pytree_node=False)  # the tiling of the GEMM they are laid out for
  act: jax.Array | None = None  # f32 [G, 2, Mp]: s_x and sum(q_x) for the small-M Mosaic GEMM (SmallConfig.quant_t)

  def __matmul__(self, layer: Any) -> jax.Array:
    return prequantized_matmul(self, layer)


def fused_norm_input(h: jax.Array, weight: jax.Array, eps: float, layer: Any):
  """rms_norm(h, weight, eps) for `layer`: a FoldedInput where the CUDA GEMV folds the norm in (gemv_folds has
  "norm"; weight of h's dtype), else quantized by one fused kernel (pallas_kernels.w6a_matmul.norm_quantize) as a
  QuantizedActivation; None where neither applies (input_quantization(layer, M, ..., "norm"): the table keys
  "fuse_norm_quant" for the Triton GEMMs, "fuse_norm_quant_small" for the small-M Mosaic GEMM) or h is not
  [..., K]."""
  m = math.prod(h.shape[:-1])
  if h.shape[-1] != layer.in_features:
    return None
  if weight.dtype == h.dtype and weight.shape == (layer.in_features,) and "norm" in gemv_folds(layer, m, h.dtype):
    return FoldedInput(x=h, weight=weight, eps=float(eps), prologue="norm", in_features=layer.in_features)
  spec = input_quantization(layer, m, h.dtype, "norm")
  if spec is None:
    return None
  out = w6a_matmul.norm_quantize(h.reshape(m, -1), weight, eps, a_bits=spec.a_bits, config=spec.quant_config,
                                 act_t=spec.act_t, interpret=jax.default_backend() != "gpu")
  return spec.wrap(h.shape[:-1], jnp.result_type(weight.dtype, h.dtype), *out)


# Producers that may quantize a pallas layer's input themselves, and the tuning-table keys that turn each on
# where the Triton GEMMs run and where the small-M Mosaic GEMM does (absent: never; $FLEXQ_TUNING_EXTRA tries them).
# The norm's are measured slower and no table sets them; the h200 table sets the SwiGLU and attention keys
# (LLaMA-2-7B decode 1-3% faster at batches 16-32, level at 64: results/e2e/h200-2026-12-03-e2e-fused-producers*.md).
PRODUCER_KEYS = {"norm": ("fuse_norm_quant", "fuse_norm_quant_small"),
                 "swiglu": ("fuse_swiglu_quant", "fuse_swiglu_quant"),
                 "attention": ("fuse_attention_quant", "fuse_attention_quant")}


@dataclasses.dataclass(frozen=True)
class InputQuantization:
  """How a pallas layer at M rows takes activations its producer quantized, in the layout of the GEMM that
  will read them (`config`: the small-M Mosaic GEMM's SmallConfig or the Triton GEMMs' TileConfig), as the
  quantizer of `quant_config` writes it. `wrap` makes the QuantizedActivation `qa @ layer` takes."""

  a_bits: int
  in_features: int
  m: int
  config: Any  # the GEMM's tiling (SmallConfig or TileConfig), which prequantized_matmul checks
  quant_config: Any  # the quantizer's w6a_matmul.TileConfig (block_m = the row tile)

  @property
  def act_t(self) -> bool:
    """s_x and sum(q_x) as the small-M Mosaic GEMM's [G, 2, rows] operand (else [rows, G] arrays each)."""
    return isinstance(self.config, w6a_gemm_mgpu_small.SmallConfig)

  @property
  def rows(self) -> int:
    """M padded to the row tile: the rows of q_x and its scales."""
    return -(-self.m // self.quant_config.block_m) * self.quant_config.block_m

  @property
  def phase_major(self) -> bool:
    return not self.quant_config.join_phases

  def wrap(self, lead: tuple[int, ...], dtype, qx: jax.Array, *scales: jax.Array) -> "QuantizedActivation":
    sx, xsum, act = (None, None, *scales) if self.act_t else (*scales, None)
    return QuantizedActivation(qx=qx, sx=sx, xsum=xsum, lead=tuple(lead), in_features=self.in_features,
                               a_bits=self.a_bits, dtype=dtype, config=self.config, act=act)


def input_quantization(layer: Any, m: int, dtype, producer: str) -> InputQuantization | None:
  """How `layer` takes M rows of input quantized by `producer` (a PRODUCER_KEYS name); None where that does not
  apply: a backend other than pallas, weight-only layers, an M at which the pallas backend runs neither the
  Triton GEMMs nor the small-M Mosaic GEMM with its [G, 2, M] operand ("mosaic_small_quant_t"), or a card whose
  tuning table does not set the producer's key for that GEMM."""
  if producer not in PRODUCER_KEYS:
    raise ValueError(f"unknown producer {producer!r}; known: {', '.join(PRODUCER_KEYS)}")
  if layer.backend != PALLAS.name or layer.a_bits == 16 or m == 0:
    return None
  if not PALLAS.can_run(layer, dtype)[0] or layer.layout != PALLAS.layout_for(layer.w_bits):
    return None
  device = jax.devices()[0]
  table = _card_table(device)
  triton_key, small_key = PRODUCER_KEYS[producer]
  if not (table.get(triton_key) or table.get(small_key)):
    return None
  kernel = PALLAS.kernel_for(m, device, w_bits=layer.w_bits, dtype=dtype, n=layer.out_features,
                             k=layer.in_features)[0]
  common = dict(a_bits=layer.a_bits, in_features=layer.in_features, m=m)
  if kernel == "mosaic_small" and table.get(small_key):
    small = _small_config(m, layer)
    if not small.quant_t:
      return None
    quant = w6a_matmul.TileConfig(block_m=small.tile_t, join_phases=False)
    return InputQuantization(config=small, quant_config=quant, **common)
  if kernel != "triton" or not table.get(triton_key):
    return None
  cfg = _gemm_config(m, layer)
  return InputQuantization(config=cfg, quant_config=w6a_matmul.quantizer_config(cfg, layer.w_bits), **common)


def fused_swiglu_input(gate_up: jax.Array, layer: Any):
  """silu(gate) * up of a fused gate/up projection's output [..., 2K] for `layer` (K inputs): a FoldedInput where
  the CUDA GEMV folds it in (gemv_folds has "swiglu"), else quantized by one kernel
  (w6a_matmul.quantize_activations(_t)(swiglu=True): the product never goes to memory) as a QuantizedActivation;
  None where neither applies (input_quantization(layer, M, ..., "swiglu"): the table key "fuse_swiglu_quant") or
  the input is not [..., 2K]."""
  k = layer.in_features
  m = math.prod(gate_up.shape[:-1])
  if gate_up.shape[-1] != 2 * k:
    return None
  if "swiglu" in gemv_folds(layer, m, gate_up.dtype):
    return FoldedInput(x=gate_up, weight=None, eps=0.0, prologue="swiglu", in_features=k)
  spec = input_quantization(layer, m, gate_up.dtype, "swiglu")
  if spec is None:
    return None
  gu = gate_up.reshape(m, 2 * k)
  if spec.act_t:
    out = w6a_matmul.quantize_activations_t(gu, a_bits=spec.a_bits, block_m=spec.quant_config.block_m,
                                            swiglu=True, interpret=jax.default_backend() != "gpu")
  else:
    out = w6a_matmul.quantize_activations(gu, a_bits=spec.a_bits, config=spec.quant_config, swiglu=True,
                                          interpret=jax.default_backend() != "gpu")
  return spec.wrap(gate_up.shape[:-1], gate_up.dtype, *out)


# What the CUDA GEMV at M <= its table's cuda_gemv_xq_max_m may fold into itself (issue 14 item 1 at batch 1;
# cuda.gemv.gemv_fused): its input's RMSNorm ("norm", fused q/k/v and gate/up), its input's SwiGLU ("swiglu",
# down_proj) and the residual add after it ("residual", o_proj and down_proj). The card table's "cuda_gemv_fuse"
# lists the ones it turns on (absent: none; the e2e method flexq-gemv-fused tries all three).
GEMV_FOLDS = ("norm", "swiglu", "residual")


def gemv_folds(layer: Any, m: int, dtype) -> frozenset[str]:
  """The GEMV_FOLDS `layer` takes at M rows of `dtype` activations: those the card's table lists in
  "cuda_gemv_fuse" where the pallas backend runs the quantizer-inside CUDA GEMV at this M (8 warps, unroll 1,
  no ring: the variant gemv_fused extends; M <= its FUSED_MAX_M), else none. A name the table lists that is not a fold is a
  ValueError naming the key."""
  if getattr(layer, "backend", None) != PALLAS.name or layer.a_bits == 16 or not 1 <= m <= cuda_gemv.FUSED_MAX_M:
    return frozenset()
  if not PALLAS.can_run(layer, dtype)[0] or layer.layout != PALLAS.layout_for(layer.w_bits):
    return frozenset()
  device = jax.devices()[0]
  table = _card_table(device)
  folds = table.get("cuda_gemv_fuse") or ()
  unknown = [f for f in folds if f not in GEMV_FOLDS]
  if unknown:
    raise ValueError(f"tuning table key cuda_gemv_fuse lists {unknown}: known folds are {', '.join(GEMV_FOLDS)}")
  if not folds or table.get("cuda_gemv_unroll", 1) != 1 or table.get("cuda_gemv_wide_warps") or \
      table.get("cuda_gemv_ring") or table.get("cuda_gemv_pdl"):
    return frozenset()
  kernel = PALLAS.kernel_for(m, device, w_bits=layer.w_bits, dtype=dtype, n=layer.out_features,
                             k=layer.in_features)[0]
  return frozenset(folds) if kernel == "cuda_gemv_xq" else frozenset()


@flax.struct.dataclass
class FoldedInput:
  """A layer's input that its kernel forms itself from what the producer would have read (cuda.gemv.gemv_fused's
  prologue): rms_norm(x, weight, eps) ("norm", x the residual stream [..., K]) or silu(gate) * up ("swiglu", x the
  fused gate/up output [..., 2K]). Made by fused_norm_input / fused_swiglu_input for the one layer that reads it;
  `fi @ layer` (or folded_matmul with a residual) runs that layer's GEMV on it."""

  x: jax.Array
  weight: jax.Array | None  # the norm's weight [K] ("norm")
  eps: float = flax.struct.field(pytree_node=False)
  prologue: str = flax.struct.field(pytree_node=False)  # "norm" or "swiglu"
  in_features: int = flax.struct.field(pytree_node=False)  # K of the layer that reads it

  @property
  def dtype(self):
    return self.x.dtype

  def __matmul__(self, layer: Any) -> jax.Array:
    return folded_matmul(self, layer)


def folded_matmul(x: Any, layer: Any, residual: jax.Array | None = None) -> jax.Array:
  """[residual +] x @ layer by the CUDA GEMV with its folds (cuda.gemv.gemv_fused): x a float array [..., K] or a
  FoldedInput made for this layer; residual [..., N] of x's dtype or None. Callers ask gemv_folds first."""
  prologue, weight, eps, data = "plain", None, 0.0, x
  if isinstance(x, FoldedInput):
    if x.in_features != layer.in_features:
      raise ValueError(f"this folded input was made for a layer with K={x.in_features}, not K={layer.in_features}")
    prologue, weight, eps, data = x.prologue, x.weight, x.eps, x.x
  lead = data.shape[:-1]
  m = math.prod(lead)
  y = cuda_gemv.gemv_fused(data.reshape(m, data.shape[-1]), layer.packed, layer.scales, a_bits=layer.a_bits,
                           prologue=prologue, norm_weight=weight, eps=eps,
                           residual=None if residual is None else residual.reshape(m, layer.out_features))
  return y.reshape(*lead, layer.out_features)


def fused_residual_matmul(x: Any, h: jax.Array, layer: Any) -> jax.Array | None:
  """h + x @ layer with the add in the CUDA GEMV's store, where gemv_folds(layer, M, ...) has "residual" and h is
  [..., N] of x's dtype; None otherwise (the model adds). x: a float array or a FoldedInput for this layer."""
  if not isinstance(x, (jax.Array, FoldedInput)) or h.shape[-1] != layer.out_features:
    return None
  m = math.prod(h.shape[:-1])
  if x.dtype != h.dtype or "residual" not in gemv_folds(layer, m, x.dtype):
    return None
  if isinstance(x, jax.Array) and (x.shape[:-1] != h.shape[:-1] or x.shape[-1] != layer.in_features):
    return None
  return folded_matmul(x, layer, residual=h)


def _gemm_config(m: int, layer: Any):
  """The Triton GEMM's tiling for M rows of `layer` (w6a_matmul.w6a_matmul's choice)."""
  return w6a_matmul.default_config(m, layer.out_features, layer.in_features, w_bits=layer.w_bits)


def prequantized_matmul(qa: Any, layer: Any) -> jax.Array:
  """qa (a QuantizedActivation made for `layer` by its producer) @ layer -> [..., N] in qa.dtype."""
  m = math.prod(qa.lead)
  small = isinstance(qa.config, w6a_gemm_mgpu_small.SmallConfig)
  if (layer.backend != PALLAS.name or qa.in_features != layer.in_features or qa.a_bits != layer.a_bits
      or qa.config != (_small_config(m, layer) if small else _gemm_config(m, layer))):
    raise ValueError(f"these quantized activations were made for another layer (K={qa.in_features}, "
                     f"A{qa.a_bits}, tiling {qa.config}), not this {layer.backend} layer (K={layer.in_features}, "
                     f"A{layer.a_bits})")
  if small:
    y = w6a_gemm_mgpu_small.gemm_quantized(qa.qx, qa.act, layer.packed, layer.scales, m=m, out_dtype=qa.dtype,
                                           config=qa.config)
  else:
    y = w6a_matmul.gemm(qa.qx, qa.sx, qa.xsum, layer.packed, layer.scales, m=m, out_dtype=qa.dtype, config=qa.config,
                        interpret=jax.default_backend() != "gpu")
  return y.reshape(*qa.lead, layer.out_features)


def quantized_matmul(x: jax.Array, layer: Any, out_dtype=None) -> jax.Array:
  """x [..., K] float -> [..., N] in out_dtype (default x's dtype), by the numerics contract, on
  layer.backend."""
  if x.ndim == 0:
    raise ValueError(f"activations must be [..., K={layer.in_features}], got a scalar")
  if x.shape[-1] != layer.in_features:
    raise ValueError(f"input has K={x.shape[-1]} but the quantized layer expects K={layer.in_features}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"activations must be floating point, got {x.dtype}")
  backend = get(layer.backend)
  ok, why = backend.can_run(layer, x.dtype)
  want = backend.layout_for(layer.w_bits)
  if ok and want is not None and layer.layout != want:
    ok, why = False, f"it reads layout {want!r}, the layer is in {layer.layout!r}"
  if not ok:
    raise ValueError(f"backend {backend.name!r} cannot run this layer (w{layer.w_bits}a{layer.a_bits}, "
                     f"N={layer.out_features}, K={layer.in_features}): {why}; place the model with "
                     f"flexq_jax.place(params, {backend.name!r}) or another backend ({', '.join(names())})")
  lead = x.shape[:-1]
  if x.size == 0:  # no rows: nothing for a kernel to do (and some cannot launch an empty grid)
    return jnp.zeros((*lead, layer.out_features), out_dtype or x.dtype)
  y = backend.matmul(x.reshape(-1, layer.in_features), layer, out_dtype)
  return y.reshape(*lead, layer.out_features)
