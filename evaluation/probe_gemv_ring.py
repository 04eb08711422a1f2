"""Probe (issue 14): device time of each launch of the CUDA decode GEMV, quantizer inside, with and without its
shared-memory weight ring, by the profiler (not the timed loop of kernel_bench, which also counts the gaps
between launches). GPU only; prints one line per kernel and variant.

    python -m evaluation.probe_gemv_ring [--shapes 7b.o,7b.qkv]
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from evaluation import kernel_bench as kb
from flexq_jax.cuda import gemv as cuda_gemv


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--shapes", default="7b.o,7b.qkv,7b.down")
  ap.add_argument("--rings", default="0,2,4")
  args = ap.parse_args()
  key = jax.random.key(0)
  for name in args.shapes.split(","):
    n, k = {**kb.SHAPES, **kb.FUSED_SHAPES}[name]
    x = jax.random.normal(key, (1, k), jnp.bfloat16)
    bufs = [(p, s) for p, s, _ in kb._our_weights(key, n, k, kb._n_bufs(int(n * k * 0.75)))]
    floor = kb.floor_bytes(1, n, k) / 4.3e12 * 1e6
    for ring in (int(r) for r in args.rings.split(",")):
      op = functools.partial(cuda_gemv.w6a_gemv, a_bits=6, fused_quant=True, ring=ring)
      for kernel, launches, us in kb.kernel_times(op, x, bufs):
        if "gemv" in kernel:
          print(f"probe {name:10s} ring {ring}: {us:6.1f} us a launch ({launches} launches; floor {floor:.1f} us) "
                f"{kernel[:70]}", flush=True)


if __name__ == "__main__":
  main()
