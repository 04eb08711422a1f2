"""The CUDA decode GEMV with its producer and the residual add folded in (flexq_jax/cuda/gemv.py gemv_fused,
csrc/gemv_pallas6.cuh gemv_pallas6_fused_kernel; issue 14 item 1 at batch 1) and its routing
(backends.gemv_folds, FoldedInput, models.llama's hooks).

CPU: the prologues' jnp statement (fused_input) is the model's RMSNorm and SwiGLU; the operand checks; the
whole model at M = 1 with every fold on (the kernel stood in for by fused_reference) equals the model with
none. GPU (marker `gpu`): the kernel bit for bit against the quantizer-inside GEMV where nothing is folded,
against fused_reference with each prologue and the residual.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evaluation import e2e_bench
from flexq_jax import backends, formats, numerics, tuning
from flexq_jax.cuda import gemv
from flexq_jax.placement import place
from flexq_jax.qconfig import QuantConfig
from flexq_jax.quantize import quantize
from models import llama
from pallas_kernels import w6a_matmul as wk
from tests.helpers import fresh_rng as _rng
from tests.helpers import has_gpu as _has_gpu


def _weights(rng, n, k):
  q_w, s_w = numerics.quantize_weight(jnp.asarray(rng.standard_normal((n, k)), jnp.float32), 6, 128)
  return q_w, s_w, formats.pack(q_w, 6, "pallas6", k)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_prologues_are_the_models_producers(dtype):
  """fused_input's "norm" is models.llama.rms_norm and its "swiglu" the SwiGLU quantizer's _swiglu, bit for bit;
  in fp32 the latter is jax.nn.silu(gate) * up to an ulp."""
  rng = _rng()
  h = jnp.asarray(rng.standard_normal((3, 384)) * 4, dtype)
  w = jnp.asarray(rng.standard_normal(384) * 0.5 + 1, dtype)
  np.testing.assert_array_equal(np.asarray(gemv.fused_input(h, "norm", w, 1e-5), np.float32),
                                np.asarray(llama.rms_norm(h, w, 1e-5), np.float32))
  gu = jnp.asarray(rng.standard_normal((3, 768)) * 3, dtype)
  got = np.asarray(gemv.fused_input(gu, "swiglu"), np.float32)
  np.testing.assert_array_equal(got, np.asarray(wk._swiglu(gu[:, :384], gu[:, 384:]), np.float32))
  if dtype == jnp.float32:
    np.testing.assert_allclose(got, np.asarray(jax.nn.silu(gu[:, :384]) * gu[:, 384:]), rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(gemv.fused_input(h, "plain"), h)


def test_fused_reference_adds_the_rounded_product():
  rng = _rng()
  q_w, s_w, _ = _weights(rng, 32, 256)
  x = jnp.asarray(rng.standard_normal((2, 256)), jnp.bfloat16)
  res = jnp.asarray(rng.standard_normal((2, 32)) * 10, jnp.bfloat16)
  y = numerics.reference_matmul(x, q_w, s_w, a_bits=6)
  got = gemv.fused_reference(x, q_w, s_w, a_bits=6, residual=res)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(res + y, np.float32))


def test_gemv_fused_checks_name_the_problem():
  rng = _rng()
  _, s_w, packed = _weights(rng, 32, 256)
  x = jnp.zeros((1, 256), jnp.bfloat16)
  with pytest.raises(ValueError, match="prologue must be one of"):
    gemv.gemv_fused(x, packed, s_w, a_bits=6, prologue="gelu")
  with pytest.raises(ValueError, match="odd count"):
    gemv.gemv_fused(jnp.zeros((1, 511), jnp.bfloat16), packed, s_w, a_bits=6, prologue="swiglu")
  with pytest.raises(ValueError, match="weights hold 256"):  # [1, 512] read as K = 512: not the weights' K
    gemv.gemv_fused(jnp.zeros((1, 512), jnp.bfloat16), packed, s_w, a_bits=6)
  with pytest.raises(ValueError, match="needs norm_weight"):
    gemv.gemv_fused(x, packed, s_w, a_bits=6, prologue="norm")
  with pytest.raises(ValueError, match="norm_weight is for prologue 'norm'"):
    gemv.gemv_fused(x, packed, s_w, a_bits=6, norm_weight=jnp.ones(256, jnp.bfloat16))
  with pytest.raises(ValueError, match="eps must be finite"):
    gemv.gemv_fused(x, packed, s_w, a_bits=6, prologue="norm", norm_weight=jnp.ones(256, jnp.bfloat16),
                    eps=float("nan"))
  with pytest.raises(ValueError, match=r"residual must be \[1, 32\]"):
    gemv.gemv_fused(x, packed, s_w, a_bits=6, residual=jnp.zeros((1, 16), jnp.bfloat16))
  with pytest.raises(ValueError, match="M <= 2"):
    gemv.gemv_fused(jnp.zeros((3, 256), jnp.bfloat16), packed, s_w, a_bits=6)
  with pytest.raises(ValueError, match="bfloat16 or float32"):
    gemv.gemv_fused(x.astype(jnp.float16), packed, s_w, a_bits=6)


@pytest.fixture(scope="module")
def tiny():
  cfg = e2e_bench.tiny_config()
  params = llama.init_params(cfg, jax.random.key(0), scale=0.05)
  calib = np.asarray(jax.random.randint(jax.random.key(1), (2, 32), 0, cfg.vocab_size))
  qparams, _ = quantize(params, calib, QuantConfig(weight_method="rtn", a8_selection="down_proj", smooth_alpha=None),
                        model_config=cfg)
  return cfg, llama.fuse_projections(place(qparams, "pallas", dtype=jnp.float32)[0])


def _stand_in_kernels(monkeypatch, table):
  """The CUDA GEMV's kernels replaced by the contract's reference (CPU): every call recorded as (prologue,
  residual?) for the fused one, "xq" for the plain one; the pallas backend told that M = 1 runs the GEMV."""
  calls = []

  def fused(x, w_packed, w_scales, *, a_bits, prologue="plain", norm_weight=None, eps=0.0, residual=None):
    calls.append((prologue, residual is not None))
    k = x.shape[1] // 2 if prologue == "swiglu" else x.shape[1]
    q_w = formats.unpack(w_packed, 6, "pallas6", k)
    return gemv.fused_reference(x, q_w, w_scales, a_bits=a_bits, prologue=prologue, norm_weight=norm_weight, eps=eps,
                                residual=residual)

  def plain(x, w_packed, w_scales, *, a_bits, out_dtype=None, **_):
    calls.append("xq")
    return numerics.reference_matmul(x, formats.unpack(w_packed, 6, "pallas6", x.shape[1]), w_scales, a_bits=a_bits,
                                     out_dtype=out_dtype or x.dtype)

  monkeypatch.setattr(backends, "_card_table", lambda device=None: table)
  monkeypatch.setattr(backends.PALLAS, "kernel_for",
                      lambda m, *a, **kw: ("cuda_gemv_xq", "test") if m == 1 else ("triton", "test"))
  monkeypatch.setattr(gemv, "gemv_fused", fused)
  monkeypatch.setattr(gemv, "w6a_gemv", plain)
  return calls


def test_the_model_at_batch_1_with_every_fold_equals_the_model_without(tiny, monkeypatch):
  """One token through the whole model (fp32) with "cuda_gemv_fuse" listing all three folds: each layer's q/k/v
  and gate/up GEMVs form their RMSNorm, down_proj its SwiGLU, o_proj and down_proj add the residual in their
  store (five fused calls a layer, no plain one), and the logits equal those of the same kernels with nothing
  folded (fp32: the norm is the model's bit for bit, the SwiGLU within an ulp of jax.nn.silu)."""
  cfg, placed = tiny
  tokens = jnp.asarray([[17]])
  run = lambda: np.asarray(jax.jit(lambda p: llama.forward(p, cfg, tokens)[0])(placed), np.float32)
  table = {"cuda_gemv_xq_max_m": 1}
  calls = _stand_in_kernels(monkeypatch, table)
  plain = run()
  assert calls == ["xq"] * (4 * cfg.num_layers)
  calls.clear()
  table["cuda_gemv_fuse"] = ["norm", "swiglu", "residual"]
  folded = run()
  per_layer = [("norm", False), ("plain", True), ("norm", False), ("swiglu", True)]
  assert calls == per_layer * cfg.num_layers
  np.testing.assert_allclose(folded, plain, rtol=1e-5, atol=1e-5 * np.abs(plain).max())
  calls.clear()
  table["cuda_gemv_fuse"] = ["residual"]
  run()
  assert calls == ["xq", ("plain", True), "xq", ("plain", True)] * cfg.num_layers  # XLA's norms and SwiGLU


def test_folds_apply_only_where_the_gemv_runs(tiny, monkeypatch):
  """No fold at M > 1 (the GEMV does not run), on a backend other than pallas, for an unknown name in the table
  (a ValueError naming the key), for a norm weight of another dtype, or with a GEMV variant the fused kernel is
  not (unroll, wider blocks, ring, PDL)."""
  cfg, placed = tiny
  layer = placed["layers"][0]
  qkv, down = layer["qkv_proj"], layer["down_proj"]
  table = {"cuda_gemv_xq_max_m": 1, "cuda_gemv_fuse": ["norm", "swiglu", "residual"]}
  _stand_in_kernels(monkeypatch, table)
  h = jnp.ones((1, 1, qkv.in_features), jnp.float32)
  norm = jnp.ones(qkv.in_features, jnp.float32)
  folded = qkv.norm_input(h, norm, 1e-5)
  assert isinstance(folded, backends.FoldedInput) and folded.prologue == "norm"
  assert qkv.norm_input(jnp.ones((1, 2, qkv.in_features)), norm, 1e-5) is None  # M = 2: the Triton GEMM
  assert qkv.norm_input(h, norm.astype(jnp.bfloat16), 1e-5) is None
  assert backends.gemv_folds(qkv.replace(backend="reference"), 1, jnp.float32) == frozenset()
  gu = jnp.ones((1, 1, 2 * down.in_features), jnp.float32)
  assert down.swiglu_input(gu).prologue == "swiglu"
  assert down.residual_matmul(jnp.ones((1, 1, down.in_features)), jnp.ones((1, 1, down.out_features))) is not None
  assert down.residual_matmul(jnp.ones((1, 1, down.in_features)),
                              jnp.ones((1, 1, down.out_features), jnp.bfloat16)) is None  # dtypes differ
  for key, value in (("cuda_gemv_unroll", 2), ("cuda_gemv_wide_warps", 16), ("cuda_gemv_ring", 4),
                     ("cuda_gemv_pdl", True)):
    table[key] = value
    assert backends.gemv_folds(qkv, 1, jnp.float32) == frozenset(), key
    del table[key]
  table["cuda_gemv_fuse"] = ["norm", "rope"]
  with pytest.raises(ValueError, match="cuda_gemv_fuse lists"):
    backends.gemv_folds(qkv, 1, jnp.float32)
  with pytest.raises(ValueError, match="made for a layer with K="):
    backends.folded_matmul(backends.FoldedInput(x=h, weight=norm, eps=1e-5, prologue="norm", in_features=7), qkv)


def test_residual_linear_without_a_hook_adds():
  rng = _rng()
  h, x, w = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((2, 8), (2, 4), (4, 8)))
  np.testing.assert_array_equal(llama.residual_linear(h, x, w), h + x @ w)


# ---- the kernel (GPU) ------------------------------------------------------------------------

gpu = pytest.mark.skipif(not _has_gpu(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("a_bits", [6, 8])
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("n,k,dtype", [(48, 840, jnp.bfloat16), (4096, 4096, jnp.bfloat16), (32, 200, jnp.float32)])
def test_gpu_fused_gemv_with_nothing_folded_is_the_quantizer_inside_gemv(a_bits, m, n, k, dtype):
  """The plain prologue is gemv_pallas6_xq at 8 warps, unroll 1, bit for bit; with a residual, that output
  rounded then added (XLA's add of the two)."""
  rng = _rng()
  _, s_w, packed = _weights(rng, n, k)
  x = jnp.asarray(rng.standard_normal((m, k)) * 3, dtype)
  res = jnp.asarray(rng.standard_normal((m, n)) * 5, dtype)
  want = jax.jit(gemv.gemv_pallas6_xq, static_argnames="a_bits")(x, packed, s_w, a_bits=a_bits)
  got = jax.jit(gemv.gemv_fused, static_argnames="a_bits")(x, packed, s_w, a_bits=a_bits)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  got = jax.jit(gemv.gemv_fused, static_argnames="a_bits")(x, packed, s_w, a_bits=a_bits, residual=res)
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray((res.astype(jnp.float32) + want.astype(jnp.float32)).astype(dtype),
                                           np.float32))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("a_bits", [6, 8])
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("prologue", ["norm", "swiglu"])
@pytest.mark.parametrize("n,k,dtype", [(48, 840, jnp.bfloat16), (4096, 4096, jnp.bfloat16), (256, 11008, jnp.bfloat16),
                                       (32, 200, jnp.float32)])
def test_gpu_fused_gemv_prologues_against_the_reference(a_bits, m, prologue, n, k, dtype):
  """Each prologue, with and without the residual, against fused_reference (the contract on the jnp prologue):
  within the GEMV tests' tolerance (bf16: 2^-7 of the output's scale). The kernel's sum of squares and exp are
  not XLA's, so an x may round one ulp apart and move a q_x step now and then; the bound holds that too."""
  rng = _rng()
  q_w, s_w, packed = _weights(rng, n, k)
  cols = 2 * k if prologue == "swiglu" else k
  x = jnp.asarray(rng.standard_normal((m, cols)) * 3, dtype)
  gamma = jnp.asarray(rng.standard_normal(k) * 0.3 + 1, dtype) if prologue == "norm" else None
  res = jnp.asarray(rng.standard_normal((m, n)) * 5, dtype)
  run = jax.jit(gemv.gemv_fused, static_argnames=("a_bits", "prologue", "eps"))
  for residual in (None, res):
    got = np.asarray(run(x, packed, s_w, a_bits=a_bits, prologue=prologue, norm_weight=gamma, eps=1e-5,
                         residual=residual), np.float32)
    want = np.asarray(gemv.fused_reference(x, q_w, s_w, a_bits=a_bits, prologue=prologue, norm_weight=gamma,
                                           eps=1e-5, residual=residual), np.float32)
    tol = 1e-5 if dtype == jnp.float32 else 2**-7
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())
