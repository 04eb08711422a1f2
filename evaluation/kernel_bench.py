"""Kernel benchmark: the W6A6 / W6A8 linear layer against bf16 and int8 baselines on one GPU.

    python -m evaluation.kernel_bench [--quick] [--out-dir results/kernels]

For every (LLaMA-2 layer shape N x K, tokens M, activation bits) it times, in the same run:
  ours        pallas_kernels.w6a_matmul (activation quantization + GEMM + split-K sum: the op)
  Mosaic      pallas_kernels.w6a_gemm_mgpu (quantizer + weight unpack + int8 WGMMA GEMM), M >= 64, sm_90
  xla_bf16    jnp.dot of bf16 activations and bf16 weights
  xla_w8a8    XLA int8 dot with its own per-token activation quantization (per-channel weights)
  cublas_bf16 torch.nn.functional.linear in bf16 (cuBLAS), when torch is importable
  cublaslt_i8 torch._int_mm (cuBLASLt int8 -> int32; M padded to >= 32), GEMM only, when importable
and reports each one's median device time, our fraction of the HBM floor (bytes at 6.125 bits a
weight plus activations and outputs, over the fastest rate measured in this run: a device copy,
or the weight stream of a bf16 baseline at M <= 16) and our speedup over each baseline. Writes
<card>-<date>.{md,json,png} into --out-dir. --profile shape:M lists the op's kernels with their
device times (JAX profiler); --sweep times candidate tilings; --rerender redraws a saved run.

Timing. JAX: one jitted lax.fori_loop whose body calls the op once on each of several weight
buffers (rotated so that the L2 cache never holds the weights a call reads), each iteration's
input made to depend on the last output with an in-place one-element update, so that XLA can
neither hoist nor drop the calls; host time of the whole loop minus that of the same loop with
no calls, divided by the number of calls; median of several runs. torch: CUDA graph of the same
rotation, timed with CUDA events. Importing this module does not import torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from evaluation import baselines
from evaluation.tables import cell
from flexq_jax import backends, formats, numerics, tuning
from flexq_jax.cuda import bmma
from flexq_jax.cuda import gemm_small as cuda_small
from flexq_jax.cuda import gemv as cuda_gemv
from models import llama
from pallas_kernels import core
from pallas_kernels import decode_attention
from pallas_kernels import w6a_gemm_mgpu as mg
from pallas_kernels import w6a_gemm_mgpu_small as mgs
from pallas_kernels import w6a_matmul as wk

SHAPES = {  # name -> (N, K) of the LLaMA-2 linear layers (70B first: the targets are set there)
    "70b.qkv": (10240, 8192), "70b.o": (8192, 8192), "70b.gate_up": (28672, 8192), "70b.down": (8192, 28672),
    "7b.qkv": (12288, 4096), "7b.o": (4096, 4096), "7b.gate_up": (11008, 4096), "7b.down": (4096, 11008),
}
FUSED_SHAPES = {"70b.gate_up2": (57344, 8192), "7b.gate_up2": (22016, 4096)}  # gate and up as one GEMM (served)
M_ALL = (1, 4, 8, 16, 64, 256, 1024, 4096)
QUICK_M = (1, 16, 256, 4096)
L2_BYTES = 50 * 2 ** 20  # H100 / H200 L2 (50 / 60 MB): rotate at least 4x this much weight data
TARGET_LOOP_S = 4e-3  # device time of one timed loop


def _sync(tree) -> None:
  jax.block_until_ready(tree)


def _median_host_time(fn: Callable, args, reps: int) -> float:
  _sync(fn(*args))  # compile and warm up
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    _sync(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _loop(op: Callable, iters: int, with_calls: bool = True) -> Callable:
  """jit(x, bufs) -> runs op(x, *buf) for every buf, `iters` times, as described above."""

  def run(x, bufs):
    y0 = [jnp.zeros(s.shape, s.dtype) for s in (jax.eval_shape(op, x, *b) for b in bufs)] if with_calls else []

    def body(i, carry):
      x, ys = carry
      dep = ((ys[-1][0, 0] if with_calls else x[0, 0]).astype(jnp.float32) * 0).astype(x.dtype)
      x = x.at[0, 0].add(dep)  # one element, in place: the calls of this iteration wait for it
      return x, [op(x, *b) for b in bufs] if with_calls else ys

    return jax.lax.fori_loop(0, iters, body, (x, y0))

  return jax.jit(run)


def time_jax(op: Callable, x: jax.Array, bufs: list, est_s: float, reps: int = 5) -> float:
  """Median device seconds of one op(x, *buf) call (see the module docstring)."""
  iters = int(min(200, max(2, math.ceil(TARGET_LOOP_S / (est_s * len(bufs))))))
  total = _median_host_time(_loop(op, iters), (x, bufs), reps)
  empty = _median_host_time(_loop(op, iters, with_calls=False), (x, bufs), reps)
  return max(total - empty, 1e-9) / (iters * len(bufs))


def traced_kernels(run: Callable[[], object]) -> dict[str, list[float]]:
  """{kernel name: [device us of each launch]} of the GPU kernels `run()` launches (jax.profiler)."""
  import glob
  import tempfile
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      _sync(run())
    data = jax.profiler.ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
  totals: dict[str, list[float]] = {}
  lines = [line for plane in data.planes if plane.name.startswith("/device:GPU") for line in plane.lines]
  streams = [line for line in lines if "stream" in line.name.lower()] or lines
  for line in streams:
    for ev in line.events:
      totals.setdefault(ev.name, []).append(ev.duration_ns / 1e3)
  return totals


def kernel_times(op: Callable, x: jax.Array, bufs: list, iters: int = 10) -> list[tuple[str, int, float]]:
  """(kernel name, launches, mean device us) of every GPU kernel of the timed loop, by the profiler."""
  fn = _loop(op, iters)
  _sync(fn(x, bufs))
  totals = traced_kernels(lambda: fn(x, bufs))
  rows = [(name, len(d), sum(d) / len(d)) for name, d in totals.items()]
  return sorted(rows, key=lambda r: -r[1] * r[2])


def time_torch(fn: Callable, bufs: list, est_s: float, reps: int = 5) -> float:
  """Median device seconds of fn(buf) over a CUDA graph of the rotation, by CUDA events."""
  import torch
  calls = int(min(400, max(len(bufs), math.ceil(TARGET_LOOP_S / est_s))))
  stream = torch.cuda.Stream()
  stream.wait_stream(torch.cuda.current_stream())
  with torch.cuda.stream(stream):
    for b in bufs:  # warm up (cuBLAS handles, heuristics) outside the capture
      fn(b)
  torch.cuda.current_stream().wait_stream(stream)
  torch.cuda.synchronize()
  graph = torch.cuda.CUDAGraph()
  with torch.cuda.graph(graph):
    for i in range(calls):
      fn(bufs[i % len(bufs)])
  graph.replay()
  torch.cuda.synchronize()
  times = []
  for _ in range(reps):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    times.append(start.elapsed_time(end) * 1e-3 / calls)
  del graph
  return statistics.median(times)


def copy_bandwidth(use_torch: bool) -> dict[str, float]:
  """Device copy bandwidth in bytes/s (bytes read + written) of a 1 GiB array: JAX, and torch."""
  x = jnp.ones((2 ** 28,), jnp.float32)
  fn = jax.jit(lambda a: jax.lax.fori_loop(0, 10, lambda i, a: a * 1.0000001, a))
  out = {"jax": 10 * 2 * x.nbytes / _median_host_time(fn, (x,), 5)}
  del x
  if use_torch:
    import torch
    src = torch.empty(2 ** 28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    out["torch"] = 2 * src.nbytes / time_torch(lambda _: dst.copy_(src), [None], 2 * src.nbytes / 4e12)
    del src, dst
    torch.cuda.empty_cache()
  return out


def torch_available() -> bool:
  try:
    import torch
    return torch.cuda.is_available()
  except ImportError:
    return False


def _n_bufs(bytes_per_buf: int) -> int:
  return int(min(8, max(2, math.ceil(4 * L2_BYTES / bytes_per_buf))))


def floor_bytes(m: int, n: int, k: int) -> float:
  """Fewest HBM bytes of the op: 6.125-bit weights, bf16 activations in and outputs out."""
  return n * k * 6.125 / 8 + 2 * m * k + 2 * m * n


@dataclasses.dataclass
class Case:
  shape: str
  n: int
  k: int
  m: int
  a_bits: int
  ours_us: float = float("nan")
  floor_us: float = float("nan")
  xla_bf16_us: float = float("nan")
  xla_w8a8_us: float = float("nan")
  cublas_bf16_us: float = float("nan")
  cublaslt_i8_us: float = float("nan")
  rel_err: float = float("nan")
  config: str = ""
  bmma_us: float = float("nan")  # the CUDA BMMA kernel (flexq_jax.cuda), where it builds and runs
  bmma_rel_err: float = float("nan")
  mgpu_us: float = float("nan")  # the Mosaic GPU GEMM (quantizer + weight unpack + GEMM), sm_90, M >= MGPU_MIN_M
  mgpu_rel_err: float = float("nan")
  mgpu_w8a8_us: float = float("nan")  # the same Mosaic kernel on "pallas8" weights, A8 (the W8A8 baseline)

  @property
  def floor_frac(self) -> float:
    return self.floor_us / self.ours_us

  def speedup(self, name: str) -> float:
    return getattr(self, f"{name}_us") / self.ours_us

  @property
  def tops(self) -> float:
    return 2 * self.m * self.n * self.k / (self.ours_us * 1e-6) / 1e12


def _our_weights(key, n: int, k: int, count: int, layout: str = "pallas6"):
  """count random layers [(packed in `layout`, fp16 scales, int8 q)], distinct draws each: W6, or
  W8 for the "pallas8" layout."""
  bits = 8 if layout == "pallas8" else 6
  lo, hi = core.qrange(bits)
  bufs = []
  for i in range(count):
    kq, ks = jax.random.split(jax.random.fold_in(key, i))
    q = jax.random.randint(kq, (n, core.padded_k(k)), lo, hi + 1, jnp.int32).astype(jnp.int8)
    s = (jax.random.uniform(ks, (n, core.padded_k(k) // 128), minval=0.5, maxval=1.5) * 2e-3).astype(jnp.float16)
    bufs.append((jax.jit(formats.pack, static_argnums=(1, 2, 3))(q, bits, layout, k), s, q))
  return bufs


def _bench_w6(op, x, n, k, a_bits, key, layout: str, check: bool) -> tuple[float, float]:
  """(seconds per call, relative error against the contract's numbers) of op(x, packed, scales)."""
  m = x.shape[0]
  bufs = _our_weights(key, n, k, _n_bufs(int(n * k * 0.75)), layout)
  rel = float("nan")
  if check:
    p, s, q = bufs[0]
    y = op(x, p, s).astype(jnp.float32)
    ref = numerics.dequant_matmul(x, q, s, a_bits=a_bits).astype(jnp.float32)
    rel = float(jnp.linalg.norm(y - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-30))
    rel = rel if np.isfinite(rel) else float("inf")
  est = max(floor_bytes(m, n, k) / 3e12, 2 * m * n * k / 5e14)
  return time_jax(op, x, [(p, s) for p, s, _ in bufs], est), rel


def bench_ours(x, n, k, a_bits, key, config=None, check=True) -> tuple[float, float]:
  """(seconds per call, relative error against the contract's numbers) of w6a_matmul."""
  op = lambda x, p, s: wk.w6a_matmul(x, p, s, a_bits=a_bits, config=config)
  return _bench_w6(op, x, n, k, a_bits, key, "pallas6", check)


def bmma_available(log=print) -> bool:
  """Whether the BMMA library builds and loads here (reports why not)."""
  try:
    bmma._register()
    return True
  except Exception as e:  # no nvcc, no GPU, a build error: the column stays empty, the run goes on
    log(f"BMMA kernel unavailable ({type(e).__name__}: {str(e)[:300]}); its column stays empty")
    return False


def bench_bmma(x, n, k, a_bits, key, check=True) -> tuple[float, float]:
  """(seconds per call, relative error against the contract) of flexq_jax.cuda.bmma_matmul."""
  op = lambda x, p, s: bmma.bmma_matmul(x, p, s, a_bits=a_bits, k=k)
  return _bench_w6(op, x, n, k, a_bits, key, "bitplanes_g4", check)


def bench_xla(x, n, k, key) -> tuple[float, float]:
  """(bf16 dot, int8 W8A8 dot) seconds per call through XLA."""
  m = x.shape[0]
  est_bf16 = max((2 * n * k + 2 * m * k + 2 * m * n) / 3e12, 2 * m * n * k / 6e14)
  bf = [(jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.bfloat16),)
        for i in range(_n_bufs(2 * n * k))]
  t_bf16 = time_jax(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype), x, bf, est_bf16)
  del bf
  i8 = [(jax.random.randint(jax.random.fold_in(key, 100 + i), (k, n), -127, 128, jnp.int32).astype(jnp.int8),
         jax.random.uniform(jax.random.fold_in(key, 200 + i), (n,), jnp.float32, 1e-3, 2e-3))
        for i in range(_n_bufs(n * k))]

  t_i8 = time_jax(baselines.int8_matmul, x, i8, est_bf16 / 2)
  return t_bf16, t_i8


def bench_torch(m: int, n: int, k: int) -> tuple[float, float]:
  """(cuBLAS bf16 linear, cuBLASLt int8 _int_mm with M padded to >= 32) seconds per call."""
  import torch
  est = max((2 * n * k) / 3e12, 2 * m * n * k / 6e14)
  x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
  ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(_n_bufs(2 * n * k))]
  t_bf16 = time_torch(lambda w: torch.nn.functional.linear(x, w), ws, est)
  del ws
  mp = max(32, -(-m // 8) * 8)
  xi = torch.randint(-127, 128, (mp, k), device="cuda", dtype=torch.int8)
  wi = [torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8).t() for _ in range(_n_bufs(n * k))]
  t_i8 = time_torch(lambda w: torch._int_mm(xi, w), wi, est / 2)
  del wi
  torch.cuda.empty_cache()
  return t_bf16, t_i8


def profile_ours(name: str, m: int, log=print) -> list[dict]:
  """Per-kernel device times (quantization, GEMM, split-K sum) of the op the pallas backend runs at this
  M (the card's table: Triton, Mosaic or CUDA), W6A6, by the profiler."""
  n, k = {**SHAPES, **FUSED_SHAPES}[name]
  key = jax.random.key(2)
  x = jax.random.normal(key, (m, k), jnp.bfloat16)
  bufs = [b[:2] for b in _our_weights(key, n, k, 2)]
  rows = []
  table_kernel = backends.PALLAS.kernel_for(m, w_bits=6, dtype=x.dtype, n=n, k=k)[0]
  try:
    for kname, count, us in kernel_times(lambda x, p, s: _dispatch(x, p, s, 6), x, bufs)[:5]:
      log(f"  profile {name} M={m} [{table_kernel}]: {us:9.2f} us x {count:4d}  {kname[:80]}")
      rows.append(dict(shape=name, m=m, table_kernel=table_kernel, kernel=kname, launches=count, mean_us=us))
  except Exception as e:  # a diagnostic: report and go on
    log(f"  profile failed: {type(e).__name__}: {str(e)[:200]}")
  return rows


MGPU_MIN_M = 64  # the Mosaic GPU GEMM's column is timed from this M (it pads M to 128-row tiles)


def _cases_with_baselines(shapes: list[str], ms: tuple[int, ...], key, use_torch: bool):
  """Yields (name, N, K, M, bf16 x [M, K], (XLA bf16 s, XLA int8 s, cuBLAS bf16 s, cuBLASLt int8 s))
  for every shape and M; the torch figures are NaN without torch."""
  for name in shapes:
    n, k = {**SHAPES, **FUSED_SHAPES}[name]
    for m in ms:
      x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.bfloat16)
      t_bf16, t_i8 = bench_xla(x, n, k, key)
      t_cb, t_ci8 = bench_torch(m, n, k) if use_torch else (float("nan"), float("nan"))
      yield name, n, k, m, x, (t_bf16, t_i8, t_cb, t_ci8)


def run_cases(shapes: list[str], ms: tuple[int, ...], a_bits_list: tuple[int, ...], use_torch: bool,
              bws: dict, a8_ms: tuple[int, ...] | None = None, log=print, use_bmma: bool = False):
  """Yields the Case of every (shape, M, a_bits), baselines included, as it is measured."""
  bw = max(bws.values())  # the floor uses the best copy rate seen
  key = jax.random.key(0)
  for name, n, k, m, x, (t_bf16, t_w8a8, t_cb, t_ci8) in _cases_with_baselines(shapes, ms, key, use_torch):
    for a_bits in a_bits_list:
      if a_bits == 8 and a8_ms is not None and m not in a8_ms:
        continue
      c = Case(name, n, k, m, a_bits, floor_us=floor_bytes(m, n, k) / bw * 1e6, xla_bf16_us=t_bf16 * 1e6,
               xla_w8a8_us=t_w8a8 * 1e6, cublas_bf16_us=t_cb * 1e6, cublaslt_i8_us=t_ci8 * 1e6,
               config=repr(wk.default_config(m, n, k)).replace("TileConfig", ""))
      t, c.rel_err = bench_ours(x, n, k, a_bits, key)
      c.ours_us = t * 1e6
      if use_bmma and x.dtype == jnp.bfloat16:
        try:
          t, c.bmma_rel_err = bench_bmma(x, n, k, a_bits, key)
          c.bmma_us = t * 1e6
        except Exception as e:  # report, keep the run
          log(f"  bmma failed: {type(e).__name__}: {str(e)[:300]}")
      if m >= MGPU_MIN_M and jax.devices()[0].compute_capability == "9.0":
        try:
          t, c.mgpu_rel_err = bench_mgpu(x, n, k, a_bits, key)
          c.mgpu_us = t * 1e6
          c.mgpu_w8a8_us = bench_mgpu(x, n, k, 8, key, check=False, layout="pallas8")[0] * 1e6
        except Exception as e:  # report, keep the run
          log(f"  mgpu failed: {type(e).__name__}: {str(e)[:300]}")
      yield c
      log(f"{name:11s} M={m:5d} W6A{a_bits}: ours {c.ours_us:9.1f} us ({100 * c.floor_frac:5.1f}% of floor "
          f"{c.floor_us:.1f})  bf16 xla {c.xla_bf16_us:.1f} cublas {c.cublas_bf16_us:.1f}  "
          f"int8 xla {c.xla_w8a8_us:.1f} cublaslt {c.cublaslt_i8_us:.1f}  err {c.rel_err:.1e}  "
          f"bmma {c.bmma_us:.1f} us (err {c.bmma_rel_err:.1e})  mosaic {c.mgpu_us:.1f} us "
          f"(x cuBLAS bf16 {c.cublas_bf16_us / c.mgpu_us:.2f}, err {c.mgpu_rel_err:.1e})")


def with_stream_ceiling(cases: list[Case], bws: dict) -> dict:
  """bws plus the fastest weight-streaming rate a bf16 baseline reached (M <= 16: its bytes / time).

  A copy kernel can undershoot what a GEMV streams (seen on an H200: a 1 GiB copy at 2.8-3.6
  TB/s while cuBLAS bf16 at M = 1 read its weights at 4.3 TB/s); the floor takes the fastest of
  all, and each case's floor_us is recomputed from it.
  """
  rates = [(2 * c.n * c.k + 2 * c.m * c.k + 2 * c.m * c.n) / (t * 1e-6) for c in cases if c.m <= 16
           for t in (c.cublas_bf16_us, c.xla_bf16_us) if np.isfinite(t)]
  out = dict(bws)
  if rates:
    out["bf16_gemv_stream"] = max(rates)
  bw = max(out.values())
  for c in cases:
    c.floor_us = floor_bytes(c.m, c.n, c.k) / bw * 1e6
  return out


def markdown(cases: list[Case], bws: dict, card: str, date: str, device: str | None = None) -> str:
  bws = with_stream_ceiling(cases, bws)
  bw = max(bws.values())
  device = device or jax.devices()[0].device_kind
  lines = [f"# W6A6 / W6A8 Pallas kernel benchmark: {card}, {date}", "",
           f"Device: {device}; jax {jax.__version__}. HBM ceiling {bw / 1e12:.2f} TB/s, the fastest of the "
           "rates measured in this run (copies count read + write; bf16_gemv_stream = bytes a bf16 baseline "
           "streamed at M <= 16 over its time): "
           + ", ".join(f"{k} {v / 1e12:.2f}" for k, v in bws.items()) + ". Times are median device microseconds per call; `ours` "
           "includes the activation quantization kernel and the split-K sum. floor = bytes at 6.125 "
           "bits/weight + bf16 activations and outputs over the HBM ceiling. cuBLASLt int8 is "
           "torch._int_mm alone (no activation quantization, M padded to >= 32).", "",
           "| layer | N x K | M | W6A | ours us | % floor | xla bf16 | xla w8a8 | cuBLAS bf16 | cuBLASLt i8 | "
           "x xla bf16 | x xla w8a8 | x cuBLAS bf16 | x cuBLASLt i8 | TOPS | rel err | BMMA us | BMMA % floor | "
           "BMMA rel err | Mosaic us | Mosaic x cuBLAS bf16 | Mosaic x xla w8a8 | Mosaic TOPS | Mosaic W8A8 us | "
           "Mosaic x its W8A8 |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
           "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for c in cases:
    lines.append(
        f"| {c.shape} | {c.n}x{c.k} | {c.m} | {c.a_bits} | {cell(c.ours_us, '.1f')} | {cell(100 * c.floor_frac, '.0f')} | "
        f"{cell(c.xla_bf16_us, '.1f')} | {cell(c.xla_w8a8_us, '.1f')} | {cell(c.cublas_bf16_us, '.1f')} | "
        f"{cell(c.cublaslt_i8_us, '.1f')} | {cell(c.speedup('xla_bf16'), '.2f')} | {cell(c.speedup('xla_w8a8'), '.2f')} | "
        f"{cell(c.speedup('cublas_bf16'), '.2f')} | {cell(c.speedup('cublaslt_i8'), '.2f')} | {cell(c.tops, '.0f')} | "
        f"{cell(c.rel_err, '.1e')} | {cell(c.bmma_us, '.1f')} | {cell(100 * c.floor_us / c.bmma_us, '.0f')} | "
        f"{cell(c.bmma_rel_err, '.1e')} | {cell(c.mgpu_us, '.1f')} | {cell(c.cublas_bf16_us / c.mgpu_us, '.2f')} | "
        f"{cell(c.xla_w8a8_us / c.mgpu_us, '.2f')} | {cell(2 * c.m * c.n * c.k / (c.mgpu_us * 1e-6) / 1e12, '.0f')} | "
        f"{cell(c.mgpu_w8a8_us, '.1f')} | {cell(c.mgpu_w8a8_us / c.mgpu_us, '.2f')} |")
  return "\n".join(lines) + "\n"


def plot(cases: list[Case], path: Path, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (a0, a1) = plt.subplots(1, 2, figsize=(12, 4.5))
  for name in dict.fromkeys(c.shape for c in cases):
    cs = sorted((c for c in cases if c.shape == name and c.a_bits == min(x.a_bits for x in cases)), key=lambda c: c.m)
    ms = [c.m for c in cs]
    a0.plot(ms, [100 * c.floor_frac for c in cs], marker="o", label=name)
    a1.plot(ms, [c.speedup("cublas_bf16") if np.isfinite(c.cublas_bf16_us) else c.speedup("xla_bf16") for c in cs],
            marker="o", label=name)
  for ax, ylabel in ((a0, "% of HBM floor"), (a1, "speedup over cuBLAS bf16 (XLA bf16 without torch)")):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("M (tokens)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
  a1.axhline(1.0, color="k", lw=0.8)
  a0.legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _sweep_cases(shapes: list[str], ms: tuple[int, ...]):
  """Yields (shape name, N, K, M, bf16 x [M, K], default tiling, key) for the sweeps."""
  key = jax.random.key(1)
  for name in shapes:
    n, k = {**SHAPES, **FUSED_SHAPES}[name]
    for m in ms:
      yield name, n, k, m, jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.bfloat16), \
          wk.default_config(m, n, k), key


def _time_quantizer(x, cfg) -> float:
  """Seconds per call of the activation quantization kernel alone (W6A6 scales)."""
  return time_jax(lambda x: wk.quantize_activations(x, a_bits=6, config=cfg)[0], x, [()], 2e-6)

def _time_tiling(x, n, k, key, cfg, log) -> tuple[float, float]:
  """(us, relative error) of w6a_matmul W6A6 with tiling cfg; NaNs where the compiler rejects it."""
  try:
    t, err = bench_ours(x, n, k, 6, key, config=cfg, check=True)
    return t * 1e6, err
  except Exception as e:  # a tiling the compiler rejects: report, go on
    log(f"  failed: {type(e).__name__}: {str(e)[:300]}")
    return float("nan"), float("nan")

def sweep(shapes: list[str], ms: tuple[int, ...], configs: list[wk.TileConfig], log=print) -> list[dict]:
  """Times each tiling on each case (W6A6); for choosing default_config."""
  rows = []
  for name, n, k, m, x, cfg0, key in _sweep_cases(shapes, ms):
    qx, sx, xs = wk.quantize_activations(x, a_bits=6, config=cfg0)
    t_q = _time_quantizer(x, cfg0)
    t_g = time_jax(lambda qx, p, s: wk.gemm(qx, sx, xs, p, s, m=m, out_dtype=jnp.bfloat16, config=cfg0), qx,
                   [b[:2] for b in _our_weights(key, n, k, _n_bufs(int(n * k * 0.75)))], 1e-5)
    log(f"breakdown {name:11s} M={m:5d} default: quantize {t_q * 1e6:.1f} us, gemm (+ split-K sum) {t_g * 1e6:.1f} us")
    rows += profile_ours(name, m, log)
    for cfg in [None, *configs]:
      us, err = _time_tiling(x, n, k, key, cfg, log)
      label = "default " + repr(cfg0) if cfg is None else repr(cfg)
      label = label.replace("TileConfig", "")
      rows.append(dict(shape=name, m=m, us=us, err=err, config=label))
      log(f"sweep {name:11s} M={m:5d} {us:9.1f} us err {err:.1e} {label}")
  return rows


def bench_mgpu(x, n, k, a_bits, key, config=None, check=True, layout: str = "pallas6") -> tuple[float, float]:
  """(seconds per call, relative error) of the Mosaic GPU GEMM (quantizer + weight unpack + GEMM);
  layout "pallas8": the same kernel on 8-bit weights (the W8A8 baseline)."""
  op = lambda x, p, s: mg.w6a_gemm(x, p, s, a_bits=a_bits, config=config)
  return _bench_w6(op, x, n, k, a_bits, key, layout, check)


MGPU_CONFIGS = (mg.GemmConfig(), mg.GemmConfig(schedule="overlap", pin=False))  # the default; the one before


def sweep_mgpu(shapes: list[str], ms: tuple[int, ...], configs, use_torch: bool, log=print) -> list[dict]:
  """The Mosaic GPU GEMM's tilings against cuBLAS bf16, XLA's bf16 and int8 dots and the Triton
  kernel, side by side on each case (W6A6), with the op's parts timed alone for the first tiling."""
  rows = []
  key = jax.random.key(3)
  for name, n, k, m, x, (t_bf16, t_i8, t_cb, _) in _cases_with_baselines(shapes, ms, key, use_torch):
    base = t_cb if np.isfinite(t_cb) else t_bf16
    row = dict(shape=name, n=n, k=k, m=m, cublas_bf16_us=t_cb * 1e6, xla_bf16_us=t_bf16 * 1e6,
               xla_w8a8_us=t_i8 * 1e6)
    try:
      t, err = bench_ours(x, n, k, 6, key)
      row.update(triton_us=t * 1e6, triton_err=err)
    except Exception as e:  # report, go on
      log(f"  triton failed: {type(e).__name__}: {str(e)[:200]}")
    cfg0 = configs[0]
    mp, np_ = mg.padded(m, n, cfg0)
    qcfg = wk.TileConfig(block_m=cfg0.cta_tile[0], join_phases=False)
    bufs = _our_weights(key, n, k, _n_bufs(int(n * k * 0.75)))
    qx, sx, _ = wk.quantize_activations(x, a_bits=6, config=qcfg)
    row["quantize_us"] = time_jax(lambda x: wk.quantize_activations(x, a_bits=6, config=qcfg)[0], x, [()], 1e-5) * 1e6
    row["unpack_us"] = time_jax(lambda x, p: wk.unpack_phase_major(p, np_), x, [b[:1] for b in bufs], 1e-5) * 1e6
    w8 = [(wk.unpack_phase_major(p, np_), jnp.pad(s.astype(jnp.float32), ((0, np_ - n), (0, 0))).T)
          for p, s, _ in bufs[:2]]
    row["gemm_only_us"] = time_jax(lambda q, w, st: mg.gemm(q, sx.T, w, st, out_dtype=jnp.bfloat16, config=cfg0),
                                   qx, w8, 2 * m * n * k / 8e14) * 1e6
    del w8
    for i, cfg in enumerate(configs):
      try:
        t, err = bench_mgpu(x, n, k, 6, key, config=cfg)
        row[f"mgpu{i}_us"], row[f"mgpu{i}_err"] = t * 1e6, err
      except Exception as e:  # a tiling the compiler rejects: report, go on
        log(f"  mgpu{i} failed: {type(e).__name__}: {str(e)[:300]}")
    rows.append(row)
    tops = lambda us: 2 * m * n * k / (us * 1e-6) / 1e12
    best = min((row[f"mgpu{i}_us"], i) for i in range(len(configs)) if f"mgpu{i}_us" in row) if any(
        f"mgpu{i}_us" in row for i in range(len(configs))) else (float("nan"), -1)
    log(f"{name:12s} M={m:5d} cuBLAS bf16 {row['cublas_bf16_us']:8.1f}  xla bf16 {row['xla_bf16_us']:8.1f}  "
        f"xla i8 {row['xla_w8a8_us']:8.1f}  triton {row.get('triton_us', float('nan')):8.1f}  | mgpu "
        + " ".join(f"{row.get(f'mgpu{i}_us', float('nan')):8.1f}" for i in range(len(configs)))
        + f" | best {best[1]} x bf16 {base * 1e6 / best[0]:.2f} ({tops(best[0]):.0f} TOPS) | parts: quantize "
        f"{row['quantize_us']:.1f} unpack {row['unpack_us']:.1f} gemm {row['gemm_only_us']:.1f} "
        f"({tops(row['gemm_only_us']):.0f} TOPS) | err {row.get('mgpu0_err', float('nan')):.1e}")
  return rows


PROBE_CONFIGS = (  # the Mosaic GEMM's scaling variants and the timing probes that break the contract
    mg.GemmConfig(), mg.GemmConfig(schedule="overlap"), mg.GemmConfig(schedule="overlap", pin=False),
    mg.GemmConfig(schedule="serial"), mg.GemmConfig(convert="init"),
    mg.GemmConfig(scaling="convert"), mg.GemmConfig(scaling="none"))


def probe_mgpu(shapes: list[str], ms: tuple[int, ...], configs, use_torch: bool, dump_dir: str | None,
               log=print) -> list[dict]:
  """The GEMM alone (prepared int8 operands) under each config, against cuBLAS bf16 and XLA's int8
  dot: what the per-group scaling costs ("convert": sums converted, not scaled; "none": one int32 sum
  over K). With dump_dir, Mosaic GPU writes each config's PTX, ptxas report and SASS (first case) to
  dump_dir/cfg<i>/."""
  import os
  rows = []
  key = jax.random.key(5)
  for ci, (name, n, k, m, x, (t_bf16, t_i8, t_cb, t_ci8)) in enumerate(_cases_with_baselines(shapes, ms, key, use_torch)):
    base = t_cb if np.isfinite(t_cb) else t_bf16
    row = dict(shape=name, n=n, k=k, m=m, cublas_bf16_us=t_cb * 1e6, xla_bf16_us=t_bf16 * 1e6,
               xla_int8_us=t_i8 * 1e6, cublaslt_int8_us=t_ci8 * 1e6)
    ops = 2 * m * n * k
    for i, cfg in enumerate(configs):
      try:
        if dump_dir and ci == 0:
          d = Path(dump_dir) / f"cfg{i}"
          d.mkdir(parents=True, exist_ok=True)
          os.environ.update(MOSAIC_GPU_DUMP_TO=str(d), MOSAIC_GPU_DUMP_SASS="1", MOSAIC_GPU_DUMP_PTXAS="1",
                            MOSAIC_GPU_DUMP_PTX="1")
        mp, np_ = mg.padded(m, n, cfg)
        kp = -(-k // (128 * cfg.groups_per_step)) * 128 * cfg.groups_per_step
        kq = jax.random.fold_in(key, i)
        qx = jax.random.randint(kq, (mp, kp), -32, 32, jnp.int32).astype(jnp.int8)
        sx = jax.random.uniform(kq, (kp // 128, mp), jnp.float32, 0.5, 1.5)
        ws = [(jax.random.randint(jax.random.fold_in(kq, j), (np_, kp), -32, 32, jnp.int32).astype(jnp.int8),
               jax.random.uniform(jax.random.fold_in(kq, j), (kp // 128, np_), jnp.float32, 1e-3, 2e-3))
              for j in range(_n_bufs(np_ * kp))]
        t = time_jax(lambda q, w, st, cfg=cfg, sx=sx: mg.gemm(q, sx, w, st, out_dtype=jnp.bfloat16, config=cfg),
                     qx, ws, ops / 7e14)
        row[f"cfg{i}_us"] = t * 1e6
        del ws
      except Exception as e:  # report, go on
        log(f"  cfg{i} failed: {type(e).__name__}: {str(e)[:300]}")
      finally:
        for v in ("MOSAIC_GPU_DUMP_TO", "MOSAIC_GPU_DUMP_SASS", "MOSAIC_GPU_DUMP_PTXAS", "MOSAIC_GPU_DUMP_PTX"):
          os.environ.pop(v, None)
    rows.append(row)
    tops = lambda us: ops / (us * 1e-6) / 1e12
    log(f"{name:12s} M={m:5d} cuBLAS bf16 {row['cublas_bf16_us']:8.1f} ({tops(row['cublas_bf16_us']):4.0f}) "
        f"xla i8 {row['xla_int8_us']:8.1f} ({tops(row['xla_int8_us']):4.0f}) | "
        + " ".join(f"cfg{i} {row.get(f'cfg{i}_us', float('nan')):7.1f} ({tops(row.get(f'cfg{i}_us', float('nan'))):4.0f}, "
                   f"{base * 1e6 / row.get(f'cfg{i}_us', float('nan')):.2f}x)" for i in range(len(configs))))
  return rows


GEMV_TILES = (  # (block_n, num_warps, block_kg, split_k, prefetch)
    (64, 2, 4, 4, False), (64, 2, 4, 8, False), (64, 2, 4, 16, False), (64, 2, 4, 4, True), (64, 2, 4, 8, True),
    (64, 2, 2, 8, True), (64, 2, 2, 16, True), (64, 4, 8, 4, False), (64, 4, 8, 8, False), (64, 4, 4, 8, True),
    (32, 2, 4, 4, False), (32, 2, 8, 8, False), (32, 2, 4, 8, True), (32, 1, 4, 8, True), (128, 4, 4, 4, True),
    (128, 4, 4, 2, False))


def gemv_candidates(m: int, n: int, k: int, full: bool) -> list[wk.TileConfig]:
  """Decode (gemv) tilings to time (GEMV_TILES, fewer when not full), split_k capped so that every
  split keeps at least one step of block_kg groups."""
  groups = core.padded_k(k) // 128
  tiles = GEMV_TILES if full else [t for i, t in enumerate(GEMV_TILES) if i in (0, 1, 3, 4, 5, 9)]
  cands = [wk.TileConfig(gemv=True, block_n=bn, num_warps=nw, block_kg=kg, split_k=max(1, min(sk, groups // kg)),
                         num_stages=1, prefetch=pf) for bn, nw, kg, sk, pf in tiles]
  return list(dict.fromkeys(c for c in cands if groups // c.split_k >= c.block_kg or c.split_k == 1))


def sweep_gemv(shapes: list[str], ms: tuple[int, ...], log=print) -> list[dict]:
  """Times the mma default and gemv tilings on every (shape, M) (W6A6), the quantization kernel alone,
  and prints the best of each case last."""
  rows = []
  for name, n, k, m, x, cfg0, key in _sweep_cases(shapes, ms):
    log(f"{name:11s} M={m:3d} quantize kernel alone {_time_quantizer(x, cfg0) * 1e6:.2f} us")
    floor = floor_bytes(m, n, k) / 4.3e12 * 1e6
    for cfg in [cfg0, *gemv_candidates(m, n, k, full=m == 1)]:
      us, err = _time_tiling(x, n, k, key, cfg, log)
      label = repr(cfg).replace("TileConfig", "")
      rows.append(dict(shape=name, m=m, us=us, err=err, config=label, floor_frac=floor / us))
      log(f"gemv-sweep {name:11s} M={m:3d} {us:8.1f} us {100 * floor / us:5.1f}% of floor@4.3TB/s err {err:.1e} {label}")
  log("== best per case (floor at 4.3 TB/s)")
  for name in shapes:
    for m in ms:
      cs = [r for r in rows if r["shape"] == name and r["m"] == m and np.isfinite(r["us"]) and r["err"] < 1e-2]
      mma = [r["us"] for r in rows if r["shape"] == name and r["m"] == m and "gemv=True" not in r["config"]]
      if cs:
        b = min(cs, key=lambda r: r["us"])
        log(f"| {name} | {m} | {b['us']:.1f} us | {100 * b['floor_frac']:.0f}% | mma {mma[0] if mma else float('nan'):.1f} us "
            f"| {b['config'][:150]} |")
  return rows


def compare_gemv_cuda(shapes: list[str], ms: tuple[int, ...], log=print) -> list[dict]:
  """Decode (M <= 8), W6A6 and W6A8, side by side in one run: the Pallas path (quantizer + Triton
  GEMV + split-K sum), the CUDA GEMV path (the same quantizer + flexq_jax/cuda/gemv.py, K split
  inside a block) and the CUDA GEMV with the quantizer inside (one kernel), each whole op against
  the contract (the last also with its shared-memory weight ring of 2, 4 and 8 stages at M <= 2; unroll 2 / 4
  and blocks of 16 / 32 warps were timed on 2026-12-02, results/kernels/h200-2026-12-02-gemv-cuda-warps.md), the
  CUDA GEMV alone on
  a quantized x, and the HBM floor (bytes at 6.125
  bits/weight over 4.3 TB/s)."""
  rows = []
  for name, n, k, m, x, cfg, key in _sweep_cases(shapes, tuple(v for v in ms if v <= cuda_gemv.MAX_M)):
    floor = floor_bytes(m, n, k) / 4.3e12 * 1e6
    for a_bits in (6, 8):
      row = dict(shape=name, n=n, k=k, m=m, a_bits=a_bits, floor_us=floor)
      for label, op in (("pallas", lambda x, p, s: wk.w6a_matmul(x, p, s, a_bits=a_bits)),
                        ("cuda", lambda x, p, s: cuda_gemv.w6a_gemv(x, p, s, a_bits=a_bits)),
                        ("cuda_xq", lambda x, p, s: cuda_gemv.w6a_gemv(x, p, s, a_bits=a_bits, fused_quant=True)),
                        *((f"cuda_xq_ring{r}", functools.partial(_ring_gemv, a_bits=a_bits, ring=r))
                          for r in cuda_gemv.RING_CHOICES[1:] if m <= cuda_gemv.RING_MAX_M)):
        try:
          t, err = _bench_w6(op, x, n, k, a_bits, key, "pallas6", check=True)
          row[f"{label}_us"], row[f"{label}_err"] = t * 1e6, err
        except Exception as e:  # report and go on: the first GPU run of the CUDA GEMV
          log(f"  {label} failed: {type(e).__name__}: {str(e)[:400]}")
          row[f"{label}_us"] = row[f"{label}_err"] = float("nan")
      try:
        qx, sx, xsum = wk.quantize_activations(x, a_bits=a_bits, config=cfg)
        alone = lambda x, p, s: cuda_gemv.gemv_pallas6(qx, sx, xsum, p, s, m=m)
        row["cuda_gemv_alone_us"] = _bench_w6(alone, x, n, k, a_bits, key, "pallas6", check=False)[0] * 1e6
      except Exception as e:
        log(f"  cuda gemv alone failed: {type(e).__name__}: {str(e)[:400]}")
        row["cuda_gemv_alone_us"] = float("nan")
      rows.append(row)
      log(f"gemv-cuda {name:11s} M={m} A{a_bits}: floor {floor:6.1f} us | pallas {row['pallas_us']:7.1f} us "
          f"(err {row['pallas_err']:.1e}) | cuda {row['cuda_us']:7.1f} us (err {row['cuda_err']:.1e}) | cuda gemv "
          f"alone {row['cuda_gemv_alone_us']:7.1f} us | cuda, quantizer inside {row['cuda_xq_us']:7.1f} us "
          f"(err {row['cuda_xq_err']:.1e}) | ring 2 / 4 / 8 stages "
          + " / ".join(f"{row.get(f'cuda_xq_ring{r}_us', float('nan')):.1f}" for r in cuda_gemv.RING_CHOICES[1:])
          + " us (err " + " / ".join(f"{row.get(f'cuda_xq_ring{r}_err', float('nan')):.1e}"
                                     for r in cuda_gemv.RING_CHOICES[1:]) + ")")
  return rows


def _ring_gemv(x, p, s, *, a_bits: int, ring: int):
  """The quantizer-inside CUDA GEMV with its weights through a shared-memory ring of `ring` stages."""
  return cuda_gemv.w6a_gemv(x, p, s, a_bits=a_bits, fused_quant=True, ring=ring)


def _timed_or_nan(label: str, op, x, n: int, k: int, a_bits: int, key, log, check: bool = True,
                  layout: str = "pallas6") -> tuple[float, float]:
  """(us per call, relative error) of op on weights in `layout`, or (nan, nan) with the failure logged:
  a kernel variant that fails to compile or run is reported and the comparison goes on."""
  try:
    t, err = _bench_w6(op, x, n, k, a_bits, key, layout, check=check)
    return t * 1e6, err
  except Exception as e:  # report and go on
    log(f"  {label} failed: {type(e).__name__}: {str(e)[:600]}")
    return float("nan"), float("nan")


def compare_mgpu_small(shapes: list[str], ms: tuple[int, ...], log=print) -> list[dict]:
  """Small M (decode batches), W6A6 and W6A8, side by side in one run: the small-M Mosaic GPU
  kernel (pallas_kernels/w6a_gemm_mgpu_small.py, weights unpacked in registers; its two
  schedules and two epilogues), the Triton kernel the pallas backend runs at these M today, XLA's bf16 dot (cuBLAS)
  and the HBM floor (weights at 6.125 bits over 4.3 TB/s). Whole ops, quantizer included."""
  rows = []
  for name, n, k, m, x, _, key in _sweep_cases(shapes, ms):
    floor = floor_bytes(m, n, k) / 4.3e12 * 1e6
    t_bf16 = bench_xla(x, n, k, key)[0] * 1e6
    for a_bits in (6, 8):
      row = dict(shape=name, n=n, k=k, m=m, a_bits=a_bits, floor_us=floor, bf16_us=t_bf16)
      for label, op in (("triton", lambda x, p, s: wk.w6a_matmul(x, p, s, a_bits=a_bits)),
                        ("small", lambda x, p, s: mgs.w6a_gemm_small(x, p, s, a_bits=a_bits)),
                        ("small_pingpong", lambda x, p, s: mgs.w6a_gemm_small(
                            x, p, s, a_bits=a_bits,
                            config=dataclasses.replace(mgs.default_config(m), schedule="pingpong", epilogue="out_t"))),
                        ("small_out_t", lambda x, p, s: mgs.w6a_gemm_small(
                            x, p, s, a_bits=a_bits,
                            config=dataclasses.replace(mgs.default_config(m), epilogue="out_t"))),
                        ("small_split", lambda x, p, s: mgs.w6a_gemm_small(
                            x, p, s, a_bits=a_bits, config=mgs.split_config(m, n, p.shape[1])))):
        row[f"{label}_us"], row[f"{label}_err"] = _timed_or_nan(label, op, x, n, k, a_bits, key, log)
      rows.append(row)
      log(f"mgpu-small {name:11s} M={m:4d} A{a_bits}: floor {floor:6.1f} | bf16 {t_bf16:7.1f} | triton "
          f"{row['triton_us']:7.1f} (err {row['triton_err']:.1e}) | small {row['small_us']:7.1f} (err "
          f"{row['small_err']:.1e}) | pingpong {row['small_pingpong_us']:7.1f} (err {row['small_pingpong_err']:.1e}) "
          f"| out_t {row['small_out_t_us']:7.1f} (err {row['small_out_t_err']:.1e}) "
          f"| split {row['small_split_us']:7.1f} (err {row['small_split_err']:.1e}) "
          f"| small x bf16 {t_bf16 / row['small_us']:.2f}, x triton {row['triton_us'] / row['small_us']:.2f}")
  return rows


# Our own W8A8 at each M runs on one kernel only where the other lost by ~2x in every row of the full run
# (results/kernels/raw/h200-2026-12-02-w8a8-cmp.log): the Triton kernel from M = 1024 (380 vs 197 us ... 2349 vs
# 1014), the large-M Mosaic kernel up to M = 64 (55.7 vs 32.0 ... 104 vs 51). Both run at M = 65-1023.
W8A8_TRITON_BELOW, W8A8_MOSAIC_ABOVE = 1024, 64


def compare_w8a8(shapes: list[str], ms: tuple[int, ...], use_torch: bool, log=print, on_row=None) -> list[dict]:
  """Issue 13's ratios side by side, whole ops (activation quantization included): what the pallas
  backend runs for W6A6 and W6A8 at each M (the card's table: the small-M Mosaic kernel, the large-M
  Mosaic kernel or the Triton kernels) against our own W8A8 on "pallas8" weights (the Triton kernel below
  W8A8_TRITON_BELOW, the large-M Mosaic kernel above W8A8_MOSAIC_ABOVE), cuBLAS bf16 (torch), cuBLASLt int8
  (torch._int_mm, no quantization) and XLA's bf16 and int8 dots. on_row(rows) after each row (a run cut
  short keeps what it measured)."""
  rows = []
  key = jax.random.key(5)
  pallas = backends.PALLAS
  nan = float("nan")
  for name, n, k, m, x, (t_bf16, t_i8, t_cb, t_ci8) in _cases_with_baselines(shapes, ms, key, use_torch):
    row = dict(shape=name, n=n, k=k, m=m, xla_bf16_us=t_bf16 * 1e6, xla_w8a8_us=t_i8 * 1e6,
               cublas_bf16_us=t_cb * 1e6, cublaslt_i8_us=t_ci8 * 1e6,
               kernel=pallas.kernel_for(m, w_bits=6, dtype=x.dtype, n=n, k=k)[0])
    for label, layout, a_bits, op, runs in (
        ("w6a6", "pallas6", 6, lambda x, p, s: _dispatch(x, p, s, 6), True),
        ("w6a8", "pallas6", 8, lambda x, p, s: _dispatch(x, p, s, 8), True),
        ("w8a8_triton", "pallas8", 8, lambda x, p, s: wk.w6a_matmul(x, p, s, a_bits=8), m < W8A8_TRITON_BELOW),
        ("w8a8_mosaic", "pallas8", 8, lambda x, p, s: mg.w6a_gemm(x, p, s, a_bits=8), m > W8A8_MOSAIC_ABOVE)):
      row[f"{label}_us"], row[f"{label}_err"] = (
          _timed_or_nan(label, op, x, n, k, a_bits, key, log, layout=layout) if runs else (nan, nan))
    row["w8a8_own_us"] = float(np.nanmin([row["w8a8_triton_us"], row["w8a8_mosaic_us"]]))
    rows.append(row)
    log(f"w8a8-cmp {name:11s} M={m:5d} [{row['kernel']}]: W6A6 {row['w6a6_us']:8.1f} (err {row['w6a6_err']:.0e}) "
        f"W6A8 {row['w6a8_us']:8.1f} | own W8A8 triton {row['w8a8_triton_us']:8.1f} mosaic {row['w8a8_mosaic_us']:8.1f} "
        f"| cuBLAS bf16 {row['cublas_bf16_us']:8.1f} cuBLASLt i8 {row['cublaslt_i8_us']:8.1f} xla bf16 "
        f"{row['xla_bf16_us']:8.1f} | W6A6 x cuBLAS {row['cublas_bf16_us'] / row['w6a6_us']:.2f} W6A8 x cuBLAS "
        f"{row['cublas_bf16_us'] / row['w6a8_us']:.2f} W6A6 x own W8A8 {row['w8a8_own_us'] / row['w6a6_us']:.2f}")
    if on_row is not None:
      on_row(rows)
  return rows


def w8a8_markdown(rows: list[dict], card: str, date: str) -> str:
  """Issue 13's closing table: every shape and M of a --w8a8-cmp run, times in us and the target ratios."""
  nan = float("nan")
  lines = [f"# W6A6 / W6A8 against cuBLAS bf16 and our own W8A8, whole ops ({card}, {date})", "",
           "Times in us (activation quantization included in ours); ratios are cuBLAS bf16 time over ours. "
           "`kernel`: what the pallas backend runs at that M. Own W8A8: the faster of our Triton and Mosaic "
           "kernels on \"pallas8\" weights (`-`: not timed at that M, see `W8A8_TRITON_BELOW` in "
           "evaluation/kernel_bench.py).", "",
           "| shape | N | K | M | kernel | W6A6 | W6A8 | own W8A8 (triton / mosaic) | cuBLAS bf16 | cuBLASLt i8 | "
           "XLA bf16 | XLA i8 | W6A6 x cuBLAS | W6A8 x cuBLAS | W6A6 x own W8A8 | W6A6 err |",
           "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for r in rows:
    lines.append(
        f"| {r['shape']} | {r['n']} | {r['k']} | {r['m']} | {r['kernel']} | {cell(r['w6a6_us'], '.1f')} | "
        f"{cell(r['w6a8_us'], '.1f')} | {cell(r['w8a8_triton_us'], '.1f')} / {cell(r['w8a8_mosaic_us'], '.1f')} | "
        f"{cell(r['cublas_bf16_us'], '.1f')} | {cell(r['cublaslt_i8_us'], '.1f')} | {cell(r['xla_bf16_us'], '.1f')} | "
        f"{cell(r['xla_w8a8_us'], '.1f')} | {cell(r['cublas_bf16_us'] / r['w6a6_us'], '.2f')} | "
        f"{cell(r['cublas_bf16_us'] / r['w6a8_us'], '.2f')} | "
        f"{cell(r.get('w8a8_own_us', nan) / r['w6a6_us'], '.2f')} | {cell(r['w6a6_err'], '.0e')} |")
  return "\n".join(lines) + "\n"


def compare_cuda_small(shapes: list[str], ms: tuple[int, ...], log=print) -> list[dict]:
  """The small-M CUDA GEMM (flexq_jax/cuda/gemm_small.py: mma.sync on "pallas6" weights) at each of its
  tiles-per-block settings, against what the pallas backend runs there now (the card's table), the
  Triton kernel, XLA's bf16 dot and the HBM floor, W6A6 and W6A8, whole ops (quantizer included),
  side by side."""
  rows = []
  for name, n, k, m, x, _, key in _sweep_cases(shapes, tuple(v for v in ms if v <= cuda_small.MAX_M)):
    floor = floor_bytes(m, n, k) / 4.3e12 * 1e6
    t_bf16 = bench_xla(x, n, k, key)[0] * 1e6
    for a_bits in (6, 8):
      row = dict(shape=name, n=n, k=k, m=m, a_bits=a_bits, floor_us=floor, bf16_us=t_bf16,
                 table_kernel=backends.PALLAS.kernel_for(m, w_bits=6, dtype=x.dtype, n=n, k=k)[0])
      ops = [("table", lambda x, p, s: _dispatch(x, p, s, a_bits)),
             ("triton", lambda x, p, s: wk.w6a_matmul(x, p, s, a_bits=a_bits))]
      ops += [(f"cuda_kt{kt}", lambda x, p, s, kt=kt: cuda_small.w6a_gemm_small_cuda(x, p, s, a_bits=a_bits,
                                                                                      tiles_per_block=kt))
              for kt in (1, 2, 4) if kt <= cuda_small.max_tiles_per_block(m) and (n // 16) % kt == 0]
      for label, op in ops:
        row[f"{label}_us"], row[f"{label}_err"] = _timed_or_nan(label, op, x, n, k, a_bits, key, log)
      rows.append(row)
      log(f"cuda-small {name:11s} M={m:3d} A{a_bits}: floor {floor:5.1f} bf16 {t_bf16:6.1f} | " + " | ".join(
          f"{lab} {row[lab + '_us']:6.1f} ({t_bf16 / row[lab + '_us']:.2f}x bf16, {100 * floor / row[lab + '_us']:.0f}% "
          f"floor, err {row[lab + '_err']:.0e})" for lab, _ in ops) + f" [table: {row['table_kernel']}]")
  return rows


def _dispatch(x, p, s, a_bits):
  """The pallas backend's kernel choice for this M (its table), on a stand-in layer of "pallas6" weights."""
  layer = types.SimpleNamespace(packed=p, scales=s, a_bits=a_bits, w_bits=6, out_features=s.shape[0],
                                in_features=x.shape[1])
  return backends.PALLAS.matmul(x, layer)


def small_candidates(m: int, n: int, groups: int, fused: tuple[bool, ...] = (False,),
                     extra_splits: tuple[int, ...] = (), persistent: bool = False,
                     stream_k: bool = False) -> list[tuple[str, "mgs.SmallConfig"]]:
  """Tilings of the small-M kernel worth timing at (M, N, K-groups): unsplit and split along K by
  split_for, by split_ragged's model (split_config(ragged=True)) and by each of extra_splits (any count: the
  kernel takes splits that do not divide the slots), each with 1, 2 and 4 groups a ring
  slot (where they divide the groups), ring depth 4 or the deepest that fits below it, with the
  TMAs of a slot separate and/or fused (SmallConfig.fused_tma; label suffix "/f"; fused tilings also read the fp16
  weight scales and take the quantizer's [G, 2, M] operand, SmallConfig.sw_f16 and quant_t, as the H200 table
  runs them since 2026-12-02), and with `persistent` each
  fused tiling also with one ring across a CTA's tiles where its depth divides the slots
  (SmallConfig.persistent, suffix "/p"); with `stream_k` also the stream-K tiling (SmallConfig.stream_k,
  stream_k_config, label "t<tile>/g<gps>/r<ring>/sk"). (Deeper rings than 4
  gained nothing at 1 group a slot, H200 2026-12-02: a step is not waiting on memory latency; the probes
  put most of its time in the TMA ring's own cost, results/kernels/NOTES.md.)"""
  base = mgs.default_config(m)
  splits = [1, mgs.split_config(m, n, groups).split_k, mgs.split_config(m, n, groups, ragged=True).split_k,
            *extra_splits]
  splits = [s for i, s in enumerate(splits) if s not in splits[:i] and s <= groups]
  out = []
  for split in splits:
    split_cfg = dataclasses.replace(base, split_k=split, epilogue="out_t" if split > 1 else base.epilogue)
    for f in fused:
      for gps in (1, 2, 4) if f or fused == (False,) else (1,):  # beside fused slots: the separate TMAs at 1 only
        if groups % gps or groups // gps < split:
          continue
        ring = min(4, mgs.max_ring(split_cfg.tile_t, mgs.out_itemsize(split_cfg, jnp.bfloat16), gps))
        if ring < 2:
          continue
        cfg = dataclasses.replace(split_cfg, max_concurrent_steps=ring, groups_per_step=gps, fused_tma=f, sw_f16=f,
                                  quant_t=f)
        out.append((f"t{cfg.tile_t}/g{gps}/r{ring}/s{split}" + ("/f" if f else ""), cfg))
        if persistent and f and mgs.persistent_fits(cfg, groups):
          out.append((out[-1][0] + "/p", dataclasses.replace(cfg, persistent=True)))
  if stream_k:
    cfg = dataclasses.replace(mgs.stream_k_config(m, groups), sw_f16=True, quant_t=True)
    out.append((f"t{cfg.tile_t}/g{cfg.groups_per_step}/r{cfg.max_concurrent_steps}/sk", cfg))
  return out


def sweep_mgpu_small(shapes: list[str], ms: tuple[int, ...], log=print, fused: tuple[bool, ...] = (False,),
                     extra_splits: tuple[int, ...] = (), persistent: bool = False, stream_k: bool = False) -> list[dict]:
  """The small-M kernel's tilings (small_candidates) against the Triton kernel and XLA's bf16 dot,
  W6A6, whole ops, side by side per shape and M."""
  rows = []
  for name, n, k, m, x, _, key in _sweep_cases(shapes, ms):
    floor = floor_bytes(m, n, k) / 4.3e12 * 1e6
    row = dict(shape=name, n=n, k=k, m=m, a_bits=6, floor_us=floor, bf16_us=bench_xla(x, n, k, key)[0] * 1e6)
    ops = [("triton", lambda x, p, s: wk.w6a_matmul(x, p, s, a_bits=6))]
    ops += [(label, lambda x, p, s, cfg=cfg: mgs.w6a_gemm_small(x, p, s, a_bits=6, config=cfg))
            for label, cfg in small_candidates(m, n, -(-k // 128), fused, extra_splits, persistent, stream_k)]
    for label, op in ops:
      us, err = _timed_or_nan(label, op, x, n, k, 6, key, log)
      row[label] = dict(us=us, err=err)
    rows.append(row)
    log(f"small-sweep {name:12s} M={m:4d}: floor {floor:5.1f} bf16 {row['bf16_us']:6.1f} | " + " | ".join(
        f"{lab} {row[lab]['us']:6.1f} ({row['bf16_us'] / row[lab]['us']:.2f}x, err {row[lab]['err']:.0e})"
        for lab, _ in ops))
  return rows


def probe_mgpu_small(shapes: list[str], ms: tuple[int, ...], log=print) -> list[dict]:
  """Where the small-M kernel's time goes: its default tiling (split along K where split_for splits)
  timed whole and under each SmallConfig.probe (the TMA ring alone, no unpack, no scaling; the
  probes' results are wrong, so unchecked), with each slot's TMAs separate and fused
  (SmallConfig.fused_tma, label suffix "/f"), at 1 and 2 groups a slot ("/g2"), W6A6."""
  rows = []
  for name, n, k, m, x, _, key in _sweep_cases(shapes, ms):
    cfg = mgs.split_config(m, n, -(-k // 128))
    row = dict(shape=name, n=n, k=k, m=m, config=str(cfg))
    labels = []
    for fused, gps in ((False, 1), (True, 1), (True, 2)):
      if (-(-k // 128) // cfg.split_k) % gps:
        continue
      for probe in ("", "tma_only", "no_unpack", "no_scale"):
        label = (probe or "whole") + ("/f" if fused else "") + ("/g2" if gps == 2 else "")
        c = dataclasses.replace(cfg, probe=probe, fused_tma=fused, groups_per_step=gps)
        op = lambda x, p, s, c=c: mgs.w6a_gemm_small(x, p, s, a_bits=6, config=c)
        row[label] = _timed_or_nan(f"probe {label}", op, x, n, k, 6, key, log, check=not probe)[0]
        labels.append(label)
    rows.append(row)
    log(f"small-probe {name:12s} M={m:4d} split {cfg.split_k}: " + " | ".join(f"{p} {row[p]:6.1f}" for p in labels))
  return rows


def gemv_cuda_markdown(rows: list[dict], card: str, date: str) -> str:
  lines = [f"# Decode GEMV, Pallas vs CUDA (flexq_jax/cuda/gemv.py): {card}, {date}", "",
           "Median device microseconds per call, whole ops (activation quantizer included), W6, against the "
           "contract (rel err); floor = bytes at 6.125 bits/weight + bf16 activations and outputs over 4.3 TB/s.", "",
           "| layer | N x K | M | A | floor us | Pallas us | Pallas % floor | CUDA us | CUDA % floor | CUDA x Pallas | "
           "CUDA GEMV alone us | CUDA quantizer inside us | its % floor | its x Pallas | Pallas err | CUDA err | "
           "CUDA quantizer inside err | its 16 warps us | % floor | 32 warps us | % floor | ring 2 us | % floor | "
           "ring 4 us | % floor | ring 8 us | % floor | ring err (max) |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
           "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  nan = float("nan")
  for r in rows:
    lines.append(f"| {r['shape']} | {r['n']}x{r['k']} | {r['m']} | {r['a_bits']} | {cell(r['floor_us'], '.1f')} | "
                 f"{cell(r['pallas_us'], '.1f')} | {cell(100 * r['floor_us'] / r['pallas_us'], '.0f')} | "
                 f"{cell(r['cuda_us'], '.1f')} | {cell(100 * r['floor_us'] / r['cuda_us'], '.0f')} | "
                 f"{cell(r['pallas_us'] / r['cuda_us'], '.2f')} | {cell(r['cuda_gemv_alone_us'], '.1f')} | "
                 f"{cell(r.get('cuda_xq_us', float('nan')), '.1f')} | "
                 f"{cell(100 * r['floor_us'] / r.get('cuda_xq_us', float('nan')), '.0f')} | "
                 f"{cell(r['pallas_us'] / r.get('cuda_xq_us', float('nan')), '.2f')} | "
                 f"{cell(r['pallas_err'], '.1e')} | {cell(r['cuda_err'], '.1e')} | "
                 f"{cell(r.get('cuda_xq_err', nan), '.1e')} | {cell(r.get('cuda_xq_w16_us', nan), '.1f')} | "
                 f"{cell(100 * r['floor_us'] / r.get('cuda_xq_w16_us', nan), '.0f')} | "
                 f"{cell(r.get('cuda_xq_w32_us', nan), '.1f')} | "
                 f"{cell(100 * r['floor_us'] / r.get('cuda_xq_w32_us', nan), '.0f')} | "
                 + "".join(f"{cell(r.get(f'cuda_xq_ring{g}_us', nan), '.1f')} | "
                           f"{cell(100 * r['floor_us'] / r.get(f'cuda_xq_ring{g}_us', nan), '.0f')} | " for g in cuda_gemv.RING_CHOICES[1:])
                 + f"{cell(max((e for g in cuda_gemv.RING_CHOICES[1:] if (e := r.get(f'cuda_xq_ring{g}_err', nan)) == e), default=nan), '.1e')} |")
  return "\n".join(lines) + "\n"


def rerender(json_path: str) -> None:
  """Rewrites the .md, .json and .png of a saved run (e.g. after a change to the floor's definition)."""
  path = Path(json_path)
  data = json.loads(path.read_text())
  names = {f.name for f in dataclasses.fields(Case)}
  cases = [Case(**{k: v for k, v in c.items() if k in names}) for c in data["cases"]]
  copies = {k: v for k, v in data["copy_bandwidth"].items() if k != "bf16_gemv_stream"}
  md = markdown(cases, copies, data["card"], data["date"], data["device"])
  path.with_suffix(".md").write_text(md)
  data["copy_bandwidth"] = with_stream_ceiling(cases, copies)
  data["cases"] = [dict(dataclasses.asdict(c), floor_frac=c.floor_frac, tops=c.tops) for c in cases]
  path.write_text(json.dumps(data, indent=1))
  plot(cases, path.with_suffix(".png"), f"W6A6/W6A8 Pallas kernels, {data['card']}, {data['date']}")
  print(md)


ATTENTION_CONFIGS = ((64, 4, 1), (32, 4, 1), (128, 4, 1), (64, 8, 1), (128, 8, 1), (64, 4, 2), (32, 2, 1))


def sweep_decode_attention(batches: tuple[int, ...], slots: tuple[int, ...], heads=(32, 32, 128),
                           configs=ATTENTION_CONFIGS, log=print) -> list[dict]:
  """The decode step's attention (one query token, bf16 cache [B, S, Hkv, hd]): XLA's einsums
  (models/llama.attention with $FLEXQ_DECODE_ATTENTION=xla) against the Pallas kernel
  (pallas_kernels/decode_attention.py) under each (block_s, num_warps, splits x) of `configs` (splits x:
  a multiple of splits_for's count, capped at the block count); each output checked against the einsums'.
  GB/s counts the cache's keys and values read once."""
  hq, hkv, hd = heads
  rows = []
  for b in batches:
    for s in slots:
      key = jax.random.key(b * 7919 + s)
      kv_bytes = 2 * b * s * hkv * hd * 2
      bufs = []
      for i in range(_n_bufs(kv_bytes)):
        kk, kv = jax.random.split(jax.random.fold_in(key, i))
        bufs.append((jax.random.normal(kk, (b, s, hkv, hd), jnp.bfloat16),
                     jax.random.normal(kv, (b, s, hkv, hd), jnp.bfloat16),
                     jnp.broadcast_to(jnp.arange(s) < s - 1, (b, s))))
      x = jax.random.normal(key, (b * hq, hd), jnp.bfloat16)
      est = kv_bytes / 3e12
      old = os.environ.get(llama.DECODE_ATTENTION_ENV)
      os.environ[llama.DECODE_ATTENTION_ENV] = "xla"
      try:
        ein = lambda x, k, v, vis: llama.attention(x.reshape(b, 1, hq, hd), k, v, vis[:, None])[:, 0].reshape(b * hq, hd)
        ref = jax.jit(ein)(x, *bufs[0])
        row = dict(batch=b, slots=s, heads=list(heads), einsum_us=1e6 * time_jax(ein, x, bufs, est))
      finally:
        if old is None:
          os.environ.pop(llama.DECODE_ATTENTION_ENV, None)
        else:
          os.environ[llama.DECODE_ATTENTION_ENV] = old
      blocks_of = lambda bs: -(-s // bs)
      for bs, nw, mult in configs:
        ns = min(blocks_of(bs), mult * decode_attention.splits_for(b, hkv, blocks_of(bs)))
        op = lambda x, k, v, vis, bs=bs, nw=nw, ns=ns: decode_attention.decode_attention(
            x.reshape(b, hq, hd), k, v, vis, block_s=bs, num_warps=nw, splits=ns).reshape(b * hq, hd)
        err = float(jnp.max(jnp.abs(jax.jit(op)(x, *bufs[0]).astype(jnp.float32) - ref.astype(jnp.float32))))
        us = 1e6 * time_jax(op, x, bufs, est) if err <= 2e-2 else float("nan")
        row[f"bs{bs}_w{nw}_x{mult}_us"] = us
        row[f"bs{bs}_w{nw}_x{mult}_err"] = err
      best = min((v, k) for k, v in row.items() if k.endswith("_us") and k != "einsum_us" and v == v)
      row["best"], row["best_us"] = best[1][:-3], best[0]
      row["best_gbs"], row["einsum_gbs"] = kv_bytes / best[0] / 1e3, kv_bytes / row["einsum_us"] / 1e3
      log(f"attention B={b:3d} S={s:5d}: einsums {row['einsum_us']:7.1f} us  " + "  ".join(
          f"{c}={row[f'bs{c[0]}_w{c[1]}_x{c[2]}_us']:.1f}" for c in configs) + f"  best {row['best']} "
          f"{row['best_us']:.1f} us ({row['best_gbs']:.0f} GB/s; einsums {row['einsum_gbs']:.0f})")
      rows.append(row)
  return rows


def attention_markdown(rows: list[dict], card: str, date: str) -> str:
  hq, hkv, hd = rows[0]["heads"] if rows else (32, 32, 128)
  out = [f"Decode attention, one layer, {card} {date}: {hq} query heads over a bf16 cache [B, S, {hkv}, {hd}], us "
         "(GB/s: keys and values read once)", "",
         "| B | S | XLA einsums | kernel, best config | best | x einsums |", "| ---: | ---: | ---: | --- | ---: | ---: |"]
  for r in rows:
    out.append(f"| {r['batch']} | {r['slots']} | {r['einsum_us']:.1f} ({r['einsum_gbs']:.0f}) | {r['best']} | "
               f"{r['best_us']:.1f} ({r['best_gbs']:.0f}) | {r['einsum_us'] / r['best_us']:.2f} |")
  return "\n".join(out) + "\n"


def _write_rows(out_dir: str, name: str, rows: list[dict], markdown_fn=None, echo: bool = True) -> None:
  """<card>-<date>-<name>.json of a side-by-side comparison (and its .md, printed, with markdown_fn)."""
  card, date = tuning.card_name(), datetime.date.today().isoformat()
  stem = Path(out_dir) / f"{card}-{date}-{name}"
  stem.parent.mkdir(parents=True, exist_ok=True)
  stem.with_suffix(".json").write_text(json.dumps(dict(card=card, device=jax.devices()[0].device_kind, date=date,
                                                       jax=jax.__version__, rows=rows), indent=1))
  if markdown_fn is not None:
    stem.with_suffix(".md").write_text(markdown_fn(rows, card, date))
    if echo:
      print(stem.with_suffix(".md").read_text())


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help=f"M in {QUICK_M}, W6A6 only")
  ap.add_argument("--shapes", default="all", help="comma list of " + ", ".join(SHAPES) + "; or 7b, 70b, all")
  ap.add_argument("--m", default=None, help="comma list of M")
  ap.add_argument("--a-bits", default=None, help="comma list of 6, 8")
  ap.add_argument("--a8-m", default=None, help="comma list of M at which W6A8 is timed too (default: all)")
  ap.add_argument("--no-torch", action="store_true")
  ap.add_argument("--no-bmma", action="store_true", help="leave out the CUDA BMMA kernel's column")
  ap.add_argument("--sweep", action="store_true", help="time candidate tilings instead (no files written)")
  ap.add_argument("--sweep-gemv", action="store_true", help="time the decode (gemv) tilings against the mma default")
  ap.add_argument("--gemv-cuda", action="store_true",
                  help="decode M <= 8: the Pallas GEMV path against the CUDA GEMV (flexq_jax/cuda/gemv.py) in one run; "
                       "writes <card>-<date>-gemv-cuda.{md,json} to --out-dir")
  ap.add_argument("--mgpu-small", action="store_true",
                  help="the small-M Mosaic GPU kernel against the Triton kernel and bf16 (writes <card>-<date>-mgpu-small.json)")
  ap.add_argument("--sweep-mgpu-small", action="store_true",
                  help="time the small-M Mosaic kernel's tilings (ring depth, split-K) against Triton and bf16, W6A6")
  ap.add_argument("--cuda-small", action="store_true",
                  help="the small-M CUDA GEMM (mma.sync) against the table's kernel, Triton and bf16, M <= 64")
  ap.add_argument("--w8a8-cmp", action="store_true",
                  help="W6A6 / W6A8 as the pallas backend dispatches them against our own W8A8 kernels, cuBLAS, cuBLASLt")
  ap.add_argument("--small-fused", default="off", choices=("off", "on", "both"),
                  help="--sweep-mgpu-small: the slot's TMAs separate (off), fused (on; SmallConfig.fused_tma) or both")
  ap.add_argument("--small-persistent", action="store_true",
                  help="--sweep-mgpu-small: each fused tiling also with one TMA ring across a CTA's tiles")
  ap.add_argument("--small-stream-k", action="store_true",
                  help="--sweep-mgpu-small: also the stream-K tiling (equal runs of tile slots a CTA)")
  ap.add_argument("--small-splits", default="", help="--sweep-mgpu-small: comma list of split_k timed besides 1 and "
                  "split_for's")
  ap.add_argument("--probe-mgpu-small", action="store_true",
                  help="time the small-M Mosaic kernel whole and under its probes (TMA ring alone, no unpack, no scaling)")
  ap.add_argument("--sweep-mgpu", action="store_true",
                  help="time the Mosaic GPU GEMM's tilings (and its parts) against cuBLAS / XLA / Triton")
  ap.add_argument("--probe-mgpu", action="store_true",
                  help="time the Mosaic GEMM alone under its scaling variants and probes (PROBE_CONFIGS)")
  ap.add_argument("--dump-dir", default=None, help="with --probe-mgpu: Mosaic GPU's PTX / ptxas / SASS dumps here")
  ap.add_argument("--profile", default="", help="comma list of shape:M whose kernels the profiler times")
  ap.add_argument("--attention", action="store_true",
                  help="the decode attention kernel's configs against XLA's einsums (--m: batches, default 1,16,32,64)")
  ap.add_argument("--slots", default="160,1024", help="--attention: comma list of cache lengths")
  ap.add_argument("--out-dir", default="results/kernels")
  ap.add_argument("--tag", default="", help="--w8a8-cmp: appended to the output file names (a value starting with - as --tag=-70b)")
  ap.add_argument("--rerender", default=None, help="a saved .json: rewrite its .md/.png (no GPU needed)")
  args = ap.parse_args(argv)
  if args.rerender:
    rerender(args.rerender)
    return
  if jax.default_backend() != "gpu":
    sys.exit("kernel_bench needs a GPU (jax.default_backend() is %r)" % jax.default_backend())
  if args.attention:
    batches = tuple(int(v) for v in (args.m or "1,16,32,64").split(","))
    _write_rows(args.out_dir, "decode-attention", sweep_decode_attention(
        batches, tuple(int(v) for v in args.slots.split(",")), log=lambda s: print(s, flush=True)), attention_markdown)
    return
  if args.probe_mgpu:
    shapes = args.shapes.split(",") if args.shapes not in ("all", "7b", "70b") else list(SHAPES)
    rows = probe_mgpu(shapes, tuple(int(v) for v in (args.m or "4096").split(",")), PROBE_CONFIGS,
                      not args.no_torch and torch_available(), args.dump_dir, log=lambda s: print(s, flush=True))
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.out_dir) / f"mgpu-probe-{tuning.card_name()}.json").write_text(json.dumps(
        dict(configs=[dataclasses.asdict(c) for c in PROBE_CONFIGS], rows=rows), indent=1))
    return
  if args.sweep_mgpu:
    shapes = args.shapes.split(",") if args.shapes not in ("all", "7b", "70b") else list(SHAPES)
    rows = sweep_mgpu(shapes, tuple(int(v) for v in (args.m or "128,1024,4096").split(",")), MGPU_CONFIGS,
                      not args.no_torch and torch_available(), log=lambda s: print(s, flush=True))
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.out_dir) / f"mgpu-sweep-{tuning.card_name()}.json").write_text(json.dumps(rows, indent=1))
    return
  if args.shapes in ("all", "7b", "70b"):
    shapes = [s for s in SHAPES if args.shapes == "all" or s.startswith(args.shapes + ".")]
  else:
    shapes = args.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES and s not in FUSED_SHAPES]
    if unknown:
      sys.exit(f"--shapes: unknown {', '.join(unknown)}; names are {', '.join([*SHAPES, *FUSED_SHAPES])}, "
               "or one of 7b, 70b, all")
  ms = tuple(int(v) for v in args.m.split(",")) if args.m else (QUICK_M if args.quick else M_ALL)
  a_bits = tuple(int(v) for v in args.a_bits.split(",")) if args.a_bits else ((6,) if args.quick else (6, 8))
  log = lambda s: print(s, flush=True)
  if args.sweep_gemv:
    rows = sweep_gemv(shapes, ms, log)
    if args.out_dir:
      Path(args.out_dir).mkdir(parents=True, exist_ok=True)
      (Path(args.out_dir) / f"gemv-sweep-{tuning.card_name()}.json").write_text(json.dumps(rows, indent=1))
    return
  if args.gemv_cuda:
    _write_rows(args.out_dir, "gemv-cuda", compare_gemv_cuda(shapes, ms, log), gemv_cuda_markdown)
    return
  if args.probe_mgpu_small:
    _write_rows(args.out_dir, "mgpu-small-probe", probe_mgpu_small(shapes, ms, log))
    return
  if args.sweep_mgpu_small:
    fused = dict(off=(False,), on=(True,), both=(False, True))[args.small_fused]
    extra = tuple(int(v) for v in args.small_splits.split(",") if v)
    _write_rows(args.out_dir, "mgpu-small-sweep", sweep_mgpu_small(shapes, ms, log, fused, extra,
                                                                     args.small_persistent, args.small_stream_k))
    return
  if args.cuda_small:
    _write_rows(args.out_dir, "cuda-small", compare_cuda_small(shapes, ms, log))
    return
  if args.w8a8_cmp:
    save = lambda rows, echo=False: _write_rows(args.out_dir, f"w8a8-cmp{args.tag}", rows, w8a8_markdown, echo)
    save(compare_w8a8(shapes, ms, not args.no_torch and torch_available(), log, on_row=save), echo=True)
    return
  if args.mgpu_small:
    _write_rows(args.out_dir, "mgpu-small", compare_mgpu_small(shapes, ms, log))
    return
  if args.sweep:
    cands = [wk.TileConfig(block_m=16, block_n=bn, split_k=sk, num_warps=nw, num_stages=ns, unpack_asm=asm)
             for bn, sk, nw, ns, asm in [(32, 4, 4, 4, True), (32, 8, 4, 4, True), (32, 4, 2, 4, True),
                                         (64, 8, 4, 4, True), (64, 3, 4, 4, True), (64, 5, 4, 2, True),
                                         (64, 5, 4, 6, True), (64, 5, 2, 4, True), (64, 5, 8, 4, True),
                                         (64, 5, 4, 4, False)]]
    if max(ms) > 16:
      cands = [wk.TileConfig(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns, join_phases=jp, group_m=8)
               for bm, bn, nw, ns, jp in [(64, 128, 4, 3, True), (64, 128, 4, 3, False), (128, 128, 8, 3, True),
                                          (128, 128, 4, 3, False), (64, 256, 8, 3, True), (128, 64, 4, 4, False),
                                          (64, 64, 4, 4, False)]]
    sweep(shapes, ms, cands, log)
    return
  use_torch = not args.no_torch and torch_available()
  a8_ms = tuple(int(v) for v in args.a8_m.split(",")) if args.a8_m else None
  card, date = tuning.card_name(), datetime.date.today().isoformat()
  out = Path(args.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  subset = args.quick or ms != M_ALL or len(shapes) != len(SHAPES) or a_bits != (6, 8) or a8_ms is not None
  tag = "" if args.shapes == "all" else "-" + args.shapes.replace(",", "_")  # names the device tool returns
  stem = out / f"{card}-{date}{tag}{'-subset' if subset else ''}"
  bws = copy_bandwidth(use_torch)
  log("copy bandwidth (read + write): " + ", ".join(f"{k} {v / 1e12:.3f} TB/s" for k, v in bws.items()))
  profile = [r for spec in filter(None, args.profile.split(",")) for r in
             profile_ours(spec.split(":")[0], int(spec.split(":")[1]), log)]
  cases = []

  def write():  # after every case: a run cut short by a timeout keeps what it measured
    stem.with_suffix(".md").write_text(markdown(cases, bws, card, date))
    stem.with_suffix(".json").write_text(json.dumps(dict(
        card=card, device=jax.devices()[0].device_kind, date=date, jax=jax.__version__,
        copy_bandwidth=with_stream_ceiling(cases, bws),
        cases=[dict(dataclasses.asdict(c), floor_frac=c.floor_frac, tops=c.tops) for c in cases],
        profile=profile), indent=1))
    plot(cases, stem.with_suffix(".png"), f"W6A6/W6A8 Pallas kernels, {card}, {date}")

  use_bmma = not args.no_bmma and bmma_available(log)
  for c in run_cases(shapes, ms, a_bits, use_torch, bws, a8_ms, log, use_bmma=use_bmma):
    cases.append(c)
    write()
  print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
  main()
