"""Quantized checkpoints: one safetensors file, arrays plus JSON metadata; no pickle anywhere.

A checkpoint is a directory:
  model.safetensors  tensors   "layers.<i>.<proj>.packed" / ".scales" for every QuantizedLinear, and
                               every other parameter under its path with "." separators
                               ("embed_tokens", "layers.3.input_layernorm").
                     metadata  {"flexq": JSON}: format name and version, the model config, the number
                               of layers, every quantized linear's static fields (shape, bits, group
                               size, layout), the quantization report (sensitivity map included), a
                               save id, a checksum of every tensor ("checksums") and one of the
                               metadata itself ("metadata_crc32").
  report.json        a copy of the report for people to read, with the same "save_id". The loader
                     trusts only the report inside model.safetensors; of report.json it checks that
                     it belongs to the same save.
Weights are stored in the "bitplanes" layout (b bits a weight, flexq_jax/formats.py) whatever
backend the model ran on: save() repacks a placed model (exact), and a loaded model runs the
reference until flexq_jax.place places it again (the CLI does, --backend).

Format versions: save() writes VERSION 2. Version 1 (written before checksums existed) still
loads with every check below except the checksums, and load()'s metadata then says
"checksums_verified": False. Any other version is refused, naming it.

Checksums are CRC-32 (zlib.crc32), written "crc32:<8 lowercase hex digits>":
  - of each tensor: over its bytes as stored (C order, little-endian);
  - of the metadata: over json.dumps(meta without "metadata_crc32", sort_keys=True,
    separators=(",", ":")) encoded as UTF-8, so any rewrite that keeps the values keeps it valid.
Why CRC-32 rather than a cryptographic hash such as blake2b: what it guards against is accidental
damage (a flipped bit on disk or in transfer, a truncated or spliced copy). CRC-32 detects every
single-bit error and every burst of up to 32 bits by construction (a hash only with high
probability), misses other random damage with probability 2^-32 a tensor, and runs in the standard
library faster than blake2b, so verifying costs little next to reading the file. It is no defence
against deliberate edits (whoever can edit the file can recompute any unkeyed hash); that is what
the cross-checks are for.

load() checks, all before the tensor it concerns is used and all header-level checks before any
tensor data is read (so a lying size costs nothing): the file framing (truncation, trailing bytes);
format, version and the metadata checksum; the model config's field types and values; that the
number of layers claimed equals the layers the file holds tensors for, and that every name in
"linears" has its tensors; every tensor's presence, dtype and shape against the config (vocab_size
and hidden_size against the embedding, the head counts and head_dim against the q/k/v/o shapes)
and, for a quantized linear, against its (w_bits, out, in), group size (a positive multiple of 128
dividing Kp, or None) and layout (only "bitplanes" is stored); the stored report against every
linear's bits and shape; every tensor's checksum (version 2); scales finite and >= 0, float
tensors finite. Bad input gets a ValueError naming the file and the problem (FileNotFoundError for
no checkpoint at all). What no check can see: a deliberate edit, re-signed, that keeps every shape
and agrees with the report (e.g. num_heads 8 / num_kv_heads 4 for 4 / 2 when hidden_size is set
and head_dim is not: the q/k/v sizes stay the same), or, in a version-1 file or one saved without
a report, a changed a_bits.

save() is atomic as one unit: model.safetensors and report.json are written to temporary files
(".flexq-save-<id>.*") in the target directory, flushed and fsync'ed, report.json is renamed first
and model.safetensors last (the commit); on any failure the temporary files are removed and the
previous report.json restored. A directory still holding such temporary files (a save killed
midway) is refused by load(), naming them. save() refuses a path that is a regular file, and
refuses to write what load() would refuse (non-finite tensors, a report that disagrees).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import uuid
import zlib
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
VERSION = 2  # what save() writes
READABLE_VERSIONS = (1, 2)
FILENAME = "model.safetensors"
REPORT_FILENAME = "report.json"
TEMP_PREFIX = ".flexq-save-"  # save()'s temporary files; any left in a directory means an interrupted save
STORED_LAYOUT = "bitplanes"

_LINEAR_FIELDS = ("in_features", "out_features", "w_bits", "a_bits", "group_size", "layout")
_HEADER_LIMIT = 100 * 2**20  # safetensors' own limit on the JSON header
_CHUNK = 1 << 22  # elements a finiteness check looks at at a time (bounds its temporary)
_FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
_DTYPE_NAMES = {**_FLOAT_DTYPES, "U32": "uint32", "U8": "uint8", "I8": "int8", "I32": "int32", "I64": "int64",
                "U64": "uint64", "U16": "uint16", "I16": "int16", "BOOL": "bool"}
_LAYER_NAME = re.compile(r"layers\.(0|[1-9][0-9]*)\.([A-Za-z_]+)(?:\.(packed|scales))?")


# ----------------------------------------------------------------------------------------- save


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
      arrays[f"{prefix}.packed"] = np.ascontiguousarray(np.asarray(node.packed))
      arrays[f"{prefix}.scales"] = np.ascontiguousarray(np.asarray(node.scales))
      linears[prefix] = {f: getattr(node, f) for f in _LINEAR_FIELDS}
    else:
      arrays[prefix] = np.ascontiguousarray(np.asarray(node))

  walk(params, "")
  return arrays, linears


def _crc32(a: np.ndarray) -> str:
  """The checksum of an array's bytes as safetensors stores them (C order, little-endian)."""
  a = np.ascontiguousarray(a)
  if a.dtype.byteorder == ">":
    a = a.astype(a.dtype.newbyteorder("<"))
  return f"crc32:{zlib.crc32(a.reshape(-1).view(np.uint8)) & 0xFFFFFFFF:08x}"


def _metadata_crc32(meta: dict) -> str:
  """The checksum of the metadata (all but "metadata_crc32"), over its canonical JSON."""
  body = {k: v for k, v in meta.items() if k != "metadata_crc32"}
  text = json.dumps(body, sort_keys=True, separators=(",", ":"))
  return f"crc32:{zlib.crc32(text.encode()) & 0xFFFFFFFF:08x}"


def _all_finite(a: np.ndarray) -> bool:
  flat = a.reshape(-1)
  return all(bool(np.isfinite(flat[i:i + _CHUNK]).all()) for i in range(0, flat.size, _CHUNK))


def _fsync(path: Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _fsync_dir(path: Path) -> None:
  with contextlib.suppress(OSError):  # not every platform / file system syncs a directory
    _fsync(path)


def _write_synced(path: Path, text: str) -> None:
  with open(path, "w", encoding="utf-8") as fh:
    fh.write(text)
    fh.flush()
    os.fsync(fh.fileno())


def save(path: str | os.PathLike, qparams: dict, model_config: LlamaConfig, report=None) -> Path:
  """Writes a quantized parameter pytree (and its report) to directory `path`; returns the file.

  Atomic as a unit (module docstring): a reader sees the previous checkpoint or this one, never a
  mix, and a failure leaves the previous one as it was.

  Raises:
    ValueError: `path` is a regular file; the params are fused, stacked or disagree with the
      config; a tensor is not finite; the report disagrees with the layers.
  """
  out = Path(path)
  if out.exists() and not out.is_dir():
    raise ValueError(f"save: {out} exists and is not a directory; a quantized checkpoint is a directory "
                     f"({FILENAME} + {REPORT_FILENAME}): choose another path or remove that file")
  fused = {f: n for f, n in llama.fused_count(qparams).items() if n} if qparams.get("layers") else {}
  if fused:
    raise ValueError(f"save: params hold fused projections ({', '.join(f'{n} x {f}' for f, n in fused.items())}); "
                     f"checkpoints store the per-projection form: save the params from before "
                     f"models.llama.fuse_projections (fuse again after loading)")
  layers = qparams.get("layers")
  if not isinstance(layers, (list, tuple)) or len(layers) != model_config.num_layers:
    raise ValueError(f"save: params must hold a list of {model_config.num_layers} layers (the config's num_layers), "
                     f"got {type(layers).__name__}{f' of {len(layers)}' if isinstance(layers, (list, tuple)) else ''}")
  arrays, linears = _flatten(qparams)
  for name, a in arrays.items():
    if name.endswith(".scales") and name[: -len(".scales")] in linears:
      if not _all_finite(a) or (a < 0).any():
        raise ValueError(f"save: {name} has negative, NaN or Inf scales; refusing to write a checkpoint load() refuses")
    elif name.endswith(".packed") and name[: -len(".packed")] in linears:
      continue
    elif not _all_finite(a):
      raise ValueError(f"save: tensor {name} has NaN or Inf values; refusing to write a checkpoint load() refuses")
  report_dict = json.loads(report.to_json()) if report is not None else None
  if report_dict is not None:
    _check_report(report_dict, linears, "save")
  save_id = uuid.uuid4().hex
  meta = {
      "format": FORMAT,
      "version": VERSION,
      "save_id": save_id,
      "model_config": dataclasses.asdict(model_config),
      "num_layers": len(layers),
      "linears": linears,
      "report": report_dict,
      "checksums": {name: _crc32(a) for name, a in arrays.items()},
  }
  meta["metadata_crc32"] = _metadata_crc32(meta)
  report_text = json.dumps({"save_id": save_id, **report_dict}, indent=1) if report_dict is not None else None

  out.mkdir(parents=True, exist_ok=True)
  final, final_report = out / FILENAME, out / REPORT_FILENAME
  tmp = out / f"{TEMP_PREFIX}{save_id}.{FILENAME}.tmp"
  tmp_report = out / f"{TEMP_PREFIX}{save_id}.{REPORT_FILENAME}.tmp"
  backup = out / f"{TEMP_PREFIX}{save_id}.{REPORT_FILENAME}.bak"
  had_report, report_swapped = final_report.exists(), False
  try:
    save_file(arrays, str(tmp), metadata={"flexq": json.dumps(meta)})
    _fsync(tmp)
    if report_text is not None:
      _write_synced(tmp_report, report_text)
    if had_report:  # kept until the model is committed, to be put back if that fails
      try:
        os.link(final_report, backup)
      except OSError:
        shutil.copy2(final_report, backup)
    if report_text is not None:
      os.replace(tmp_report, final_report)
    elif had_report:
      final_report.unlink()  # a report of an earlier save must not stand beside this model
    report_swapped = True
    os.replace(tmp, final)  # the commit
    _fsync_dir(out)
  except BaseException:
    with contextlib.suppress(OSError):
      if report_swapped and had_report:
        os.replace(backup, final_report)
      elif report_swapped:
        final_report.unlink(missing_ok=True)
    for t in (tmp, tmp_report, backup):
      with contextlib.suppress(OSError):
        t.unlink(missing_ok=True)
    raise
  for stale in out.glob(f"{TEMP_PREFIX}*"):  # ours, and any an earlier interrupted save left
    with contextlib.suppress(OSError):
      stale.unlink()
  _fsync_dir(out)
  return final


# ----------------------------------------------------------------------------------------- load


def _model_config(d: dict) -> LlamaConfig:
  d = dict(d)
  if d.get("rope_scaling"):
    d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
  if isinstance(d.get("eos_token_id"), list):
    d["eos_token_id"] = tuple(d["eos_token_id"])
  return LlamaConfig(**d)


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _open(path: str | os.PathLike) -> tuple[Path, Path | None]:
  """(the model file, its folder or None), refusing an interrupted save's leftovers and no file."""
  p = Path(path)
  file = p / FILENAME if p.is_dir() else p
  folder = file.parent if file.name == FILENAME else None
  if folder is not None and folder.is_dir():
    leftovers = sorted(x.name for x in folder.glob(f"{TEMP_PREFIX}*"))
    if leftovers:
      raise ValueError(f"{folder}: holds the temporary files of an interrupted save ({', '.join(leftovers)}): "
                       f"the checkpoint there may be incomplete or a mix of two saves; save again, or delete "
                       f"those files if {FILENAME} and {REPORT_FILENAME} are the checkpoint you want")
  if not file.is_file():
    raise FileNotFoundError(f"no quantized checkpoint at {file}")
  _check_framing(file)
  return file, folder


def _safe_open(file: Path):
  try:
    return safe_open(str(file), "np")
  except Exception as e:  # safetensors raises its own error types for a corrupt header
    raise ValueError(f"{file} is not a readable safetensors file: {e}") from None


def load_config(path: str | os.PathLike) -> LlamaConfig:
  """The model config of a checkpoint, from its validated metadata only (no tensor is read): what
  a caller needs to plan where the tensors go (flexq_jax/sharding.py) before load() reads them."""
  file, _ = _open(path)
  with _safe_open(file) as f:
    return _read_config(_read_meta(f, file), file)


def _to_device(name: str, value):
  """load()'s default `convert`: every array onto the default device."""
  if isinstance(value, QuantizedLinear):
    return value.replace(packed=jnp.asarray(value.packed), scales=jnp.asarray(value.scales))
  return jnp.asarray(value)


def load(path: str | os.PathLike, *, convert=None) -> tuple[dict, LlamaConfig, dict]:
  """Reads a checkpoint written by save() (format version 2, or 1).

  convert(name, value) -> leaf: where each parameter goes once read and verified, one at a time
  (name dotted, "layers.3.q_proj"; value a numpy array, or a QuantizedLinear of numpy arrays in the
  stored layout). Default: onto the default device. flexq_jax/sharding.py passes one that puts each
  shard's slice on its device, so no device ever holds a whole tensor or the whole model.

  Returns:
    (quantized params, model config, metadata dict incl. "report" and "checksums_verified":
    False for a version-1 checkpoint, which has no checksums).

  Raises:
    FileNotFoundError: no checkpoint at `path`.
    ValueError: naming the file and the problem: an interrupted save's leftovers, a truncated or
      corrupt file, not a flexq-jax checkpoint, another format version, a checksum mismatch, or
      any tensor or field that disagrees with the others (module docstring).
  """
  file, folder = _open(path)
  with _safe_open(file) as f:
    meta = _read_meta(f, file)
    config = _read_config(meta, file)
    header = {}
    for name in f.keys():
      s = f.get_slice(name)
      header[name] = (tuple(int(d) for d in s.get_shape()), str(s.get_dtype()))
    linears = _check_structure(meta, config, header, file)
    params = _read_tensors(f, meta, config, header, linears, file, convert or _to_device)
  if folder is not None and meta["version"] >= 2:
    _check_report_copy(folder / REPORT_FILENAME, meta, file)
  meta["checksums_verified"] = meta["version"] >= 2
  return params, config, meta


def _check_framing(file: Path) -> None:
  """Truncation and trailing bytes, named as such (safetensors only says "incomplete metadata")."""
  size = file.stat().st_size
  with open(file, "rb") as fh:
    head = fh.read(8)
    if size < 8:
      raise ValueError(f"{file} is truncated: {size} bytes, less than a safetensors header's length field")
    n = int.from_bytes(head, "little")
    if n > _HEADER_LIMIT:
      raise ValueError(f"{file}: header length field says {n} bytes (over {_HEADER_LIMIT}): corrupt, not a checkpoint")
    if 8 + n > size:
      raise ValueError(f"{file} is truncated: its header needs {n} bytes, only {size - 8} follow the length field")
    try:
      entries = json.loads(fh.read(n))
      end = max((int(v["data_offsets"][1]) for k, v in entries.items() if k != "__metadata__"), default=0)
    except Exception:
      return  # not ours to describe: safe_open names what is wrong
  if 8 + n + end > size:
    raise ValueError(f"{file} is truncated: its tensors need {8 + n + end} bytes, the file has {size}")
  if 8 + n + end < size:
    raise ValueError(f"{file} has {size - 8 - n - end} bytes after its tensor data: corrupt or spliced")


def _read_meta(f, file: Path) -> dict:
  raw = (f.metadata() or {}).get("flexq")
  if raw is None:
    raise ValueError(f"{file} has no flexq metadata: not a flexq-jax quantized checkpoint")
  try:
    meta = json.loads(raw)
  except (json.JSONDecodeError, RecursionError) as e:
    raise ValueError(f"{file}: corrupt flexq metadata ({e})") from None
  if not isinstance(meta, dict):
    raise ValueError(f"{file}: corrupt flexq metadata (a JSON {type(meta).__name__}, not an object)")
  if meta.get("format") != FORMAT:
    raise ValueError(f"{file}: format is {meta.get('format')!r}, expected {FORMAT!r}")
  version = meta.get("version")
  if not _is_int(version) or version not in READABLE_VERSIONS:
    raise ValueError(f"{file}: format version {version!r} is not supported (this library reads versions "
                     f"{', '.join(map(str, READABLE_VERSIONS))})")
  if version == 1:
    for key in ("checksums", "metadata_crc32", "save_id"):
      if key in meta:
        raise ValueError(f"{file}: says format version 1 but carries {key!r}, which only version 2 has: "
                         f"the version field was altered")
    return meta
  stored = meta.get("metadata_crc32")
  if stored is None:
    raise ValueError(f"{file}: version-2 metadata without its checksum (metadata_crc32)")
  if stored != _metadata_crc32(meta):
    raise ValueError(f"{file}: metadata checksum mismatch (stored {stored}, computed {_metadata_crc32(meta)}): "
                     f"the flexq metadata was altered or damaged")
  if not isinstance(meta.get("save_id"), str) or not isinstance(meta.get("checksums"), dict):
    raise ValueError(f"{file}: version-2 metadata without a save_id string and a checksums object")
  return meta


def _read_config(meta: dict, file: Path) -> LlamaConfig:
  d = meta.get("model_config")
  if not isinstance(d, dict):
    raise ValueError(f"{file}: invalid model_config in metadata (not an object)")
  for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
               "max_position_embeddings"):
    if name in d and not _is_int(d[name]):
      raise ValueError(f"{file}: invalid model_config in metadata ({name} is {d[name]!r}, not an integer)")
  for name in ("head_dim", "bos_token_id", "pad_token_id"):
    if d.get(name) is not None and not _is_int(d[name]):
      raise ValueError(f"{file}: invalid model_config in metadata ({name} is {d[name]!r}, not an integer or null)")
  eos = d.get("eos_token_id")
  if eos is not None and not _is_int(eos) and not (isinstance(eos, list) and all(map(_is_int, eos))):
    raise ValueError(f"{file}: invalid model_config in metadata (eos_token_id is {eos!r})")
  for name in ("rope_theta", "rms_norm_eps"):
    if name in d and not (_is_number(d[name]) and d[name] > 0):
      raise ValueError(f"{file}: invalid model_config in metadata ({name} is {d[name]!r}, not a positive number)")
  if "head_dim" in d and d["head_dim"] is not None and d["head_dim"] <= 0:
    raise ValueError(f"{file}: invalid model_config in metadata (head_dim is {d['head_dim']})")
  if "tie_word_embeddings" in d and not isinstance(d["tie_word_embeddings"], bool):
    raise ValueError(f"{file}: invalid model_config in metadata (tie_word_embeddings is {d['tie_word_embeddings']!r})")
  rs = d.get("rope_scaling")
  if rs is not None and not (isinstance(rs, dict) and all(_is_number(v) and v > 0 for v in rs.values())):
    raise ValueError(f"{file}: invalid model_config in metadata (rope_scaling is {rs!r})")
  try:
    config = _model_config(d)
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{file}: invalid model_config in metadata ({e})") from None
  n = meta.get("num_layers")
  if not _is_int(n) or n != config.num_layers:
    raise ValueError(f"{file}: metadata num_layers is {n!r}, its model_config says {config.num_layers}")
  return config


def _config_note(c: LlamaConfig) -> str:
  return (f"vocab_size {c.vocab_size}, hidden_size {c.hidden_size}, intermediate_size {c.intermediate_size}, "
          f"num_heads {c.num_heads}, num_kv_heads {c.num_kv_heads}, head_dim {c.resolved_head_dim}")


def _check_structure(meta: dict, config: LlamaConfig, header: dict, file: Path) -> dict[str, dict]:
  """Every header-level check (no tensor data read); returns the validated linear specs."""
  # Counts first, from what the file holds: a claim is never used to size anything.
  present = set()
  for name in header:
    m = _LAYER_NAME.fullmatch(name)
    if m:
      present.add(int(m[1]))
    elif name.startswith("layers"):
      raise ValueError(f"{file}: unexpected tensor name {name!r}")
  n = config.num_layers
  if len(present) != n or (present and max(present) != n - 1):
    held = f"layers {min(present)}..{max(present)}" if present else "none"
    raise ValueError(f"{file}: the metadata claims {n} layers, but the file holds tensors for {len(present)} "
                     f"({held})")
  linears = meta.get("linears")
  if linears is None:
    linears = {}
  if not isinstance(linears, dict):
    raise ValueError(f"{file}: metadata 'linears' is not an object")
  one = jax.eval_shape(lambda: llama.init_params(dataclasses.replace(config, num_layers=1), jax.random.key(0)))
  layer_shapes = {k: tuple(v.shape) for k, v in one["layers"][0].items()}
  top_shapes = {k: tuple(v.shape) for k, v in one.items() if k != "layers"}
  if "lm_head" in linears:  # a quantized lm_head (flexq_jax/lm_head.py): with tied embeddings, an added copy
    top_shapes.setdefault("lm_head", (config.hidden_size, config.vocab_size))
  for prefix in linears:
    if prefix == "lm_head":
      continue
    m = _LAYER_NAME.fullmatch(prefix)
    if not m or m[3] or int(m[1]) >= n or m[2] not in llama.PROJECTIONS or m[2] not in layer_shapes:
      raise ValueError(f"{file}: metadata 'linears' names {prefix!r}, not a projection of this {n}-layer model")
    if f"{prefix}.packed" not in header and f"{prefix}.scales" not in header:
      raise ValueError(f"{file}: metadata 'linears' names {prefix}, but the file has no tensors for it "
                       f"({prefix}.packed, {prefix}.scales)")
  expected = {name for name in top_shapes if name not in linears}
  expected |= {f"lm_head.{suffix}" for suffix in ("packed", "scales") if "lm_head" in linears}
  for i in range(n):
    for name in layer_shapes:
      prefix = f"layers.{i}.{name}"
      expected |= {f"{prefix}.packed", f"{prefix}.scales"} if prefix in linears else {prefix}
  for name in sorted(expected - set(header)):
    raise ValueError(f"{file}: tensor {name} is missing")
  for name in sorted(set(header) - expected):
    raise ValueError(f"{file}: unexpected tensor {name} (not a parameter of the model the metadata describes)")
  specs = {prefix: _check_linear(prefix, spec, top_shapes[prefix] if prefix == "lm_head"
                                else layer_shapes[prefix.rsplit(".", 1)[1]], header, config, file)
           for prefix, spec in linears.items()}
  for name, (shape, dtype) in header.items():
    base = name.rsplit(".", 1)[0] if name.endswith((".packed", ".scales")) else None
    if base in specs:
      continue
    want = layer_shapes[name.split(".", 2)[2]] if name.startswith("layers.") else top_shapes[name]
    if dtype not in _FLOAT_DTYPES:
      raise ValueError(f"{file}: tensor {name} has dtype {_DTYPE_NAMES.get(dtype, dtype)}; float expected")
    if shape != want:
      raise ValueError(f"{file}: tensor {name} has shape {shape}, the model config ({_config_note(config)}) "
                       f"implies {want}")
  if meta.get("report") is not None:
    _check_report(meta["report"], specs, str(file))
  if meta["version"] >= 2:
    sums = meta["checksums"]
    for name in sorted(set(header) - set(sums)):
      raise ValueError(f"{file}: tensor {name} has no checksum in the metadata")
    for name in sorted(set(sums) - set(header)):
      raise ValueError(f"{file}: the metadata has a checksum for tensor {name}, which the file does not hold")
    for name, v in sums.items():
      if not (isinstance(v, str) and re.fullmatch(r"crc32:[0-9a-f]{8}", v)):
        raise ValueError(f"{file}: checksum of tensor {name} is {v!r}, not 'crc32:<8 hex digits>'")
  return specs


def _check_linear(prefix: str, spec, kn: tuple[int, int], header: dict, config: LlamaConfig, file: Path) -> dict:
  if not isinstance(spec, dict) or set(spec) != set(_LINEAR_FIELDS):
    raise ValueError(f"{file}: bad metadata for {prefix}: fields must be {', '.join(_LINEAR_FIELDS)}")
  for field in ("in_features", "out_features", "w_bits", "a_bits"):
    if not _is_int(spec[field]):
      raise ValueError(f"{file}: bad metadata for {prefix}: {field} is {spec[field]!r}, not an integer")
  k, n = spec["in_features"], spec["out_features"]
  w_bits, a_bits, group, layout = spec["w_bits"], spec["a_bits"], spec["group_size"], spec["layout"]
  if (k, n) != kn:
    raise ValueError(f"{file}: {prefix} is {k} x {n} (in x out) in the metadata, but the model config "
                     f"({_config_note(config)}) makes it {kn[0]} x {kn[1]}")
  if layout != STORED_LAYOUT:
    known = "a layout checkpoints never store" if layout in formats.LAYOUTS else "an unknown layout"
    raise ValueError(f"{file}: {prefix} has layout {layout!r}, {known} (only {STORED_LAYOUT!r} is stored)")
  if not 2 <= w_bits <= 8:
    raise ValueError(f"{file}: {prefix} has unsupported w_bits {w_bits} (2..8)")
  if not (2 <= a_bits <= 8 or a_bits == 16):
    raise ValueError(f"{file}: {prefix} has unsupported a_bits {a_bits} (2..8, or 16 for float activations)")
  kp = core.padded_k(k)
  if group is not None and (not _is_int(group) or group <= 0 or group % core.GROUP or kp % group):
    raise ValueError(f"{file}: {prefix} has group_size {group!r}: it must be null or a positive multiple of "
                     f"{core.GROUP} dividing the padded K={kp}")
  groups = 1 if group is None else kp // group
  want_packed = (w_bits, n, core.stored_k(k) // core.WORD_BITS)
  for suffix, dtype, want in (("packed", "U32", want_packed), ("scales", "F16", (n, groups))):
    got_shape, got_dtype = header[f"{prefix}.{suffix}"]
    if got_dtype != dtype or got_shape != want:
      raise ValueError(f"{file}: {prefix}.{suffix} is {_DTYPE_NAMES.get(got_dtype, got_dtype)} {got_shape}, expected "
                       f"{_DTYPE_NAMES[dtype]} {want} (w_bits {w_bits}, out {n}, in {k}, group_size {group})")
  return spec


def _check_report(report, linears: dict[str, dict], where: str) -> None:
  """The report (a dict as QuantReport.to_json writes it) must describe exactly these linears (those of
  the blocks: a quantized lm_head is an add-on its config names, flexq_jax/lm_head.py)."""
  if "lm_head" in linears:
    cfg = report.get("config") if isinstance(report, dict) else None
    head = linears["lm_head"]
    if not isinstance(cfg, dict) or not str(cfg.get("lm_head", "")).startswith(f"w{head['w_bits']}a{head['a_bits']}"):
      raise ValueError(f"{where}: the model has a W{head['w_bits']}A{head['a_bits']} lm_head, but the stored report's "
                       f"config says lm_head {cfg.get('lm_head') if isinstance(cfg, dict) else None!r}")
    linears = {k: v for k, v in linears.items() if k != "lm_head"}
  rows = report.get("layers") if isinstance(report, dict) else None
  if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("path"), str) for r in rows):
    raise ValueError(f"{where}: the stored report is malformed (no list of layers with paths)")
  by_prefix = {}
  for r in rows:
    prefix = r["path"].replace("/", ".")
    if prefix in by_prefix:
      raise ValueError(f"{where}: the stored report lists {r['path']} twice")
    by_prefix[prefix] = r
  for prefix in sorted(set(linears) ^ set(by_prefix)):
    side = "the report has no entry for" if prefix in linears else "the report lists a layer with no tensors:"
    raise ValueError(f"{where}: {side} {prefix}")
  cfg = report.get("config") if isinstance(report.get("config"), dict) else {}
  for prefix, spec in linears.items():
    for field in ("in_features", "out_features", "w_bits", "a_bits"):
      if by_prefix[prefix].get(field) != spec[field]:
        raise ValueError(f"{where}: {prefix} has {field} {spec[field]!r}, the stored report says "
                         f"{by_prefix[prefix].get(field)!r}")
    for field in ("w_bits", "group_size"):
      if field in cfg and cfg[field] != spec[field]:
        raise ValueError(f"{where}: {prefix} has {field} {spec[field]!r}, the stored report's quantization "
                         f"config says {cfg[field]!r}")


def _read_tensors(f, meta: dict, config: LlamaConfig, header: dict, linears: dict, file: Path, convert) -> dict:
  """Reads every tensor (its size checked already), verifies it, and builds the params, handing
  each parameter to `convert` as soon as it is whole (a quantized linear: its two tensors)."""
  sums = meta.get("checksums") if meta["version"] >= 2 else None
  params: dict = {"layers": [dict() for _ in range(config.num_layers)]}  # num_layers == the layers held
  pending: dict[str, np.ndarray] = {}  # one quantized linear's first tensor, until its second is read
  for name in sorted(header):  # a linear's ".packed" and ".scales" sort next to each other
    a = f.get_tensor(name)
    if sums is not None and _crc32(a) != sums[name]:
      raise ValueError(f"{file}: tensor {name} fails its checksum (stored {sums[name]}, computed {_crc32(a)}): "
                       f"its data is damaged")
    base, _, suffix = name.rpartition(".")
    if base in linears and suffix == "scales":
      if not _all_finite(a) or (a < 0).any():
        raise ValueError(f"{file}: {name} has negative, NaN or Inf values")
    elif base not in linears and not _all_finite(a):
      raise ValueError(f"{file}: tensor {name} has NaN or Inf values")
    if base not in linears:
      _put(params, name, convert(name, a))
      continue
    pending[name] = a
    if f"{base}.packed" in pending and f"{base}.scales" in pending:
      spec = linears[base]
      _put(params, base, convert(base, QuantizedLinear(
          packed=pending.pop(f"{base}.packed"), scales=pending.pop(f"{base}.scales"),
          in_features=spec["in_features"], out_features=spec["out_features"], w_bits=spec["w_bits"],
          a_bits=spec["a_bits"], group_size=spec["group_size"], layout=spec["layout"])))
    del a
  return params


def _put(params: dict, dotted: str, value) -> None:
  parts = dotted.split(".")
  if parts[0] == "layers":
    params["layers"][int(parts[1])][parts[2]] = value
  else:
    params[dotted] = value


def _check_report_copy(copy: Path, meta: dict, file: Path) -> None:
  """report.json, if there, must come from the same save as the model file."""
  if not copy.exists():
    return
  try:
    sid = json.loads(copy.read_text(encoding="utf-8")).get("save_id")
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, RecursionError) as e:
    raise ValueError(f"{copy}: unreadable report copy beside {file} ({e}); delete it or save again") from None
  if sid != meta["save_id"]:
    raise ValueError(f"{copy} comes from another save (save id {sid!r}) than {file} ({meta['save_id']!r}): "
                     f"not one checkpoint; save again, or delete {copy.name} (the model file holds its own report)")
