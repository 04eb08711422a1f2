"""A quantized checkpoint written before the backends/placement rework (format version 1) still loads;
other versions are refused by number, and a version-1 file cannot pass as version 2 (no checksums)."""

import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from flexq_jax import checkpoint
from flexq_jax.placement import place
from models import llama

V1 = Path(__file__).parent.parent / "data" / "checkpoint-v1"
TOKENS = jnp.asarray([[3, 17, 99, 250, 1, 0, 42, 7]])


def test_a_version_1_checkpoint_loads_and_computes_what_it_did():
  params, config, meta = checkpoint.load(V1)
  assert meta["version"] == 1 and config.num_layers == 2
  assert meta["checksums_verified"] is False  # version 1 has no checksums: loaded, but says so
  logits, _ = llama.forward(params, config, TOKENS)
  np.testing.assert_array_equal(np.asarray(logits, np.float32), np.load(V1 / "logits.npy"))
  placed, record = place(params, "dequant")
  assert record.counts() == {"dequant": 14}
  np.testing.assert_allclose(llama.forward(placed, config, TOKENS)[0], logits, atol=1e-4)


def _rewrite_v1(tmp_path, **changes):
  with safe_open(str(V1 / checkpoint.FILENAME), "np") as f:
    meta = json.loads(f.metadata()["flexq"])
    arrays = {k: f.get_tensor(k) for k in f.keys()}
  meta.update(changes)
  save_file(arrays, str(tmp_path / checkpoint.FILENAME), metadata={"flexq": json.dumps(meta)})
  return tmp_path / checkpoint.FILENAME


@pytest.mark.parametrize("version", [99, 0, 3, "1"])
def test_another_format_version_is_refused_by_name(tmp_path, version):
  file = _rewrite_v1(tmp_path, version=version)
  with pytest.raises(ValueError, match=re.escape(f"{file}: format version {version!r} is not supported")):
    checkpoint.load(tmp_path)


def test_a_version_1_file_relabelled_version_2_is_refused_for_its_missing_checksums(tmp_path):
  file = _rewrite_v1(tmp_path, version=2)
  with pytest.raises(ValueError, match=re.escape(f"{file}: version-2 metadata without its checksum")):
    checkpoint.load(tmp_path)


def test_a_version_1_checkpoint_still_gets_every_cross_check(tmp_path):
  with safe_open(str(V1 / checkpoint.FILENAME), "np") as f:
    linears = json.loads(f.metadata()["flexq"])["linears"]
  linears["layers.1.q_proj"]["a_bits"] = 4  # no checksums in version 1: the stored report catches it
  file = _rewrite_v1(tmp_path, linears=linears)
  with pytest.raises(ValueError, match=re.escape(f"{file}: layers.1.q_proj has a_bits 4, the stored report says 6")):
    checkpoint.load(tmp_path)


def test_a_version_1_checkpoint_saved_again_is_version_2_with_the_same_logits(tmp_path):
  params, config, meta = checkpoint.load(V1)
  checkpoint.save(tmp_path, params, config)
  again, _, meta2 = checkpoint.load(tmp_path)
  assert meta2["version"] == checkpoint.VERSION == 2 and meta2["checksums_verified"] is True
  np.testing.assert_array_equal(np.asarray(llama.forward(again, config, TOKENS)[0], np.float32),
                                np.load(V1 / "logits.npy"))
