"""Hugging Face hub ids as model paths (models/loaders.py: is_hub_id, resolve_hub_id, load_model).

No network: each test builds a hub cache in a temporary folder, in the standard layout
(models--org--name/snapshots/<commit>/..., refs/main), from a tiny random model, and runs with
HF_HUB_OFFLINE so that only the cache is read.
"""

import os

import numpy as np
import pytest
from huggingface_hub import constants as hub_constants

from evaluation import cli
from models import loaders
from tests.helpers import tiny_hf_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tiny-model")
  tiny_hf_checkpoint(directory)
  return directory


@pytest.fixture
def hub_cache(tmp_path, tiny_dir, monkeypatch):
  """A hub cache holding org/tiny at COMMIT (refs/main -> COMMIT), files as symlinks into blobs/
  as huggingface_hub lays them out; offline mode on."""
  cache = tmp_path / "hub"
  repo = cache / "models--org--tiny"
  snapshot = repo / "snapshots" / COMMIT
  snapshot.mkdir(parents=True)
  (repo / "blobs").mkdir()
  for i, f in enumerate(sorted(tiny_dir.iterdir())):
    blob = repo / "blobs" / f"{i:040x}"
    blob.write_bytes(f.read_bytes())
    (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(COMMIT)
  monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
  monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.chdir(tmp_path)  # no local folder "org/tiny" here
  return cache


def test_hub_id_syntax():
  for spec in ("org/name", "meta-llama/Llama-2-7b-hf", "HuggingFaceTB/SmolLM2-135M-Instruct@main",
               "org/name@" + COMMIT):
    assert loaders.is_hub_id(spec), spec
  for spec in ("name", "/abs/path", "./rel/path", "a/b/c", "org/name.gguf/", "org/", "../x", "runs/model.gguf"):
    assert not loaders.is_hub_id(spec), spec


@pytest.mark.parametrize("spec", ["org/tiny", "org/tiny@main", f"org/tiny@{COMMIT}"])
def test_a_cached_hub_id_loads_like_its_directory(hub_cache, tiny_dir, spec):
  assert loaders.resolve_hub_id(spec) == hub_cache / "models--org--tiny" / "snapshots" / COMMIT
  config, params, tokenizer = loaders.load_model(spec)
  want_config, want_params, _ = loaders.load_model(tiny_dir)
  assert config == want_config and tokenizer is not None
  np.testing.assert_array_equal(np.asarray(params["layers"][1]["down_proj"]),
                                np.asarray(want_params["layers"][1]["down_proj"]))


def test_missing_hub_id_offline_is_a_clear_error(hub_cache, capsys):
  with pytest.raises(FileNotFoundError, match=r"org/absent: no such local path, not in the Hugging Face cache .* HF_HUB_OFFLINE"):
    loaders.load_model("org/absent")
  with pytest.raises(FileNotFoundError, match="org/tiny at revision v9: no such local path, not in the Hugging Face cache"):
    loaders.load_model("org/tiny@v9")
  assert cli.main(["eval", "--model", "org/absent"]) == 2
  err = capsys.readouterr().err
  assert "org/absent: no such local path, not in the Hugging Face cache" in err and str(hub_cache) in err


def test_a_local_folder_wins_over_a_hub_id(hub_cache, tiny_dir, tmp_path):
  local = tmp_path / "org" / "absent"
  local.parent.mkdir()
  local.symlink_to(tiny_dir, target_is_directory=True)
  assert not loaders.is_hub_id("org/absent")
  config, _, _ = loaders.load_model("org/absent")  # the folder, not the (missing) hub repository
  assert config.num_layers == 2
