"""Tuning tables: per GPU model, the measured time of every kernel backend at real layer shapes.

`<card>.json` beside this file (card = card_name(): "h200", "h100", ...) holds entries
{n, k, m, a_bits, us: {backend: microseconds}} and the runs it came from (made_from, dates), and
optionally "mosaic_min_m": the M from which the pallas backend runs its Mosaic GPU GEMM instead of
the Triton kernels (measured by `python -m evaluation.kernel_bench --sweep-mgpu`; absent: never),
and "cuda_gemv_max_m" / "cuda_gemv_xq_max_m": the M up to which it runs the CUDA decode GEMV
(without / with the quantizer inside; `kernel_bench --gemv-cuda`; absent: never; "cuda_gemv_unroll" (1, 2, 4)
and "cuda_gemv_pdl" (programmatic dependent launch) tune the latter), and
"mosaic_small_min_m" / "mosaic_small_max_m" / "mosaic_small_min_n": the M window (default from 1)
and the least N (default 0) of the layers on which it runs the small-M Mosaic GPU GEMM on sm_90
(pallas_kernels/w6a_gemm_mgpu_small.py; `kernel_bench --mgpu-small`; absent: never;
"mosaic_small_split": true splits its K until every SM has a CTA ("mosaic_small_ragged": true by the cost model of
w6a_gemm_mgpu_small.split_ragged, any split count), and "mosaic_small_sw_f16": true has it read the
stored fp16 weight scales (SmallConfig.sw_f16), and "mosaic_small_quant_t": true has its
quantizer write the fused TMA's [G, 2, M] operand (SmallConfig.quant_t), and "mosaic_small_stream_k": true
streams equal runs of (tile, slot) units a CTA where split_config's cost model prefers it to the split
(SmallConfig.stream_k), backends._small_config;
"mosaic_small_skip": [[N, K, max M], ...] keeps those layer shapes on the Triton kernels up to max M; these keys
and the CUDA GEMV's are set by hand from the benchmarks, `main` below writes the entries and
mosaic_min_m only), and
"fuse_norm_quant": true to fuse each RMSNorm with the activation quantization of the fused q/k/v or
gate/up GEMM that reads it, where that GEMM is a Triton kernel (backends.fused_norm_input; the e2e
method flexq-fused-norm measures it; absent: never), and "fuse_norm_quant_small": true the same where it
is the small-M Mosaic GEMM with "mosaic_small_quant_t" (e2e method flexq-fused-norm-small; absent: never), and
"fuse_swiglu_quant": true to quantize down_proj's input silu(gate) * up in one kernel reading the fused gate/up
output, for either GEMM (backends.fused_swiglu_input; e2e method flexq-fused-swiglu; absent: never), and
"fuse_attention_quant": true to quantize o_proj's input in the decode attention kernel's merge
(models.llama.attention_input; e2e method flexq-fused-attention; absent: never), and
"cuda_gemv_fuse": a list of "norm", "swiglu", "residual": what the quantizer-inside CUDA GEMV (8 warps, unroll 1)
folds into itself where it runs: the RMSNorm of its input, down_proj's SwiGLU, the residual add after it
(backends.gemv_folds, cuda.gemv.gemv_fused; e2e methods flexq-gemv-fused, -fused-residual; absent: none).
$FLEXQ_TUNING_EXTRA, a JSON object, is merged over the table (benchmarks: a setting tried before
it is committed, e.g. '{"cuda_gemv_xq_max_m": 2}').
It is made from kernel-benchmark runs (python -m evaluation.kernel_bench writes them):

    python -m flexq_jax.tuning --from results/kernels/<run>.json ... --out flexq_jax/tuning/<card>.json

flexq_jax.placement reads it to place each layer on its fastest backend ("auto").
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from pathlib import Path

import jax
import numpy as np

TUNING_DIR = Path(__file__).parent
EXTRA_ENV = "FLEXQ_TUNING_EXTRA"
# The kernel benchmark's field of each backend's time (evaluation/kernel_bench.py, Case).
BENCH_FIELDS = {"pallas": "ours_us", "bmma": "bmma_us"}


def card_name(device=None) -> str:
  """A short name of the accelerator: 'h200', 'h100', ...; the platform ('cpu') off the GPU."""
  device = device or jax.devices()[0]
  if device.platform != "gpu":
    return device.platform
  kind = device.device_kind
  for tag in ("H200", "H100", "H800", "H20", "A100", "L40S", "B200", "GB200"):
    if tag in kind:
      return tag.lower()
  return "".join(c if c.isalnum() else "-" for c in kind.lower()).strip("-")


def load_table(card: str) -> dict | None:
  """The committed tuning table of a GPU model with $FLEXQ_TUNING_EXTRA merged over it, or None
  when there is neither."""
  extra = os.environ.get(EXTRA_ENV)
  return _load_table(card, extra)


def _setting(key: str, value) -> bool:
  """Whether `value` is a valid $FLEXQ_TUNING_EXTRA setting for `key`."""
  count = lambda v: isinstance(v, int) and v >= 0
  if key == "mosaic_small_skip":
    return isinstance(value, list) and all(isinstance(t, list) and len(t) == 3 and all(map(count, t)) for t in value)
  if key == "cuda_gemv_fuse":  # names; backends.gemv_folds says which it knows
    return isinstance(value, list) and all(isinstance(t, str) for t in value)
  return count(value)


@functools.cache
def _load_table(card: str, extra: str | None) -> dict | None:
  path = TUNING_DIR / f"{card}.json"
  table = None
  if path.exists():
    table = json.loads(path.read_text())
    if not isinstance(table.get("entries"), list):
      raise ValueError(f"{path}: a tuning table needs an 'entries' list")
  if extra:
    try:
      more = json.loads(extra)
    except ValueError as e:
      raise ValueError(f"${EXTRA_ENV} is not JSON: {e}") from None
    if not isinstance(more, dict) or not all(_setting(k, v) for k, v in more.items()):
      raise ValueError(f"${EXTRA_ENV} must be a JSON object of non-negative integers or booleans (and, for "
                       f"mosaic_small_skip, a list of [N, K, max M] triples; for cuda_gemv_fuse, a list of names), got {extra!r}")
    table = {"entries": [], **(table or {}), **more}
  return table


def table_from_bench(paths: list[str | Path]) -> dict:
  """A tuning table from kernel_bench JSON files; a later file's figure replaces an earlier one's."""
  entries: dict[tuple, dict] = {}
  cards, devices, dates = set(), set(), set()
  for path in paths:
    run = json.loads(Path(path).read_text())
    cards.add(run["card"]), devices.add(run["device"]), dates.add(run["date"])
    for c in run["cases"]:
      key = (c["n"], c["k"], c["m"], c["a_bits"])
      e = entries.setdefault(key, dict(n=c["n"], k=c["k"], m=c["m"], a_bits=c["a_bits"], us={}))
      for backend, field in BENCH_FIELDS.items():
        v = c.get(field)
        if v is not None and np.isfinite(v):
          e["us"][backend] = round(float(v), 2)
  if len(cards) != 1:
    raise ValueError(f"the runs come from different cards {sorted(cards)}: one table per GPU model")
  return dict(card=cards.pop(), device=sorted(devices), dates=sorted(dates),
              made_from=[Path(p).name for p in paths], entries=sorted(entries.values(), key=lambda e: (
                  e["n"], e["k"], e["a_bits"], e["m"])))


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(prog="python -m flexq_jax.tuning",
                               description="Make a backend tuning table from kernel-benchmark JSON files "
                               "(python -m evaluation.kernel_bench writes them).")
  ap.add_argument("--from", dest="sources", nargs="+", required=True, help="kernel_bench .json files, oldest first")
  ap.add_argument("--out", required=True)
  ap.add_argument("--mosaic-min-m", type=int, default=None,
                  help="the M from which the pallas backend runs the Mosaic GPU GEMM on this card (read it off "
                       "`python -m evaluation.kernel_bench --sweep-mgpu`); left out: never")
  ap.add_argument("--mosaic-from", nargs="*", default=[], help="the sweep files behind --mosaic-min-m")
  args = ap.parse_args(argv)
  table = table_from_bench(args.sources)
  if args.mosaic_min_m is not None:
    table = {"card": table["card"], "mosaic_min_m": args.mosaic_min_m,
             "mosaic_made_from": [Path(p).name for p in args.mosaic_from], **table}
  head = json.dumps({k: v for k, v in table.items() if k != "entries"}, indent=1)[:-2]
  rows = ",\n".join("  " + json.dumps(e) for e in table["entries"])  # one entry a line
  Path(args.out).write_text(f'{head},\n "entries": [\n{rows}\n ]\n}}\n')
  wins = {}
  for e in table["entries"]:
    if e["us"]:
      b = min(e["us"], key=e["us"].get)
      wins[b] = wins.get(b, 0) + 1
  print(f"{args.out}: {len(table['entries'])} entries for {table['card']}; fastest: {wins}")
