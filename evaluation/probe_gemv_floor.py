"""Probe (issue 14): what one launch of the batch-1 decode GEMV can reach, by the profiler's device time.

For each layer shape it times, on the same weight bytes:
  gemv cold   the CUDA GEMV (quantizer inside) over weight buffers rotated so that L2 never holds them;
  gemv hot    the same GEMV called again and again on one buffer: the weights come from L2 where they fit;
  xla read    XLA's own reduction (max) over the same packed bytes, rotated: a plain read of those bytes
              as one launch, the rate a simple kernel reaches at this size;
and once a launch of the smallest GEMV (N 256, K 512): the fixed cost of a launch with almost no bytes.
With --bmma, the BMMA kernel at M = 1 instead (bitplanes_g4 weights, rotated), the whole op (activation
planes + GEMM) and the GEMM kernel alone, for each M = 1 variant (flexq_jax.cuda.bmma.M1_ROWS_VARIANTS).
If `gemv hot` is no faster than `gemv cold`, the GEMV's time over its bytes is not spent waiting on HBM;
if `xla read` is as slow as `gemv cold`, the HBM floor at 4.3 TB/s is out of reach at that size for
any single launch. GPU only; prints one line per shape, then a markdown table.

    python -m evaluation.probe_gemv_floor [--shapes 7b.o,7b.qkv,7b.down,7b.gate_up2,70b.o,70b.down]
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from evaluation import kernel_bench as kb
from flexq_jax import formats
from flexq_jax.cuda import bmma
from flexq_jax.cuda import gemv as cuda_gemv


def _device_us(op, x, bufs, match: str | None) -> float:
  """Mean device us a call of op: the kernels whose name holds `match` (all kernels when None)."""
  iters = 10
  rows = kb.kernel_times(op, x, bufs, iters=iters)
  picked = [(n, us) for name, n, us in rows if match is None or match in name]
  if not picked:
    raise RuntimeError(f"no kernel named like {match!r} among {[r[0][:40] for r in rows]}")
  return sum(n * us for n, us in picked) / (iters * len(bufs))


def _read(x, p, s):
  del x
  return (jnp.max(p.reshape(-1)).astype(jnp.float32) + jnp.max(s.reshape(-1)).astype(jnp.float32)).reshape(1, 1)


def _shape(name: str) -> tuple[str, tuple[int, int]]:
  named = {**kb.SHAPES, **kb.FUSED_SHAPES}
  if name in named:
    return name, named[name]
  try:
    n, k = (int(v) for v in name.split("x"))
  except ValueError:
    raise SystemExit(f"--shapes: {name!r} is neither a shape name ({', '.join(named)}) nor NxK") from None
  return name, (n, k)


def _layer(key, n: int, k: int, layout: str = "pallas6"):
  """(x bf16 [1, K], weight buffers [(packed, fp16 scales)] in `layout`, rotated so that L2 never holds them,
  bytes of one buffer, their floor in us at 4.3 TB/s)."""
  pack = jax.jit(formats.pack, static_argnums=(1, 2, 3))
  bufs = [(p if layout == "pallas6" else pack(q, 6, layout, k), s)
          for p, s, q in kb._our_weights(key, n, k, kb._n_bufs(int(n * k * 0.75)))]
  nbytes = sum(a.size * a.dtype.itemsize for a in bufs[0])
  return jax.random.normal(key, (1, k), jnp.bfloat16), bufs, nbytes, nbytes / 4.3e12 * 1e6


def _bmma(shapes, a_bits: int, variants) -> None:
  key = jax.random.key(0)
  rows = []
  for name, (n, k) in shapes:
    x, bufs, _, floor = _layer(key, n, k, "bitplanes_g4")
    times = {}
    for variant in variants:
      op = functools.partial(bmma.bmma_matmul, a_bits=a_bits, k=k, m1_rows=variant)
      times[variant] = (_device_us(op, x, bufs, None), _device_us(op, x, bufs, "bmma_decode"))
      print(f"probe bmma {name} A{a_bits} {bmma.M1_ROWS_VARIANTS[variant]}: op {times[variant][0]:.1f} us, "
            f"GEMM {times[variant][1]:.1f} us; floor {floor:.1f}", flush=True)
    rows.append((name, n, k, floor, times))
  print("\nDevice us a call, the whole op (activation planes + GEMM) / the GEMM kernel alone:\n")
  print("| layer | N x K | A | floor us | " + " | ".join(bmma.M1_ROWS_VARIANTS[v] for v in variants) + " |")
  print("| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in variants) + " |")
  for name, n, k, floor, times in rows:
    print(f"| {name} | {n} x {k} | {a_bits} | {floor:.1f} | "
          + " | ".join(f"{times[v][0]:.1f} / {times[v][1]:.1f}" for v in variants) + " |")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--shapes", default="7b.o,7b.qkv,7b.down,7b.gate_up2,70b.o,70b.down",
                  help="comma list of kernel_bench shape names or NxK (e.g. 6144x4096)")
  ap.add_argument("--a-bits", type=int, choices=(6, 8), default=6)
  ap.add_argument("--bmma", action="store_true", help="time the BMMA kernel at M = 1 instead")
  ap.add_argument("--variants", default="0,1,2,3,4", help="--bmma: comma list of bmma_matmul's m1_rows variants")
  args = ap.parse_args()
  shapes = [_shape(name) for name in args.shapes.split(",")]
  if args.bmma:
    return _bmma(shapes, args.a_bits, [int(v) for v in args.variants.split(",")])
  key = jax.random.key(0)
  gemv = functools.partial(cuda_gemv.w6a_gemv, a_bits=args.a_bits, fused_quant=True)
  x0 = jax.random.normal(key, (1, 512), jnp.bfloat16)
  tiny = [(p, s) for p, s, _ in kb._our_weights(key, 256, 512, 2)]
  tiny_us = _device_us(gemv, x0, tiny, "gemv")
  print(f"probe tiny gemv 256x512: {tiny_us:.2f} us a launch", flush=True)
  rows = []
  for name, (n, k) in shapes:
    x, bufs, nbytes, floor = _layer(key, n, k)
    cold = _device_us(gemv, x, bufs, "gemv")
    hot = _device_us(gemv, x, [bufs[0]] * 4, "gemv")
    read = _device_us(_read, x, bufs, None)
    rows.append((name, n, k, nbytes / 1e6, floor, cold, hot, read))
    print(f"probe {name}: {nbytes / 1e6:.1f} MB, floor {floor:.1f} us; gemv cold {cold:.1f}, hot {hot:.1f}; "
          f"xla read {read:.1f} us ({nbytes / read / 1e6:.2f} TB/s)", flush=True)
  print("\n| layer | N x K | MB | floor at 4.3 TB/s, us | GEMV, L2 cold | GEMV, L2 hot | XLA read of the bytes | "
        "GEMV % of floor | read % of floor |")
  print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  for name, n, k, mb, floor, cold, hot, read in rows:
    print(f"| {name} | {n} x {k} | {mb:.1f} | {floor:.1f} | {cold:.1f} | {hot:.1f} | {read:.1f} | "
          f"{100 * floor / cold:.0f}% | {100 * floor / read:.0f}% |")
  print(f"\nW6A{args.a_bits}. Smallest GEMV (256 x 512), device time a launch: {tiny_us:.2f} us.")


if __name__ == "__main__":
  main()
