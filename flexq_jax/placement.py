"""Placement: which backend runs each quantized linear, decided once, after quantize() or a load.

    qparams, placement = flexq_jax.place(qparams, "auto")   # each layer on its fastest backend here
    print(placement.summary())                              # "backends: 14 x pallas", and why not others

quantize() and checkpoints give layers in the canonical stored layout ("bitplanes") on the
"reference" backend. place() sets every QuantizedLinear's backend and repacks it, once and
exactly (through the canonical int form), to the layout that backend reads
(flexq_jax/backends.py). A layer the asked backend cannot run keeps its backend and layout, and
the placement says why.

"auto" chooses per layer among the backends of flexq_jax.backends.REGISTRY that may be chosen
automatically, run on this device's platform and can run the layer, in the registry's order of
preference: on CPU the jnp reference; on an NVIDIA GPU the fastest kernel by the card's tuning
table (flexq_jax/tuning/<card>.json, measured by the kernel benchmark). A layer is packed for one
backend, so the choice is made for one activation count M (default 1: batch-1 decode, where
generation spends its time); at other M the layer runs the same backend. The table lookup takes
the measured shape nearest to the layer's [N, K] (log scale) and the measured M nearest to the
asked one; a backend other than the first candidate must be faster there by more than MARGIN (5%:
less is run-to-run noise). Without a table entry the first candidate runs it.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math

import jax
import numpy as np

from flexq_jax import backends, tuning
from flexq_jax._tree import path_str
from flexq_jax.tuning import card_name
from flexq_jax.qlinear import QuantizedLinear

# Another backend replaces the preferred one only when the table has it faster by more than this
# (repeated kernel-benchmark runs on one card differ by a few percent).
MARGIN = 0.05
AUTO = "auto"


def _platform(card: str) -> str:
  return card if card in ("cpu", "tpu") else "gpu"


def _nearest(entries: list[dict], n: int, k: int, m: int, a_bits: int) -> dict | None:
  pool = [e for e in entries if e["a_bits"] == a_bits] or entries
  if not pool:
    return None
  shape_d = lambda e: math.hypot(math.log(e["n"] / n), math.log(e["k"] / k))
  best_shape = min(shape_d(e) for e in pool)
  pool = [e for e in pool if shape_d(e) == best_shape]
  return min(pool, key=lambda e: abs(math.log(e["m"] / max(m, 1))))


def choose(layer: QuantizedLinear, m: int = 1, *, card: str | None = None, table: dict | None = None,
           dtype=None) -> tuple[str, str]:
  """(backend name, why) of the "auto" choice for one layer at M activation rows.

  card: the GPU model whose table decides (default: this device's card_name); "cpu" / "tpu" mean
  that platform. table: a tuning table to use instead of the committed one. dtype: the activation
  dtype, where known (a backend may need one, e.g. bmma bf16).
  """
  card = card or card_name()
  platform = _platform(card)
  candidates, refused = [], []
  for b in backends.REGISTRY:
    if not b.auto:
      continue
    if platform not in b.platforms:
      continue
    ok, why = b.can_run(layer, dtype)
    (candidates.append(b.name) if ok else refused.append(f"{b.name} {why}"))
  kernels = [b for b in candidates if b != backends.REFERENCE.name]
  if not kernels:
    if platform != "gpu":
      return backends.REFERENCE.name, f"{card}: the jnp reference"
    return backends.REFERENCE.name, "no GPU kernel runs this layer: " + "; ".join(refused)
  table = table if table is not None else tuning.load_table(card)
  if table is not None:
    entry = _nearest(table["entries"], layer.out_features, layer.in_features, m, layer.a_bits)
    timed = {b: entry["us"][b] for b in kernels
             if entry is not None and np.isfinite(entry["us"].get(b, float("nan")))}
    if timed:
      best = min(timed, key=timed.get)
      preferred = next(b for b in kernels if b in timed)
      if timed[best] * (1 + MARGIN) > timed[preferred]:
        best = preferred  # a near tie: keep the preferred backend
      others = ", ".join(f"{b} {t:.1f} us" for b, t in sorted(timed.items()))
      return best, f"{card} table at {entry['n']}x{entry['k']} M={entry['m']} A{entry['a_bits']}: {others}"
  return kernels[0], f"no {card} table entry: {kernels[0]} by default"


@dataclasses.dataclass(frozen=True)
class LayerPlacement:
  path: str  # "layers/3/q_proj"
  backend: str  # what runs it now
  layout: str
  why: str  # why that backend ("auto": the table's figures; a refusal of the asked backend)


@dataclasses.dataclass(frozen=True)
class Placement:
  """What place() did: the asked backend and every quantized linear's backend, layout and reason."""

  asked: str
  card: str
  layers: tuple[LayerPlacement, ...]

  def counts(self) -> dict[str, int]:
    """{backend: number of layers}."""
    return dict(collections.Counter(l.backend for l in self.layers))

  def summary(self) -> str:
    lines = ["backends: " + ", ".join(f"{c} x {b}" for b, c in sorted(self.counts().items()))]
    if self.asked != AUTO:
      lines += [f"  {l.path} stays on {l.backend}: {l.why}" for l in self.layers if l.backend != self.asked]
    return "\n".join(lines)

  def to_json(self) -> str:
    return json.dumps({"asked": self.asked, "card": self.card, "counts": self.counts(),
                       "layers": [dataclasses.asdict(l) for l in self.layers]}, indent=1)


def _is_qlinear(x) -> bool:
  return isinstance(x, QuantizedLinear)


def place(params, backend: str = AUTO, *, m: int = 1, device=None, dtype=None) -> tuple[object, Placement]:
  """Every QuantizedLinear of a pytree set to run on `backend`, repacked once to the layout it reads.

  Args:
    params: a pytree holding QuantizedLinear leaves (other leaves are returned as they are).
    backend: a name of flexq_jax.backends.names(), or "auto" (each layer's fastest here).
    m: the activation rows "auto" chooses for (1 = batch-1 decode).
    device: the device "auto" chooses for (default: the first JAX device).
    dtype: the activation dtype the model will run, where known (bmma needs bf16).

  Returns:
    (placed params, Placement). A layer the asked backend cannot run keeps its backend and layout;
    the Placement records why.
  """
  if backend != AUTO:
    target = backends.get(backend)  # a clear error for an unknown name
  card = card_name(device) if backend == AUTO else ""
  record = []

  def convert(keys, layer):
    if not _is_qlinear(layer):
      return layer
    if backend == AUTO:
      name, why = choose(layer, m, card=card, dtype=dtype)
      b = backends.get(name)
    else:
      b, why = target, "asked for"
      ok, refusal = b.can_run(layer, dtype)
      if not ok:
        record.append(LayerPlacement(path_str(keys), layer.backend, layer.layout, f"{b.name} {refusal}"))
        return layer
    want = b.layout_for(layer.w_bits)
    placed = (layer if want is None else layer.with_layout(want)).replace(backend=b.name)
    record.append(LayerPlacement(path_str(keys), b.name, placed.layout, why))
    return placed

  placed = jax.tree_util.tree_map_with_path(convert, params, is_leaf=_is_qlinear)
  return placed, Placement(backend, card, tuple(record))


def backends_of(params) -> dict[str, str]:
  """{path: backend} of every QuantizedLinear in a pytree (what each layer runs now)."""
  leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_qlinear)[0]
  return {path_str(keys): leaf.backend for keys, leaf in leaves if _is_qlinear(leaf)}
