"""The small-M tensor-core GEMM on "pallas6" weights (flexq_jax/cuda/gemm_small.py, csrc/gemm_small_pallas6.cuh).

CPU: `gemm_small_plan`, the kernel's arithmetic restated lane by lane in numpy (which bytes a lane
loads, the phase unpacking, the mma fragments and their k order, the warps' K split and order of
addition), equals the numerics contract on the q_x the Pallas quantizer writes (interpret mode); one
changed weight changes exactly its own output column; operand and option checks. nvcc builds the
kernel in tests/flexq_jax/test_cuda_build.py (the library includes it). GPU (marker `gpu`): the kernel
against its plan and the contract.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexq_jax import formats, numerics
from flexq_jax.cuda import gemm_small
from pallas_kernels import w6a_matmul as wk
from tests.helpers import fresh_rng as _rng
from tests.helpers import has_gpu as _has_gpu


def _inputs(rng, m, n, k):
  x = rng.standard_normal((m, k)).astype(np.float32) * 3
  x[min(1, m - 1)] = 0 if m > 1 else x[0]  # an all-zero token: scale 0, q 0
  w = rng.standard_normal((n, k)).astype(np.float32)
  w[0, :64], w[0, 64:128] = -1.0, 31 / 32  # weights at both bounds -32 and 31 in one group
  q_w, s_w = numerics.quantize_weight(jnp.asarray(w), 6, 128)
  return jnp.asarray(x, jnp.bfloat16), q_w, s_w, formats.pack(q_w, 6, "pallas6", k)


def _quantized(x, a_bits, interpret=True):
  m = x.shape[0]
  cfg = wk.TileConfig(block_m=max(16, 8 * gemm_small.token_tiles(m)), join_phases=False)
  return wk.quantize_activations(x, a_bits=a_bits, config=cfg, interpret=interpret)


@pytest.mark.parametrize("a_bits", [6, 8])
@pytest.mark.parametrize("m,n,k", [(9, 32, 200), (17, 48, 384),  # the rest with -m slow (CI time)
                                   pytest.param(16, 16, 576, marks=pytest.mark.slow),
                                   pytest.param(40, 16, 256, marks=pytest.mark.slow)])
def test_plan_equals_contract(a_bits, m, n, k):
  x, q_w, s_w, packed = _inputs(_rng(), m, n, k)
  qx, sx, xsum = _quantized(x, a_bits)
  assert qx.shape[0] >= 8 * gemm_small.token_tiles(m)
  y = gemm_small.gemm_small_plan(qx, sx, xsum, packed, s_w, m)
  ref = np.asarray(numerics.reference_matmul(x.astype(jnp.float32), q_w, s_w, a_bits=a_bits), np.float32)
  assert y.shape == (m, n)
  # the group sums are exact; only the fp32 summation order differs from the reference's
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4 * np.abs(ref).max())


def test_plan_reads_every_byte_of_its_lanes():
  """One weight changed anywhere changes exactly its output column, by the contract's amount: no byte
  reaches the wrong row, phase or k of an mma (a swapped half-row, word or phase would move or cancel it)."""
  x, q_w, s_w, packed = _inputs(_rng(), 12, 32, 256)
  qx, sx, xsum = _quantized(x, 8)
  base = gemm_small.gemm_small_plan(qx, sx, xsum, packed, s_w, 12)
  rng = np.random.default_rng(2)
  for _ in range(10):
    row, kk = int(rng.integers(32)), int(rng.integers(256))
    q2 = np.asarray(q_w).copy()
    q2[row, kk] = 31 if q2[row, kk] != 31 else -32
    y = gemm_small.gemm_small_plan(qx, sx, xsum, formats.pack(jnp.asarray(q2), 6, "pallas6", 256), s_w, 12)
    cols = sorted(set(np.nonzero(~np.isclose(y, base, rtol=0, atol=0))[1].tolist()))
    assert cols in ([row], []), (row, kk, cols)
    want = np.asarray(numerics.reference_matmul(x.astype(jnp.float32), jnp.asarray(q2), s_w, a_bits=8))[:, row]
    np.testing.assert_allclose(y[:, row], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_operand_and_option_checks_name_the_problem():
  x, q_w, s_w, packed = _inputs(_rng(), 16, 32, 200)
  qx, sx, xsum = _quantized(x, 6)
  with pytest.raises(ValueError, match="M <= 64"):
    gemm_small.check_operands(qx, sx, xsum, packed, s_w, 65, 1)
  with pytest.raises(ValueError, match="q_x must be int8 \\[Mp >= 16"):
    gemm_small.check_operands(qx[:8], sx[:8], xsum[:8], packed, s_w, 16, 1)
  with pytest.raises(ValueError, match="s_x must be float32"):
    gemm_small.check_operands(qx, sx[:, :1], xsum, packed, s_w, 16, 1)
  with pytest.raises(ValueError, match="w_scales must be float16"):
    gemm_small.check_operands(qx, sx, xsum, packed, s_w.astype(jnp.float32), 16, 1)
  with pytest.raises(ValueError, match="pallas6"):
    gemm_small.check_operands(qx, sx, xsum, formats.pack(q_w.astype(jnp.int8), 8, "pallas8", 200), s_w, 16, 1)
  with pytest.raises(ValueError, match="tiles_per_block=3"):
    gemm_small.check_operands(qx, sx, xsum, packed, s_w, 16, 3)
  qx17, sx17, xsum17 = _quantized(jnp.zeros((17, 200), jnp.bfloat16), 6)
  with pytest.raises(ValueError, match="tiles_per_block=4 .* at most 2 at M=17"):
    gemm_small.check_operands(qx17, sx17, xsum17, packed, s_w, 17, 4)
  with pytest.raises(ValueError, match="divide the 2 row tiles"):
    gemm_small.check_operands(qx, sx, xsum, packed, s_w, 16, 4)
  with pytest.raises(ValueError, match="bfloat16 or float32"):
    gemm_small.gemm_small_pallas6(qx, sx, xsum, packed, s_w, m=16, out_dtype=jnp.float16)
  with pytest.raises(ValueError, match="M <= 64"):
    gemm_small.w6a_gemm_small_cuda(jnp.zeros((65, 200), jnp.bfloat16), packed, s_w, a_bits=6)
  assert [gemm_small.max_tiles_per_block(m) for m in (1, 8, 9, 16, 17, 32, 33, 64)] == [4, 4, 4, 4, 2, 2, 1, 1]


# ---- the kernel (GPU) ------------------------------------------------------------------------

gpu = pytest.mark.skipif(not _has_gpu(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("a_bits", [6, 8])
@pytest.mark.parametrize("m", [1, 9, 16, 17, 33, 64])
@pytest.mark.parametrize("n,k", [(48, 840), (4096, 4096)])
def test_gpu_gemm_small_equals_its_plan_and_the_contract(a_bits, m, n, k):
  x, q_w, s_w, packed = _inputs(_rng(), m, n, k)
  qx, sx, xsum = _quantized(x, a_bits, interpret=False)
  plan = gemm_small.gemm_small_plan(qx, sx, xsum, packed, s_w, m)
  for kt in sorted({1, gemm_small.max_tiles_per_block(m)}):
    if (n // 16) % kt:
      continue
    y32 = jax.jit(gemm_small.gemm_small_pallas6, static_argnames=("m", "out_dtype", "tiles_per_block"))(
        qx, sx, xsum, packed, s_w, m=m, out_dtype=jnp.float32, tiles_per_block=kt)
    np.testing.assert_allclose(np.asarray(y32), plan, rtol=1e-5, atol=1e-5 * np.abs(plan).max())  # FMA vs mul+add
  ref = np.asarray(numerics.reference_matmul(x, q_w, s_w, a_bits=a_bits), np.float32)
  y = gemm_small.w6a_gemm_small_cuda(x, packed, s_w, a_bits=a_bits)
  assert y.shape == (m, n) and y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=2**-7, atol=2**-7 * np.abs(ref).max())
