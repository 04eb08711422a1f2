"""Calibration statistics of every linear layer's input, gathered in one forward pass.

Each projection kernel is swapped for a probe that records statistics of its input and then
multiplies as usual, so the model code runs unchanged. The pass runs eagerly (not under jit)
because the probes keep Python-side state; the per-input statistics are jitted. Projections that
read the same tensor (q/k/v; gate/up) share one statistics object.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from flexq_jax._tree import copy_containers, get_at, set_at


@dataclasses.dataclass
class InputStats:
  """Running statistics of one linear input [tokens, K]."""

  hessian: jax.Array  # [K, K] fp32, sum of x^T x (GPTQ's H, unnormalized)
  absmax: jax.Array  # [K] fp32, max |x| per input channel (SmoothQuant)
  count: int = 0  # tokens seen


@jax.jit
def _update(hessian, absmax, x):
  x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  return (hessian + jnp.dot(x.T, x, precision=jax.lax.Precision.HIGHEST),
          jnp.maximum(absmax, jnp.max(jnp.abs(x), axis=0)))


class _Probe:
  """Stands in for a kernel; `x @ probe` records x, then returns x @ kernel."""

  def __init__(self, kernel, path: str, recorder: "_Recorder"):
    self.kernel, self.path, self.recorder = kernel, path, recorder

  @property
  def shape(self):
    return self.kernel.shape

  def __rmatmul__(self, x):
    self.recorder.observe(self.path, x)
    return x @ self.kernel


class _Recorder:

  def __init__(self):
    self.stats: dict[str, InputStats] = {}
    self._last_input = None
    self._last_stats = None

  def observe(self, path: str, x):
    if x is self._last_input:  # same tensor as the previous projection (q/k/v, gate/up)
      self.stats[path] = self._last_stats
      return
    k = x.shape[-1]
    st = self.stats.get(path) or InputStats(jnp.zeros((k, k), jnp.float32), jnp.zeros((k,), jnp.float32))
    st.hessian, st.absmax = _update(st.hessian, st.absmax, x)
    st.count += x.size // k
    self.stats[path] = st
    self._last_input, self._last_stats = x, st


def collect_input_stats(
    params: Any,
    linear_paths: dict[str, tuple],
    forward_fn: Callable[[Any, jax.Array], Any],
    calib_batch: jax.Array,
    batch_rows: int = 4,
) -> dict[str, InputStats]:
  """Runs `forward_fn(params_with_probes, tokens)` over the calibration batch, rows at a time.

  Args:
    params: the float parameter pytree.
    linear_paths: {path: index tuple into params} of the kernels to observe.
    forward_fn: the model forward (its output is ignored).
    calib_batch: [B, T] int tokens.
    batch_rows: rows per forward (bounds memory).

  Returns:
    {path: InputStats}; projections that share an input share the object.
  """
  recorder = _Recorder()
  for start in range(0, calib_batch.shape[0], batch_rows):
    probed = copy_containers(params)
    for path, idx in linear_paths.items():
      set_at(probed, idx, _Probe(get_at(params, idx), path, recorder))
    recorder._last_input = None
    forward_fn(probed, jnp.asarray(calib_batch[start:start + batch_rows]))
  return recorder.stats


def collect_block_stats(layer: dict, projections: dict[str, str],
                        chunks: list[tuple[Callable[[dict, jax.Array], jax.Array], jax.Array]]) -> dict[str, InputStats]:
  """The statistics of one decoder block's projections on given block inputs (sequential
  calibration: the inputs come from the blocks before it as already quantized).

  Args:
    layer: the block's weights; projections {name in layer: path} are probed.
    chunks: (run, h) a calibration chunk: run(layer, h) -> h one block (models.llama.block_runner),
      h the block's input hidden states [B, T, D].
  """
  recorder = _Recorder()
  for run, h in chunks:
    probed = dict(layer)
    for name, path in projections.items():
      probed[name] = _Probe(layer[name], path, recorder)
    recorder._last_input = None
    run(probed, h)
  return recorder.stats
