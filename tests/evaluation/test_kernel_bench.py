"""The kernel benchmark's CPU-side parts: timing loop structure, floor arithmetic, report files."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evaluation import kernel_bench as kb
from evaluation import probe_gemv_floor


def test_loop_keeps_every_call_inside_the_loop():
  # XLA must neither hoist the calls out of the loop (loop-invariant) nor drop them (unused).
  bufs = [(jnp.full((64, 32), float(i)),) for i in range(3)]
  hlo = kb._loop(lambda x, w: jnp.dot(x, w), 5).lower(jnp.ones((4, 64)), bufs).compile().as_text()
  comps = {c.strip().split(" ")[0].lstrip("%"): c for c in hlo.split("\n\n") if c.strip()}
  dots = [name for name, c in comps.items() if " dot(" in c]
  assert len(dots) == 3  # one per weight buffer, none dropped
  entry = next(c for name, c in comps.items() if name == "ENTRY")
  assert "while(" in entry and not any(f"calls=%{d}," in entry or f"calls=%{d}\n" in entry for d in dots)


def test_floor_uses_the_fastest_rate_and_rerender(tmp_path):
  # cuBLAS at M = 1 streaming 2NK bytes in 10 us beats the copy rate: it sets the ceiling.
  n, k = 4096, 4096
  c = kb.Case("7b.o", n, k, 1, 6, ours_us=20.0, xla_bf16_us=12.0, xla_w8a8_us=15.0, cublas_bf16_us=10.0,
              cublaslt_i8_us=11.0, rel_err=1e-3)
  bws = kb.with_stream_ceiling([c], {"jax": 1e12})
  stream = (2 * n * k + 2 * k + 2 * n) / 10e-6
  assert np.isclose(bws["bf16_gemv_stream"], stream)
  assert np.isclose(c.floor_us, kb.floor_bytes(1, n, k) / stream * 1e6)
  path = tmp_path / "h100-2026-01-01.json"
  path.write_text(json.dumps(dict(card="h100", device="NVIDIA H100", date="2026-01-01", jax=jax.__version__,
                                  copy_bandwidth={"jax": 1e12}, cases=[kb.dataclasses.asdict(c)], profile=[])))
  kb.rerender(str(path))
  md = path.with_suffix(".md").read_text()
  assert "| 7b.o | 4096x4096 | 1 | 6 | 20.0 |" in md and "bf16_gemv_stream" in md
  assert path.with_suffix(".png").stat().st_size > 0


def test_bmma_column_and_old_files_without_it(tmp_path):
  c = kb.Case("7b.o", 4096, 4096, 1, 6, ours_us=20.0, floor_us=10.0, xla_bf16_us=12.0, xla_w8a8_us=15.0,
              rel_err=1e-3, bmma_us=25.0, bmma_rel_err=2e-3)
  md = kb.markdown([c], {"jax": 1e12}, "h200", "2026-01-01", "NVIDIA H200")
  header = next(line for line in md.splitlines() if line.startswith("| layer"))
  row = next(line for line in md.splitlines() if line.startswith("| 7b.o"))
  cells = dict(zip([h.strip() for h in header.strip("|").split("|")], [v.strip() for v in row.strip("|").split("|")]))
  assert cells["BMMA us"] == "25.0" and cells["BMMA rel err"] == "2.0e-03"
  assert cells["BMMA % floor"] == f"{100 * c.floor_us / 25.0:.0f}"
  # A run saved before the column existed still renders (the BMMA cells read "-", never nan).
  old = {k: v for k, v in kb.dataclasses.asdict(c).items() if not k.startswith("bmma")}
  path = tmp_path / "h200-2026-01-01.json"
  path.write_text(json.dumps(dict(card="h200", device="NVIDIA H200", date="2026-01-01", jax=jax.__version__,
                                  copy_bandwidth={"jax": 1e12}, cases=[old], profile=[])))
  kb.rerender(str(path))
  md = path.with_suffix(".md").read_text()
  assert "| - | - | - |" in md and "nan" not in md


def test_gemv_candidates_respect_the_k_groups():
  for m, n, k in [(1, 4096, 4096), (1, 8192, 28672), (4, 4096, 512)]:
    groups = -(-k // 128)
    cands = kb.gemv_candidates(m, n, k, full=m == 1)
    assert cands and all(c.gemv and (groups // c.split_k >= c.block_kg or c.split_k == 1) for c in cands)
    assert len(set(cands)) == len(cands)


def test_gemv_cuda_table_marks_a_failed_kernel_not_nan():
  rows = [dict(shape="7b.o", n=4096, k=4096, m=1, a_bits=6, floor_us=3.0, pallas_us=6.0, pallas_err=1e-3,
               cuda_us=float("nan"), cuda_err=float("nan"), cuda_gemv_alone_us=float("nan"))]
  md = kb.gemv_cuda_markdown(rows, "h200", "2026-12-01")
  assert "| 7b.o | 4096x4096 | 1 | 6 | 3.0 | 6.0 | 50 | - | - | - | - | - | - | - | 1.0e-03 | - | - |" in md
  assert "nan" not in md


def test_gemv_floor_probe_reads_named_and_nxk_shapes_and_refuses_others():
  assert probe_gemv_floor._shape("7b.o") == ("7b.o", (4096, 4096))
  assert probe_gemv_floor._shape("6144x4096") == ("6144x4096", (6144, 4096))
  with pytest.raises(SystemExit, match="neither a shape name"):
    probe_gemv_floor._shape("7bx")


def test_w8a8_table_takes_own_w8a8_from_the_kernel_that_ran_and_marks_the_other(tmp_path):
  nan = float("nan")
  row = dict(shape="7b.o", n=4096, k=4096, m=16, kernel="mosaic_small", w6a6_us=20.0, w6a6_err=1e-3, w6a8_us=25.0,
             w8a8_triton_us=30.0, w8a8_mosaic_us=nan, cublas_bf16_us=40.0, cublaslt_i8_us=35.0, xla_bf16_us=41.0,
             xla_w8a8_us=33.0, w8a8_own_us=30.0)
  kb._write_rows(str(tmp_path), "w8a8-cmp", [row], kb.w8a8_markdown, echo=False)
  md = next(tmp_path.glob("*-w8a8-cmp.md")).read_text()
  line = next(l for l in md.splitlines() if l.startswith("| 7b.o"))
  cells = [c.strip() for c in line.strip("|").split("|")]
  assert cells[7] == "30.0 / -"  # the Mosaic W8A8 kernel did not run at M = 16: a dash, not "nan"
  assert cells[12:15] == ["2.00", "1.60", "1.50"]  # cuBLAS / W6A6, cuBLAS / W6A8, own W8A8 / W6A6
  assert "nan" not in md
  assert json.loads(next(tmp_path.glob("*-w8a8-cmp.json")).read_text())["rows"][0]["w8a8_own_us"] == 30.0
