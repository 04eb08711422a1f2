"""A short run of the BMMA kernels against the contract, for sanitizers and first checks on a GPU.

    python -m flexq_jax.cuda.selfcheck            # a few shapes, W6A6 and W6A8; exit 1 on mismatch
    compute-sanitizer --tool memcheck --kernel-name kns=flexq python -m flexq_jax.cuda.selfcheck --small

Prints one line per case (max error against flexq_jax.numerics.reference_matmul, in units of
the tolerance the GPU tests use: bf16 rounding of the output, 2^-7 relative) and, with --sass,
how many binary tensor-core instructions (BMMA) the built library holds (cuobjdump -sass).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from flexq_jax import formats, numerics
from flexq_jax.cuda import bmma

CASES = [(1, 200, 840), (8, 200, 840), (17, 72, 576), (64, 256, 1024)]
SMALL = [(1, 40, 200), (17, 72, 576)]


def check(m: int, n: int, k: int, a_bits: int, seed: int = 0) -> float:
  """max |y - ref| / (2^-7 |ref| + 1e-6) of bmma_matmul on random inputs (<= 1 passes)."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((m, k)) * 3, jnp.bfloat16)
  q_w, s_w = numerics.quantize_weight(jnp.asarray(rng.standard_normal((n, k)), jnp.float32), 6, 128)
  y = bmma.bmma_matmul(x, formats.pack(q_w, 6, "bitplanes_g4", k), s_w, a_bits=a_bits, k=k)
  ref = np.asarray(numerics.reference_matmul(x, q_w, s_w, a_bits=a_bits), np.float32)
  return float(np.max(np.abs(np.asarray(y, np.float32) - ref) / (2 ** -7 * np.abs(ref) + 1e-6)))


def planes_mismatch(m: int, k: int, a_bits: int, seed: int = 1) -> int:
  """Activation plane words that differ from formats' bitplanes of the contract's q_x (0 passes)."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((m, k)) * 3, jnp.bfloat16)
  planes, scales = bmma.quantize_activation_planes(x, a_bits=a_bits)
  q_x, s_x = numerics.quantize_activation(x, a_bits)
  bad = int(np.sum(np.asarray(planes) != np.asarray(formats.interleave_groups(formats.pack_bitplanes(q_x, a_bits)))))
  return bad + int(np.sum(np.asarray(scales) != np.asarray(s_x)))


def sass_bmma_count() -> int | None:
  """BMMA instructions in the built library, or None without cuobjdump."""
  tool = shutil.which("cuobjdump")
  if tool is None:
    return None
  sass = subprocess.run([tool, "-sass", str(bmma.build_library())], capture_output=True, text=True).stdout
  return sum("BMMA" in line for line in sass.splitlines())


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--small", action="store_true", help="two small shapes (for sanitizers)")
  ap.add_argument("--sass", action="store_true", help="count BMMA instructions in the library")
  args = ap.parse_args(argv)
  if jax.default_backend() != "gpu":
    print("selfcheck needs a CUDA GPU", file=sys.stderr)
    return 2
  if args.sass:
    print(f"BMMA instructions in {bmma.build_library().name}: {sass_bmma_count()}")
  worst = 0.0
  for a_bits in bmma.A_BITS:
    bad = planes_mismatch(64, 1000, a_bits)
    worst = max(worst, 0.0 if bad == 0 else float("inf"))
    print(f"activation planes A{a_bits} [64 x 1000]: {bad} words or scales differ from the contract's")
  for m, n, k in SMALL if args.small else CASES:
    for a_bits in bmma.A_BITS:
      e = check(m, n, k, a_bits)
      worst = max(worst, e)
      print(f"bmma M={m:3d} N={n:4d} K={k:5d} W6A{a_bits}: max error {e:.3f} x tolerance {'ok' if e <= 1 else 'FAIL'}")
  return 0 if worst <= 1 else 1


if __name__ == "__main__":
  sys.exit(main())
