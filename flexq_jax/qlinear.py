"""QuantizedLinear: a quantized weight leaf that applies itself (`x @ qlinear`, or `qa @ qlinear`
for a backends.QuantizedActivation its producer quantized or a backends.FoldedInput its kernel forms)."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from flexq_jax import backends, formats, numerics
from pallas_kernels import core


@flax.struct.dataclass
class QuantizedLinear:
  """A linear layer's kernel in quantized form, standing where the model keeps a [K, N] array.

  The logical weight is W [N, K] (out, in) as integers in the signed `w_bits` range with one
  fp16 scale per (output channel, K-group); what is stored is `packed` in `layout` (see
  flexq_jax.formats), so the storage type differs from the logical one. `x @ layer` runs the
  quantized matmul of the numerics contract with `a_bits`-bit dynamic activations (16 = the
  activations stay float: weight-only quantization) on `backend` (a name in flexq_jax.backends;
  flexq_jax.place sets it and repacks to the layout that backend reads).
  """

  packed: jax.Array  # layout-specific, e.g. uint32 [w_bits, N, K32/32] for "bitplanes"
  scales: jax.Array  # fp16 [N, Kp / group]
  in_features: int = flax.struct.field(pytree_node=False)  # K (unpadded)
  out_features: int = flax.struct.field(pytree_node=False)  # N
  w_bits: int = flax.struct.field(pytree_node=False)
  a_bits: int = flax.struct.field(pytree_node=False)  # 6, 8, or 16 (no activation quantization)
  group_size: int | None = flax.struct.field(pytree_node=False)  # None = one group per row
  layout: str = flax.struct.field(pytree_node=False, default="bitplanes")
  backend: str = flax.struct.field(pytree_node=False, default="reference")  # flexq_jax.backends.names()

  @property
  def shape(self) -> tuple[int, int]:
    """The shape of the float kernel this stands for: [K, N]."""
    return (self.in_features, self.out_features)

  @property
  def padded_in_features(self) -> int:
    return core.padded_k(self.in_features)

  @property
  def nbytes(self) -> int:
    """Bytes of packed weights plus scales."""
    return int(self.packed.size * self.packed.dtype.itemsize + self.scales.size * self.scales.dtype.itemsize)

  def with_layout(self, layout: str) -> "QuantizedLinear":
    """The same layer packed in `layout` (exact: through the canonical int form)."""
    if layout == self.layout:
      return self
    return self.replace(packed=formats.pack(self.logical_weight(), self.w_bits, layout, self.in_features), layout=layout)

  @staticmethod
  def concatenate(layers: "list[QuantizedLinear]") -> "QuantizedLinear":
    """One layer whose outputs are the given layers' side by side (their weight rows stacked).

    Exact: x @ fused == concatenate([x @ l for l in layers], -1), since activations are quantized
    per token and K-group whatever N is. The layers must agree on K, bits, group size, layout and
    backend (ValueError naming the first difference otherwise). Used to fuse q/k/v and gate/up
    (models.llama.fuse_projections).
    """
    if not layers:
      raise ValueError("concatenate: no layers")
    first = layers[0]
    for i, l in enumerate(layers[1:], start=1):
      if not isinstance(l, QuantizedLinear):
        raise ValueError(f"concatenate: layer {i} is a {type(l).__name__}, not a QuantizedLinear")
      for f in ("in_features", "w_bits", "a_bits", "group_size", "layout", "backend"):
        if getattr(l, f) != getattr(first, f):
          raise ValueError(f"concatenate: layer {i} has {f}={getattr(l, f)!r}, layer 0 {getattr(first, f)!r}")
    q = jnp.concatenate([l.logical_weight() for l in layers], axis=0)
    out = sum(l.out_features for l in layers)
    return first.replace(packed=formats.pack(q, first.w_bits, first.layout, first.in_features),
                         scales=jnp.concatenate([l.scales for l in layers], axis=0), out_features=out)

  def logical_weight(self) -> jax.Array:
    """int8 [N, Kp]: the canonical logical form (a transient; never stored)."""
    return formats.unpack(self.packed, self.w_bits, self.layout, self.in_features)

  def dequantize(self) -> jax.Array:
    """fp32 [K, N]: the float kernel this layer computes with (for analysis, not inference)."""
    return numerics.dequantize_weight(self.logical_weight(), self.scales, self.in_features).T

  def matmul(self, x: jax.Array, out_dtype=None) -> jax.Array:
    """x @ self with the result in out_dtype (default x's dtype): float32 gives the fp32 sums
    before rounding (row-parallel shards add them: models.llama.row_parallel_linear)."""
    return backends.quantized_matmul(x, self, out_dtype)

  def __rmatmul__(self, x: jax.Array) -> jax.Array:
    return backends.quantized_matmul(x, self)

  def norm_input(self, h: jax.Array, weight: jax.Array, eps: float):
    """The hook models.llama calls for this layer's input, rms_norm(h, weight, eps): the input
    already quantized by a kernel that fuses the norm with the activation quantization, or left for this
    layer's GEMV to form (a FoldedInput), where the backend and the card's tuning table say so
    (backends.fused_norm_input), else None (the model runs rms_norm and `x @ self` as usual)."""
    return backends.fused_norm_input(h, weight, eps, self)

  def swiglu_input(self, gate_up: jax.Array):
    """The hook models.llama calls for this layer's input silu(gate) * up, from a fused gate/up projection's
    output [..., 2 K]: the product quantized by one kernel that reads gate and up, or left for this layer's GEMV
    to form (a FoldedInput), where the backend and the card's tuning table say so (backends.fused_swiglu_input),
    else None."""
    return backends.fused_swiglu_input(gate_up, self)

  def residual_matmul(self, x, h: jax.Array) -> jax.Array | None:
    """The hook models.llama calls for h + x @ self (the residual add after o_proj and down_proj): the sum from
    one kernel that adds h in its store, where the backend and the card's tuning table say so
    (backends.fused_residual_matmul: the CUDA GEMV at batch 1), else None (the model adds)."""
    return backends.fused_residual_matmul(x, h, self)

  def input_quantization(self, m: int, dtype, producer: str) -> "backends.InputQuantization | None":
    """The hook models.llama calls where a kernel that produces this layer's input (`producer`: "attention",
    the decode attention's merge) could quantize it too: how this layer wants M rows quantized
    (backends.input_quantization), or None (the model hands over the float input)."""
    return backends.input_quantization(self, m, dtype, producer)
