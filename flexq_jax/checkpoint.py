"""Quantized checkpoints: one safetensors file, arrays plus JSON metadata; no pickle anywhere.

File `<dir>/model.safetensors`:
  tensors   "layers.<i>.<proj>.packed" / ".scales" for every QuantizedLinear, and every other
            parameter under its path with "." separators ("embed_tokens", "layers.3.input_layernorm").
  metadata  {"flexq": JSON} with format name and version, the model config, and for every
            quantized linear its static fields (shape, bits, group size, layout); the report
            (sensitivity map included) is stored as well.
Weights are stored in the "bitplanes" layout (b bits a weight, flexq_jax/formats.py) whatever
backend the model ran on: save() repacks a placed model (exact), and a loaded model runs the
reference until flexq_jax.place places it again (the CLI does, --backend).
Beside it, `<dir>/report.json` repeats the quantization report for people to read.
Everything read back is validated (format version, names, shapes, dtypes, bit widths) before
an array is used.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from flexq_jax import formats
from flexq_jax.qlinear import QuantizedLinear
from models import llama
from models.config import LlamaConfig, RopeScaling
from pallas_kernels import core

FORMAT = "flexq-jax"
VERSION = 1
FILENAME = "model.safetensors"


STORED_LAYOUT = "bitplanes"


def _flatten(params: dict) -> tuple[dict[str, Any], dict[str, dict]]:
  arrays, linears = {}, {}

  def walk(node, prefix):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, (list, tuple)):
      for i, v in enumerate(node):
        walk(v, f"{prefix}.{i}")
    elif isinstance(node, QuantizedLinear):
      node = node.with_layout(STORED_LAYOUT)  # a model placed on a GPU backend: back to the storage layout
      arrays[f"{prefix}.packed"] = np.asarray(node.packed)
      arrays[f"{prefix}.scales"] = np.asarray(node.scales)
      linears[prefix] = {f: getattr(node, f) for f in
                         ("in_features", "out_features", "w_bits", "a_bits", "group_size", "layout")}
    else:
      arrays[prefix] = np.asarray(node)

  walk(params, "")
  return arrays, linears


def save(path: str | os.PathLike, qparams: dict, model_config: LlamaConfig, report=None) -> Path:
  """Writes a quantized parameter pytree (and its report) to directory `path`; returns the file."""
  fused = {f: n for f, n in llama.fused_count(qparams).items() if n} if qparams.get("layers") else {}
  if fused:
    raise ValueError(f"save: params hold fused projections ({', '.join(f'{n} x {f}' for f, n in fused.items())}); "
                     f"checkpoints store the per-projection form: save the params from before "
                     f"models.llama.fuse_projections (fuse again after loading)")
  out = Path(path)
  out.mkdir(parents=True, exist_ok=True)
  arrays, linears = _flatten(qparams)
  meta = {
      "format": FORMAT,
      "version": VERSION,
      "model_config": dataclasses.asdict(model_config),
      "num_layers": len(qparams["layers"]),
      "linears": linears,
      "report": json.loads(report.to_json()) if report is not None else None,
  }
  file = out / FILENAME
  save_file(arrays, str(file), metadata={"flexq": json.dumps(meta)})
  if report is not None:
    (out / "report.json").write_text(report.to_json())
  return file


def _model_config(d: dict) -> LlamaConfig:
  d = dict(d)
  if d.get("rope_scaling"):
    d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
  if isinstance(d.get("eos_token_id"), list):
    d["eos_token_id"] = tuple(d["eos_token_id"])
  return LlamaConfig(**d)


def load(path: str | os.PathLike) -> tuple[dict, LlamaConfig, dict]:
  """Reads a checkpoint written by save().

  Returns:
    (quantized params, model config, metadata dict incl. "report").

  Raises:
    FileNotFoundError: no checkpoint at `path`.
    ValueError: the file is not a flexq-jax checkpoint, has another format version, or any
      tensor or field disagrees with what the metadata implies.
  """
  p = Path(path)
  file = p / FILENAME if p.is_dir() else p
  if not file.is_file():
    raise FileNotFoundError(f"no quantized checkpoint at {file}")
  try:
    f = safe_open(str(file), "np")
  except Exception as e:  # safetensors raises its own error types for a corrupt header
    raise ValueError(f"{file} is not a readable safetensors file: {e}") from None
  with f:
    raw = (f.metadata() or {}).get("flexq")
    if raw is None:
      raise ValueError(f"{file} has no flexq metadata: not a flexq-jax quantized checkpoint")
    try:
      meta = json.loads(raw)
    except json.JSONDecodeError as e:
      raise ValueError(f"{file}: corrupt flexq metadata ({e})") from None
    if meta.get("format") != FORMAT:
      raise ValueError(f"{file}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
      raise ValueError(f"{file}: format version {meta.get('version')} is not supported (this library reads {VERSION})")
    try:
      config = _model_config(meta["model_config"])
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{file}: invalid model_config in metadata ({e})") from None
    names = set(f.keys())
    linears = meta.get("linears") or {}
    params: dict = {"layers": [dict() for _ in range(int(meta.get("num_layers", 0)))]}
    used = set()
    for prefix, spec in linears.items():
      layer = _load_linear(f, names, prefix, spec, file)
      _put(params, prefix, layer, file)
      used |= {f"{prefix}.packed", f"{prefix}.scales"}
    for name in sorted(names - used):
      a = f.get_tensor(name)
      if not np.issubdtype(a.dtype, np.floating) and a.dtype.name != "bfloat16":
        raise ValueError(f"{file}: tensor {name} has dtype {a.dtype}; float expected")
      _put(params, name, jnp.asarray(a), file)
  _check_complete(params, config, file)
  return params, config, meta


def _load_linear(f, names: set, prefix: str, spec: dict, file: Path) -> QuantizedLinear:
  try:
    k, n = int(spec["in_features"]), int(spec["out_features"])
    w_bits, a_bits = int(spec["w_bits"]), int(spec["a_bits"])
    group, layout = spec["group_size"], spec["layout"]
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{file}: bad metadata for {prefix}: {e}") from None
  if layout not in formats.LAYOUTS:
    raise ValueError(f"{file}: {prefix} has unknown layout {layout!r}")
  if not 2 <= w_bits <= 8 or not (2 <= a_bits <= 8 or a_bits == 16):
    raise ValueError(f"{file}: {prefix} has unsupported bit widths w{w_bits} a{a_bits}")
  for suffix in ("packed", "scales"):
    if f"{prefix}.{suffix}" not in names:
      raise ValueError(f"{file}: tensor {prefix}.{suffix} is missing")
  packed = f.get_tensor(f"{prefix}.packed")
  scales = f.get_tensor(f"{prefix}.scales")
  kp = core.padded_k(k)
  groups = 1 if group is None else kp // int(group)
  want_packed = (w_bits, n, core.stored_k(k) // core.WORD_BITS)
  if packed.dtype != np.uint32 or packed.shape != want_packed:
    raise ValueError(f"{file}: {prefix}.packed is {packed.dtype} {packed.shape}, expected uint32 {want_packed}")
  if scales.dtype != np.float16 or scales.shape != (n, groups):
    raise ValueError(f"{file}: {prefix}.scales is {scales.dtype} {scales.shape}, expected float16 {(n, groups)}")
  if not np.isfinite(scales).all() or (scales < 0).any():
    raise ValueError(f"{file}: {prefix}.scales has negative, NaN or Inf values")
  return QuantizedLinear(packed=jnp.asarray(packed), scales=jnp.asarray(scales), in_features=k, out_features=n,
                         w_bits=w_bits, a_bits=a_bits, group_size=None if group is None else int(group),
                         layout=layout)


def _put(params: dict, dotted: str, value, file: Path) -> None:
  parts = dotted.split(".")
  if parts[0] == "layers":
    if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) >= len(params["layers"]):
      raise ValueError(f"{file}: unexpected tensor name {dotted!r}")
    params["layers"][int(parts[1])][parts[2]] = value
  elif len(parts) == 1:
    params[parts[0]] = value
  else:
    raise ValueError(f"{file}: unexpected tensor name {dotted!r}")


def _check_complete(params: dict, config: LlamaConfig, file: Path) -> None:
  want = jax.eval_shape(lambda: llama.init_params(config, jax.random.key(0)))
  if len(params["layers"]) != config.num_layers:
    raise ValueError(f"{file}: {len(params['layers'])} layers, the config says {config.num_layers}")
  for name in want:
    if name != "layers" and name not in params:
      raise ValueError(f"{file}: tensor {name} is missing")
  for i, (got, exp) in enumerate(zip(params["layers"], want["layers"])):
    for name, shape_struct in exp.items():
      if name not in got:
        raise ValueError(f"{file}: tensor layers.{i}.{name} is missing")
      if tuple(got[name].shape) != tuple(shape_struct.shape):
        raise ValueError(f"{file}: layers.{i}.{name} has shape {tuple(got[name].shape)}, "
                         f"expected {tuple(shape_struct.shape)}")
