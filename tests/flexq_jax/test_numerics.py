import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexq_jax import formats, numerics


def numpy_reference(x, q_w, s_w, a_bits, group):
  """The contract in float64 / int64 NumPy, written out independently of numerics.py."""
  m, k = x.shape
  kp = q_w.shape[1]
  xp = np.zeros((m, kp)); xp[:, :k] = x
  g = kp if group is None else group
  qmax = 2 ** (a_bits - 1) - 1
  xg = xp.reshape(m, kp // g, g)
  s_x = np.abs(xg).max(-1).astype(np.float32) * (np.float32(1) / np.float32(qmax))  # fp32 product
  s_x = (s_x.view(np.uint32) & np.uint32(0xFFFFFE00)).view(np.float32).astype(np.float64)  # 15 bits
  # float64 x / s_x rounds like the exact quotient: an exact tie is exact in float64 as well.
  with np.errstate(invalid="ignore", divide="ignore"):
    q_x = np.where(s_x[..., None] > 0, np.round(xg / np.where(s_x > 0, s_x, 1)[..., None]), 0).astype(np.int64)
  q_w64 = np.asarray(q_w, np.int64).reshape(q_w.shape[0], kp // g, g)
  sums = np.einsum("mgk,ngk->mng", q_x, q_w64)
  return np.einsum("mng,mg,ng->mn", sums.astype(np.float64), s_x, np.asarray(s_w, np.float64))


def test_weight_quantizer_bounds_zero_groups_and_padding():
  w = np.zeros((3, 300), np.float32)
  w[0, 0], w[0, 1] = 1.0, -0.5
  w[1, 130:140] = np.linspace(-2, 2, 10)
  q, s = numerics.quantize_weight(jnp.asarray(w))
  assert q.shape == (3, 384) and s.shape == (3, 3) and s.dtype == jnp.float16
  q = np.asarray(q)
  # Round to nearest with s = max|w| / 31 uses [-31, 31]: the group max maps to +-31.
  assert q[0, 0] == 31 and q[0, 1] == -16 and q[1, 130] == -31 and q[1, 139] == 31
  assert s[2].tolist() == [0, 0, 0] and not q[2].any()  # all-zero groups: scale 0, q 0
  assert not q[:, 300:].any()  # the K padding stays zero
  # With scales chosen by a weight method (clipping, GPTQ), -32 is reached and larger values clip.
  given = jnp.full((3, 3), 0.03125, jnp.float16)
  w2 = np.zeros((3, 300), np.float32)
  w2[0, :3] = [-32 * 0.03125, 31 * 0.03125, 40 * 0.03125]
  w2[0, 3] = -50 * 0.03125
  q2, _ = numerics.quantize_weight(jnp.asarray(w2), scales=given)
  assert np.asarray(q2[0, :4]).tolist() == [-32, 31, 31, -32]


def test_activation_quantizer_bounds():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 200)).astype(np.float32))
  for bits, qmax in ((6, 31), (8, 127)):
    q, s = numerics.quantize_activation(x, bits)
    assert q.shape == (4, 256) and s.shape == (4, 2)
    assert int(jnp.max(jnp.abs(q))) == qmax  # the max of every group maps to +-qmax


@pytest.mark.parametrize("bits", [6, 8])
def test_activation_quantization_is_exact_rational_rounding(bits):
  # The contract: s_x = max|x| * fl32(1 / qmax) with 15 significant bits, q_x = the integer nearest
  # to the exact quotient x / s_x, ties to even. Checked against Python fractions on bf16 inputs,
  # where fp32 x / s and x * (1 / s) disagree on near-ties, and on exact ties made on purpose.
  from fractions import Fraction
  rng = np.random.default_rng(0)
  x = np.asarray(jnp.asarray(rng.standard_normal((512, 128)) * 3, jnp.bfloat16), np.float32)
  qmax = 2 ** (bits - 1) - 1
  s = (np.abs(x).max(axis=1) * (np.float32(1) / np.float32(qmax))).view(np.uint32) & np.uint32(0xFFFFFE00)
  s = s.view(np.float32)
  x[:8, 1] = (np.arange(8) - 3.5).astype(np.float32) * s[:8]  # exact ties: (c + 1/2) s, c = -4 .. 3
  assert np.count_nonzero(np.rint(x / s[:, None]) != np.rint(x * (np.float32(1) / s)[:, None])) > 0
  q, s_ref = numerics.quantize_activation(jnp.asarray(x), bits)
  np.testing.assert_array_equal(np.asarray(s_ref)[:, 0], s)
  want = np.array([[round(Fraction(float(v)) / Fraction(float(sc))) for v in row] for row, sc in zip(x, s)])
  np.testing.assert_array_equal(np.asarray(q, np.int64), np.clip(want, -qmax - 1, qmax))  # round(): ties even
  assert list(np.asarray(q)[:8, 1]) == [-4, -2, -2, 0, 0, 2, 2, 4]  # -3.5 -> -4, -2.5 -> -2, ...


@pytest.mark.parametrize("a_bits", [6, 8])
@pytest.mark.parametrize("k", [128, 300])
@pytest.mark.parametrize("group", [128, None])
def test_reference_matmul_equals_int64_numpy(a_bits, k, group):
  rng = np.random.default_rng(k + a_bits)
  x = rng.standard_normal((5, k)).astype(np.float32) * 3
  x[1] = 0.0  # an all-zero token
  w = rng.standard_normal((70, k)).astype(np.float32)
  q_w, s_w = numerics.quantize_weight(jnp.asarray(w), 6, group)
  y = numerics.reference_matmul(jnp.asarray(x), q_w, s_w, a_bits=a_bits, group_size=group)
  expect = numpy_reference(x, np.asarray(q_w), np.asarray(s_w, np.float32), a_bits, group)
  np.testing.assert_allclose(y, expect, rtol=1e-5, atol=1e-5 * np.abs(expect).max())
  assert not np.asarray(y[1]).any()


def test_group_sums_are_exact_integers_at_the_extremes():
  # Every product at its largest magnitude: -128 * -32 over 128 terms = 524288 (> 2^16).
  qx = jnp.full((2, 256), -128, jnp.int8)
  qw = jnp.full((3, 256), -32, jnp.int8)
  sums = numerics.group_dots(qx, qw, 128)
  assert sums.dtype == jnp.int32
  assert np.all(np.asarray(sums) == 128 * 128 * 32)
  rng = np.random.default_rng(1)
  qx = rng.integers(-128, 128, (7, 640)).astype(np.int8)
  qw = rng.integers(-32, 32, (9, 640)).astype(np.int8)
  got = numerics.group_dots(jnp.asarray(qx), jnp.asarray(qw), 128)
  want = np.einsum("mgk,ngk->gmn", qx.astype(np.int64).reshape(7, 5, 128), qw.astype(np.int64).reshape(9, 5, 128))
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("a_bits", [6, 8])
def test_bitplane_matmul_equals_reference(a_bits):
  rng = np.random.default_rng(a_bits)
  x = jnp.asarray(rng.standard_normal((6, 384)).astype(np.float32))
  w = jnp.asarray(rng.standard_normal((33, 384)).astype(np.float32))
  q_w, s_w = numerics.quantize_weight(w)
  planes = formats.pack_bitplanes(q_w, 6)
  q_x, _ = numerics.quantize_activation(x, a_bits)
  exact = numerics.group_dots(q_x, q_w, 128)
  via_planes = numerics.bitplane_group_dots(formats.pack_bitplanes(q_x, a_bits), planes)
  np.testing.assert_array_equal(via_planes, exact)  # integer identity, bit for bit
  np.testing.assert_allclose(numerics.bitplane_matmul(x, planes, s_w, a_bits=a_bits),
                             numerics.reference_matmul(x, q_w, s_w, a_bits=a_bits), rtol=1e-6, atol=1e-5)


def test_reference_matmul_jits_and_keeps_dtype():
  x = jnp.ones((3, 128), jnp.bfloat16)
  q_w, s_w = numerics.quantize_weight(jnp.ones((4, 128), jnp.float32))
  y = jax.jit(lambda x: numerics.reference_matmul(x, q_w, s_w, a_bits=6))(x)
  assert y.dtype == jnp.bfloat16 and y.shape == (3, 4)
  np.testing.assert_allclose(np.asarray(y, np.float32), 128.0, rtol=1e-2)


def test_bad_inputs():
  w = np.ones((4, 128), np.float32)
  w[2, 5] = np.nan
  with pytest.raises(ValueError, match="NaN or Inf.*\\(2, 5\\)"):
    numerics.quantize_weight(jnp.asarray(w))
  w[2, 5] = np.inf
  with pytest.raises(ValueError, match="NaN or Inf"):
    numerics.quantize_weight(jnp.asarray(w))
  with pytest.raises(ValueError, match=r"must be \[N, K\]"):
    numerics.quantize_weight(jnp.ones((2, 3, 4)))
  with pytest.raises(ValueError, match="floating point"):
    numerics.quantize_weight(jnp.ones((2, 128), jnp.int32))
  with pytest.raises(ValueError, match="group_size"):
    numerics.quantize_weight(jnp.ones((2, 128)), group_size=100)
  q_w, s_w = numerics.quantize_weight(jnp.ones((4, 256)))
  with pytest.raises(ValueError, match="does not match"):
    numerics.reference_matmul(jnp.ones((2, 100)), q_w, s_w, a_bits=6)


@pytest.mark.parametrize("group", [128, None])
def test_dequant_path_equals_reference_up_to_fp32_rounding(group):
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((16, 576)).astype(np.float32))
  q_w, s_w = numerics.quantize_weight(jnp.asarray(rng.standard_normal((40, 576)).astype(np.float32)), 6, group)
  ref = numerics.reference_matmul(x, q_w, s_w, a_bits=6, group_size=group)
  fast = numerics.dequant_matmul(x, q_w, s_w, a_bits=6, group_size=group)
  np.testing.assert_allclose(fast, ref, rtol=0, atol=1e-6 * float(jnp.abs(ref).max()) * 16)

