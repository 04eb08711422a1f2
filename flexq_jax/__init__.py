"""flexq-jax: FlexQ INT6 post-training quantization (W6A6 / W6A8) for LLaMA-family models in JAX.

    qparams, report = flexq_jax.quantize(params, calib_batch)
"""

from flexq_jax.checkpoint import load as load_quantized
from flexq_jax.checkpoint import save as save_quantized
from flexq_jax.matmul import quantized_matmul, with_backend
from flexq_jax.numerics import dequantize_weight, quantize_activation, quantize_weight, reference_matmul
from flexq_jax.qlinear import QuantizedLinear
from flexq_jax.quantize import QuantConfig, QuantReport, quantize

__all__ = [
    "QuantConfig", "QuantReport", "QuantizedLinear", "dequantize_weight", "load_quantized", "quantize",
    "quantize_activation", "quantize_weight", "quantized_matmul", "reference_matmul", "save_quantized",
    "with_backend",
]
