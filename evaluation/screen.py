"""Quick screening of quantization settings on the default model (CPU): perplexity on a few windows
of the evaluation part and of the held-out text, and optionally the main job's chat sample, for
QuantConfig variants the accuracy table has no row for.

    python -m evaluation.screen --windows 2 --sample \
        --row 'W6A16 damp 0.1={"a_bits": 16, "a8_selection": "none", "gptq_damp": 0.1}'

Each --row is LABEL=JSON: QuantConfig fields over {"smooth_alpha": null}, on the Hadamard-rotated
model (as the default method). Calibration and windows are those of `flexq accuracy` (8 x 512
tokens of wiki-excerpt, seed 0; 2048-token windows), fewer windows for speed, so compare rows of
one run, not with the 8-window table. results/raw/gptq-damping-2026-12-01.md is such a run.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax.numpy as jnp

from evaluation import accuracy, calibration, corpora, perplexity
from flexq_jax.qconfig import QuantConfig
from models import generate, loaders

PROMPT = "What is the capital of France?"  # the main job's first sample (evaluation/cli.py, cmd_run)


def parse_row(text: str) -> tuple[str, QuantConfig]:
  label, sep, spec = text.partition("=")
  if not sep or not label:
    raise ValueError(f"--row {text!r} must look like LABEL=JSON")
  try:
    fields = json.loads(spec)
  except json.JSONDecodeError as e:
    raise ValueError(f"--row {label!r}: {spec!r} is not JSON ({e})") from None
  if not isinstance(fields, dict):
    raise ValueError(f"--row {label!r}: the JSON must be an object of QuantConfig fields")
  try:
    return label, QuantConfig(**{"smooth_alpha": None, **fields})
  except TypeError as e:
    raise ValueError(f"--row {label!r}: {e}") from None


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m evaluation.screen", description=__doc__.split("\n\n")[0])
  ap.add_argument("--row", action="append", default=[], help="LABEL=JSON of QuantConfig fields (repeatable)")
  ap.add_argument("--windows", type=int, default=2, help="2048-token windows of each text (default 2)")
  ap.add_argument("--calib-batch", type=int, default=8, help="calibration crops of 512 tokens (default 8)")
  ap.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration crops' starts (default 0, as "
                  "`flexq accuracy`): other seeds measure how much the draw of crops moves a row")
  ap.add_argument("--sample", action="store_true", help=f"also the greedy chat answer to {PROMPT!r}")
  args = ap.parse_args(argv)
  try:
    rows = [parse_row(r) for r in args.row]  # bad rows fail before the model loads
  except ValueError as e:
    ap.error(str(e))
  if not rows:
    ap.error("give at least one --row")
  config, params, tok = loaders.load_model(None, jnp.float32)
  corpus, held = corpora.load_corpus("wiki-excerpt"), corpora.load_corpus("lee-news")
  windows = perplexity.eval_windows(calibration.tokenize_corpus(tok, corpus.eval_text), 2048, args.windows)
  held_windows = perplexity.eval_windows(calibration.tokenize_corpus(tok, held.eval_text), 2048, args.windows)
  calib = calibration.calibration_batch(calibration.tokenize_corpus(tok, corpus.calib_text), args.calib_batch, 512,
                                       args.calib_seed)
  table = [("FP32", None, False)] + [(label, cfg, True) for label, cfg in rows]
  samples = {}

  def on_row(row):
    print(f"{row.label}: ppl {row.ppl:.3f} ({row.delta_pct:+.2f}%), held-out {row.heldout_ppl:.3f} "
          f"({row.heldout_delta_pct:+.2f}%)" + (f"; sample: {samples[row.label]!r}" if row.label in samples else ""),
          flush=True)

  sample = None
  if args.sample:
    def sample(label, qcfg, p):
      samples[label] = generate.generate_text(qcfg, p, tok, [PROMPT], max_new_tokens=24, chat=True)[0]
  accuracy.run_table(config, params, windows, calib, rows=table, heldout_windows=held_windows, log=lambda m: None,
                     on_row=on_row, sample=sample)
  return 0


if __name__ == "__main__":
  sys.exit(main())
