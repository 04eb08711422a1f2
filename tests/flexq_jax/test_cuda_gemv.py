"""The CUDA decode GEMV on "pallas6" weights (flexq_jax/cuda/gemv.py, csrc/gemv_pallas6.cuh).

CPU: `gemv_plan`, the kernel's arithmetic restated lane by lane in numpy (which bytes a lane
loads, the phase unpacking, the dp4a pairs, the two half-rows added, the warps' accumulators
added in order), equals the numerics contract; it reads the q_x the Pallas quantizer writes (in
interpret mode), so the two kernels share their inputs. Operand checks. GPU (marker `gpu`): the
kernel against its plan and the contract.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexq_jax import formats, numerics
from flexq_jax.cuda import gemv
from pallas_kernels import w6a_matmul as wk
from tests.helpers import fresh_rng as _rng
from tests.helpers import has_gpu as _has_gpu


def _inputs(rng, m, n, k, extremes=False):
  x = rng.standard_normal((m, k)).astype(np.float32) * 3
  if m > 1:
    x[1] = 0  # an all-zero token: scale 0, q 0
  w = rng.standard_normal((n, k)).astype(np.float32)
  if extremes:  # weights at both bounds -32 and 31 in one group
    w[0, :64], w[0, 64:128] = -1.0, 31 / 32
  q_w, s_w = numerics.quantize_weight(jnp.asarray(w), 6, 128)
  return jnp.asarray(x, jnp.bfloat16), q_w, s_w, formats.pack(q_w, 6, "pallas6", k)


def _quantized(x, packed, a_bits, interpret=True):
  m, k = x.shape
  cfg = wk.default_config(m, packed.shape[0] * 16, k)
  return wk.quantize_activations(x, a_bits=a_bits, config=cfg, interpret=interpret)


@pytest.mark.parametrize("a_bits", [6, 8])
@pytest.mark.parametrize("m,n,k,warps", [(1, 48, 200, 8), (8, 32, 2200, 8), (2, 16, 2200, 16),  # the rest: -m slow
                                         pytest.param(3, 16, 576, 8, marks=pytest.mark.slow),
                                         pytest.param(5, 64, 1152, 8, marks=pytest.mark.slow),
                                         pytest.param(1, 32, 4200, 32, marks=pytest.mark.slow)])
def test_plan_equals_contract(a_bits, m, n, k, warps):
  x, q_w, s_w, packed = _inputs(_rng(), m, n, k, extremes=True)
  qx, sx, xsum = _quantized(x, packed, a_bits)
  assert qx.shape[0] >= gemv.rows_read(m)
  y = gemv.gemv_plan(qx, sx, xsum, packed, s_w, m, warps=warps)
  ref = np.asarray(numerics.reference_matmul(x.astype(jnp.float32), q_w, s_w, a_bits=a_bits), np.float32)
  # the group sums are exact; only the fp32 summation order differs from the reference's
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4 * np.abs(ref).max())


def test_plan_reads_every_byte_of_its_lanes():
  """One weight changed anywhere changes exactly its output column: no byte is read by the wrong
  lane or phase (a swapped phase or half-row would move the change or cancel it)."""
  x, q_w, s_w, packed = _inputs(_rng(), 1, 16, 256)
  qx, sx, xsum = _quantized(x, packed, 8)
  base = gemv.gemv_plan(qx, sx, xsum, packed, s_w, 1)
  rng = np.random.default_rng(1)
  qx_np = np.asarray(qx)
  for _ in range(12):
    row, col = int(rng.integers(16)), int(rng.integers(256))
    kk = (col // 128) * 128 + 4 * (col % 128 // 4) + col % 4  # a natural k
    if qx_np[0, (kk // 128) * 128 + 32 * (kk % 4) + (kk % 128) // 4] == 0:
      continue  # q_x = 0 there: no change to see
    q2 = np.asarray(q_w).copy()
    q2[row, kk] = 31 if q2[row, kk] != 31 else -32
    y = gemv.gemv_plan(qx, sx, xsum, formats.pack(jnp.asarray(q2), 6, "pallas6", 256), s_w, 1)
    changed = np.nonzero(~np.isclose(y[0], base[0], rtol=0, atol=0))[0].tolist()
    assert changed == [row], (row, kk, changed)
    want = np.asarray(numerics.reference_matmul(x.astype(jnp.float32), jnp.asarray(q2), s_w, a_bits=8))[0, row]
    assert y[0, row] == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_operand_checks_name_the_operand():
  x, q_w, s_w, packed = _inputs(_rng(), 2, 16, 200)
  qx, sx, xsum = _quantized(x, packed, 6)
  with pytest.raises(ValueError, match="M <= 8"):
    gemv.check_operands(qx, sx, xsum, packed, s_w, 9)
  with pytest.raises(ValueError, match="q_x must be int8"):
    gemv.check_operands(qx[:1], sx, xsum, packed, s_w, 2)
  with pytest.raises(ValueError, match="s_x must be float32"):
    gemv.check_operands(qx, sx[:, :1], xsum, packed, s_w, 2)
  with pytest.raises(ValueError, match="w_scales must be float16"):
    gemv.check_operands(qx, sx, xsum, packed, s_w.astype(jnp.float32), 2)
  with pytest.raises(ValueError, match="pallas6"):
    gemv.check_operands(qx, sx, xsum, formats.pack(q_w.astype(jnp.int8), 8, "pallas8", 200), s_w, 2)
  with pytest.raises(ValueError, match="bfloat16 or float32"):
    gemv.gemv_pallas6(qx, sx, xsum, packed, s_w, m=2, out_dtype=jnp.float16)
  # the variant with the quantizer inside
  with pytest.raises(ValueError, match="bfloat16 or float32 activations"):
    gemv.gemv_pallas6_xq(x.astype(jnp.float16), packed, s_w, a_bits=6)
  with pytest.raises(ValueError, match="M <= 8"):
    gemv.gemv_pallas6_xq(jnp.zeros((9, 200), jnp.bfloat16), packed, s_w, a_bits=6)
  with pytest.raises(ValueError, match="warps must be one of"):
    gemv.gemv_pallas6_xq(x.astype(jnp.bfloat16), packed, s_w, a_bits=6, warps=12)
  with pytest.raises(ValueError, match="unroll 1 only"):
    gemv.gemv_pallas6_xq(x.astype(jnp.bfloat16), packed, s_w, a_bits=6, warps=16, unroll=2)
  with pytest.raises(ValueError, match="x has k=300"):
    gemv.gemv_pallas6_xq(jnp.zeros((2, 300), jnp.bfloat16), packed, s_w, a_bits=6)
  # its shared-memory ring
  with pytest.raises(ValueError, match="ring must be one of"):
    gemv.gemv_pallas6_xq(x.astype(jnp.bfloat16), packed, s_w, a_bits=6, ring=3)
  with pytest.raises(ValueError, match="8 warps a block at unroll 1"):
    gemv.gemv_pallas6_xq(x.astype(jnp.bfloat16), packed, s_w, a_bits=6, ring=4, warps=16)
  with pytest.raises(ValueError, match="M <= 2"):
    gemv.gemv_pallas6_xq(jnp.zeros((3, 200), jnp.bfloat16), packed, s_w, a_bits=6, ring=4)
  with pytest.raises(ValueError, match="fused_quant"):
    gemv.w6a_gemv(x.astype(jnp.bfloat16), packed, s_w, a_bits=6, ring=4)


def test_ring_shared_memory_fits_every_served_shape_and_refuses_what_does_not():
  """The ring GEMV's shared memory (csrc gemv_ring_smem_bytes): 4 stages fit every LLaMA-2 / LLaMA-3 K up
  to 70B's down_proj (28672) at M = 2; a K whose q_x cannot fit is refused before any launch."""
  for k in (4096, 5120, 8192, 11008, 13824, 14336, 28672):
    assert gemv.ring_smem_bytes(4, 2, -(-k // 128)) <= gemv.RING_SMEM_LIMIT, k
  assert gemv.ring_smem_bytes(4, 1, 32) == 4 * 12288 + 4096 + 256 + 1024
  groups = 1600  # K = 204800: q_x of two rows alone is 400 KB
  x = jnp.zeros((2, groups * 128), jnp.bfloat16)
  packed = jnp.zeros((1, groups, 3, 16, 32), jnp.uint8)
  with pytest.raises(ValueError, match="shared memory"):
    gemv.gemv_pallas6_xq(x, packed, jnp.zeros((16, groups), jnp.float16), a_bits=6, ring=2)


# ---- the kernel (GPU) ------------------------------------------------------------------------

gpu = pytest.mark.skipif(not _has_gpu(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("a_bits", [6, 8])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("n,k", [(48, 840), (4096, 4096), (16, 128)])
def test_gpu_gemv_equals_its_plan_and_the_contract(a_bits, m, n, k):
  x, q_w, s_w, packed = _inputs(_rng(), m, n, k, extremes=True)
  qx, sx, xsum = _quantized(x, packed, a_bits, interpret=False)
  y32 = jax.jit(gemv.gemv_pallas6, static_argnames=("m", "out_dtype"))(qx, sx, xsum, packed, s_w, m=m,
                                                                           out_dtype=jnp.float32)
  plan = gemv.gemv_plan(qx, sx, xsum, packed, s_w, m)
  np.testing.assert_allclose(np.asarray(y32), plan, rtol=1e-5, atol=1e-5 * np.abs(plan).max())  # FMA vs mul+add
  ref = np.asarray(numerics.reference_matmul(x, q_w, s_w, a_bits=a_bits), np.float32)
  y = gemv.w6a_gemv(x, packed, s_w, a_bits=a_bits)
  assert y.shape == (m, n) and y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=2**-7, atol=1e-6)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("a_bits", [6, 8])
@pytest.mark.parametrize("m", [1, 2, 3, 8])
@pytest.mark.parametrize("n,k,dtype", [(48, 840, jnp.bfloat16), (4096, 4096, jnp.bfloat16), (32, 200, jnp.float32)])
@pytest.mark.parametrize("unroll, warps", [(1, 8), (2, 8), (4, 8), (1, 16), (1, 32)])
def test_gpu_gemv_with_the_quantizer_inside(a_bits, m, n, k, dtype, unroll, warps):
  """One kernel: the same q_x as the Pallas quantizer (the contract's rule is one number
  everywhere), so the same plan; with 1, 2 or 4 groups' loads in flight a warp (7 groups at K = 840:
  a partial step), and in blocks of 8, 16 or 32 warps (32 at K = 4096: one group a warp)."""
  x, q_w, s_w, packed = _inputs(_rng(), m, n, k, extremes=True)
  x = x.astype(dtype)
  qx, sx, xsum = _quantized(x, packed, a_bits, interpret=False)
  plan = gemv.gemv_plan(qx, sx, xsum, packed, s_w, m, warps=warps)
  y = jax.jit(gemv.gemv_pallas6_xq, static_argnames=("a_bits", "unroll", "warps"))(x, packed, s_w, a_bits=a_bits,
                                                                                   unroll=unroll, warps=warps)
  assert y.shape == (m, n) and y.dtype == dtype
  tol = 1e-5 if dtype == jnp.float32 else 2**-7
  np.testing.assert_allclose(np.asarray(y, np.float32), plan, rtol=tol, atol=tol * np.abs(plan).max())


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("a_bits", [6, 8])
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("n,k,dtype", [(48, 840, jnp.bfloat16), (4096, 11008, jnp.bfloat16), (32, 200, jnp.float32),
                                       (256, 4096, jnp.bfloat16)])
@pytest.mark.parametrize("ring", [2, 4, 8])
def test_gpu_ring_gemv_is_bit_identical_to_the_gemv(a_bits, m, n, k, dtype, ring):
  """The shared-memory ring changes where the weights wait, not the arithmetic: the same groups per warp in
  the same order, the same quantizer, so the same bits as the 8-warp kernel and its plan (K = 11008: 86
  groups, 11 stages through 2-8 slots, the last partial; K = 200: a zero-padded group)."""
  x, q_w, s_w, packed = _inputs(_rng(), m, n, k, extremes=True)
  x = x.astype(dtype)
  run = jax.jit(gemv.gemv_pallas6_xq, static_argnames=("a_bits", "ring"))
  y = run(x, packed, s_w, a_bits=a_bits, ring=ring)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(run(x, packed, s_w, a_bits=a_bits), np.float32))
  qx, sx, xsum = _quantized(x, packed, a_bits, interpret=False)
  plan = gemv.gemv_plan(qx, sx, xsum, packed, s_w, m)
  tol = 1e-5 if dtype == jnp.float32 else 2**-7
  np.testing.assert_allclose(np.asarray(y, np.float32), plan, rtol=tol, atol=tol * np.abs(plan).max())
  with_pdl = jax.jit(lambda x: gemv.gemv_pallas6_xq(jnp.tanh(x) + x, packed, s_w, a_bits=a_bits, ring=ring, pdl=True))
  without = jax.jit(lambda x: gemv.gemv_pallas6_xq(jnp.tanh(x) + x, packed, s_w, a_bits=a_bits, ring=ring))
  np.testing.assert_array_equal(np.asarray(with_pdl(x), np.float32), np.asarray(without(x), np.float32))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("a_bits", [6, 8])
def test_gpu_gemv_with_programmatic_dependent_launch(a_bits):
  """pdl=True: the GEMV's blocks may start before the kernel that produces x has finished; they wait for
  it before reading x. A chain of producer -> GEMV -> consumer -> GEMV in one program must give the
  same numbers as without PDL and as the plan."""
  m, n, k = 1, 4096, 4096
  x, q_w, s_w, packed = _inputs(_rng(), m, n, k, extremes=True)
  x = x.astype(jnp.bfloat16)

  def chain(x, pdl):
    h = jnp.tanh(x * 1.5) + x  # an XLA fusion writes the GEMV's input just before it
    y = gemv.gemv_pallas6_xq(h, packed, s_w, a_bits=a_bits, pdl=pdl)
    z = (y.astype(jnp.float32) * 0.01).astype(jnp.bfloat16)[:, :k]  # and reads its output just after
    return y, gemv.gemv_pallas6_xq(z, packed, s_w, a_bits=a_bits, pdl=pdl)

  with_pdl = jax.jit(lambda x: chain(x, True))(x)
  without = jax.jit(lambda x: chain(x, False))(x)
  for a, b in zip(with_pdl, without):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  h = jnp.tanh(x * 1.5) + x
  qx, sx, xsum = _quantized(h, packed, a_bits, interpret=False)
  plan = gemv.gemv_plan(qx, sx, xsum, packed, s_w, m)
  np.testing.assert_allclose(np.asarray(with_pdl[0], np.float32), plan, rtol=2**-7, atol=2**-7 * np.abs(plan).max())

