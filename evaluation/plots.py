"""Pictures: the sensitivity heatmap (layers x projections)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

PROJ_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def sensitivity_heatmap(layers: list, path: str | os.PathLike, title: str = "FlexQ sensitivity") -> Path:
  """Writes a PNG: Fisher sensitivity per (block, projection), A8 layers outlined.

  Args:
    layers: QuantReport.layers (needs .path, .sensitivity, .a_bits).
    path: output file (.png).
    title: figure title.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  blocks = 1 + max(int(l.path.split("/")[1]) for l in layers)
  score = np.full((blocks, len(PROJ_ORDER)), np.nan)
  high = np.zeros_like(score, bool)
  base_bits = min(l.a_bits for l in layers)
  for l in layers:
    _, i, proj = l.path.split("/")
    j = PROJ_ORDER.index(proj)
    if l.sensitivity is not None:
      score[int(i), j] = l.sensitivity
    high[int(i), j] = l.a_bits > base_bits
  fig, ax = plt.subplots(figsize=(5.5, max(3.0, 0.22 * blocks + 1.2)))
  shown = np.log10(np.maximum(score, 1e-12)) if np.isfinite(score).any() else np.zeros_like(score)
  im = ax.imshow(shown, aspect="auto", cmap="viridis", interpolation="nearest")
  for i, j in zip(*np.nonzero(high)):
    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.6))
  ax.set_xticks(range(len(PROJ_ORDER)), [p.replace("_proj", "") for p in PROJ_ORDER])
  ax.set_ylabel("decoder block")
  ax.set_title(title, fontsize=10)
  fig.colorbar(im, ax=ax, label="log10 est. loss increase A8->A6 (nats)")
  ax.text(0.0, -0.08 - 0.5 / max(blocks, 1), "red: kept at 8-bit activations", transform=ax.transAxes,
          fontsize=8, color="red", va="top")
  fig.tight_layout()
  out = Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out
