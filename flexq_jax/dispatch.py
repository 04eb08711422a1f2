"""Per-layer backend choice (`backend="auto"`): which kernel runs each quantized linear.

    qparams = flexq_jax.matmul.to_backend(qparams, "auto")          # once, at load time
    flexq_jax.dispatch.backends(qparams)                           # {layer path: backend}

On CPU every layer runs the jnp reference. On an NVIDIA GPU, each layer gets the fastest of the
backends that can run it (`pallas`: W6 or W8 weights, A6/A8, group 128, N a multiple of 16;
`bmma`: W6, A6/A8, group 128, bf16 activations), read from a tuning table that the kernel
benchmark measured on that GPU model (`flexq_jax/tuning/<card>.json`, made by
`python -m flexq_jax.dispatch --from results/kernels/<run>.json ... --out ...`).

A layer is packed for one backend, once (the two GPU layouts differ), so the choice is made for
one activation count M per layer: the decode M (default 1) where generation spends its time; at
other M the layer runs the same backend. The table lookup takes the measured shape nearest to the
layer's [N, K] (log scale) and the measured M nearest to the asked one; a backend other than the
first of GPU_BACKENDS that can run the layer must be faster there by more than MARGIN (5%: less
is run-to-run noise). On a GPU model without a
table the choice falls back to `pallas` (Triton, portable across NVIDIA generations), then
`bmma`, then `reference`.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from pathlib import Path

import jax
import numpy as np

from flexq_jax import formats
from flexq_jax.qlinear import QuantizedLinear

TUNING_DIR = Path(__file__).parent / "tuning"
GPU_BACKENDS = ("pallas", "bmma")  # the order of preference where no table decides (or it is a near tie)
# Another backend replaces the preferred one only when the table has it faster by more than this
# (repeated kernel-benchmark runs on one card differ by a few percent).
MARGIN = 0.05


def runnable(layer: QuantizedLinear, backend: str) -> bool:
  """Whether `backend` can run this layer (after repacking to its layout)."""
  group_ok = layer.group_size == formats.GROUP_ALIGN and layer.a_bits in (6, 8)
  if backend == "pallas":
    return group_ok and layer.w_bits in (6, 8) and layer.out_features % formats.PALLAS6_ROWS == 0
  if backend == "bmma":
    return group_ok and layer.w_bits == 6
  return backend in ("reference", "dequant")


def card_name(device=None) -> str:
  """A short name of the accelerator: 'h200', 'h100', ...; 'cpu' off the GPU."""
  device = device or jax.devices()[0]
  if device.platform != "gpu":
    return device.platform
  kind = device.device_kind
  for tag in ("H200", "H100", "H800", "H20", "A100", "L40S", "B200", "GB200"):
    if tag in kind:
      return tag.lower()
  return "".join(c if c.isalnum() else "-" for c in kind.lower()).strip("-")


@functools.cache
def load_table(card: str) -> dict | None:
  """The committed tuning table of a GPU model, or None when there is none."""
  path = TUNING_DIR / f"{card}.json"
  if not path.exists():
    return None
  table = json.loads(path.read_text())
  if not isinstance(table.get("entries"), list):
    raise ValueError(f"{path}: a tuning table needs an 'entries' list")
  return table


def _nearest(entries: list[dict], n: int, k: int, m: int, a_bits: int) -> dict | None:
  pool = [e for e in entries if e["a_bits"] == a_bits] or entries
  if not pool:
    return None
  shape_d = lambda e: math.hypot(math.log(e["n"] / n), math.log(e["k"] / k))
  best_shape = min(shape_d(e) for e in pool)
  pool = [e for e in pool if shape_d(e) == best_shape]
  return min(pool, key=lambda e: abs(math.log(e["m"] / max(m, 1))))


def choose(layer: QuantizedLinear, m: int = 1, *, card: str | None = None, table: dict | None = None) -> tuple[str, str]:
  """(backend, why) for one layer at M activation rows on the current device."""
  card = card or card_name()
  if card in ("cpu", "tpu"):
    return "reference", f"{card}: the jnp reference"
  candidates = [b for b in GPU_BACKENDS if runnable(layer, b)]
  if not candidates:
    return "reference", "no GPU kernel runs this layer (needs group 128, A6/A8, W6 or W8)"
  table = table if table is not None else load_table(card)
  if table is not None:
    entry = _nearest(table["entries"], layer.out_features, layer.in_features, m, layer.a_bits)
    timed = {b: entry["us"][b] for b in candidates
             if entry is not None and np.isfinite(entry["us"].get(b, float("nan")))}
    if timed:
      best = min(timed, key=timed.get)
      preferred = next(b for b in candidates if b in timed)
      if timed[best] * (1 + MARGIN) > timed[preferred]:
        best = preferred  # a near tie: keep the preferred backend
      others = ", ".join(f"{b} {t:.1f} us" for b, t in sorted(timed.items()))
      return best, f"{card} table at {entry['n']}x{entry['k']} M={entry['m']} A{entry['a_bits']}: {others}"
  return candidates[0], f"no {card} table entry: {candidates[0]} by default"


def backends(params) -> dict[str, str]:
  """{path: backend} of every QuantizedLinear in a pytree (what each layer runs)."""
  out = {}
  leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda l: isinstance(l, QuantizedLinear))[0]
  for path, leaf in leaves:
    if isinstance(leaf, QuantizedLinear):
      out["/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)] = leaf.backend
  return out


# ---- making a table from kernel-benchmark runs ----------------------------------------------------

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
      for backend, field in (("pallas", "ours_us"), ("bmma", "bmma_us")):
        v = c.get(field)
        if v is not None and np.isfinite(v):
          e["us"][backend] = round(float(v), 2)
  if len(cards) != 1:
    raise ValueError(f"the runs come from different cards {sorted(cards)}: one table per GPU model")
  return dict(card=cards.pop(), device=sorted(devices), dates=sorted(dates),
              made_from=[Path(p).name for p in paths], entries=sorted(entries.values(), key=lambda e: (
                  e["n"], e["k"], e["a_bits"], e["m"])))


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description="Make a backend tuning table from kernel-benchmark JSON files "
                               "(python -m evaluation.kernel_bench writes them).")
  ap.add_argument("--from", dest="sources", nargs="+", required=True, help="kernel_bench .json files, oldest first")
  ap.add_argument("--out", required=True)
  args = ap.parse_args(argv)
  table = table_from_bench(args.sources)
  head = json.dumps({k: v for k, v in table.items() if k != "entries"}, indent=1)[:-2]
  rows = ",\n".join("  " + json.dumps(e) for e in table["entries"])  # one entry a line
  Path(args.out).write_text(f'{head},\n "entries": [\n{rows}\n ]\n}}\n')
  wins = {}
  for e in table["entries"]:
    if e["us"]:
      b = min(e["us"], key=e["us"].get)
      wins[b] = wins.get(b, 0) + 1
  print(f"{args.out}: {len(table['entries'])} entries for {table['card']}; fastest: {wins}")


if __name__ == "__main__":
  main()
