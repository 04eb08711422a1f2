"""The quantized-matmul dispatch: every QuantizedLinear's `x @ layer` lands here.

Paths side by side:
  reference  unpack the layout, then numerics.reference_matmul (the definition; the CPU path).
GPU kernel paths (Pallas, BMMA) plug in here, chosen per layer by `backend`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flexq_jax import numerics
from flexq_jax.qlinear import QuantizedLinear

BACKENDS = ("reference",)


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
  else:
    raise ValueError(f"unknown backend {layer.backend!r}; known: {BACKENDS}")
  return y.reshape(*lead, layer.out_features)
