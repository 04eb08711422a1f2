import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import config as config_lib
from models import llama
from tests.models.hf_reference import hf_logits

# Small, but with every feature the real models use: GQA (4 query heads share 2 KV heads),
# a non-default RoPE theta, untied head.
SMALL = config_lib.LlamaConfig(
    vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
    num_kv_heads=2, rope_theta=5000.0, rms_norm_eps=1e-6,
)
forward = jax.jit(llama.forward, static_argnums=1)


def small_params(config=SMALL, seed=0, dtype=jnp.float32):
  return llama.init_params(config, jax.random.key(seed), dtype=dtype, scale=0.2)


def rel_err(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.mark.parametrize("tied", [False, True])
def test_matches_transformers_flax_llama(tied):
  config = dataclasses.replace(SMALL, tie_word_embeddings=tied)
  params = small_params(config)
  tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 19))
  ours, _ = forward(params, config, tokens)
  ref = hf_logits(config, params, tokens)
  print(f"max abs logit diff vs transformers Flax (tied={tied}): {np.abs(ours - ref).max():.3g}")
  assert rel_err(ours, ref) < 1e-4


def test_kv_cache_decoding_equals_full_forward():
  params = small_params()
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, SMALL.vocab_size, (3, 14)))
  full, _ = forward(params, SMALL, tokens)
  cache = llama.init_cache(SMALL, 3, 16, jnp.float32)
  # A 9-token prefill, then one token at a time.
  logits, cache = forward(params, SMALL, tokens[:, :9], None, cache)
  steps = [logits]
  for t in range(9, 14):
    logits, cache = forward(params, SMALL, tokens[:, t:t + 1], None, cache)
    steps.append(logits)
  assert int(cache.length) == 14
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=0, atol=1e-4 * np.abs(full).max())


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_a_rows_logits(side):
  params = small_params()
  rng = np.random.default_rng(3)
  short = rng.integers(0, SMALL.vocab_size, 5)
  long = rng.integers(0, SMALL.vocab_size, 11)
  tokens = np.zeros((2, 11), np.int32)
  mask = np.zeros((2, 11), bool)
  tokens[0] = long
  mask[0] = True
  sl = slice(6, 11) if side == "left" else slice(0, 5)
  tokens[1, sl] = short
  mask[1, sl] = True
  batched, _ = forward(params, SMALL, tokens, mask)
  alone, _ = forward(params, SMALL, short[None])
  np.testing.assert_allclose(batched[1, sl], alone[0], atol=1e-4 * np.abs(alone).max())
  alone_long, _ = forward(params, SMALL, long[None])
  np.testing.assert_allclose(batched[0], alone_long[0], atol=1e-4 * np.abs(alone_long).max())


def test_bfloat16_forward_tracks_float32():
  params = small_params()
  tokens = np.random.default_rng(4).integers(0, SMALL.vocab_size, (2, 16))
  f32, _ = forward(params, SMALL, tokens)
  bf16, _ = forward(jax.tree.map(lambda a: a.astype(jnp.bfloat16), params), SMALL, tokens)
  assert bf16.dtype == jnp.float32  # logits are always fp32
  assert 1e-5 < rel_err(bf16, f32) < 5e-2  # bf16 really ran, and stayed close


def test_llama3_rope_scaling_bands():
  base = config_lib.llama3_8b()
  unscaled = llama.rope_inv_freq(dataclasses.replace(base, rope_scaling=None))
  scaled = llama.rope_inv_freq(base)
  rs = base.rope_scaling
  wavelen = 2 * np.pi / unscaled
  high = wavelen < rs.original_max_position_embeddings / rs.high_freq_factor
  low = wavelen > rs.original_max_position_embeddings / rs.low_freq_factor
  np.testing.assert_array_equal(scaled[high], unscaled[high])
  np.testing.assert_allclose(scaled[low], unscaled[low] / rs.factor)
  mid = ~high & ~low
  assert mid.any()
  assert np.all(scaled[mid] < unscaled[mid]) and np.all(scaled[mid] > unscaled[mid] / rs.factor)


@pytest.mark.parametrize("preset", sorted(config_lib.PRESETS))
def test_real_architectures_have_the_right_shapes(preset):
  config = config_lib.PRESETS[preset]()
  params = jax.eval_shape(lambda k: llama.init_params(config, k, jnp.bfloat16), jax.random.key(0))
  tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)
  logits, _ = jax.eval_shape(lambda p, t: llama.forward(p, config, t), params, tokens)
  assert logits.shape == (2, 8, config.vocab_size)
  n = sum(np.prod(a.shape) for a in jax.tree.leaves(params))
  expected = {"smollm2-135m": 134.5e6, "llama2-7b": 6.74e9, "llama2-13b": 13.0e9,
              "llama2-70b": 69.0e9, "llama3-8b": 8.03e9}[preset]
  assert abs(n - expected) / expected < 0.01, n


def test_bad_inputs_give_clear_errors():
  params = small_params()
  with pytest.raises(ValueError, match=r"tokens must be \[batch, seq\]"):
    llama.forward(params, SMALL, jnp.zeros((5,), jnp.int32))
  with pytest.raises(ValueError, match="tokens must be integers"):
    llama.forward(params, SMALL, jnp.zeros((1, 5), jnp.float32))
  with pytest.raises(ValueError, match="mask shape"):
    llama.forward(params, SMALL, jnp.zeros((1, 5), jnp.int32), jnp.ones((1, 4), bool))
  with pytest.raises(ValueError, match="multiple of"):
    config_lib.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=4, num_kv_heads=3)


# Stacked layers (one lax.scan over the blocks) must compute exactly what the unrolled list does.


def quantized_params(params, a_bits=8, backend="dequant", layout="bitplanes"):
  """Every projection of `params` as a W6 QuantizedLinear (per-channel RTN), built directly."""
  from flexq_jax import formats, numerics
  from flexq_jax.qlinear import QuantizedLinear

  def quantize(w):
    k, n = w.shape
    q, s = numerics.quantize_weight(jnp.asarray(w, jnp.float32).T, 6, None)
    return QuantizedLinear(packed=formats.pack(q, 6, layout, k), scales=s, in_features=k, out_features=n, w_bits=6,
                           a_bits=a_bits, group_size=None, layout=layout, backend=backend)

  layers = [{name: quantize(w) if name in llama.PROJECTIONS else w for name, w in layer.items()}
            for layer in params["layers"]]
  return {**params, "layers": layers}


def padded_batch(seed, width=11, lengths=(11, 5, 8)):
  """Rows of mixed length: odd rows left-padded, even rows right-padded (row 0 is full)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, SMALL.vocab_size, (len(lengths), width)).astype(np.int32)
  mask = np.zeros(tokens.shape, bool)
  for i, n in enumerate(lengths):
    mask[i, slice(width - n, width) if i % 2 else slice(0, n)] = True
  return jnp.asarray(tokens), jnp.asarray(mask)


def assert_logits_close(a, b):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * float(np.abs(np.asarray(b)).max()))


def decode(params, tokens, mask, stacked, cache_len=16, prefill=7):
  """A padded prefill, then one token at a time; returns (all logits, final cache)."""
  cache = llama.init_cache(SMALL, tokens.shape[0], cache_len, jnp.float32, stacked=stacked)
  logits, cache = forward(params, SMALL, tokens[:, :prefill], mask[:, :prefill], cache)
  steps = [logits]
  for t in range(prefill, tokens.shape[1]):
    logits, cache = forward(params, SMALL, tokens[:, t:t + 1], mask[:, t:t + 1], cache)
    steps.append(logits)
  return jnp.concatenate(steps, axis=1), cache


def test_stack_unstack_round_trip():
  params = small_params()
  stacked = llama.stack_layers(params)
  assert llama.is_stacked(stacked) and not llama.is_stacked(params)
  assert isinstance(params["layers"], list)  # the input is not modified
  assert stacked["layers"]["q_proj"].shape == (SMALL.num_layers, SMALL.hidden_size, SMALL.q_size)
  assert stacked["layers"]["input_layernorm"].shape == (SMALL.num_layers, SMALL.hidden_size)
  back = llama.unstack_layers(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  # Idempotent on the form they produce.
  assert jax.tree.structure(llama.stack_layers(stacked)) == jax.tree.structure(stacked)
  assert jax.tree.structure(llama.unstack_layers(params)) == jax.tree.structure(params)


def test_stack_unstack_round_trip_quantized():
  qparams = quantized_params(small_params())
  stacked = llama.stack_layers(qparams)
  q = stacked["layers"]["down_proj"]
  one = qparams["layers"][0]["down_proj"]
  assert type(q) is type(one) and q.a_bits == one.a_bits and q.in_features == one.in_features
  assert q.packed.shape == (SMALL.num_layers, *one.packed.shape)
  assert q.scales.shape == (SMALL.num_layers, *one.scales.shape)
  back = llama.unstack_layers(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(qparams)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(qparams)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("tied", [False, True])
def test_stacked_forward_equals_list_forward(tied):
  config = dataclasses.replace(SMALL, tie_word_embeddings=tied)
  params = small_params(config)
  stacked = llama.stack_layers(params)
  tokens, mask = padded_batch(5)
  for m in (None, mask):
    want, _ = forward(params, config, tokens, m)
    got, cache = forward(stacked, config, tokens, m)
    assert cache is None
    assert_logits_close(got, want)


def test_stacked_kv_cache_decoding_equals_list_decoding():
  params = small_params()
  stacked = llama.stack_layers(params)
  tokens, mask = padded_batch(6)
  want, want_cache = decode(params, tokens, mask, stacked=False)
  got, got_cache = decode(stacked, tokens, mask, stacked=True)
  assert_logits_close(got, want)
  assert got_cache.stacked and not want_cache.stacked
  assert got_cache.k.shape == (SMALL.num_layers, 3, 16, SMALL.num_kv_heads, SMALL.resolved_head_dim)
  assert int(got_cache.length) == int(want_cache.length) == tokens.shape[1]
  np.testing.assert_array_equal(got_cache.valid, want_cache.valid)
  for name in ("k", "v"):
    np.testing.assert_allclose(getattr(got_cache, name), jnp.stack(getattr(want_cache, name)), atol=1e-5)
  # And decoding with a cache still equals the plain causal forward of the same padded batch.
  full, _ = forward(stacked, SMALL, tokens, mask)
  assert_logits_close(jnp.where(mask[..., None], got, 0), jnp.where(mask[..., None], full, 0))


@pytest.mark.parametrize("stacked", [False, True])
def test_kv_cache_writes_are_pinned_row_major(stacked):
  """Every cache write carries a row-major layout constraint (llama._row_major): without it XLA carried
  a GPU decode loop's value cache sequence-minor, 2.6x slower attention (results/e2e/NOTES.md)."""
  params = small_params()
  params = llama.stack_layers(params) if stacked else params
  tokens = jnp.zeros((2, 1), jnp.int32)
  cache = llama.init_cache(SMALL, 2, 8, jnp.float32, stacked=stacked)
  text = jax.jit(llama.forward, static_argnums=1).lower(params, SMALL, tokens, None, cache).as_text()
  pins = [line for line in text.splitlines() if "@LayoutConstraint" in line]
  rank = 5 if stacked else 4
  row_major = f"result_layouts = [dense<[{', '.join(str(d) for d in reversed(range(rank)))}]>"
  writes = 2 if stacked else 2 * SMALL.num_layers  # k and v: once a scan step, or once a layer
  assert len(pins) == writes and all(row_major in line for line in pins), pins


def test_cache_form_must_match_params_form():
  params = small_params()
  stacked = llama.stack_layers(params)
  tokens = jnp.zeros((1, 3), jnp.int32)
  with pytest.raises(ValueError, match="stacked params need a stacked cache"):
    llama.forward(stacked, SMALL, tokens, None, llama.init_cache(SMALL, 1, 8, jnp.float32))
  with pytest.raises(ValueError, match="list .* params need a list cache"):
    llama.forward(params, SMALL, tokens, None, llama.init_cache(SMALL, 1, 8, jnp.float32, stacked=True))


def test_stack_layers_rejects_heterogeneous_layers():
  params = small_params(dataclasses.replace(SMALL, num_layers=3))
  qparams = quantized_params(params, a_bits=6)
  mixed = {**qparams, "layers": [dict(layer) for layer in qparams["layers"]]}
  mixed["layers"][2]["down_proj"] = mixed["layers"][2]["down_proj"].replace(a_bits=8)
  with pytest.raises(ValueError, match=r"layer 2 down_proj differs from layer 0 down_proj: a_bits 6 vs 8"):
    llama.stack_layers(mixed)
  mixed["layers"][1]["up_proj"] = mixed["layers"][1]["up_proj"].replace(backend="reference")
  with pytest.raises(ValueError, match=r"layer 1 up_proj .*backend 'dequant' vs 'reference'"):
    llama.stack_layers(mixed)
  mixed["layers"][1]["q_proj"] = params["layers"][1]["q_proj"]  # a float kernel among quantized ones
  with pytest.raises(ValueError, match=r"layer 1 q_proj .*type QuantizedLinear vs "):
    llama.stack_layers(mixed)
  floats = {**params, "layers": [dict(layer) for layer in params["layers"]]}
  floats["layers"][1]["o_proj"] = floats["layers"][1]["o_proj"].astype(jnp.bfloat16)
  with pytest.raises(ValueError, match=r"layer 1 o_proj .*float32\[64, 64\] vs bfloat16\[64, 64\]"):
    llama.stack_layers(floats)
  del floats["layers"][2]["up_proj"]
  with pytest.raises(ValueError, match=r"layer 1 o_proj"):  # the first difference is reported
    llama.stack_layers(floats)
  floats["layers"][1]["o_proj"] = params["layers"][1]["o_proj"]
  with pytest.raises(ValueError, match=r"layer 2 has different entries .*missing \['up_proj'\]"):
    llama.stack_layers(floats)


@pytest.mark.parametrize("backend", ["dequant", "reference"])
def test_stacked_quantized_layers_run_forward(backend):
  params = small_params()
  qparams = quantized_params(params, a_bits=8, backend=backend)
  stacked = llama.stack_layers(qparams)
  tokens, mask = padded_batch(7)
  want, _ = forward(qparams, SMALL, tokens, mask)
  got, _ = forward(stacked, SMALL, tokens, mask)
  assert_logits_close(got, want)
  fp, _ = forward(params, SMALL, tokens, mask)
  assert 1e-5 < rel_err(got, fp) < 0.2  # quantized, and close
  if backend == "dequant":  # the cached path too (the reference backend is slow per call)
    want, _ = decode(qparams, tokens, mask, stacked=False)
    got, _ = decode(stacked, tokens, mask, stacked=True)
    assert_logits_close(got, want)


def test_stacked_real_architecture_shapes():
  config = config_lib.PRESETS["llama2-7b"]()
  params = jax.eval_shape(lambda k: llama.stack_layers(llama.init_params(config, k, jnp.bfloat16)), jax.random.key(0))
  assert params["layers"]["q_proj"].shape == (config.num_layers, config.hidden_size, config.q_size)
  tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)
  cache = jax.eval_shape(lambda: llama.init_cache(config, 2, 16, stacked=True))
  logits, new_cache = jax.eval_shape(lambda p, t, c: llama.forward(p, config, t, None, c), params, tokens, cache)
  assert logits.shape == (2, 8, config.vocab_size)
  assert new_cache.k.shape == (config.num_layers, 2, 16, config.num_kv_heads, config.resolved_head_dim)


# ---- fused projections (q/k/v -> qkv_proj, gate/up -> gate_up_proj) ----------------------------------

@pytest.mark.parametrize("kind", ["float", "reference", "dequant"])
def test_fused_projections_compute_the_same_model(kind):
  params = small_params()
  p = params if kind == "float" else quantized_params(params, a_bits=6, backend=kind)
  fused = llama.fuse_projections(p)
  assert llama.fused_count(fused) == {"qkv_proj": SMALL.num_layers, "gate_up_proj": SMALL.num_layers}
  layer = fused["layers"][0]
  assert set(layer) == {"input_layernorm", "post_attention_layernorm", "qkv_proj", "o_proj", "gate_up_proj",
                        "down_proj"}
  assert layer["qkv_proj"].shape == (SMALL.hidden_size, SMALL.q_size + 2 * SMALL.kv_size)
  assert layer["gate_up_proj"].shape == (SMALL.hidden_size, 2 * SMALL.intermediate_size)
  assert llama.fuse_projections(fused)["layers"][0].keys() == layer.keys()  # idempotent
  # The reference's group sums are exact integers, so fusing changes nothing; the float and
  # dequant paths sum in fp32 in whatever order XLA's dot picks for the wider N (the contract
  # leaves it free), and in dequant an activation that rounding moves across a half step lands one
  # quantization step apart downstream: a looser bound there.
  def close(a, b):
    rel = 1e-3 if kind == "dequant" else 1e-5
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=rel * float(np.abs(np.asarray(b)).max()))

  tokens, mask = padded_batch(8)
  want, _ = forward(p, SMALL, tokens, mask)
  got, _ = forward(fused, SMALL, tokens, mask)
  close(got, want)
  want, _ = decode(p, tokens, mask, stacked=False)  # with the KV cache too
  got, _ = decode(fused, tokens, mask, stacked=False)
  close(got, want)
  stacked = llama.fuse_projections(llama.stack_layers(p))  # the stacked form fuses as well
  assert llama.fused_count(stacked)["qkv_proj"] == SMALL.num_layers
  got, _ = forward(stacked, SMALL, tokens, mask)
  close(got, forward(p, SMALL, tokens, mask)[0])


def test_fused_quantized_kernel_is_its_parts_side_by_side():
  qparams = quantized_params(small_params(), a_bits=8, backend="reference")
  parts = [qparams["layers"][1][n] for n in ("q_proj", "k_proj", "v_proj")]
  fused = llama.concatenate_outputs(parts)
  assert fused.out_features == sum(q.out_features for q in parts) and fused.a_bits == 8
  np.testing.assert_array_equal(fused.logical_weight(), jnp.concatenate([q.logical_weight() for q in parts]))
  x = jax.random.normal(jax.random.key(3), (5, SMALL.hidden_size), jnp.float32)
  np.testing.assert_allclose(x @ fused, jnp.concatenate([x @ q for q in parts], axis=-1), rtol=1e-6, atol=1e-6)


def test_fusion_keeps_unlike_projections_apart():
  qparams = quantized_params(small_params(), a_bits=6)
  mixed = {**qparams, "layers": [dict(layer) for layer in qparams["layers"]]}
  mixed["layers"][1]["k_proj"] = mixed["layers"][1]["k_proj"].replace(a_bits=8)  # a fragile k_proj kept at A8
  fused = llama.fuse_projections(mixed)
  assert llama.fused_count(fused) == {"qkv_proj": 1, "gate_up_proj": SMALL.num_layers}
  assert {"q_proj", "k_proj", "v_proj"} <= set(fused["layers"][1]) and "qkv_proj" in fused["layers"][0]
  with pytest.raises(ValueError, match="layer 1 has a_bits=8, layer 0 6"):
    llama.concatenate_outputs([mixed["layers"][1][n] for n in ("q_proj", "k_proj")])
  with pytest.raises(ValueError, match="different types"):
    llama.concatenate_outputs([mixed["layers"][1]["q_proj"], small_params()["layers"][1]["k_proj"]])
  with pytest.raises(ValueError, match="different dtypes"):
    p = small_params()["layers"][0]
    llama.concatenate_outputs([p["q_proj"], p["k_proj"].astype(jnp.bfloat16)])
  tokens, mask = padded_batch(9)
  assert_logits_close(forward(fused, SMALL, tokens, mask)[0], forward(mixed, SMALL, tokens, mask)[0])


def test_checkpoint_refuses_fused_projections(tmp_path):
  from flexq_jax import checkpoint
  fused = llama.fuse_projections(quantized_params(small_params(), a_bits=6))
  with pytest.raises(ValueError, match="fused projections .*per-projection form"):
    checkpoint.save(tmp_path / "q", fused, SMALL)


def test_remat_changes_nothing_but_memory():
  config = config_lib.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                       num_kv_heads=1)
  params = llama.init_params(config, jax.random.key(3), scale=0.1)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 9)))
  loss = lambda p, remat: jnp.sum(llama.forward(p, config, tokens, remat=remat)[0] ** 2)
  for form in (params, llama.stack_layers(params)):
    np.testing.assert_allclose(loss(form, True), loss(form, False), rtol=1e-6)
    g1, g0 = jax.grad(loss)(form, True), jax.grad(loss)(form, False)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))  # recompute order
  with pytest.raises(ValueError, match="cache-less"):
    llama.forward(params, config, tokens, None, llama.init_cache(config, 2, 16), remat=True)
