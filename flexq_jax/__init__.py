"""flexq-jax: FlexQ INT6 post-training quantization (W6A6 / W6A8) for LLaMA-family models in JAX.

    params, config = flexq_jax.rotate(params, config)            # optional: Hadamard rotation (exact)
    qparams, report = flexq_jax.quantize(params, calib_batch, model_config=config)  # reference backend
    qparams, placement = flexq_jax.place(qparams, "auto")        # each layer on its fastest kernel here

The design, layouts and layering: flexq_jax/DESIGN.md.
"""

from flexq_jax.backends import names as backend_names
from flexq_jax.backends import quantized_matmul
from flexq_jax.checkpoint import load as load_quantized
from flexq_jax.checkpoint import save as save_quantized
from flexq_jax.numerics import dequantize_weight, quantize_activation, quantize_weight, reference_matmul
from flexq_jax.placement import Placement, place
from flexq_jax.qconfig import QuantConfig
from flexq_jax.qlinear import QuantizedLinear
from flexq_jax.quantize import quantize
from flexq_jax.report import QuantReport
from flexq_jax.rotation import rotate

__all__ = [
    "Placement", "QuantConfig", "QuantReport", "QuantizedLinear", "backend_names", "dequantize_weight",
    "load_quantized", "place", "quantize", "quantize_activation", "quantize_weight", "quantized_matmul",
    "reference_matmul", "rotate", "save_quantized",
]
