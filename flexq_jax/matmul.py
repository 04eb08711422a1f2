"""The quantized-matmul dispatch: every QuantizedLinear's `x @ layer` lands here.

Paths side by side:
  reference  unpack the layout, then numerics.reference_matmul: the definition, with exact
             int32 group sums. Exact but slow on CPU (one small batched dot per K-group).
  dequant    the same numbers (q_x, s_x, q_w, s_w) dequantized to fp32 and multiplied in one
             dot: identical up to fp32 rounding and summation order, the latitude the contract
             gives every backend, at the speed of a float matmul. For long CPU evaluations.
GPU kernel paths (Pallas, BMMA) plug in here, chosen per layer by `backend`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flexq_jax import numerics
from flexq_jax.qlinear import QuantizedLinear

BACKENDS = ("reference", "dequant")


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
  else:
    raise ValueError(f"unknown backend {layer.backend!r}; known: {BACKENDS}")
  return y.reshape(*lead, layer.out_features)


def with_backend(params, backend: str):
  """The same pytree with every QuantizedLinear set to run on `backend`."""
  if backend not in BACKENDS:
    raise ValueError(f"unknown backend {backend!r}; known: {BACKENDS}")
  return jax.tree.map(lambda l: l.replace(backend=backend) if isinstance(l, QuantizedLinear) else l, params,
                      is_leaf=lambda l: isinstance(l, QuantizedLinear))
