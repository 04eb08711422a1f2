"""The decode-step attention kernel (pallas_kernels/decode_attention.py) and the model's use of it.

CPU: the kernel in Pallas' interpret mode against models/llama.attention's einsums (grouped and plain
heads, ragged cache lengths, splits of the cache, a row with no visible key), its refusals, and greedy
generation with $FLEXQ_DECODE_ATTENTION=pallas equal to "xla". GPU (marker `gpu`): the compiled kernel
against the einsums at LLaMA-2-7B and LLaMA-3-8B decode shapes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import generate as gen
from models import llama
from models.config import LlamaConfig
from pallas_kernels import decode_attention as da
from pallas_kernels import w6a_matmul as wk
from tests.helpers import has_gpu


def _case(b, hq, hkv, hd, s, dtype, seed=0, lengths=None):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (b, hq, hd), dtype)
  k = jax.random.normal(ks[1], (b, s, hkv, hd), dtype)
  v = jax.random.normal(ks[2], (b, s, hkv, hd), dtype)
  lengths = jnp.asarray(lengths if lengths is not None else [s - 7 * i for i in range(b)])
  visible = jnp.arange(s)[None, :] < lengths[:, None]
  return q, k, v, visible


def _einsums(q, k, v, visible, monkeypatch):
  monkeypatch.setenv(llama.DECODE_ATTENTION_ENV, "xla")
  return llama.attention(q[:, None], k, v, visible[:, None, :])[:, 0].astype(jnp.float32)


def _close(out, ref, dtype):
  # fp32: summation order only; bf16: the output's rounding (half an ulp of |out| <= 1) and the
  # probabilities' bf16 cast, taken before (einsums) or after (kernel) the normalization
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), np.asarray(ref), atol=tol, rtol=tol)


@pytest.mark.parametrize("b, hq, hkv, hd, s, dtype, splits", [
    (2, 4, 2, 64, 100, jnp.float32, None),  # grouped heads, S not a multiple of the block
    (2, 4, 2, 64, 100, jnp.float32, 2),  # two splits merged
    (3, 8, 8, 32, 150, jnp.bfloat16, 3),  # one query head a kv head, bf16 cache
    (1, 32, 8, 16, 33, jnp.bfloat16, None),  # G = 4 padded to 16 rows, a 16-wide head
])
def test_interpret_mode_equals_the_einsums(b, hq, hkv, hd, s, dtype, splits, monkeypatch):
  q, k, v, visible = _case(b, hq, hkv, hd, s, dtype)
  out = da.decode_attention(q, k, v, visible, splits=splits, interpret=True)
  assert out.shape == q.shape and out.dtype == q.dtype
  _close(out, _einsums(q, k, v, visible, monkeypatch), dtype)


def test_a_row_with_no_visible_key_averages_its_values_as_the_einsums_do(monkeypatch):
  q, k, v, visible = _case(2, 4, 4, 32, 70, jnp.float32, lengths=[0, 5])
  out = da.decode_attention(q, k, v, visible, splits=2, interpret=True)
  ref = _einsums(q, k, v, visible, monkeypatch)
  _close(out, ref, jnp.float32)
  np.testing.assert_allclose(np.asarray(out[0]), np.asarray(v[0].mean(axis=0)), atol=1e-5)


def test_one_changed_visible_value_changes_only_its_sequence():
  q, k, v, visible = _case(2, 4, 2, 32, 40, jnp.float32)
  base = da.decode_attention(q, k, v, visible, interpret=True)
  moved = da.decode_attention(q, k, v.at[1, 3, 0, 5].add(100.0), visible, interpret=True)
  np.testing.assert_array_equal(np.asarray(moved[0]), np.asarray(base[0]))
  changed = np.argwhere(np.asarray(moved[1] != base[1]))
  assert set(changed[:, 1]) == {5} and set(changed[:, 0]) == {0, 1}  # kv head 0 serves query heads 0-1


def test_splits_cover_every_block_and_leave_none_empty():
  for b, h, blocks in [(1, 32, 3), (64, 32, 3), (1, 8, 100), (2, 1, 7), (1, 1, 1)]:
    ns = da.splits_for(b, h, blocks)
    per = -(-blocks // ns)
    assert 1 <= ns <= blocks and (ns - 1) * per < blocks <= ns * per
  assert da.splits_for(64, 32, 3) == 1  # 2048 programs already
  assert da.splits_for(1, 32, 3) == 3  # batch 1: each block its own program
  assert [da.block_for(b, s, 32) for b, s in [(64, 160), (1, 1024), (16, 1024)]] == [32, 128, 64]


@pytest.mark.parametrize("q_shape, k_shape, dtype, words", [
    ((2, 4, 48), (2, 10, 2, 48), jnp.float32, "power of two"),
    ((2, 5, 64), (2, 10, 2, 64), jnp.float32, "multiple"),
    ((2, 4, 64), (3, 10, 2, 64), jnp.float32, "disagree"),
    ((2, 4, 64), (2, 10, 2, 64), jnp.int8, "bf16, fp16 or fp32"),
])
def test_refuses_shapes_it_cannot_take(q_shape, k_shape, dtype, words):
  assert words in da.supported(q_shape, k_shape, dtype)
  q = jnp.zeros(q_shape, jnp.float32)
  k = jnp.zeros(k_shape, dtype)
  with pytest.raises(ValueError, match=words):
    da.decode_attention(q, k, k, jnp.ones(k_shape[:2], bool), interpret=True)


def test_refuses_a_bad_mask_block_or_split():
  q, k, v, visible = _case(1, 4, 2, 32, 40, jnp.float32)
  with pytest.raises(ValueError, match="visible must be"):
    da.decode_attention(q, k, v, visible[:, :10], interpret=True)
  with pytest.raises(ValueError, match="block_s"):
    da.decode_attention(q, k, v, visible, block_s=48, interpret=True)
  with pytest.raises(ValueError, match="splits must be in"):
    da.decode_attention(q, k, v, visible, splits=5, interpret=True)


def test_the_model_reads_its_setting_and_refuses_a_bad_one(monkeypatch):
  monkeypatch.setenv(llama.DECODE_ATTENTION_ENV, "flash")
  with pytest.raises(ValueError, match="FLEXQ_DECODE_ATTENTION"):
    llama.decode_attention_mode()
  monkeypatch.delenv(llama.DECODE_ATTENTION_ENV)
  assert llama.decode_attention_mode() == "auto"


def test_greedy_generation_through_the_kernel_equals_the_einsums(monkeypatch):
  """The model's decode steps on the kernel (interpret mode) give the einsums' tokens and logits."""
  config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                       num_kv_heads=2, eos_token_id=5, pad_token_id=0)
  params = llama.init_params(config, jax.random.key(0), scale=0.3)
  tokens, mask = gen.pad_prompts([[7, 8, 9], [10, 11, 12, 13, 14]], 0, "left")
  outs = {}
  for mode in ("xla", "pallas"):
    monkeypatch.setenv(llama.DECODE_ATTENTION_ENV, mode)
    jax.clear_caches()  # the choice is made at trace time
    outs[mode] = gen.generate(params, config, tokens, mask, jax.random.key(1), max_new_tokens=5,
                              sampling=gen.GREEDY, cache_dtype=jnp.float32)
  jax.clear_caches()
  np.testing.assert_array_equal(outs["pallas"].tokens, outs["xla"].tokens)


def _quantized_pair(q, k, v, visible, a_bits, rows, act_t, phase_major, splits, interpret):
  """decode_attention_quantized's outputs and the quantizer's on decode_attention's flattened output."""
  b, hq, hd = q.shape
  got = da.decode_attention_quantized(q, k, v, visible, a_bits=a_bits, rows=rows, act_t=act_t,
                                      phase_major=phase_major, block_s=16, splits=splits, interpret=interpret)
  out = da.decode_attention(q, k, v, visible, block_s=16, splits=splits, interpret=interpret).reshape(b, hq * hd)
  if act_t:
    want = wk.quantize_activations_t(out, a_bits=a_bits, block_m=rows, interpret=interpret)
  else:
    want = wk.quantize_activations(out, a_bits=a_bits, config=wk.TileConfig(block_m=rows, join_phases=not phase_major),
                                   interpret=interpret)
  return [np.asarray(a) for a in got], [np.asarray(a) for a in want]


@pytest.mark.parametrize("b, hq, hkv, s, dtype, splits", [
    (3, 4, 4, 40, jnp.float32, 1), (2, 8, 2, 70, jnp.bfloat16, 2),  # the rest with -m slow (CI time)
    pytest.param(3, 4, 4, 40, jnp.bfloat16, 3, marks=pytest.mark.slow),
    pytest.param(17, 2, 1, 33, jnp.float32, 3, marks=pytest.mark.slow)])
@pytest.mark.parametrize("act_t, phase_major", [(False, True), (False, False), (True, True)])
def test_quantized_merge_is_the_quantizer_of_the_output(b, hq, hkv, s, dtype, splits, act_t, phase_major):
  """decode_attention_quantized (the splits merged and quantized for o_proj in one kernel) against
  quantizing decode_attention's output with the quantizer of the GEMM that reads it (Triton: [rows, G] scales,
  phase-major or K-order q_x; small Mosaic: [G, 2, rows]), in interpret mode: identical, padded rows zero.
  Grouped heads (G = 4, 2), one head a kv head, ragged cache lengths, 1-3 splits, A6 and A8."""
  q, k, v, visible = _case(b, hq, hkv, 128, s, dtype, lengths=[s - 5 * i for i in range(b)])
  rows = 32 if b <= 32 else 64
  for a_bits in (6, 8):
    got, want = _quantized_pair(q, k, v, visible, a_bits, rows, act_t, phase_major, splits, interpret=True)
    assert [a.shape for a in got] == [a.shape for a in want] and [a.dtype for a in got] == [a.dtype for a in want]
    for g, w in zip(got, want):
      np.testing.assert_array_equal(g, w)
    assert not got[0][b:].any()


def test_quantized_merge_refuses_what_it_cannot_take():
  q, k, v, visible = _case(2, 4, 2, 64, 40, jnp.float32)
  with pytest.raises(ValueError, match="head size of 128"):
    da.decode_attention_quantized(q, k, v, visible, a_bits=6, rows=16, act_t=True, interpret=True)
  q, k, v, visible = _case(20, 2, 2, 128, 40, jnp.float32, lengths=[40] * 20)
  with pytest.raises(ValueError, match="at least the batch"):
    da.decode_attention_quantized(q, k, v, visible, a_bits=6, rows=16, act_t=True, interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("b, act_t", [(1, False), (16, True), (64, True), (16, False)])
def test_gpu_quantized_merge_is_the_quantizer_of_the_output(b, act_t):
  """The compiled merge-and-quantize kernel against the compiled quantizer on the compiled attention's output
  (LLaMA-2-7B decode shapes): the merge's fp32 order may move an output across a bf16 rounding, so q_x at most
  one step apart in under 1% of the elements, the scales within one bf16 ulp, sum(q_x) exact to its q_x."""
  q, k, v, visible = _case(b, 32, 32, 128, 160, jnp.bfloat16, lengths=[160 - 3 * i for i in range(b)])
  rows = 32 if b <= 32 else 64
  got, want = _quantized_pair(q, k, v, visible, 6, rows, act_t, True, None, interpret=False)
  steps = np.abs(got[0].astype(np.int32) - want[0].astype(np.int32))
  assert steps.max() <= 1 and steps.mean() < 0.01, (steps.max(), steps.mean())
  sums = got[0].reshape(rows, 32, 128).astype(np.int32).sum(-1)  # [rows, heads]
  if act_t:
    np.testing.assert_allclose(got[1][:, 0], want[1][:, 0], rtol=2 ** -7)
    np.testing.assert_array_equal(got[1][:, 1], sums.T.astype(np.float32))
  else:
    np.testing.assert_allclose(got[1], want[1], rtol=2 ** -7)
    np.testing.assert_array_equal(got[2], sums)


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("b, hq, hkv, s", [(1, 32, 32, 160), (16, 32, 32, 160), (64, 32, 32, 144),
                                          (4, 32, 8, 2100)])  # LLaMA-2-7B; LLaMA-3-8B's grouped heads
def test_gpu_kernel_equals_the_einsums(b, hq, hkv, s, monkeypatch):
  q, k, v, visible = _case(b, hq, hkv, 128, s, jnp.bfloat16, lengths=[s - 3 * i for i in range(b)])
  out = da.decode_attention(q, k, v, visible)
  _close(out, _einsums(q, k, v, visible, monkeypatch), jnp.bfloat16)
