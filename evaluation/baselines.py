"""W8A8 through XLA's int8 dot: what a JAX user has today without custom kernels (a baseline).

Weights int8 per output channel (symmetric), activations quantized per token on the fly (int8,
symmetric), one int8 x int8 -> int32 `lax.dot`, then both scales in fp32. `Int8Linear` is a weight
leaf for models/llama.py (`x @ leaf`), like flexq_jax's QuantizedLinear.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp


def int8_matmul(x: jax.Array, w: jax.Array, w_scale: jax.Array) -> jax.Array:
  """x [M, K] float @ (w int8 [K, N] * w_scale [N]) with per-token int8 activations -> [M, N] x.dtype."""
  xf = x.astype(jnp.float32)
  s = jnp.max(jnp.abs(xf), axis=1, keepdims=True) / 127
  q = jnp.round(xf / jnp.where(s > 0, s, 1.0)).astype(jnp.int8)
  acc = jax.lax.dot(q, w, preferred_element_type=jnp.int32)
  return (acc.astype(jnp.float32) * s * w_scale[None, :]).astype(x.dtype)


@flax.struct.dataclass
class Int8Linear:
  """int8 kernel [K, N] with fp32 per-output-channel scales [N]; `x @ leaf` runs int8_matmul."""

  w: jax.Array
  scale: jax.Array

  @classmethod
  def quantize(cls, kernel: jax.Array) -> "Int8Linear":
    """Round-to-nearest per-channel int8 of a float kernel [K, N]."""
    k = kernel.astype(jnp.float32)
    s = jnp.max(jnp.abs(k), axis=0) / 127
    s = jnp.where(s > 0, s, 1.0)
    return cls(w=jnp.clip(jnp.round(k / s), -127, 127).astype(jnp.int8), scale=s)

  @staticmethod
  def concatenate(layers: "list[Int8Linear]") -> "Int8Linear":
    """One layer with the given layers' output channels side by side (models.llama.fuse_projections)."""
    ks = {l.w.shape[0] for l in layers}
    if len(ks) != 1:
      raise ValueError(f"Int8Linear.concatenate: layers have different K {sorted(ks)}")
    return Int8Linear(w=jnp.concatenate([l.w for l in layers], axis=1),
                      scale=jnp.concatenate([l.scale for l in layers], axis=0))

  @property
  def nbytes(self) -> int:
    return int(self.w.size + 4 * self.scale.size)

  def __rmatmul__(self, x: jax.Array) -> jax.Array:
    if x.shape[-1] != self.w.shape[0]:
      raise ValueError(f"input has K={x.shape[-1]} but the int8 layer expects K={self.w.shape[0]}")
    y = int8_matmul(x.reshape(-1, x.shape[-1]), self.w, self.scale)
    return y.reshape(*x.shape[:-1], self.w.shape[1])
