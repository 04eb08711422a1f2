"""Hostile or broken model files (issue 15): each must fail fast with a ValueError naming the file.

Every file is built here, in tmp_path: truncated and corrupt safetensors / GGUF files, malformed
config.json, index and tokenizer files, and files claiming sizes they do not hold.
"""

import json
import os
import pathlib
import struct
import subprocess
import sys
import textwrap

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file

from models import loaders
from models.tokenizer import Tokenizer
from tests.models.test_loaders import hf_config_dict, hf_weights, write_gguf, write_hf_dir, write_tiny_tokenizer_json

ROOT = pathlib.Path(__file__).resolve().parents[2]


def hf_dir(tmp_path, name="ckpt", shards=1, **config) -> pathlib.Path:
  return write_hf_dir(tmp_path / name, hf_weights(), hf_config_dict(**config), shards=shards)


def gguf_file(tmp_path, name="tiny.gguf", tokenizer=False) -> pathlib.Path:
  path = tmp_path / name
  write_gguf(path, hf_weights(), tokenizer=tokenizer)
  return path


def patch_gguf(path: pathlib.Path, key: str, fmt: str, value, skip: int = 4):
  """Overwrites the value of metadata `key` in place: `skip` bytes after the key (its type) come first."""
  data = bytearray(path.read_bytes())
  encoded = key.encode()
  at = data.index(struct.pack("<Q", len(encoded)) + encoded) + 8 + len(encoded) + skip
  struct.pack_into("<" + fmt, data, at, value)
  path.write_bytes(bytes(data))


def raises_naming(exc, path, *fragments):
  """Context manager: `exc` whose message names `path` and contains every fragment."""

  class Check:
    def __enter__(self):
      self.ctx = pytest.raises(exc)
      self.info = self.ctx.__enter__()
      return self.info

    def __exit__(self, *args):
      suppressed = self.ctx.__exit__(*args)
      message = str(self.info.value)
      assert str(path) in message, message
      for fragment in fragments:
        assert fragment in message, (fragment, message)
      return suppressed

  return Check()


# ----------------------------------------------------------------------------------------------
# 1. Huge sizes claimed by a file: refused in well under a second, under a memory limit.

_LIMITED_LOAD = textwrap.dedent("""
    import json, resource, sys, time
    from models import loaders
    # The limit is set after the imports (JAX alone maps gigabytes of address space): whatever
    # the load allocates must fit in 1 GiB more than the interpreter already holds.
    vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))
    start = time.perf_counter()
    try:
      getattr(loaders, sys.argv[1])(sys.argv[2])
      result = {"type": None, "message": ""}
    except BaseException as e:
      result = {"type": type(e).__name__, "message": str(e)}
    result["elapsed"] = time.perf_counter() - start
    print(json.dumps(result))
""")


def load_under_memory_limit(function: str, path: pathlib.Path) -> dict:
  out = subprocess.run([sys.executable, "-c", _LIMITED_LOAD, function, str(path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr
  return json.loads(out.stdout.strip().splitlines()[-1])


def _huge_hf_layers(tmp_path):
  return "load_hf_checkpoint", hf_dir(tmp_path, num_hidden_layers=10**9), "config.json", ["num_hidden_layers=1000000000"]


def _huge_hf_vocab(tmp_path):
  return "load_hf_checkpoint", hf_dir(tmp_path, vocab_size=10**12), "model.safetensors", ["model.embed_tokens.weight", "shape"]


def _huge_gguf_blocks(tmp_path):
  path = gguf_file(tmp_path)
  patch_gguf(path, "llama.block_count", "I", 10**9)
  return "load_gguf", path, path.name, ["llama.block_count=1000000000", "only 2 layer"]


def _huge_gguf_width(tmp_path):
  path = gguf_file(tmp_path)
  patch_gguf(path, "llama.embedding_length", "I", 2**31)
  return "load_gguf", path, path.name, ["token_embd.weight", "shape"]


def _huge_gguf_array(tmp_path):
  path = gguf_file(tmp_path, tokenizer=True)
  patch_gguf(path, "tokenizer.ggml.token_type", "Q", 2**60, skip=8)  # value type, item type, then the count
  return "load_model", path, path.name, ["tokenizer.ggml.token_type", "entries"]


def _huge_gguf_string(tmp_path):
  path = gguf_file(tmp_path)
  patch_gguf(path, "general.architecture", "Q", 2**62)  # the string's length
  return "load_gguf", path, path.name, ["truncated or corrupt GGUF"]


@pytest.mark.parametrize("case", [_huge_hf_layers, _huge_hf_vocab, _huge_gguf_blocks, _huge_gguf_width,
                                  _huge_gguf_array, _huge_gguf_string], ids=lambda f: f.__name__[1:])
def test_huge_claimed_sizes_are_refused_fast_and_small(tmp_path, case):
  """A count or size read from a file is checked against the tensors / bytes actually present.

  Runs the load in a subprocess whose address space is limited (RLIMIT_AS) to 1 GiB above what the
  interpreter holds after importing JAX, and asserts the refusal takes under 5 s.
  """
  function, path, named, fragments = case(tmp_path)
  result = load_under_memory_limit(function, path)
  assert result["type"] == "ValueError", result
  assert named in result["message"], result
  for fragment in fragments:
    assert fragment in result["message"], (fragment, result)
  assert result["elapsed"] < 5, result


# ----------------------------------------------------------------------------------------------
# 2. Malformed config.json.


@pytest.mark.parametrize("content,fragments", [
    (b"{not json", ["not a valid config.json"]),
    (b"\xff\xfe{}", ["not a valid config.json"]),
    (b"[1, 2, 3]", ["expected a JSON object"]),
    (b"null", ["expected a JSON object"]),
    ({"hidden_size": "abc"}, ["'hidden_size'", "'abc'"]),
    ({"hidden_size": None}, ["'hidden_size'", "missing"]),
    ({"num_hidden_layers": 2.5}, ["'num_hidden_layers'", "integer"]),
    ({"vocab_size": -5}, ["'vocab_size'", "positive"]),
    ({"intermediate_size": 0}, ["'intermediate_size'", "positive"]),
    ({"num_attention_heads": True}, ["'num_attention_heads'"]),
    ({"num_attention_heads": 6, "num_key_value_heads": 6}, ["hidden_size (64) is not divisible by num_heads (6)"]),
    ({"num_key_value_heads": 3}, ["num_heads (4) must be a multiple of num_kv_heads (3)"]),
    ({"rms_norm_eps": "1e-6"}, ["'rms_norm_eps'"]),
    ({"rope_theta": -1.0}, ["'rope_theta'"]),
    ({"tie_word_embeddings": "false"}, ["'tie_word_embeddings'"]),
    ({"architectures": "LlamaForCausalLM"}, ["'architectures'"]),
    ({"eos_token_id": 40}, ["eos_token_id", "[0, 40)"]),
    ({"bos_token_id": -1}, ["'bos_token_id'"]),
    ({"eos_token_id": [2, "x"]}, ["'eos_token_id'"]),
    ({"rope_scaling": [1]}, ["'rope_scaling'"]),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, ["rope_scaling.low_freq_factor"]),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}}, ["high_freq_factor"]),
], ids=lambda v: None)
def test_malformed_config_json(tmp_path, content, fragments):
  directory = hf_dir(tmp_path)
  config = directory / "config.json"
  if isinstance(content, dict):
    content = json.dumps({**hf_config_dict(), **content}).encode()
  config.write_bytes(content)
  with raises_naming(ValueError, config, *fragments):
    loaders.load_hf_checkpoint(directory)
  with raises_naming(ValueError, config, *fragments):
    loaders.load_model(directory)


def test_pad_token_id_minus_one_means_no_padding_token(tmp_path):
  """Older LLaMA configs write pad_token_id -1 for "none": that loads, as None (other negative ids
  of special tokens are refused above)."""
  directory = hf_dir(tmp_path)
  (directory / "config.json").write_text(json.dumps({**hf_config_dict(), "pad_token_id": -1}))
  config, _ = loaders.load_hf_checkpoint(directory)
  assert config.pad_token_id is None


def test_config_shape_disagreeing_with_tensor_names_tensor_and_file(tmp_path):
  directory = hf_dir(tmp_path, intermediate_size=128)
  with raises_naming(ValueError, directory / "model.safetensors", "model.layers.0.mlp.gate_proj.weight",
                     "has shape (96, 64); the config implies (128, 64)"):
    loaders.load_hf_checkpoint(directory)


# ----------------------------------------------------------------------------------------------
# 3. Truncated or corrupt weight files.


def _safetensors_cut_points(data: bytes) -> dict[str, bytes]:
  header = struct.unpack("<Q", data[:8])[0]
  return {
      "empty": b"",
      "inside header length": data[:5],
      "inside JSON header": data[:8 + header // 2],
      "after JSON header": data[:8 + header],
      "inside tensor data": data[:8 + header + (len(data) - 8 - header) // 2],
      "last byte missing": data[:-1],
      "huge header length": struct.pack("<Q", 2**62) + data[8:],
      "header not JSON": struct.pack("<Q", 8) + b"not json" + data[8 + header:],
      "header JSON list": struct.pack("<Q", 2) + b"[]" + data[8 + header:],
  }


@pytest.mark.parametrize("cut", list(_safetensors_cut_points(b"\0" * 64)))
def test_truncated_or_corrupt_safetensors(tmp_path, cut):
  directory = hf_dir(tmp_path)
  weights = directory / "model.safetensors"
  weights.write_bytes(_safetensors_cut_points(weights.read_bytes())[cut])
  with raises_naming(ValueError, weights, "safetensors"):
    loaders.load_hf_checkpoint(directory)


def test_safetensors_dtype_numpy_cannot_read(tmp_path):
  directory = hf_dir(tmp_path)
  weights = directory / "model.safetensors"
  data = weights.read_bytes()
  n = struct.unpack("<Q", data[:8])[0]
  header = json.loads(data[8:8 + n])
  header["model.norm.weight"]["dtype"] = "F8_E4M3"  # 64 one-byte values: offsets no longer match
  start = header["model.norm.weight"]["data_offsets"][0]
  header["model.norm.weight"]["data_offsets"] = [start, start + 64]
  # Shift nothing else: the file is then inconsistent, which safetensors itself must report.
  encoded = json.dumps(header).encode()
  weights.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + n:])
  with raises_naming(ValueError, weights):
    loaders.load_hf_checkpoint(directory)


def _gguf_corruptions(path: pathlib.Path) -> dict[str, bytes]:
  data = path.read_bytes()
  reader = gguf.GGUFReader(path)
  start = reader.data_offset
  name = b"token_embd.weight"
  dims_at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
  many_dims = bytearray(data)
  struct.pack_into("<I", many_dims, dims_at, 1000)
  bad_type = bytearray(data)
  struct.pack_into("<I", bad_type, dims_at + 4 + 2 * 8, 999)
  del reader
  return {
      "empty": b"",
      "magic only": data[:4],
      "inside counts": data[:20],
      "inside metadata": data[:start // 3],
      "inside tensor infos": data[:start - 40],
      "inside tensor data": data[:start + (len(data) - start) // 2],
      "last byte missing": data[:-1],
      "bad magic": b"GGUG" + data[4:],
      "bad version": data[:4] + struct.pack("<I", 77) + data[8:],
      "huge tensor count": data[:8] + struct.pack("<Q", 2**50) + data[16:],
      "too many dimensions": bytes(many_dims),
      "unknown tensor type": bytes(bad_type),
  }


@pytest.mark.parametrize("cut", [
    "empty", "magic only", "inside counts", "inside metadata", "inside tensor infos", "inside tensor data",
    "last byte missing", "bad magic", "bad version", "huge tensor count", "too many dimensions", "unknown tensor type",
])
def test_truncated_or_corrupt_gguf(tmp_path, cut):
  path = gguf_file(tmp_path, tokenizer=True)
  path.write_bytes(_gguf_corruptions(path)[cut])
  for load in (loaders.load_gguf, loaders.load_model, Tokenizer.from_gguf):
    with raises_naming(ValueError, path):
      load(path)


@pytest.mark.parametrize("key,fmt,value,fragment", [
    ("llama.block_count", "I", 0, "num_layers"),
    ("llama.attention.head_count", "I", 0, "num_heads"),
    ("llama.attention.head_count", "I", 3, "GGUF metadata: num_heads (3) must be a multiple of num_kv_heads (2)"),
    ("llama.vocab_size", "I", 30, "token_embd.weight has shape (40, 64)"),
    ("tokenizer.ggml.bos_token_id", "I", 4000, "bos_token_id"),
])
def test_gguf_metadata_out_of_range(tmp_path, key, fmt, value, fragment):
  path = gguf_file(tmp_path)
  patch_gguf(path, key, fmt, value)
  with raises_naming(ValueError, path, fragment):
    loaders.load_gguf(path)


def test_gguf_metadata_of_wrong_type(tmp_path):
  path = tmp_path / "typed.gguf"
  write_gguf(path, hf_weights())
  data = bytearray(path.read_bytes())
  # llama.block_count stored as FLOAT32 2.0 instead of UINT32 2: same size, different type.
  key = b"llama.block_count"
  at = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
  struct.pack_into("<If", data, at, gguf.GGUFValueType.FLOAT32, 2.0)
  path.write_bytes(bytes(data))
  with raises_naming(ValueError, path, "'llama.block_count' must be int"):
    loaders.load_gguf(path)


# ----------------------------------------------------------------------------------------------
# 4. Sharded checkpoints: the index is untrusted data.


def _index(directory: pathlib.Path) -> pathlib.Path:
  return directory / "model.safetensors.index.json"


@pytest.mark.parametrize("edit,fragments", [
    (lambda spec: "{broken", ["not a valid safetensors index"]),
    (lambda spec: [], ["weight_map"]),
    (lambda spec: {"metadata": {}}, ["weight_map"]),
    (lambda spec: {"weight_map": ["model-00001-of-00002.safetensors"]}, ["weight_map"]),
    (lambda spec: {"weight_map": {**spec["weight_map"], "model.norm.weight": 7}}, ["model.norm.weight", "7"]),
    (lambda spec: {"weight_map": {**spec["weight_map"], "model.norm.weight": None}}, ["model.norm.weight"]),
    (lambda spec: {"weight_map": {**spec["weight_map"], "model.norm.weight": "../../../../etc/passwd"}},
     ["model.norm.weight", "../../../../etc/passwd", "outside the checkpoint"]),
    (lambda spec: {"weight_map": {**spec["weight_map"], "model.norm.weight": "/etc/passwd"}},
     ["/etc/passwd", "outside the checkpoint"]),
    (lambda spec: {"weight_map": {**spec["weight_map"], "model.norm.weight": "sub/../../ckpt2/x.safetensors"}},
     ["outside the checkpoint"]),
    (lambda spec: {"weight_map": {**spec["weight_map"], "model.norm.weight": "."}}, ["outside the checkpoint"]),
    (lambda spec: {"weight_map": {name: "model-00001-of-00002.safetensors" for name in spec["weight_map"]}},
     ["does not contain it"]),
])
def test_hostile_shard_index(tmp_path, edit, fragments):
  directory = hf_dir(tmp_path, shards=2)
  index = _index(directory)
  spec = edit(json.loads(index.read_text()))
  index.write_text(spec if isinstance(spec, str) else json.dumps(spec))
  with raises_naming(ValueError, index, *fragments):
    loaders.load_hf_checkpoint(directory)


def test_shard_named_in_index_but_missing(tmp_path):
  directory = hf_dir(tmp_path, shards=2)
  (directory / "model-00002-of-00002.safetensors").unlink()
  with raises_naming(FileNotFoundError, _index(directory), "model-00002-of-00002.safetensors", "not found"):
    loaders.load_hf_checkpoint(directory)


def test_truncated_shard_names_the_shard(tmp_path):
  directory = hf_dir(tmp_path, shards=2)
  shard = directory / "model-00002-of-00002.safetensors"
  shard.write_bytes(shard.read_bytes()[:-10])
  with raises_naming(ValueError, shard, "safetensors"):
    loaders.load_hf_checkpoint(directory)


def test_shard_symlinked_into_a_cache_still_loads(tmp_path):
  # Hugging Face's cache keeps snapshots/<rev>/*.safetensors as symlinks into blobs/: allowed,
  # since the index entry itself stays inside the directory.
  directory = hf_dir(tmp_path, shards=2)
  blobs = tmp_path / "blobs"
  blobs.mkdir()
  shard = directory / "model-00001-of-00002.safetensors"
  shard.rename(blobs / "abc123")
  shard.symlink_to(blobs / "abc123")
  config, params = loaders.load_hf_checkpoint(directory)
  assert len(params["layers"]) == config.num_layers == 2


# ----------------------------------------------------------------------------------------------
# 5. Tokenizer files, and a tokenizer larger than the model's embedding.


@pytest.mark.parametrize("content,fragments", [
    (b"{not json", ["not a valid tokenizer.json"]),
    (b"\xff\xfe\x00", ["not a valid tokenizer.json"]),
    (b"[1, 2]", ['"model"']),
    (b'{"version": "1.0"}', ['"model"']),
    (b'{"model": {"type": "BPE", "vocab": 3, "merges": []}}', ["malformed tokenizer.json"]),
    (b'{"model": {"type": "NoSuchModel"}}', ["malformed tokenizer.json"]),
])
def test_malformed_tokenizer_json(tmp_path, content, fragments):
  directory = hf_dir(tmp_path)
  path = directory / "tokenizer.json"
  path.write_bytes(content)
  with raises_naming(ValueError, path, *fragments):
    Tokenizer.from_file(path)
  with raises_naming(ValueError, path, *fragments):
    loaders.load_model(directory)


@pytest.mark.parametrize("name,content,fragments", [
    ("tokenizer_config.json", b"{oops", ["not a valid tokenizer_config.json"]),
    ("tokenizer_config.json", b"[]", ["expected a JSON object"]),
    ("tokenizer_config.json", b'{"chat_template": 5}', ["'chat_template'"]),
    ("tokenizer_config.json", b'{"chat_template": [{"name": 1}]}', ["'chat_template'"]),
    ("chat_template.jinja", b"\xff\xfe{{ x }}", ["not UTF-8"]),
])
def test_malformed_chat_template_files(tmp_path, name, content, fragments):
  directory = hf_dir(tmp_path)
  write_tiny_tokenizer_json(directory / "tokenizer.json")
  (directory / name).write_bytes(content)
  with raises_naming(ValueError, directory / name, *fragments):
    loaders.load_model(directory)


def test_named_chat_templates_pick_default(tmp_path):
  directory = hf_dir(tmp_path)
  write_tiny_tokenizer_json(directory / "tokenizer.json")
  templates = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
  (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": templates}))
  assert loaders.load_model(directory)[2].chat_template == "D"


def test_tokenizer_larger_than_model_is_refused(tmp_path):
  # The tiny tokenizer has ids 0..6; a model with 5 embedding rows cannot take ids 5 and 6.
  directory = write_hf_dir(tmp_path / "hf", hf_weights(), hf_config_dict(vocab_size=5, eos_token_id=2))
  write_tiny_tokenizer_json(directory / "tokenizer.json")
  with raises_naming(ValueError, directory / "tokenizer.json", "7 ids", "vocab_size=5"):
    loaders.load_model(directory)

  path = gguf_file(tmp_path, tokenizer=True)  # 40 tokens
  patch_gguf(path, "llama.vocab_size", "I", 30)
  with raises_naming(ValueError, path, "40 ids", "vocab_size=30"):
    loaders.load_model(path)


def test_tokenizer_smaller_than_model_is_fine(tmp_path):
  directory = hf_dir(tmp_path)  # vocab_size 40, tokenizer 7 ids
  write_tiny_tokenizer_json(directory / "tokenizer.json")
  config, _, tokenizer = loaders.load_model(directory)
  assert tokenizer.id_bound == 7 < config.vocab_size == 40


def _gguf_string(text: bytes) -> bytes:
  return struct.pack("<Q", len(text)) + text


@pytest.mark.parametrize("old,new,fragment", [
    (_gguf_string(b"a b"), _gguf_string(b"a\xffb"), "'tokenizer.ggml.merges' cannot be read"),
    (_gguf_string(b"a b"), _gguf_string(b"a_b"), "malformed BPE merge 'a_b'"),
    (_gguf_string(b"a b"), _gguf_string(b"a x"), "inconsistent BPE tokenizer metadata"),
    (_gguf_string(b"<unused0>"), _gguf_string(b"<unused1>"), "duplicate tokens"),
    (_gguf_string(b"gpt2"), _gguf_string(b"gpt3"), "tokenizer.ggml.model='gpt3'"),
])
def test_gguf_tokenizer_metadata_corrupt(tmp_path, old, new, fragment):
  # Same-length edits: the file stays well formed, only the tokenizer's content is wrong.
  path = gguf_file(tmp_path, tokenizer=True)
  data = path.read_bytes()
  assert data.count(old) == 1
  path.write_bytes(data.replace(old, new))
  error = NotImplementedError if "gpt3" in fragment else ValueError
  for load in (Tokenizer.from_gguf, loaders.load_model):
    with raises_naming(error, path, fragment):
      load(path)


def test_gguf_tokenizer_special_id_outside_tokens(tmp_path):
  path = gguf_file(tmp_path, tokenizer=True)
  patch_gguf(path, "tokenizer.ggml.eos_token_id", "I", 40)
  with raises_naming(ValueError, path, "eos_token_id=40 is not an id of the 40 tokens"):
    Tokenizer.from_gguf(path)
