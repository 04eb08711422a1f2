"""CUDA kernels bound through jax.ffi: the BMMA backend (bmma.py; first GPU run 2026-11-27, H200)
and the decode GEMV on "pallas6" weights (gemv.py; not yet run on a GPU, and chosen only where a
card's tuning table sets cuda_gemv_max_m). One library holds both (csrc/ffi_bmma.cu).

Importing this package compiles nothing and needs neither nvcc nor a GPU: the library is built
and registered on the first call of a kernel.
"""

from flexq_jax.cuda.bmma import bmma_matmul, build_library, quantize_activation_planes

__all__ = ["bmma_matmul", "build_library", "quantize_activation_planes"]
