import dataclasses

import numpy as np

from evaluation import accuracy


def test_table_rows_are_what_the_issue_asks_for():
  labels = [label for label, _, _ in accuracy.ROWS]
  assert labels[0] == "FP32" and accuracy.ROWS[0][1] is None
  assert len(set(labels)) == len(labels)
  configs = {label: c for label, c, _ in accuracy.ROWS}
  rotated = {label for label, _, rot in accuracy.ROWS if rot}
  assert rotated == {label for label in labels if "rotation" in label} and len(rotated) == 17
  w8a8 = next(c for l, c in configs.items() if l.startswith("W8A8"))
  assert (w8a8.w_bits, w8a8.a_bits, w8a8.group_size, w8a8.smooth_alpha) == (8, 8, None, 0.5)
  paper = [(l, c) for l, c in configs.items() if "paper rule" in l]
  ours = [(l, c) for l, c in configs.items() if "sensitivity-chosen" in l and "clipping" not in l]
  # RTN, GPTQ, GPTQ + smoothing, rotation, rotation with damping 0.01, rotation with sequential GPTQ: pairs
  # differ only in the selection
  assert len(paper) == len(ours) == 6
  for (lp, p), (lo, o) in zip(paper, ours):
    assert dataclasses.replace(p, a8_selection="sensitivity") == o and (lp in rotated) == (lo in rotated)
    assert (p.a8_selection, o.a8_selection) == ("down_proj", "sensitivity")
  measured = [c for l, c in configs.items() if "measured A8" in l]
  assert [dataclasses.replace(c, a8_selection="down_proj") for c in measured] == [
      configs["W6A6 + down_proj A8, paper rule (Hadamard rotation + GPTQ)"],
      configs["W6A6 + down_proj A8, paper rule (Hadamard rotation + GPTQ damp 0.01)"]]
  # The ceiling of any A8 choice: the default's weights with every layer at 8 bits.
  ceiling = configs["W6A8 everywhere (Hadamard rotation + GPTQ)"]
  assert (ceiling.a_bits, ceiling.a8_selection, ceiling.weight_method) == (8, "none", "gptq")
  # The default row is the main job's method: the library's default QuantConfig with what the CLI's "auto"
  # smoothing chooses on the rotated model (rotation applied by the row): none.
  [default] = [c for l, c in configs.items() if l.endswith("= flexq-jax default")]
  assert dataclasses.replace(default, smooth_alpha=0.5) == type(default)()
  from evaluation import cli
  assert cli._quant_config(cli.build_parser().parse_args(["quantize"])) == default
  # Rows labelled "damp 0.01": the rotated rows again, GPTQ's damping at its earlier default.
  for label, c in configs.items():
    if "damp 0.01" in label and "learned clipping" not in label and "sequential" not in label:
      twin = label.replace(" damp 0.01", "") + (" = flexq-jax default" if "sensitivity" in label else "")
      assert c.gptq_damp == 0.01 and configs[twin].gptq_damp == 0.1
      assert dataclasses.replace(c, gptq_damp=0.1) == configs[twin]
  # Learned clipping and sequential calibration: a rotated row again with only that added.
  for key, field, value in (("learned clipping", "weight_clipping", "learned"), ("sequential", "gptq_sequential", True)):
    rows = {l: c for l, c in configs.items() if key in l}
    assert len(rows) == (2 if key == "learned clipping" else 4) and set(rows) <= rotated
    for label, c in rows.items():
      twin = label.replace(" + learned clipping", "").replace("sequential GPTQ", "GPTQ")
      twin = configs.get(twin) or configs[twin + " = flexq-jax default"]
      assert getattr(c, field) == value and dataclasses.replace(c, **{field: getattr(twin, field)}) == twin


def test_markdown_and_resume(tmp_path):
  rows = [accuracy.Row("FP32", 10.0, 0.0, 0, 0.0, 1.0), accuracy.Row("X", 11.0, 10.0, 3, 2.0, 1.0)]
  meta = {"model": "m", "corpus": "c", "windows": [8, 2048], "calib": [8, 512], "backend": "dequant"}
  md, _ = accuracy.write(rows, tmp_path, "header", meta)
  assert "| X | 11.000 | +10.00% | 3 |" in md.read_text()
  assert set(accuracy.load_done(tmp_path, meta)) == {"FP32", "X"}
  assert accuracy.load_done(tmp_path, {**meta, "windows": [4, 2048]}) == {}
  # With a held-out corpus: its own column pair, and a different held-out text is not resumed from.
  rows[1].heldout_ppl, rows[1].heldout_delta_pct = 12.5, 4.2
  held = {**meta, "heldout": "lee-news", "heldout_windows": [8, 2048]}
  md, _ = accuracy.write(rows, tmp_path, "header", held)
  assert "| held-out (lee-news) | vs FP32 |" in md.read_text()
  assert "| X | 11.000 | +10.00% | 12.500 | +4.20% | 3 |" in md.read_text()
  assert "| FP32 | 10.000 | +0.00% | - | - | 0 |" in md.read_text()
  assert accuracy.load_done(tmp_path, held)["X"].heldout_ppl == 12.5
  assert accuracy.load_done(tmp_path, {**held, "heldout": None}) == {}
