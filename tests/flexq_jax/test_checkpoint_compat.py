"""A quantized checkpoint written before the backends/placement rework (format version 1) still loads."""

import json
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
  logits, _ = llama.forward(params, config, TOKENS)
  np.testing.assert_array_equal(np.asarray(logits, np.float32), np.load(V1 / "logits.npy"))
  placed, record = place(params, "dequant")
  assert record.counts() == {"dequant": 14}
  np.testing.assert_allclose(llama.forward(placed, config, TOKENS)[0], logits, atol=1e-4)


def test_another_format_version_is_refused_by_name(tmp_path):
  with safe_open(str(V1 / checkpoint.FILENAME), "np") as f:
    meta = json.loads(f.metadata()["flexq"])
    arrays = {k: f.get_tensor(k) for k in f.keys()}
  meta["version"] = 2
  save_file(arrays, str(tmp_path / checkpoint.FILENAME), metadata={"flexq": json.dumps(meta)})
  with pytest.raises(ValueError, match="format version 2 is not supported"):
    checkpoint.load(tmp_path)
