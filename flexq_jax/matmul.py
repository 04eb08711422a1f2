"""The quantized-matmul dispatch: every QuantizedLinear's `x @ layer` lands here.

Paths side by side:
  reference  unpack the layout, then numerics.reference_matmul: the definition, with exact
             int32 group sums. Exact but slow on CPU (one small batched dot per K-group).
  dequant    the same numbers (q_x, s_x, q_w, s_w) dequantized to fp32 and multiplied in one
             dot: identical up to fp32 rounding and summation order, the latitude the contract
             gives every backend, at the speed of a float matmul. For long CPU evaluations.
  pallas     the Pallas (Triton) GPU kernels of pallas_kernels.w6a_matmul: int8 tensor-core dots
             (or dp4a in decode) on weights unpacked from the "pallas6" layout, or read from the
             "pallas8" layout for 8-bit weights (repack once with to_backend).
  bmma       the CUDA binary-tensor-core kernel of flexq_jax.cuda (jax.ffi; W6, A6/A8, group 128,
             bf16): reads the "bitplanes_g4" layout (bit planes, 4 groups interleaved).
GPU kernel paths plug in here, chosen per layer by `backend`; to_backend(params, "auto") picks
each layer's fastest on the current device (flexq_jax.dispatch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flexq_jax import numerics
from flexq_jax.qlinear import QuantizedLinear

BACKENDS = ("reference", "dequant", "pallas", "bmma")
# The layout each backend reads, by weight bits; a backend not listed here reads any layout.
BACKEND_LAYOUTS = {"pallas": {6: "pallas6", 8: "pallas8"}, "bmma": {6: "bitplanes_g4"}}


def quantized_matmul(x: jax.Array, layer: QuantizedLinear) -> jax.Array:
  """x [..., K] float -> [..., N] in x's dtype, by the numerics contract."""
  if x.shape[-1] != layer.in_features:
    raise ValueError(f"input has K={x.shape[-1]} but the quantized layer expects K={layer.in_features}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"activations must be floating point, got {x.dtype}")
  lead = x.shape[:-1]
  x2 = x.reshape(-1, layer.in_features)
  if layer.backend == "reference":
    y = numerics.reference_matmul(x2, layer.logical_weight(), layer.scales, a_bits=layer.a_bits,
                                  group_size=layer.group_size, out_dtype=x.dtype)
  elif layer.backend == "dequant":
    y = numerics.dequant_matmul(x2, layer.logical_weight(), layer.scales, a_bits=layer.a_bits,
                                group_size=layer.group_size, out_dtype=x.dtype)
  elif layer.backend == "pallas":
    from pallas_kernels import w6a_matmul
    if layer.layout != BACKEND_LAYOUTS["pallas"].get(layer.w_bits) or layer.group_size != numerics.CHUNK \
        or layer.a_bits not in (6, 8):
      raise ValueError(f"backend 'pallas' runs W6 (layout 'pallas6') or W8 (layout 'pallas8') with A6/A8, group "
                       f"128 (see to_backend); got layout {layer.layout!r}, w{layer.w_bits}a{layer.a_bits}, group "
                       f"{layer.group_size}")
    # Interpret mode off the GPU: slow, but the same kernel code (the CPU path of choice is "dequant").
    y = w6a_matmul.w6a_matmul(x2, layer.packed, layer.scales, a_bits=layer.a_bits,
                              interpret=jax.default_backend() != "gpu")
  elif layer.backend == "bmma":
    from flexq_jax.cuda import bmma
    if layer.layout != "bitplanes_g4" or layer.w_bits != 6 or layer.group_size != numerics.CHUNK or layer.a_bits not in (6, 8) \
        or x.dtype != jnp.bfloat16:
      raise ValueError(f"backend 'bmma' runs W6A6/W6A8, group 128, layout 'bitplanes_g4' (see to_backend), bf16 activations; got layout "
                       f"{layer.layout!r}, w{layer.w_bits}a{layer.a_bits}, group {layer.group_size}, {x.dtype}")
    y = bmma.bmma_matmul(x2, layer.packed, layer.scales, a_bits=layer.a_bits, k=layer.in_features)
  else:
    raise ValueError(f"unknown backend {layer.backend!r}; known: {BACKENDS}")
  return y.reshape(*lead, layer.out_features)


def with_backend(params, backend: str):
  """The same pytree with every QuantizedLinear set to run on `backend`."""
  if backend not in BACKENDS:
    raise ValueError(f"unknown backend {backend!r}; known: {BACKENDS}")
  return jax.tree.map(lambda l: l.replace(backend=backend) if isinstance(l, QuantizedLinear) else l, params,
                      is_leaf=lambda l: isinstance(l, QuantizedLinear))


def to_backend(params, backend: str, *, m: int = 1, device=None):
  """Every QuantizedLinear set to run on `backend`, repacked (once, offline) to the layout it reads.

  backend="auto": each layer gets the backend flexq_jax.dispatch.choose picks for it at `m`
  activation rows on `device` (default: the first JAX device): the jnp reference on CPU, the
  fastest GPU kernel by the card's tuning table on a GPU.
  Layers a backend cannot run (e.g. `pallas` needs w6/w8, a6/a8, group 128, N a multiple of 16)
  keep their layout and backend. Repacking goes through the canonical int form, so it is exact.
  """
  from flexq_jax import dispatch
  if backend != "auto" and backend not in BACKENDS:
    raise ValueError(f"unknown backend {backend!r}; known: {BACKENDS + ('auto',)}")
  card = dispatch.card_name(device) if backend == "auto" else None

  def convert(l):
    if not isinstance(l, QuantizedLinear):
      return l
    b = dispatch.choose(l, m, card=card)[0] if backend == "auto" else backend
    if not dispatch.runnable(l, b):
      return l
    want = BACKEND_LAYOUTS.get(b, {}).get(l.w_bits)
    return (l if want is None else l.with_layout(want)).replace(backend=b)

  return jax.tree.map(convert, params, is_leaf=lambda l: isinstance(l, QuantizedLinear))
