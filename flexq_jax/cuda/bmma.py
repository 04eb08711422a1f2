"""The BMMA W6A6 / W6A8 kernel (csrc/) as XLA FFI custom calls. First GPU run 2026-11-27 (H200): see README.

`bmma_matmul(x, w_planes, w_scales, a_bits=..., k=...)` runs two custom calls under jit:
  flexq_bmma_act_quant  x bf16 [M, K] -> activation bit planes u32 [a_bits, M, W] and
                        fp32 scales [M, Kp/128] (the numerics contract, on the GPU)
  flexq_bmma_gemm       planes x weight planes u32 [6, N, W] on binary tensor cores, group
                        scales fused -> bf16 [M, N]
Both operands are in the "bitplanes_g4" layout of flexq_jax.formats: bit planes whose words come
in blocks of 4 groups, interleaved (word 4q + u of a block = word q of its group u), rows padded
to whole blocks (W = core.g4_words(K)), so a lane's fragment words of 4 groups are one
16-byte load.

Design (csrc/; tiles in configs.h):
  - act_quant.cuh: one warp per (token, 128-group); lane t holds elements 32e + t, so
    __ballot_sync of bit i gives word e of the group's plane i directly.
  - bmma_gemm.cuh: one m8n8k128 AND+POPC MMA covers exactly one K-group of one plane pair, so
    a lane's fragment is one raw plane word (row lane/4, word lane%4 of the group), loaded
    straight from global memory (no shared memory, no re-layout). Per 8x8 tile and group,
    a_bits x 6 MMAs chained in Horner order (accumulator input = +-2 x running sum) give the
    exact int32 group sum; then acc += (s_x * s_w) * sum in fp32 (scales fused per group).
  - Tiles: M = 1 -> bmma_decode_m1_kernel (the activation's planes as the MMA's 8 rows: 6 MMAs a
    group instead of a_bits x 6, rows then weighted and added by 3 xor-shuffles; bit-identical to the
    next; m1_rows=False turns it off), M <= 8 -> bmma_decode_kernel (8 channels a block, 4 warps
    splitting K, one 16-byte load a plane, lane and 4 groups), M <= 16 -> 16 x 32 (4 warps split N), else 32 x 32
    (2 x 2 warps, 2 x 2 MMA tiles each). Rows past M / N and padding words read as zero.

The shared library is built on first use, not at import (a CPU machine imports this module
freely): nvcc compiles csrc/ for the local GPU into a cache directory keyed by the sources'
hash, the arch and the nvcc version, so a changed source, card or compiler rebuilds.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import core

CSRC = Path(__file__).parent / "csrc"
ENTRY = CSRC / "ffi_bmma.cu"
W_BITS = 6  # the kernel's weight width (configs.h kWeightBits)
A_BITS = (6, 8)
ACT_QUANT_TARGET = "flexq_bmma_act_quant"
GEMM_TARGET = "flexq_bmma_gemm"
# The decode GEMV on "pallas6" weights (csrc/gemv_pallas6.cuh, flexq_jax/cuda/gemv.py), same library.
GEMV_TARGETS = {"bfloat16": ("flexq_gemv_pallas6_bf16", "FlexqGemvPallas6Bf16"),
                "float32": ("flexq_gemv_pallas6_f32", "FlexqGemvPallas6F32")}
GEMV_XQ_TARGETS = {"bfloat16": ("flexq_gemv_pallas6_xq_bf16", "FlexqGemvPallas6XqBf16"),  # quantizer inside
                   "float32": ("flexq_gemv_pallas6_xq_f32", "FlexqGemvPallas6XqF32")}
GEMV_FUSED_TARGETS = {"bfloat16": ("flexq_gemv_pallas6_fused_bf16", "FlexqGemvPallas6FusedBf16"),  # producer and
                      "float32": ("flexq_gemv_pallas6_fused_f32", "FlexqGemvPallas6FusedF32")}      # residual inside
GEMM_SMALL_TARGETS = {"bfloat16": ("flexq_gemm_small_pallas6_bf16", "FlexqGemmSmallPallas6Bf16"),  # M <= 64, mma.sync
                      "float32": ("flexq_gemm_small_pallas6_f32", "FlexqGemmSmallPallas6F32")}
CACHE_ENV = "FLEXQ_JAX_CUDA_CACHE"  # where built libraries go (default ~/.cache/flexq_jax/cuda)
NVCC_ENV = "NVCC"  # an nvcc to use instead of the one on PATH


def find_nvcc() -> str:
  """Path of nvcc ($NVCC, then PATH, then $CUDA_HOME/bin); a clear error when there is none."""
  candidates = [os.environ.get(NVCC_ENV), shutil.which("nvcc")]
  cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
  candidates.append(str(Path(cuda_home) / "bin" / "nvcc"))
  for c in candidates:
    if c and Path(c).is_file() and os.access(c, os.X_OK):
      return c
  raise RuntimeError("the BMMA backend compiles its CUDA kernels on first use and needs nvcc: install the CUDA "
                     f"toolkit, put nvcc on PATH or set ${NVCC_ENV}; the 'reference', 'dequant' and 'pallas' "
                     "backends need no nvcc")


@functools.cache
def nvcc_version(nvcc: str) -> str:
  out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
  return out.strip().splitlines()[-1]  # e.g. "Build cuda_13.0.r13.0/compiler.36424714_0"


def arch_for(compute_capability: str) -> str:
  """'9.0' -> 'sm_90a' (wgmma/setmaxnreg-capable Hopper target), '8.6' -> 'sm_86'."""
  major, minor = (int(v) for v in str(compute_capability).split("."))
  if major < 8:
    raise RuntimeError(f"the BMMA kernel needs binary-tensor-core AND+POPC (sm_80 or newer); this GPU is "
                       f"sm_{major}{minor}")
  return f"sm_{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")


def local_gpu_arch() -> str:
  """The arch of the first GPU JAX sees; a clear error when JAX sees none."""
  try:
    devices = jax.devices("gpu")
  except RuntimeError as e:
    raise RuntimeError("the BMMA backend runs only on an NVIDIA GPU and JAX sees none (on CPU use the "
                       "'reference' or 'dequant' backend)") from e
  return arch_for(devices[0].compute_capability)


def compile_command(nvcc: str, arch: str, output: Path) -> list[str]:
  """The nvcc command line that builds the FFI library for `arch` (e.g. 'sm_90a')."""
  compute = arch.replace("sm_", "compute_")
  # No --use_fast_math: activation quantization relies on IEEE division (x / s) to match the contract.
  return [nvcc, "-O3", "-shared", "-Xcompiler", "-fPIC", "-std=c++17", f"-gencode=arch={compute},code={arch}",
          "-I", jax.ffi.include_dir(), "-I", str(CSRC), "-o", str(output), str(ENTRY)]


def _sources_digest() -> str:
  h = hashlib.sha256()
  for path in sorted(CSRC.iterdir()):
    if path.suffix in (".cu", ".cuh", ".h"):
      h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
  return h.hexdigest()


def cache_dir() -> Path:
  return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "flexq_jax" / "cuda")


def library_path(nvcc: str, arch: str, directory: Path | None = None) -> Path:
  """Where the build for `arch` lives: named by a hash of the sources, the arch, the nvcc
  version and the jax version whose FFI headers it is compiled against."""
  key = hashlib.sha256("\0".join([_sources_digest(), arch, nvcc_version(nvcc), jax.__version__]).encode())
  return Path(directory or cache_dir()) / f"flexq_bmma_{arch}_{key.hexdigest()[:16]}.so"


def build_library(arch: str | None = None, directory: Path | None = None) -> Path:
  """Compiles csrc/ for `arch` (default: the local GPU's) unless a cached build exists.

  Returns:
    Path of the shared library (see library_path).
  """
  nvcc = find_nvcc()
  arch = arch or local_gpu_arch()
  library = library_path(nvcc, arch, directory)
  directory = library.parent
  if library.exists():
    return library
  directory.mkdir(parents=True, exist_ok=True)
  # Build beside the target, then rename: concurrent first uses never load a half-written file.
  with tempfile.TemporaryDirectory(dir=directory) as tmp:
    partial = Path(tmp) / library.name
    done = subprocess.run(compile_command(nvcc, arch, partial), capture_output=True, text=True)
    if done.returncode:
      raise RuntimeError(f"nvcc failed to build the BMMA kernels for {arch}:\n{done.stderr[-4000:]}")
    os.replace(partial, library)
  return library


@functools.cache
def _register() -> None:
  """Builds (or finds) the library for the local GPU, loads it and registers its FFI targets."""
  library = ctypes.cdll.LoadLibrary(str(build_library()))
  jax.ffi.register_ffi_target(ACT_QUANT_TARGET, jax.ffi.pycapsule(library.FlexqBmmaActQuant), platform="CUDA")
  jax.ffi.register_ffi_target(GEMM_TARGET, jax.ffi.pycapsule(library.FlexqBmmaGemm), platform="CUDA")
  for target, symbol in (*GEMV_TARGETS.values(), *GEMV_XQ_TARGETS.values(), *GEMV_FUSED_TARGETS.values(),
                         *GEMM_SMALL_TARGETS.values()):
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="CUDA")


# bmma_matmul's m1_rows at M = 1 (csrc/ffi_bmma.cu): the kernel that runs.
M1_ROWS_VARIANTS = {0: "M <= 8 kernel", 1: "planes as rows, 4 warps", 2: "planes as rows, 4 warps, prefetch",
                    3: "planes as rows, 8 warps", 4: "planes as rows, 8 warps, prefetch"}


def m1_rows_variant(n: int, k: int) -> int:
  """The planes-as-rows variant bmma_matmul runs at M = 1 by default: blocks of 8 warps on layers with
  N and K both >= 8192 (LLaMA-2-70B's o_proj 15.9 vs 17.3 us, down_proj 48.0 vs 54.2; its q/k/v and
  gate/up level), 4 warps below (LLaMA-2-7B's layers 6-17% faster so); prefetching the next step's
  words was slower everywhere (H200, results/kernels/h200-2026-12-03-bmma-m1.md)."""
  return 3 if n >= 8192 and k >= 8192 else 1


def _check_a_bits(a_bits: int) -> None:
  if a_bits not in A_BITS:
    raise ValueError(f"the BMMA kernel runs W6A6 and W6A8: a_bits must be one of {A_BITS}, got {a_bits}")


def quantize_activation_planes(x: jax.Array, *, a_bits: int) -> tuple[jax.Array, jax.Array]:
  """bf16 [M, K] -> (uint32 [a_bits, M, W] "bitplanes_g4" planes, fp32 [M, Kp/128] scales), on the GPU.

  Equals (flexq_jax.formats.interleave_groups(flexq_jax.formats.pack_bitplanes(q_x, a_bits)), s_x) of
  numerics.quantize_activation(x, a_bits); W = core.g4_words(K).
  """
  _check_a_bits(a_bits)
  if x.ndim != 2 or x.dtype != jnp.bfloat16:
    raise ValueError(f"activations must be bf16 [M, K], got {x.dtype} {x.shape}")
  _register()
  m, k = x.shape
  kp = core.padded_k(k)
  out = (jax.ShapeDtypeStruct((a_bits, m, core.g4_words(k)), jnp.uint32),
         jax.ShapeDtypeStruct((m, kp // core.GROUP), jnp.float32))
  return jax.ffi.ffi_call(ACT_QUANT_TARGET, out)(x, a_bits=np.int32(a_bits))


def bmma_matmul(x: jax.Array, w_planes: jax.Array, w_scales: jax.Array, *, a_bits: int, k: int,
                m1_rows: bool | int = True) -> jax.Array:
  """The numerics contract (group 128, W6) on binary tensor cores: bf16 [M, K] -> bf16 [M, N].

  Args:
    x: bf16 [M, K] activations (quantized on the GPU to a_bits per token and group of 128).
    w_planes: uint32 [6, N, W], the "bitplanes_g4" layout (flexq_jax.formats.pack(q, 6, "bitplanes_g4", k):
      bit planes with 4 groups' words interleaved, so a lane loads its words of 4 groups at once).
    w_scales: fp16 [N, Kp/128] weight scales.
    a_bits: 6 or 8.
    k: the layer's real K (unpadded).
    m1_rows: at M = 1, the kernel with the activation's planes as the MMA's rows (fewer MMAs, exact group
      sums); True picks its variant by the layer's shape (m1_rows_variant), False keeps the M <= 8 kernel
      (for comparison). An int picks a variant (M1_ROWS_VARIANTS): 1 (bit-identical to the M <= 8 kernel),
      2 its next step's words loaded ahead (bit-identical too), 3 / 4 the same in blocks of 8 warps (exact
      group sums, the warps' fp32 partials in another order).

  Returns:
    bf16 [M, N].
  """
  _check_a_bits(a_bits)
  if isinstance(m1_rows, bool):
    m1_rows = m1_rows_variant(w_planes.shape[1], k) if m1_rows else 0
  if m1_rows not in M1_ROWS_VARIANTS:
    raise ValueError(f"m1_rows must be True, False or one of {sorted(M1_ROWS_VARIANTS)}, got {m1_rows!r}")
  kp, words = core.padded_k(k), core.g4_words(k)
  if x.ndim != 2 or x.dtype != jnp.bfloat16 or x.shape[1] != k:
    raise ValueError(f"activations must be bf16 [M, {k=}], got {x.dtype} {x.shape}")
  if w_planes.ndim != 3 or w_planes.dtype != jnp.uint32 or w_planes.shape[0] != W_BITS or w_planes.shape[2] != words:
    raise ValueError(f"weight planes must be uint32 [{W_BITS}, N, {words}] (the 'bitplanes_g4' layout of a "
                     f"{W_BITS}-bit layer with {k=}; repack with flexq_jax.matmul.place(params, 'bmma')), "
                     f"got {w_planes.dtype} {w_planes.shape}")
  n = w_planes.shape[1]
  if w_scales.dtype != jnp.float16 or w_scales.shape != (n, kp // core.GROUP):
    raise ValueError(f"weight scales must be float16 [{n}, {kp // core.GROUP}] (group 128), got "
                     f"{w_scales.dtype} {w_scales.shape}")
  x_planes, x_scales = quantize_activation_planes(x, a_bits=a_bits)
  out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.bfloat16)
  return jax.ffi.ffi_call(GEMM_TARGET, out)(x_planes, x_scales, w_planes, w_scales, a_bits=np.int32(a_bits),
                                            k=np.int32(k), m1_rows=np.int32(m1_rows))
