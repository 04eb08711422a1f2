"""The README's Python example runs as written (on a small random model with the real tokenizer)."""

import re
from pathlib import Path

import jax

from models import llama, loaders
from tests.helpers import tiny_hf_checkpoint

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
  example = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
  assert "flexq_jax.quantize(" in example and "flexq_jax.place(" in example
  tiny_hf_checkpoint(tmp_path / "tiny")  # the built-in model's tokenizer, a 2-layer random model
  tiny = loaders.load_model(str(tmp_path / "tiny"))
  monkeypatch.setattr(loaders, "load_model", lambda *a, **k: tiny)  # minutes of GPTQ + analysis otherwise
  monkeypatch.setattr(llama, "infer_config", lambda params: tiny[0])  # not a preset: tell quantize() its shape
  monkeypatch.chdir(tmp_path)
  scope: dict = {}
  exec(compile(example, str(README), "exec"), scope)
  assert scope["logits"].shape[:2] == scope["tokens"].shape and scope["placement"].counts()
  assert any(llama.fused_count(scope["serving"]).values())  # blocks whose parts share a_bits are fused
  assert (tmp_path / "runs" / "smollm2-flexq" / "model.safetensors").is_file()
  assert set(scope["placement"].counts()) == ({"pallas"} if jax.default_backend() == "gpu" else {"reference"})
