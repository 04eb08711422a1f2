"""One run of the small-M Mosaic GPU GEMM (pallas_kernels/w6a_gemm_mgpu_small.py) against the jnp
reference, for bisecting a failure on the GPU one configuration a process (a CUDA fault poisons the
process, so the reference is computed first and each configuration runs alone):

    python -m evaluation.probe_mgpu_small --m 16 --tile-t 16 --epilogue out_t

Prints one line: the configuration and "ok <max rel err>" or the error. Exit status 1 on a mismatch.
"""

import argparse
import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np

from flexq_jax import formats, numerics
from pallas_kernels import w6a_gemm_mgpu_small as ms


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--m", type=int, default=16)
  ap.add_argument("--n", type=int, default=4096)
  ap.add_argument("--k", type=int, default=4096)
  ap.add_argument("--a-bits", type=int, default=6, choices=(6, 8))
  ap.add_argument("--tile-t", type=int, default=None)
  ap.add_argument("--epilogue", default="smem_transpose")
  ap.add_argument("--schedule", default="serial")
  ap.add_argument("--steps", type=int, default=4, help="TMA ring depth")
  ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  args = ap.parse_args(argv)
  rng = np.random.default_rng(0)
  w = rng.standard_normal((args.n, args.k)).astype(np.float32) * 0.05
  q, s = numerics.quantize_weight(jnp.asarray(w), 6, 128)
  packed = formats.pack(q, 6, "pallas6", args.k)
  x = jnp.asarray(rng.standard_normal((args.m, args.k)) * 2, args.dtype)
  ref = np.asarray(numerics.reference_matmul(x, q, s, a_bits=args.a_bits), np.float32)  # before the kernel runs
  cfg = dataclasses.replace(ms.default_config(args.m), epilogue=args.epilogue, schedule=args.schedule,
                            max_concurrent_steps=args.steps, **({"tile_t": args.tile_t} if args.tile_t else {}))
  label = f"m={args.m} n={args.n} k={args.k} A{args.a_bits} {args.dtype} {cfg}"
  try:
    out = np.asarray(ms.w6a_gemm_small(x, packed, s, a_bits=args.a_bits, config=cfg), np.float32)
  except Exception as e:  # a diagnostic: say what failed
    print(f"{label}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
    return 1
  err = float(np.abs(out - ref).max() / max(float(np.abs(ref).max()), 1e-30))
  ok = np.isfinite(out).all() and err <= 2 ** -7
  print(f"{label}: {'ok' if ok else 'WRONG'} max err {err:.3g} of max |ref|", flush=True)
  if not ok:
    bad = np.argwhere(np.abs(out - ref) > 2 ** -7 * np.abs(ref).max())
    print(f"  {len(bad)} wrong elements; first {bad[:8].tolist()}; rows wrong {np.unique(bad[:, 0])[:20].tolist()}, "
          f"cols wrong {np.unique(bad[:, 1])[:20].tolist()}", flush=True)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
