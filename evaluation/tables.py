"""Markdown table cells shared by the benchmarks' tables."""

from __future__ import annotations

import math


def cell(x: float, spec: str) -> str:
  """A table cell: the number formatted with `spec`, or "-" where there is none (a baseline not
  run, a failed run, a ratio with no denominator): a table never prints nan or inf as a figure."""
  return format(x, spec) if x is not None and math.isfinite(x) else "-"
