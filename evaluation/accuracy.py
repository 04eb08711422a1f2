"""The accuracy table: perplexity of FP32, baselines and FlexQ variants on the same windows."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from evaluation import perplexity
from flexq_jax.placement import place
from flexq_jax.qconfig import QuantConfig
from flexq_jax.quantize import quantize
from flexq_jax.rotation import rotate
from models import llama

RTN = dict(weight_method="rtn", smooth_alpha=None)
GPTQ = dict(weight_method="gptq", smooth_alpha=None)
GPTQ_SQ = dict(weight_method="gptq", smooth_alpha=0.5)
GPTQ_D01 = dict(weight_method="gptq", smooth_alpha=None, gptq_damp=0.01)  # the default damping until 2026-12-01

# (row label, QuantConfig or None for the float model, rotate first: flexq_jax/rotation.py). Every W6
# row uses g = 128 for weights and activations; the budget of A8 layers is FlexQ's (one in seven:
# as many as down_proj).
ROWS: tuple[tuple[str, QuantConfig | None, bool], ...] = (
    ("FP32", None, False),
    ("W8A8 SmoothQuant (per-channel W, per-token A, alpha 0.5)",
     QuantConfig(w_bits=8, group_size=None, a_bits=8, a8_selection="none", weight_method="rtn", smooth_alpha=0.5),
     False),
    ("W6A16 (RTN)", QuantConfig(a_bits=16, a8_selection="none", **RTN), False),
    ("W6A6 everywhere (RTN)", QuantConfig(a8_selection="none", **RTN), False),
    ("W6A8 everywhere (RTN)", QuantConfig(a_bits=8, a8_selection="none", **RTN), False),
    ("W6A6 + down_proj A8, paper rule (RTN)", QuantConfig(a8_selection="down_proj", **RTN), False),
    ("W6A6 + sensitivity-chosen A8 (RTN)", QuantConfig(a8_selection="sensitivity", **RTN), False),
    ("W6A16 (GPTQ)", QuantConfig(a_bits=16, a8_selection="none", **GPTQ), False),
    ("W6A6 + down_proj A8, paper rule (GPTQ)", QuantConfig(a8_selection="down_proj", **GPTQ), False),
    ("W6A6 + sensitivity-chosen A8 (GPTQ)", QuantConfig(a8_selection="sensitivity", **GPTQ), False),
    ("W6A6 everywhere (GPTQ + smoothing 0.5)", QuantConfig(a8_selection="none", **GPTQ_SQ), False),
    ("W6A6 + down_proj A8, paper rule (GPTQ + smoothing 0.5)", QuantConfig(a8_selection="down_proj", **GPTQ_SQ),
     False),
    ("W6A6 + sensitivity-chosen A8 (GPTQ + smoothing 0.5)", QuantConfig(a8_selection="sensitivity", **GPTQ_SQ),
     False),
    ("W6A16 (Hadamard rotation + GPTQ)", QuantConfig(a_bits=16, a8_selection="none", **GPTQ), True),
    ("W6A6 + sensitivity-chosen A8 (Hadamard rotation + GPTQ) = flexq-jax default",
     QuantConfig(a8_selection="sensitivity", **GPTQ), True),
    ("W6A6 + down_proj A8, paper rule (Hadamard rotation + GPTQ)", QuantConfig(a8_selection="down_proj", **GPTQ),
     True),
    ("W6A6 everywhere (Hadamard rotation + GPTQ)", QuantConfig(a8_selection="none", **GPTQ), True),
    # The ceiling of any A8 selection: every layer at 8 bits (what the 30 chosen layers can at most recover)
    ("W6A8 everywhere (Hadamard rotation + GPTQ)", QuantConfig(a_bits=8, a8_selection="none", **GPTQ), True),
    ("W6A6 + measured A8 (Hadamard rotation + GPTQ)", QuantConfig(a8_selection="measured", **GPTQ), True),
    # GPTQ damping 0.01 (the default until 2026-12-01; the rows below were measured then)
    ("W6A16 (Hadamard rotation + GPTQ damp 0.01)", QuantConfig(a_bits=16, a8_selection="none", **GPTQ_D01), True),
    ("W6A6 everywhere (Hadamard rotation + GPTQ damp 0.01)", QuantConfig(a8_selection="none", **GPTQ_D01), True),
    ("W6A6 + down_proj A8, paper rule (Hadamard rotation + GPTQ damp 0.01)",
     QuantConfig(a8_selection="down_proj", **GPTQ_D01), True),
    ("W6A6 + sensitivity-chosen A8 (Hadamard rotation + GPTQ damp 0.01)",
     QuantConfig(a8_selection="sensitivity", **GPTQ_D01), True),
    ("W6A6 + measured A8 (Hadamard rotation + GPTQ damp 0.01)", QuantConfig(a8_selection="measured", **GPTQ_D01),
     True),
    ("W6A16 (Hadamard rotation + sequential GPTQ damp 0.01)",
     QuantConfig(a_bits=16, a8_selection="none", gptq_sequential=True, **GPTQ_D01), True),
    ("W6A16 (Hadamard rotation + GPTQ damp 0.01 + learned clipping)",
     QuantConfig(a_bits=16, a8_selection="none", weight_clipping="learned", **GPTQ_D01), True),
    ("W6A6 + sensitivity-chosen A8 (Hadamard rotation + GPTQ damp 0.01 + learned clipping)",
     QuantConfig(a8_selection="sensitivity", weight_clipping="learned", **GPTQ_D01), True),
    # Sequential GPTQ calibration (each block's statistics on the quantized blocks before it) at the default
    # damping: not the default, it won on one draw of calibration crops of three (results/raw/screens-2026-12-02.md)
    ("W6A16 (Hadamard rotation + sequential GPTQ)",
     QuantConfig(a_bits=16, a8_selection="none", gptq_sequential=True, **GPTQ), True),
    ("W6A6 + sensitivity-chosen A8 (Hadamard rotation + sequential GPTQ)",
     QuantConfig(a8_selection="sensitivity", gptq_sequential=True, **GPTQ), True),
    ("W6A6 + down_proj A8, paper rule (Hadamard rotation + sequential GPTQ)",
     QuantConfig(a8_selection="down_proj", gptq_sequential=True, **GPTQ), True),
)


@dataclasses.dataclass
class Row:
  label: str
  ppl: float
  delta_pct: float  # vs the first (FP32) row
  a8_layers: int
  quantize_seconds: float
  eval_seconds: float
  heldout_ppl: float | None = None  # on the held-out corpus (never calibrated on), when evaluated
  heldout_delta_pct: float | None = None  # vs the first (FP32) row's held-out perplexity


def run_table(config, params, windows: np.ndarray, calib_batch: np.ndarray, *,
              rows=ROWS, backend: str = "dequant", log: Callable[[str], None] = print,
              on_row: Callable[[Row], None] | None = None, done: dict[str, Row] | None = None,
              heldout_windows: np.ndarray | None = None,
              sample: Callable[[str, Any, Any], None] | None = None) -> list[Row]:
  """Evaluates every row on the same windows (and heldout_windows, when given); the float row must
  come first.

  Rows whose label is in `done` (from an earlier run on the same windows) are reused. A row whose
  third field is True quantizes the Hadamard-rotated model (flexq_jax/rotation.py, seed 0).

  backend "dequant" (default) computes the contract's numbers with one fp32 dot per layer
  (equal to the exact reference up to fp32 summation order; about 4x faster on CPU);
  "reference" uses the exact int32 group sums.
  """
  out: list[Row] = []
  base = base_heldout = None
  rotated = None
  for label, qcfg, rot in rows:
    if done and label in done:
      row = done[label]
      base = base if base is not None else row.ppl
      base_heldout = base_heldout if base_heldout is not None else row.heldout_ppl
      log(f"{label}: ppl {row.ppl:.3f} (from the earlier run)")
      out.append(row)
      if on_row:
        on_row(row)
      continue
    t0 = time.perf_counter()
    a8 = 0
    p, cfg = params, config
    if rot:
      if rotated is None:
        rotated = rotate(params, config)
      p, cfg = rotated
    if qcfg is not None:
      p, report = quantize(p, calib_batch, qcfg, model_config=cfg, progress=lambda m: log(f"  {m}"))
      p = place(p, backend)[0]
      a8 = sum(1 for l in report.layers if l.a_bits == qcfg.sensitive_a_bits and l.a_bits != qcfg.a_bits)
    tq = time.perf_counter() - t0
    if sample is not None:  # e.g. evaluation/screen.py's chat answer, from the model as evaluated
      sample(label, cfg, p)
    logits = functools.partial(llama.logits_fn(cfg), p)
    res = perplexity.perplexity(logits, windows, progress=False)
    base = base if base is not None else res.ppl
    row = Row(label, res.ppl, 100 * (res.ppl / base - 1), a8, tq, res.seconds)
    if heldout_windows is not None:
      held = perplexity.perplexity(logits, heldout_windows, progress=False)
      base_heldout = base_heldout if base_heldout is not None else held.ppl
      row.heldout_ppl, row.heldout_delta_pct = held.ppl, 100 * (held.ppl / base_heldout - 1)
      row.eval_seconds += held.seconds
    del p, logits
    log(f"{label}: ppl {row.ppl:.3f} ({row.delta_pct:+.2f}%)"
        + (f", held-out {row.heldout_ppl:.3f} ({row.heldout_delta_pct:+.2f}%)" if row.heldout_ppl else "")
        + f"  [quantize {tq:.0f}s, eval {row.eval_seconds:.0f}s]")
    out.append(row)
    if on_row:
      on_row(row)
  return out


def to_markdown(rows: list[Row], header: str, heldout_name: str | None = None) -> str:
  """The table; with a held-out column pair when heldout_name is given."""
  if heldout_name is None:
    lines = [header, "", "| configuration | perplexity | vs FP32 | A8 layers |", "| --- | ---: | ---: | ---: |"]
    for r in rows:
      lines.append(f"| {r.label} | {r.ppl:.3f} | {r.delta_pct:+.2f}% | {r.a8_layers} |")
    return "\n".join(lines) + "\n"
  lines = [header, "", f"| configuration | perplexity | vs FP32 | held-out ({heldout_name}) | vs FP32 | A8 layers |",
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
  for r in rows:
    held = (f"{r.heldout_ppl:.3f} | {r.heldout_delta_pct:+.2f}%" if r.heldout_ppl is not None else "- | -")
    lines.append(f"| {r.label} | {r.ppl:.3f} | {r.delta_pct:+.2f}% | {held} | {r.a8_layers} |")
  return "\n".join(lines) + "\n"


def write(rows: list[Row], out_dir: str | Path, header: str, meta: dict) -> tuple[Path, Path]:
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  md = out / "accuracy.md"
  js = out / "accuracy.json"
  md.write_text(to_markdown(rows, header, meta.get("heldout")))
  js.write_text(json.dumps({**meta, "rows": [dataclasses.asdict(r) for r in rows]}, indent=1))
  return md, js


def load_done(out_dir: str | Path, meta: dict) -> dict[str, Row]:
  """Rows of an earlier run in out_dir with the same model, corpus, windows and calibration."""
  js = Path(out_dir) / "accuracy.json"
  if not js.is_file():
    return {}
  old = json.loads(js.read_text())
  if any(old.get(k) != meta.get(k) for k in ("model", "corpus", "windows", "calib", "backend", "heldout",
                                             "heldout_windows")):
    return {}
  fields = {f.name for f in dataclasses.fields(Row)}  # rows may carry notes (e.g. restored_from_log)
  return {r["label"]: Row(**{k: v for k, v in r.items() if k in fields}) for r in old.get("rows", [])}
