"""Hostile and damaged quantized checkpoints: every kind is refused with a ValueError naming the file
and the problem, before anything is allocated from a lying size; saves are atomic as a unit.

The checkpoints are built here from a tiny random model. `_write` re-signs what it writes (tensor
checksums and the metadata checksum, computed as flexq_jax/checkpoint.py's docstring documents), so
the lies reach the cross-checks instead of stopping at the checksums: a forger who recomputes them
is the harder case. Unsigned edits are refused by the checksums (tested too).
"""

import json
import re
import shutil
import time
import zlib

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from flexq_jax import checkpoint
from flexq_jax.qconfig import QuantConfig
from flexq_jax.quantize import quantize
from models import llama
from models.config import LlamaConfig

CONFIG = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                     num_kv_heads=2, max_position_embeddings=64)  # untied: lm_head is a tensor too
TOKENS = np.asarray([[3, 17, 9, 25, 1, 0, 42, 7]])


@pytest.fixture(scope="module")
def model():
  params = llama.init_params(CONFIG, jax.random.key(0), scale=0.05)
  calib = np.random.default_rng(1).integers(0, CONFIG.vocab_size, (2, 32))
  return quantize(params, calib, QuantConfig(weight_method="rtn", a8_selection="down_proj", smooth_alpha=None),
                  model_config=CONFIG)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
  qparams, report = model
  d = tmp_path_factory.mktemp("ckpt") / "q"
  checkpoint.save(d, qparams, CONFIG, report)
  return d


@pytest.fixture
def ckpt(saved, tmp_path):
  """A fresh copy of the good checkpoint: (directory, its model file)."""
  d = tmp_path / "q"
  shutil.copytree(saved, d)
  return d, d / checkpoint.FILENAME


def _read(file):
  with safe_open(str(file), "np") as f:
    return json.loads(f.metadata()["flexq"]), {k: f.get_tensor(k) for k in f.keys()}


def _crc(data: bytes) -> str:
  return f"crc32:{zlib.crc32(data) & 0xFFFFFFFF:08x}"


def _write(file, meta, arrays, sign=True):
  """Writes a checkpoint file; sign: with checksums recomputed as the format documents them."""
  meta = dict(meta)
  if sign:
    meta["checksums"] = {k: _crc(np.ascontiguousarray(a).tobytes()) for k, a in arrays.items()}
    body = {k: v for k, v in meta.items() if k != "metadata_crc32"}
    meta["metadata_crc32"] = _crc(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
  save_file(arrays, str(file), metadata={"flexq": json.dumps(meta)})


def _refused(target, file, problem, error=ValueError):
  with pytest.raises(error) as e:
    checkpoint.load(target)
  msg = str(e.value)
  assert str(file) in msg, msg
  assert re.search(problem, msg), msg
  return msg


def _logits(params):
  return np.asarray(llama.forward(params, CONFIG, TOKENS)[0])


# ------------------------------------------------------------------------------------- the good one


def test_the_good_checkpoint_loads_verified_and_computes_what_the_model_does(model, ckpt):
  d, file = ckpt
  params, config, meta = checkpoint.load(d)
  assert config == CONFIG and meta["version"] == 2 and meta["checksums_verified"] is True
  np.testing.assert_array_equal(_logits(params), _logits(model[0]))
  report_copy = json.loads((d / checkpoint.REPORT_FILENAME).read_text())
  assert report_copy["save_id"] == meta["save_id"] and report_copy["layers"] == meta["report"]["layers"]
  assert all(v.startswith("crc32:") for v in meta["checksums"].values())
  assert checkpoint.load(file)[2]["save_id"] == meta["save_id"]  # the file itself names the same checkpoint


def test_a_rewrite_that_keeps_the_values_keeps_the_checksums_valid(ckpt):
  d, file = ckpt
  meta, arrays = _read(file)
  save_file(arrays, str(file), metadata={"flexq": json.dumps(meta, indent=2)})  # another serialization
  assert checkpoint.load(d)[2]["checksums_verified"]


# --------------------------------------------------------------------------- truncation and framing


@pytest.mark.parametrize("where", ["empty", "4 bytes", "length field only", "inside the header",
                                   "header end - 1", "header end", "first tensor", "middle", "last byte"])
def test_a_truncated_file_is_refused_as_truncated(ckpt, where):
  d, file = ckpt
  data = file.read_bytes()
  header_end = 8 + int.from_bytes(data[:8], "little")
  cut = {"empty": 0, "4 bytes": 4, "length field only": 8, "inside the header": header_end // 2,
         "header end - 1": header_end - 1, "header end": header_end, "first tensor": header_end + 5,
         "middle": len(data) // 2, "last byte": len(data) - 1}[where]
  file.write_bytes(data[:cut])
  _refused(d, file, "is truncated")


def test_bytes_after_the_tensor_data_are_refused(ckpt):
  d, file = ckpt
  file.write_bytes(file.read_bytes() + b"\0" * 16)
  _refused(d, file, "16 bytes after its tensor data")


def test_a_header_length_beyond_any_header_is_refused_without_reading_it(ckpt):
  d, file = ckpt
  data = file.read_bytes()
  file.write_bytes((10**15).to_bytes(8, "little") + data[8:])
  _refused(d, file, "header length field says 1000000000000000 bytes")


# ------------------------------------------------------------------------------------------- bit flips


def test_a_flipped_bit_in_any_tensors_data_is_refused_naming_the_tensor(ckpt):
  d, file = ckpt
  good = file.read_bytes()
  header_end = 8 + int.from_bytes(good[:8], "little")
  header = json.loads(good[8:header_end])
  names = [k for k in header if k != "__metadata__"]
  assert len(names) == 2 * 14 + 2 * 2 + 3  # packed + scales a projection, two norms a layer, embed/norm/lm_head
  rng = np.random.default_rng(0)
  for name in names:
    start, end = header[name]["data_offsets"]
    pos = header_end + int(rng.integers(start, end))
    flipped = bytearray(good)
    flipped[pos] ^= 1 << int(rng.integers(8))
    file.write_bytes(bytes(flipped))
    _refused(d, file, rf"tensor {re.escape(name)} fails its checksum .*damaged")


def test_a_flipped_bit_anywhere_in_the_file_is_refused(ckpt):
  d, file = ckpt
  good = file.read_bytes()
  header_end = 8 + int.from_bytes(good[:8], "little")
  rng = np.random.default_rng(1)
  positions = list(rng.integers(0, 8, 4)) + list(rng.integers(8, header_end, 60)) + list(
      rng.integers(header_end, len(good), 20))
  for pos in positions:
    flipped = bytearray(good)
    flipped[pos] ^= 1 << int(rng.integers(8))
    file.write_bytes(bytes(flipped))
    with pytest.raises(ValueError) as e:
      checkpoint.load(d)
    assert str(file) in str(e.value), (pos, str(e.value))


def test_an_edited_metadata_field_is_refused_by_the_metadata_checksum(ckpt):
  d, file = ckpt
  meta, arrays = _read(file)
  meta["linears"]["layers.0.q_proj"]["a_bits"] = 8
  meta["report"]["layers"][0]["a_bits"] = 8  # even when the report is edited to agree
  _write(file, meta, arrays, sign=False)
  _refused(d, file, "metadata checksum mismatch .*altered or damaged")


def test_a_relabelled_version_1_is_refused(ckpt):
  d, file = ckpt
  meta, arrays = _read(file)
  _write(file, {**meta, "version": 1}, arrays)
  _refused(d, file, "says format version 1 but carries 'checksums'")


def test_a_tensor_without_a_checksum_is_refused(ckpt):
  d, file = ckpt
  meta, arrays = _read(file)
  meta["checksums"].pop("norm")
  body = {k: v for k, v in meta.items() if k != "metadata_crc32"}
  meta["metadata_crc32"] = _crc(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
  _write(file, meta, arrays, sign=False)
  _refused(d, file, "tensor norm has no checksum")


# -------------------------------------------------------------- lying metadata (consistent checksums)


def _lie(ckpt, edit, arrays_edit=None):
  d, file = ckpt
  meta, arrays = _read(file)
  edit(meta)
  if arrays_edit:
    arrays_edit(arrays)
  _write(file, meta, arrays)
  return d, file


def _set_linear(field, value, prefix="layers.0.q_proj", report_too=False):
  def edit(meta):
    meta["linears"][prefix][field] = value
    if report_too:
      for row in meta["report"]["layers"]:
        if row["path"] == prefix.replace(".", "/"):
          row[field] = value
      meta["report"]["config"][field] = value
  return edit


def _set_config(**fields):
  def edit(meta):
    meta["model_config"].update(fields)
    if "num_layers" in fields:
      meta["num_layers"] = fields["num_layers"]
  return edit


LIES = {
    # a linear's fields against its tensors, the config and the stored report
    "a_bits 6 -> 4, report disagrees": (_set_linear("a_bits", 4), r"layers.0.q_proj has a_bits 4, the stored report says 6"),
    "a_bits 8 -> 6 on a down_proj": (_set_linear("a_bits", 6, "layers.1.down_proj"), "a_bits 6, the stored report says 8"),
    "a_bits 6 -> 12": (_set_linear("a_bits", 12), "unsupported a_bits 12"),
    "w_bits 6 -> 5, report agrees": (_set_linear("w_bits", 5, report_too=True),
                                     r"layers.0.q_proj.packed is uint32 \(6, 128, 4\), expected uint32 \(5, 128, 4\)"),
    "w_bits 6 -> 9": (_set_linear("w_bits", 9), "unsupported w_bits 9"),
    "group_size 0": (_set_linear("group_size", 0), "group_size 0: it must be null or a positive multiple of 128"),
    "group_size 96": (_set_linear("group_size", 96), "group_size 96: .* multiple of 128"),
    "group_size not dividing Kp": (_set_linear("group_size", 256), "group_size 256: .*dividing the padded K=128"),
    "group_size per row, report agrees": (_set_linear("group_size", None, "layers.0.down_proj", report_too=True),
                                          r"down_proj.scales is float16 \(128, 2\), expected float16 \(128, 1\)"),
    "group_size from the report": (lambda m: m["report"]["config"].update(group_size=256),
                                   "group_size 128, the stored report's quantization config says 256"),
    "layout unknown": (_set_linear("layout", "zigzag"), "layout 'zigzag', an unknown layout"),
    "layout never stored": (_set_linear("layout", "bitplanes_g4"), "layout 'bitplanes_g4', a layout checkpoints never store"),
    "in_features": (_set_linear("in_features", 256), r"layers.0.q_proj is 256 x 128 \(in x out\) in the metadata"),
    "a linear field missing": (lambda m: m["linears"]["layers.1.o_proj"].pop("a_bits"), "bad metadata for layers.1.o_proj"),
    "w_bits a string": (_set_linear("w_bits", "6"), "w_bits is '6', not an integer"),
    # the model config against the tensors
    "num_heads 4 -> 8": (_set_config(num_heads=8), r"layers.0.k_proj is 128 x 64 .*num_heads 8, num_kv_heads 2, head_dim 16\) makes it 128 x 32"),
    "num_kv_heads 2 -> 1": (_set_config(num_kv_heads=1), r"k_proj is 128 x 64 .*num_kv_heads 1.* makes it 128 x 32"),
    "head_dim 32 -> 16": (_set_config(head_dim=16), r"q_proj is 128 x 128 .*head_dim 16\) makes it 128 x 64"),
    "vocab_size vs embedding rows": (_set_config(vocab_size=65), r"tensor embed_tokens has shape \(64, 128\), the model config \(vocab_size 65"),
    "hidden_size vs embedding width": (_set_config(hidden_size=256, num_heads=8), "hidden_size 256"),
    "intermediate_size": (_set_config(intermediate_size=384), r"gate_proj is 128 x 256 .*intermediate_size 384"),
    "tied embeddings but lm_head stored": (_set_config(tie_word_embeddings=True), "unexpected tensor lm_head"),
    "num_layers a string": (_set_config(num_layers="2"), "num_layers is '2', not an integer"),
    "rms_norm_eps NaN": (_set_config(rms_norm_eps=float("nan")), "rms_norm_eps is nan, not a positive number"),
    "rope_theta negative": (_set_config(rope_theta=-1.0), "rope_theta is -1.0, not a positive number"),
    "num_layers vs config": (lambda m: m.update(num_layers=3), "metadata num_layers is 3, its model_config says 2"),
    "config num_layers 2 -> 3": (_set_config(num_layers=3), "claims 3 layers, but the file holds tensors for 2"),
    "config num_layers 2 -> 1": (_set_config(num_layers=1), "claims 1 layers, but the file holds tensors for 2"),
    # linears and report against the tensors present
    "linears names a layer with no tensors": (lambda m: m["linears"].update({"layers.1.xyz_proj": m["linears"]["layers.1.q_proj"]}),
                                              "'linears' names 'layers.1.xyz_proj', not a projection"),
    "linears names a layer beyond the file": (lambda m: m["linears"].update({"layers.7.q_proj": m["linears"]["layers.1.q_proj"]}),
                                              "'linears' names 'layers.7.q_proj', not a projection of this 2-layer model"),
    "linears forgets a projection": (lambda m: m["linears"].pop("layers.1.v_proj"), "tensor layers.1.v_proj is missing"),
    "report lacks a layer": (lambda m: m["report"]["layers"].pop(3), "the report has no entry for layers.0.o_proj"),
    "report names an extra layer": (lambda m: m["report"]["layers"].append({**m["report"]["layers"][0], "path": "layers/2/q_proj"}),
                                    "the report lists a layer with no tensors: layers.2.q_proj"),
    "report w_bits": (lambda m: m["report"]["config"].update(w_bits=4), "w_bits 6, the stored report's quantization config says 4"),
    "report malformed": (lambda m: m.update(report={"layers": "all of them"}), "stored report is malformed"),
}


@pytest.mark.parametrize("case", list(LIES))
def test_metadata_that_contradicts_the_tensors_is_refused(ckpt, case):
  edit, problem = LIES[case]
  d, file = _lie(ckpt, edit)
  _refused(d, file, problem)


TENSOR_LIES = {
    "packed dtype int32": ("layers.0.up_proj.packed", lambda a: a.view(np.int32),
                           r"layers.0.up_proj.packed is int32 \(6, 256, 4\), expected uint32"),
    "packed shape": ("layers.1.k_proj.packed", lambda a: a[:, :32], r"layers.1.k_proj.packed is uint32 \(6, 32, 4\)"),
    "scales float32": ("layers.0.q_proj.scales", lambda a: a.astype(np.float32), "scales is float32"),
    "scales negative": ("layers.0.q_proj.scales", lambda a: -a, "layers.0.q_proj.scales has negative, NaN or Inf"),
    "scales NaN": ("layers.1.down_proj.scales", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 7, np.nan, a).astype(a.dtype),
                   "layers.1.down_proj.scales has negative, NaN or Inf"),
    "scales Inf": ("layers.1.up_proj.scales", lambda a: np.full_like(a, np.inf), "layers.1.up_proj.scales has negative, NaN or Inf"),
    "NaN in a norm": ("layers.1.input_layernorm", lambda a: np.where(np.arange(a.size) == 3, np.nan, a).astype(a.dtype),
                      "tensor layers.1.input_layernorm has NaN or Inf"),
    "Inf in the embedding": ("embed_tokens", lambda a: np.where(a > 0.1, np.inf, a).astype(a.dtype), "tensor embed_tokens has NaN or Inf"),
    "NaN in lm_head": ("lm_head", lambda a: np.full_like(a, np.nan), "tensor lm_head has NaN or Inf"),
    "norm as int": ("norm", lambda a: a.astype(np.int32), "tensor norm has dtype int32; float expected"),
    "embedding one row short": ("embed_tokens", lambda a: a[:-1], r"embed_tokens has shape \(63, 128\), the model config \(vocab_size 64"),
}


@pytest.mark.parametrize("case", list(TENSOR_LIES))
def test_tensors_that_contradict_the_metadata_or_are_not_finite_are_refused(ckpt, case):
  name, change, problem = TENSOR_LIES[case]
  d, file = _lie(ckpt, lambda m: None, lambda arrays: arrays.update({name: np.ascontiguousarray(change(arrays[name]))}))
  _refused(d, file, problem)


def test_an_unexpected_or_missing_tensor_is_refused(ckpt):
  d, file = _lie(ckpt, lambda m: None, lambda arrays: arrays.update(extra=np.zeros(3, np.float32)))
  _refused(d, file, "unexpected tensor extra")
  d, file = _lie(ckpt, lambda m: None, lambda arrays: arrays.pop("layers.1.post_attention_layernorm"))
  _refused(d, file, "tensor layers.1.post_attention_layernorm is missing")
  d, file = _lie(ckpt, lambda m: None, lambda arrays: arrays.update({"layers.01.norm": np.ones(3, np.float32)}))
  _refused(d, file, "unexpected tensor name 'layers.01.norm'")


# --------------------------------------------------------------------------------------- huge counts


HUGE = {
    "num_layers 10**9 in the metadata and config": _set_config(num_layers=10**9),
    "linears with 200000 claimed layers": lambda m: m["linears"].update(
        {f"layers.{i}.q_proj": m["linears"]["layers.0.q_proj"] for i in range(2, 200_002)}),
    "linears naming layer 10**12": lambda m: m["linears"].update({f"layers.{10**12}.q_proj": m["linears"]["layers.0.q_proj"]}),
    "vocab_size 10**12": _set_config(vocab_size=10**12),
    "intermediate_size 10**12": _set_config(intermediate_size=10**12),
    "hidden_size 2**40": _set_config(hidden_size=2**40, head_dim=32),
}


@pytest.mark.parametrize("case", list(HUGE))
def test_huge_claimed_sizes_are_refused_quickly_without_allocating_them(ckpt, case):
  d, file = _lie(ckpt, HUGE[case])
  t0 = time.perf_counter()
  msg = _refused(d, file, "claims|names|shape|makes it")
  assert time.perf_counter() - t0 < 5, msg


# ---------------------------------------------------------------------------------------- atomic saves


def _temps(d):
  return sorted(p.name for p in d.iterdir() if p.name.startswith(checkpoint.TEMP_PREFIX))


def _snapshot(d):
  return {p.name: p.read_bytes() for p in d.iterdir()}


def test_a_save_interrupted_while_writing_the_model_leaves_the_previous_checkpoint(model, ckpt, monkeypatch):
  qparams, report = model
  d, file = ckpt
  before = _snapshot(d)
  real = checkpoint.save_file

  def dies_midway(arrays, filename, metadata=None):
    real(arrays, filename, metadata=metadata)
    data = open(filename, "rb").read()
    open(filename, "wb").write(data[: len(data) // 2])  # half of it on disk, then the disk fills
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(checkpoint, "save_file", dies_midway)
  with pytest.raises(OSError, match="No space left"):
    checkpoint.save(d, qparams, CONFIG, report)
  assert _temps(d) == [] and _snapshot(d) == before
  monkeypatch.undo()
  np.testing.assert_array_equal(_logits(checkpoint.load(d)[0]), _logits(qparams))


def test_a_save_interrupted_at_the_commit_restores_the_previous_report(model, ckpt, monkeypatch):
  qparams, report = model
  d, _ = ckpt
  before = _snapshot(d)
  real, calls = checkpoint.os.replace, []

  def fails_on_the_model(src, dst):
    calls.append(str(dst))
    if str(dst).endswith(checkpoint.FILENAME):
      raise KeyboardInterrupt  # not even an Exception
    real(src, dst)

  monkeypatch.setattr(checkpoint.os, "replace", fails_on_the_model)
  with pytest.raises(KeyboardInterrupt):
    checkpoint.save(d, qparams, CONFIG, report)
  monkeypatch.undo()
  assert calls[0].endswith(checkpoint.REPORT_FILENAME)  # the report had been replaced already
  assert _temps(d) == [] and _snapshot(d) == before
  assert checkpoint.load(d)[2]["checksums_verified"]


def test_leftovers_of_a_killed_save_are_reported_on_load(ckpt):
  d, file = ckpt
  leftover = d / f"{checkpoint.TEMP_PREFIX}0123.{checkpoint.FILENAME}.tmp"
  leftover.write_bytes(b"half a model")
  msg = _refused(d, d, "interrupted save")
  assert leftover.name in msg
  file.unlink()  # killed before the first checkpoint was ever committed: no model, only the temp file
  _refused(d, d, "interrupted save")


def test_a_successful_save_clears_leftovers_and_replaces_the_whole_unit(model, ckpt):
  qparams, report = model
  d, _ = ckpt
  (d / f"{checkpoint.TEMP_PREFIX}0123.{checkpoint.FILENAME}.tmp").write_bytes(b"old")
  old_id = json.loads((d / checkpoint.REPORT_FILENAME).read_text())["save_id"]
  checkpoint.save(d, qparams, CONFIG, report)
  assert _temps(d) == []
  meta = checkpoint.load(d)[2]
  assert meta["save_id"] != old_id
  assert json.loads((d / checkpoint.REPORT_FILENAME).read_text())["save_id"] == meta["save_id"]
  checkpoint.save(d, qparams, CONFIG)  # no report: the old report.json must not stay beside it
  assert not (d / checkpoint.REPORT_FILENAME).exists() and checkpoint.load(d)[2]["report"] is None


def test_a_report_copy_from_another_save_is_refused(model, ckpt, tmp_path):
  qparams, report = model
  d, file = ckpt
  other = tmp_path / "other"
  checkpoint.save(other, qparams, CONFIG, report)
  shutil.copy(other / checkpoint.REPORT_FILENAME, d / checkpoint.REPORT_FILENAME)
  msg = _refused(d, file, "comes from another save")
  assert str(d / checkpoint.REPORT_FILENAME) in msg
  (d / checkpoint.REPORT_FILENAME).write_text("{not json")
  _refused(d, file, "unreadable report copy")


def test_save_to_an_existing_regular_file_fails_at_once_naming_it(model, tmp_path, monkeypatch):
  qparams, report = model
  target = tmp_path / "model.bin"
  target.write_bytes(b"precious")
  monkeypatch.setattr(checkpoint, "_flatten", lambda *a: pytest.fail("save did work before refusing"))
  with pytest.raises(ValueError, match=re.escape(f"save: {target} exists and is not a directory")):
    checkpoint.save(target, qparams, CONFIG, report)
  assert target.read_bytes() == b"precious" and list(tmp_path.iterdir()) == [target]


def test_save_refuses_what_load_would_refuse(model, tmp_path):
  qparams, report = model
  bad = {**qparams, "norm": qparams["norm"].at[0].set(np.nan)}
  with pytest.raises(ValueError, match="save: tensor norm has NaN or Inf"):
    checkpoint.save(tmp_path / "a", bad, CONFIG, report)
  short = {**qparams, "layers": qparams["layers"][:1]}
  with pytest.raises(ValueError, match="list of 2 layers"):
    checkpoint.save(tmp_path / "b", short, CONFIG)
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
