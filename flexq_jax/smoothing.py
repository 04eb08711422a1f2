"""SmoothQuant smoothing: activation outliers moved into the weights before quantization.

For every fold (op, projections) of models.llama.SMOOTHING_FOLDS, a per-input-channel factor
s = act_max^alpha / w_max^(1 - alpha) multiplies the projections' input rows and divides the op
that produces their input (a norm weight, or up_proj's output columns), so the float model is
unchanged and the activations the projections see are flatter.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from flexq_jax._tree import copy_containers
from models import llama
from models.config import LlamaConfig


def smoothing_folds(config: LlamaConfig) -> tuple:
  """The folds that keep this model's function: all of models.llama.SMOOTHING_FOLDS, less
  up_proj -> down_proj when down_proj reads a Hadamard-transformed input (a rotated model,
  flexq_jax/rotation.py): scaling up_proj's columns would no longer scale down_proj's input rows."""
  if config.down_proj_hadamard:
    return tuple(f for f in llama.SMOOTHING_FOLDS if f[0] != "up_proj")
  return llama.SMOOTHING_FOLDS


def smooth(params: dict, stats: dict, alpha: float,
           folds=llama.SMOOTHING_FOLDS) -> tuple[dict, dict[str, np.ndarray]]:
  """SmoothQuant over `folds` (default models.llama.SMOOTHING_FOLDS; a rotated model leaves out
  up_proj -> down_proj, see smoothing_folds).

  Args:
    params: float LLaMA params (unstacked layers list).
    stats: {"layers/<i>/<proj>": InputStats} (flexq_jax.input_stats), the input max per channel.
    alpha: migration strength in [0, 1].

  Returns:
    (smoothed params, {path: s [K]} per smoothed kernel, so input statistics can be rescaled).
  """
  params = copy_containers(params)
  factors = {}
  for i, layer in enumerate(params["layers"]):
    for fold_into, projs in folds:
      act = np.asarray(stats[f"layers/{i}/{projs[0]}"].absmax, np.float64)
      wmax = np.max([np.max(np.abs(np.asarray(layer[p], np.float64)), axis=1) for p in projs], axis=0)
      s = np.where((act > 0) & (wmax > 0), act ** alpha / np.maximum(wmax, 1e-8) ** (1 - alpha), 1.0)
      s = np.clip(s, 1e-5, 1e5)
      for p in projs:
        layer[p] = jnp.asarray(np.asarray(layer[p], np.float64) * s[:, None], layer[p].dtype)
        factors[f"layers/{i}/{p}"] = s
      # A norm weight [D] scales channels; up_proj [D, F] scales its output columns.
      layer[fold_into] = jnp.asarray(np.asarray(layer[fold_into], np.float64) / s, layer[fold_into].dtype)
  return params, factors
