import numpy as np

from evaluation import accuracy


def test_table_rows_are_what_the_issue_asks_for():
  labels = [label for label, _ in accuracy.ROWS]
  assert labels[0] == "FP32" and accuracy.ROWS[0][1] is None
  assert len(set(labels)) == len(labels)
  configs = dict(accuracy.ROWS)
  w8a8 = next(c for l, c in configs.items() if l.startswith("W8A8"))
  assert (w8a8.w_bits, w8a8.a_bits, w8a8.group_size, w8a8.smooth_alpha) == (8, 8, None, 0.5)
  paper = [c for l, c in configs.items() if "paper rule" in l]
  ours = [c for l, c in configs.items() if "sensitivity-chosen" in l]
  assert len(paper) == len(ours) == 3  # RTN, GPTQ, GPTQ + smoothing: each pair differs only in the selection
  for p, o in zip(paper, ours):
    assert (p.weight_method, p.smooth_alpha) == (o.weight_method, o.smooth_alpha)
    assert (p.a8_selection, o.a8_selection) == ("down_proj", "sensitivity")


def test_markdown_and_resume(tmp_path):
  rows = [accuracy.Row("FP32", 10.0, 0.0, 0, 0.0, 1.0), accuracy.Row("X", 11.0, 10.0, 3, 2.0, 1.0)]
  meta = {"model": "m", "corpus": "c", "windows": [8, 2048], "calib": [8, 512], "backend": "dequant"}
  md, _ = accuracy.write(rows, tmp_path, "header", meta)
  assert "| X | 11.000 | +10.00% | 3 |" in md.read_text()
  assert set(accuracy.load_done(tmp_path, meta)) == {"FP32", "X"}
  assert accuracy.load_done(tmp_path, {**meta, "windows": [4, 2048]}) == {}
