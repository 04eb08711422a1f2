"""CUDA kernels bound through jax.ffi (the BMMA backend). First GPU run 2026-11-27 (H200): see README.

Importing this package compiles nothing and needs neither nvcc nor a GPU: bmma.bmma_matmul
builds and registers the library on first call.
"""

from flexq_jax.cuda.bmma import bmma_matmul, build_library, quantize_activation_planes

__all__ = ["bmma_matmul", "build_library", "quantize_activation_planes"]
