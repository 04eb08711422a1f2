"""The Pallas W6A6 / W6A8 kernels (and their 8-bit-weight "pallas8" path) against the numerics contract.

TestW6AMatmul compiles for a GPU (marker `gpu`; skipped without one); TestW6AMatmulInterpret runs
the same cases in Pallas interpret mode on the CPU. Every check draws fresh random inputs, so an
output left unwritten (or stale from an earlier call) cannot match the reference.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexq_jax import formats, numerics
from pallas_kernels import core
from flexq_jax.placement import place
from flexq_jax.qlinear import QuantizedLinear
from pallas_kernels import w6a_matmul as wk

from tests.helpers import fresh_rng as _rng
from tests.helpers import has_gpu as _has_gpu


def _weights(rng, n: int, k: int, scale: float = 1.0):
  w = rng.standard_normal((n, k)).astype(np.float32) * scale
  q, s = numerics.quantize_weight(jnp.asarray(w), 6, 128)
  return q, s, formats.pack(q, 6, "pallas6", k)


def _weights8(rng, n: int, k: int, scale: float = 1.0):
  w = rng.standard_normal((n, k)).astype(np.float32) * scale
  q, s = numerics.quantize_weight(jnp.asarray(w), 8, 128)
  return q, s, formats.pack(q, 8, "pallas8", k)


def _reference(x, packed, scales, a_bits):
  """The definition: the layout unpacked to the canonical int form, then numerics.reference_matmul."""
  q_w = formats.unpack_pallas6(packed) if wk.weight_bits(packed) == 6 else formats.unpack_pallas8(packed)
  return numerics.reference_matmul(x, q_w, scales, a_bits=a_bits, out_dtype=x.dtype)


# ---- the layout (CPU) -------------------------------------------------------------------------

def _reference_pallas6(q: np.ndarray) -> np.ndarray:
  """Independent packer: one byte at a time with plain Python ints, from formats' drawing."""
  n, kp = q.shape
  out = np.zeros((n // 16, kp // 128, 3, 16, 32), np.uint8)
  for j in range(kp // 128):
    for t in range(32):
      for c in range(n):
        u = [int(q[c, 128 * j + 4 * t + p]) + 32 for p in range(4)]
        tile = out[c // 16, j, :, c % 16]
        tile[0, t] = (u[0] & 15) | (u[1] & 15) << 4
        tile[1, t] = (u[2] & 15) | (u[3] & 15) << 4
        tile[2, t] = (u[0] >> 4) | (u[1] >> 4) << 2 | (u[2] >> 4) << 4 | (u[3] >> 4) << 6
  return out


def test_pallas6_bit_exact_against_reference_packer():
  rng = _rng()
  q = rng.integers(-32, 32, (32, 256)).astype(np.int8)
  q[0, :8] = [-32, 31, 0, -1, 1, -31, 30, -2]  # the signed bounds and neighbours
  q[1, 128:] = 0  # an all-zero group
  q[2] = -32
  q[3] = 31
  packed = formats.pack_pallas6(jnp.asarray(q))
  assert packed.dtype == jnp.uint8 and packed.shape == (2, 2, 3, 16, 32)  # 6 bits a weight
  np.testing.assert_array_equal(packed, _reference_pallas6(q))
  np.testing.assert_array_equal(formats.unpack_pallas6(packed), q)


def test_pallas6_round_trip_with_k_padding():
  rng = _rng()
  q = rng.integers(-32, 32, (304, 576)).astype(np.int8)
  q_padded = np.pad(q, [(0, 0), (0, 64)])
  packed = formats.pack(jnp.asarray(q_padded), 6, "pallas6", k=576)
  assert packed.shape == (19, 5, 3, 16, 32)  # stores the padded Kp = 640
  assert formats.packed_bytes_per_weight(6, "pallas6") == 0.75
  back = formats.unpack(packed, 6, "pallas6", k=576)
  np.testing.assert_array_equal(back, q_padded)
  with pytest.raises(ValueError, match="6-bit weights only"):
    formats.pack(jnp.asarray(q_padded), 8, "pallas6", k=576)
  with pytest.raises(ValueError, match="multiple of 128"):
    formats.pack_pallas6(jnp.zeros((16, 96), jnp.int8))
  with pytest.raises(ValueError, match="multiple of 16"):
    formats.pack_pallas6(jnp.zeros((40, 128), jnp.int8))


def test_place_repacks_exactly_and_dispatches():
  rng = _rng()
  n, k = 80, 200
  q, s, _ = _weights(rng, n, k)
  layer = QuantizedLinear(packed=formats.pack(q, 6, "bitplanes", k), scales=s, in_features=k, out_features=n,
                          w_bits=6, a_bits=8, group_size=128)
  params = {"w": layer, "other": jnp.ones(3)}
  moved, _ = place(params, "pallas")
  assert moved["w"].layout == "pallas6" and moved["w"].backend == "pallas"
  np.testing.assert_array_equal(moved["w"].logical_weight(), layer.logical_weight())
  x = jnp.asarray(rng.standard_normal((2, 3, k)), jnp.float32)
  np.testing.assert_allclose(x @ moved["w"], x @ layer, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(x @ layer))))
  with pytest.raises(ValueError, match="layout 'pallas6'"):
    x @ layer.replace(backend="pallas")  # bitplanes on the pallas backend


def test_default_config_regimes():
  # Decode M <= 2: the gemv kernel, split-K giving ~1024 programs, never more splits than steps.
  for n, k in [(8192, 8192), (28672, 8192), (4096, 4096), (4096, 11008), (112, 600)]:
    for m in (1, 2):
      cfg = wk.default_config(m, n, k)
      groups = -(-k // 128)
      assert cfg.gemv and cfg.block_n == 64 and 1 <= cfg.split_k <= max(1, groups // cfg.block_kg)
  assert wk.default_config(1, 8192, 8192).split_k == 8 and wk.default_config(1, 4096, 4096).split_k == 8
  # M >= 3: the tensor-core kernels (split phases to 16, joined K = 128 dots for prefill).
  assert not wk.default_config(3, 8192, 8192).gemv and not wk.default_config(16, 8192, 8192).join_phases
  assert wk.default_config(4096, 8192, 8192).join_phases and wk.default_config(4096, 8192, 8192).block_m == 128


def test_default_config_w8():
  # The w8 gemv loads 128 bytes a row and group (w6: 96): 2 groups a step keep a step's loaded
  # bytes a thread (256) at most w6's (4 x 96 = 384); the tensor-core tilings are w6's.
  def step_bytes_per_thread(cfg, bytes_per_row_group):
    return cfg.block_kg * cfg.block_n * bytes_per_row_group / (32 * cfg.num_warps)
  for n, k in [(8192, 8192), (28672, 8192), (4096, 11008), (112, 600)]:
    w6, w8 = wk.default_config(1, n, k), wk.default_config(1, n, k, w_bits=8)
    assert w8.gemv and 1 <= w8.split_k <= max(1, -(-k // 128) // w8.block_kg)
    assert step_bytes_per_thread(w8, 128) <= step_bytes_per_thread(w6, 96)
    assert step_bytes_per_thread(w8, 128) >= step_bytes_per_thread(w6, 96) / 2
  assert wk.default_config(1, 8192, 8192, w_bits=8).split_k == 8
  assert wk.default_config(16, 8192, 8192, w_bits=8) == wk.default_config(16, 8192, 8192)
  assert not wk.default_config(4096, 8192, 8192, w_bits=8).join_phases
  with pytest.raises(ValueError, match="w_bits=4"):
    wk.default_config(1, 64, 128, w_bits=4)


def test_wrapper_errors():
  x = jnp.zeros((2, 256), jnp.bfloat16)
  packed = jnp.zeros((4, 2, 3, 16, 32), jnp.uint8)
  scales = jnp.zeros((64, 2), jnp.float16)
  with pytest.raises(ValueError, match="a_bits=4"):
    wk.w6a_matmul(x, packed, scales, a_bits=4)
  with pytest.raises(ValueError, match="k=384"):
    wk.w6a_matmul(jnp.zeros((2, 384), jnp.bfloat16), packed, scales, a_bits=6)
  with pytest.raises(ValueError, match="w_scales"):
    wk.w6a_matmul(x, packed, scales[:, :1], a_bits=6)
  with pytest.raises(ValueError, match="split_k=3 exceeds"):
    wk.w6a_matmul(x, packed, scales, a_bits=6, config=wk.TileConfig(split_k=3))
  with pytest.raises(ValueError, match="power of two"):
    wk.TileConfig(block_n=48)
  # Neither layout: the message names both expected shapes.
  for bad in (jnp.zeros((4, 2, 16, 128), jnp.uint8), jnp.zeros((4, 2, 3, 16, 32), jnp.int8),
              jnp.zeros((4, 2, 16, 96), jnp.int8)):
    with pytest.raises(ValueError, match=r"'pallas6' uint8 \[N/16, groups, 3, 16, 32\] or 'pallas8' int8 "
                                         r"\[N/16, groups, 16, 128\]"):
      wk.w6a_matmul(x, bad, scales, a_bits=6)
  packed8 = jnp.zeros((4, 2, 16, 128), jnp.int8)
  with pytest.raises(ValueError, match="k=384"):
    wk.w6a_matmul(jnp.zeros((2, 384), jnp.bfloat16), packed8, scales, a_bits=8)
  with pytest.raises(ValueError, match="w_scales"):
    wk.w6a_matmul(x, packed8, scales[:32], a_bits=8)


# ---- the kernels (GPU compiled, or CPU interpret) --------------------------------------------

class _W6AMatmulCases:
  INTERPRET: bool
  USE_ASM = (False,)  # unpacking variants to check (the PTX one compiles only for a GPU)

  def _run(self, x, packed, scales, a_bits, config=None):
    return wk.w6a_matmul(x, packed, scales, a_bits=a_bits, config=config, interpret=self.INTERPRET)

  def _check(self, x, packed, scales, a_bits, config=None):
    ref = np.asarray(_reference(x, packed, scales, a_bits), np.float32)
    for use_asm in self.USE_ASM:
      default = wk.default_config(x.shape[0], packed.shape[1], x.shape[1], w_bits=wk.weight_bits(packed))
      cfg = dataclasses.replace(config or default, unpack_asm=use_asm)
      out = self._run(x, packed, scales, a_bits, cfg)
      assert out.shape == ref.shape and out.dtype == x.dtype
      out = np.asarray(out, np.float32)
      assert np.isfinite(out).all()
      # fp32 outputs: summation order only; bf16: one rounding of the output (2^-8 relative).
      rtol = 1e-5 if x.dtype == jnp.float32 else 2 ** -7
      np.testing.assert_allclose(out, ref, rtol=rtol, atol=rtol * max(1e-30, float(np.abs(ref).max())))

  @pytest.mark.parametrize("m", [1, 3, 16, 17])
  @pytest.mark.parametrize("k,a_bits", [(256, 6), (200, 8)])
  def test_against_reference(self, m, k, a_bits):
    rng = _rng()
    _, s, packed = _weights(rng, 112, k)  # N = 112: not a multiple of any block_n > 16
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    self._check(x, packed, s, a_bits)

  @pytest.mark.parametrize("config", [
      wk.TileConfig(block_m=16, block_n=32, split_k=3),
      wk.TileConfig(block_m=32, block_n=32, split_k=1, group_m=2, join_phases=True),
      wk.TileConfig(block_m=16, block_n=64, split_k=2, join_phases=True),
      wk.TileConfig(block_m=16, block_n=16, split_k=3),
  ])
  def test_other_tilings(self, config):
    rng = _rng()
    _, s, packed = _weights(rng, 80, 400)
    x = jnp.asarray(rng.standard_normal((70, 400)), jnp.bfloat16)
    self._check(x, packed, s, 6, config)

  @pytest.mark.parametrize("config", [
      wk.TileConfig(gemv=True, block_n=32, num_warps=2, block_kg=4, num_stages=1),
      wk.TileConfig(gemv=True, block_n=16, num_warps=1, block_kg=3, split_k=2, num_stages=1),
      wk.TileConfig(gemv=True, block_n=64, num_warps=4, block_kg=2, split_k=3),
      wk.TileConfig(gemv=True, block_n=64, num_warps=2, block_kg=2, split_k=2, prefetch=True),
  ])
  @pytest.mark.parametrize("m,a_bits", [(1, 6), (3, 8), pytest.param(16, 6, marks=pytest.mark.slow)])  # CI time
  def test_gemv_tilings(self, config, m, a_bits):
    # N = 112: not a multiple of 32 or 64; K = 600 -> 5 groups: ragged against block_kg and split_k.
    rng = _rng()
    _, s, packed = _weights(rng, 112, 600)
    x = jnp.asarray(rng.standard_normal((m, 600)), jnp.bfloat16)
    self._check(x, packed, s, a_bits, config)

  def test_exact_integer_group_sums(self):
    # Power-of-two scales on both sides: every product and sum is exact in fp32, so the output
    # must equal the integer sum_g 2^(ex + ew) sum_k q_x q_w exactly.
    rng = _rng()
    m, n, k = 17, 48, 384
    q_w = rng.integers(-32, 32, (n, k)).astype(np.int8)
    q_w[:, 0] = 31  # max |q| = 31 in every group -> the weight scale is exactly 2^-3
    q_w[:, 128] = -31
    q_w[:, 256] = 31
    s_w = jnp.full((n, 3), 2.0 ** -3, jnp.float16)
    for a_bits in A_BITS_AND_QMAX:
      qmax = A_BITS_AND_QMAX[a_bits]
      q_x = rng.integers(-qmax, qmax + 1, (m, k)).astype(np.float32)
      q_x[:, [0, 128, 256]] = qmax  # s_x = 2^2 exactly
      x = jnp.asarray(q_x * 4.0)
      want = (q_x.astype(np.int64) @ q_w.T.astype(np.int64)) * 4.0 * 2.0 ** -3
      out = self._run(x, formats.pack_pallas6(jnp.asarray(q_w)), s_w, a_bits)
      np.testing.assert_array_equal(np.asarray(out, np.float64), want)

  def test_zeros_and_large_magnitudes(self):
    rng = _rng()
    n, k = 64, 256
    _, s, packed = _weights(rng, n, k, scale=1e3)
    zeros = jnp.zeros((3, k), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(self._run(zeros, packed, s, 6), np.float32), 0.0)
    x = jnp.asarray(rng.standard_normal((5, k)) * 1e4, jnp.bfloat16)
    x = x.at[1, 128:].set(0)  # an all-zero activation group
    self._check(x, packed, s, 6)
    q0 = np.zeros((n, k), np.int8)  # all-zero weights: scale 0
    np.testing.assert_array_equal(
        np.asarray(self._run(x, formats.pack_pallas6(jnp.asarray(q0)), jnp.zeros((n, 2), jnp.float16), 8)), 0.0)

  @pytest.mark.parametrize("a_bits,phase_major", [(6, True), (8, False)])
  def test_quantize_activations(self, a_bits, phase_major):
    rng = _rng()
    x = jnp.asarray(rng.standard_normal((19, 300)) * 3, jnp.bfloat16)
    cfg = wk.TileConfig(block_m=16, join_phases=not phase_major)
    q_x, s_x, sums = wk.quantize_activations(x, a_bits=a_bits, config=cfg, interpret=self.INTERPRET)
    rq, rs = numerics.quantize_activation(x, a_bits)
    if phase_major:  # column 128g + 32p + t holds k = 128g + 4t + p
      rq = rq.reshape(19, 3, 32, 4).transpose(0, 1, 3, 2).reshape(19, 384)
    assert q_x.shape == (32, 384) and not np.asarray(q_x[19:]).any() and not np.asarray(s_x[19:]).any()
    # Bit-equal: both compute round_half_even(x * fl32(1 / s)) with an IEEE reciprocal.
    np.testing.assert_array_equal(np.asarray(q_x[:19]), np.asarray(rq))
    np.testing.assert_array_equal(s_x[:19], rs)
    np.testing.assert_array_equal(sums[:19], np.asarray(q_x[:19], np.int32).reshape(19, 3, 128).sum(-1))

  @pytest.mark.parametrize("a_bits", [6, 8])
  def test_quantize_activations_t(self, a_bits):
    """The small-M Mosaic GEMM's quantizer: the same q_x, with s_x and sum(q_x) stacked and transposed."""
    rng = _rng()
    x = jnp.asarray(rng.standard_normal((19, 300)) * 3, jnp.bfloat16)
    q_x, s_x, sums = wk.quantize_activations(x, a_bits=a_bits, config=wk.TileConfig(block_m=32, join_phases=False),
                                             interpret=self.INTERPRET)
    q_t, act = wk.quantize_activations_t(x, a_bits=a_bits, block_m=32, interpret=self.INTERPRET)
    assert q_t.shape == (32, 384) and act.shape == (3, 2, 32) and act.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(q_t), np.asarray(q_x))
    np.testing.assert_array_equal(np.asarray(act[:, 0]).T, np.asarray(s_x))
    np.testing.assert_array_equal(np.asarray(act[:, 1]).T, np.asarray(sums, np.float32))
    assert not np.asarray(act[:, :, 19:]).any()


  # ---- 8-bit weights ("pallas8"): the same contract, no offset, phase-major int8 tiles ----

  @pytest.mark.parametrize("m", [1, 3, 16, 17])
  @pytest.mark.parametrize("k,a_bits", [(256, 6), (200, 8)])
  def test_w8_against_reference(self, m, k, a_bits):
    rng = _rng()
    _, s, packed = _weights8(rng, 112, k)  # N = 112: not a multiple of any block_n > 16
    assert packed.dtype == jnp.int8 and wk.weight_bits(packed) == 8
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    self._check(x, packed, s, a_bits)

  @pytest.mark.parametrize("config", [
      wk.TileConfig(block_m=16, block_n=32, split_k=3),
      wk.TileConfig(block_m=32, block_n=64, split_k=2, group_m=2, join_phases=True),  # join: no meaning for w8
      wk.TileConfig(gemv=True, block_n=32, num_warps=2, block_kg=2, split_k=2, num_stages=1),
      wk.TileConfig(gemv=True, block_n=64, num_warps=2, block_kg=3, split_k=2, prefetch=True),
  ], ids=["mma-split3", "mma-join", "gemv-kg2-split2", "gemv-kg3-split2-prefetch"])
  @pytest.mark.parametrize("m,a_bits", [(1, 8), (3, 6)])
  def test_w8_tilings(self, config, m, a_bits):
    # N = 112: not a multiple of 32 or 64; K = 600 -> 5 groups: ragged against block_kg and split_k.
    rng = _rng()
    _, s, packed = _weights8(rng, 112, 600)
    x = jnp.asarray(rng.standard_normal((m, 600)), jnp.bfloat16)
    self._check(x, packed, s, a_bits, config)

  @pytest.mark.parametrize("config", [
      None,
      wk.TileConfig(gemv=True, block_n=16, num_warps=1, block_kg=2, split_k=2, num_stages=1),
      wk.TileConfig(block_m=16, block_n=16, split_k=2),
  ], ids=["default", "gemv", "mma"])
  def test_w8_exact_integer_group_sums(self, config):
    # Power-of-two scales on both sides: the output must equal the integer sum exactly, for the
    # whole int8 range of q_w (-128 included: the layout and dp4a.s32 hold it).
    rng = _rng()
    m, n, k = 3, 48, 384
    q_w = rng.integers(-128, 128, (n, k)).astype(np.int8)
    q_w[:, [0, 128, 256]] = [127, -128, -127]
    s_w = jnp.full((n, 3), 2.0 ** -7, jnp.float16)
    packed = formats.pack_pallas8(jnp.asarray(q_w))
    for a_bits, qmax in A_BITS_AND_QMAX.items():
      q_x = rng.integers(-qmax, qmax + 1, (m, k)).astype(np.float32)
      q_x[:, [0, 128, 256]] = qmax  # s_x = 2^2 exactly
      x = jnp.asarray(q_x * 4.0)
      want = (q_x.astype(np.int64) @ q_w.T.astype(np.int64)) * 4.0 * 2.0 ** -7
      out = wk.w6a_matmul(x, packed, s_w, a_bits=a_bits, config=config, interpret=self.INTERPRET)
      np.testing.assert_array_equal(np.asarray(out, np.float64), want)

  def test_w8_zeros(self):
    rng = _rng()
    n, k = 64, 256
    _, s, packed = _weights8(rng, n, k)
    for m in (1, 5):  # the gemv and the tensor-core kernel
      zeros = jnp.zeros((m, k), jnp.bfloat16)
      np.testing.assert_array_equal(np.asarray(self._run(zeros, packed, s, 8), np.float32), 0.0)
    x = jnp.asarray(rng.standard_normal((2, k)), jnp.bfloat16)
    q0 = formats.pack_pallas8(jnp.zeros((n, k), jnp.int8))  # all-zero weights: scale 0
    np.testing.assert_array_equal(np.asarray(self._run(x, q0, jnp.zeros((n, 2), jnp.float16), 6)), 0.0)


A_BITS_AND_QMAX = {6: 31, 8: 127}


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs a CUDA GPU")
class TestW6AMatmul(_W6AMatmulCases):
  INTERPRET = False
  USE_ASM = (False, True)

  @pytest.mark.parametrize("m", [1, 8, 64, 256, 1024])
  @pytest.mark.parametrize("a_bits", [6, 8])
  @pytest.mark.parametrize("w_bits", [6, 8])
  def test_llama_shapes(self, m, a_bits, w_bits):
    rng = _rng()
    _, s, packed = (_weights if w_bits == 6 else _weights8)(rng, 4096, 4096, scale=0.02)
    x = jnp.asarray(rng.standard_normal((m, 4096)), jnp.bfloat16)
    self._check(x, packed, s, a_bits)


class TestW6AMatmulInterpret(_W6AMatmulCases):
  INTERPRET = True


@pytest.mark.parametrize("a_bits", [6, 8])
def test_kernel_quantizer_rounds_exact_ties_as_the_contract(a_bits):
  """Activations exactly halfway between two steps (x = (c + 1/2) s_x, exact in fp32): the Pallas
  quantization kernel (interpret mode) must round them to even, bit-equal to the reference; both
  call pallas_kernels.core.quantize_groups, the rule's one definition."""
  rng = _rng()
  qmax = core.qrange(a_bits)[1]
  amax = np.float32(rng.uniform(0.5, 4.0, (16, 1)))
  s = np.asarray(core.activation_scale(jnp.asarray(amax), qmax))  # [16, 1], 15 significant bits
  c = rng.integers(-qmax, qmax - 1, (16, 256)).astype(np.float32)
  x = ((c + 0.5) * s).astype(np.float32)  # exact: c + 1/2 has <= 9 significant bits
  x[:, 0] = amax[:, 0]
  x[:, 128] = -amax[:, 0]  # each group's max sets its scale
  q_x, s_x, _ = wk.quantize_activations(jnp.asarray(x), a_bits=a_bits, config=wk.TileConfig(join_phases=True),
                                        interpret=True)
  rq, rs = numerics.quantize_activation(jnp.asarray(x), a_bits)
  np.testing.assert_array_equal(np.asarray(s_x), np.asarray(rs))
  np.testing.assert_array_equal(np.asarray(q_x), np.asarray(rq))
  ties = np.asarray(rq, np.float32)[:, 1:128]
  assert np.all(ties % 2 == 0)  # every tie went to the even neighbour


# ---- the RMSNorm fused with the activation quantization (issue 14's producer fusion) ----------------

@pytest.mark.parametrize("dtype,w_dtype,m,k", [(jnp.float32, jnp.float32, 33, 256), (jnp.bfloat16, jnp.float32, 16, 640),
                                               (jnp.bfloat16, jnp.bfloat16, 5, 300), (jnp.float32, jnp.float32, 3, 2200)])
def test_norm_quantize_is_the_norm_then_the_quantizer(dtype, w_dtype, m, k):
  """norm_quantize(h, w) against quantize_activations(models.llama.rms_norm(h, w)), same tiling. The
  kernel adds the sum of squares in its own order (1024-column steps), so a normalized value may move
  by an ulp and cross a rounding boundary: in fp32 q_x at most one step apart in under 1% of the
  elements and s_x within one step of its grid (seen: 1 of 288 at K = 2200); in bf16 (XLA's excess
  precision too) at most one q_x step in a few percent, s_x within about one bf16 ulp. sum(q_x) is
  always exactly the written q_x's. Ragged M and K; A6 and A8; phase-major and K-order layouts."""
  from models.llama import rms_norm
  rng = _rng()
  h = jnp.asarray(rng.standard_normal((m, k)) * 3, dtype)
  w = jnp.asarray(rng.standard_normal(k) * 0.5 + 1, w_dtype)
  for a_bits in (6, 8):
    for cfg, gpp in ((wk.default_config(m, 4096, k), None), (wk.TileConfig(block_m=64, join_phases=True), 2)):
      # gpp: K-groups a program quantizes (2 at K = 300 or 640: a program whose second group is past K)
      fused = wk.norm_quantize(h, w, 1e-5, a_bits=a_bits, config=cfg, groups_per_program=gpp, interpret=True)
      plain = wk.quantize_activations(rms_norm(h, w, 1e-5), a_bits=a_bits, config=cfg, interpret=True)
      assert [a.shape for a in fused] == [a.shape for a in plain] and [a.dtype for a in fused] == [a.dtype for a in plain]
      q1, s1, x1 = (np.asarray(a) for a in fused)
      q2, s2, x2 = (np.asarray(a) for a in plain)
      fp32 = dtype == jnp.float32
      steps = np.abs(q1.astype(np.int32) - q2.astype(np.int32))
      assert steps.max() <= 1 and steps.mean() < (0.01 if fp32 else 0.05), (steps.max(), steps.mean())
      np.testing.assert_allclose(s1, s2, rtol=2 ** -12 if fp32 else 2 ** -7)
      np.testing.assert_array_equal(x1, q1.reshape(*x1.shape, 128).astype(np.int32).sum(-1))


@pytest.mark.parametrize("m,k,block_m", [(16, 640, 16), (5, 300, 32), (40, 2200, 64)])
def test_norm_quantize_act_t_is_the_small_kernels_input(m, k, block_m):
  """act_t: the same q_x as the [Mp, G] outputs, and act [G, 2, Mp] = (s_x, sum(q_x)) transposed and
  stacked, exactly; the shapes and layout of quantize_activations_t for the small-M Mosaic GEMM's tile."""
  from models.llama import rms_norm
  rng = _rng()
  h = jnp.asarray(rng.standard_normal((m, k)) * 3, jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal(k) * 0.5 + 1, jnp.bfloat16)
  cfg = wk.TileConfig(block_m=block_m, join_phases=False)
  for a_bits in (6, 8):
    q, s, xs = (np.asarray(a) for a in wk.norm_quantize(h, w, 1e-5, a_bits=a_bits, config=cfg, interpret=True))
    q_t, act = (np.asarray(a) for a in wk.norm_quantize(h, w, 1e-5, a_bits=a_bits, config=cfg, act_t=True,
                                                         interpret=True))
    np.testing.assert_array_equal(q_t, q)
    np.testing.assert_array_equal(act[:, 0, :], s.T)
    np.testing.assert_array_equal(act[:, 1, :], xs.T.astype(np.float32))
    plain = wk.quantize_activations_t(rms_norm(h, w, 1e-5), a_bits=a_bits, block_m=block_m, interpret=True)
    assert [a.shape for a in plain] == [q_t.shape, act.shape] and [a.dtype for a in plain] == [q_t.dtype, act.dtype]
  with pytest.raises(ValueError, match="join_phases must be False"):
    wk.norm_quantize(h, w, 1e-5, a_bits=6, config=wk.TileConfig(block_m=16, join_phases=True), act_t=True,
                     interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,m,k", [(jnp.float32, 33, 4096), (jnp.bfloat16, 16, 4096), (jnp.bfloat16, 1, 300)])
def test_norm_quantize_compiled_equals_interpret(dtype, m, k):
  """The compiled kernel (Triton on the GPU) against the same kernel in interpret mode: Triton adds
  the sum of squares in its own order, so a normalized value may move by an ulp and cross a
  rounding boundary (seen on an H200 in fp32: one s_x of 2048 one step of its grid apart): q_x at
  most one step apart, s_x within 2^-12 (fp32) or one bf16 ulp; sum(q_x) exact to the q_x written."""
  rng = _rng()
  h = jnp.asarray(rng.standard_normal((m, k)) * 3, dtype)
  w = jnp.asarray(rng.standard_normal(k) * 0.5 + 1, dtype)
  for a_bits in (6, 8):
    cfg = wk.default_config(m, 4096, k)
    got = [np.asarray(a) for a in wk.norm_quantize(h, w, 1e-5, a_bits=a_bits, config=cfg)]
    want = [np.asarray(a) for a in wk.norm_quantize(h, w, 1e-5, a_bits=a_bits, config=cfg, interpret=True)]
    steps = np.abs(got[0].astype(np.int32) - want[0].astype(np.int32))
    assert steps.max() <= 1 and steps.mean() < 0.01, (steps.max(), steps.mean())
    np.testing.assert_allclose(got[1], want[1], rtol=2 ** -12 if dtype == jnp.float32 else 2 ** -7)
    np.testing.assert_array_equal(got[2], got[0].reshape(*got[2].shape, 128).astype(np.int32).sum(-1))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("m,k", [(5, 300), (16, 640), (33, 1100)])
def test_swiglu_quantize_is_silu_times_up_then_the_quantizer(dtype, m, k):
  """quantize_activations(swiglu=True) on [gate | up] against quantize_activations(jax.nn.silu(gate) * up),
  same tiling, and the [G, 2, Mp] variant against its [Mp, G] outputs. fp32: identical. bf16: the kernel
  rounds as the model's program does (_swiglu), but in interpret mode XLA's excess precision may skip the
  last rounding before the quantizer (seen on this CPU: a product of 66.457 quantized where the materialized
  bf16 is 66.5), so q_x at most one step apart in a few percent and s_x within one bf16 ulp. sum(q_x) is
  always exactly the written q_x's. Ragged M and K (the up half then starts inside a group); A6 and A8."""
  rng = _rng()
  gate_up = jnp.asarray(rng.standard_normal((m, 2 * k)) * 3, dtype)
  product = jax.nn.silu(gate_up[:, :k]) * gate_up[:, k:]
  for a_bits in (6, 8):
    cfg = wk.default_config(m, 4096, k)
    fused = [np.asarray(a) for a in wk.quantize_activations(gate_up, a_bits=a_bits, config=cfg, swiglu=True,
                                                            interpret=True)]
    plain = [np.asarray(a) for a in wk.quantize_activations(product, a_bits=a_bits, config=cfg, interpret=True)]
    assert [a.shape for a in fused] == [a.shape for a in plain] and [a.dtype for a in fused] == [a.dtype for a in plain]
    if dtype == jnp.float32:
      for got, want in zip(fused, plain):
        np.testing.assert_array_equal(got, want)
    else:
      steps = np.abs(fused[0].astype(np.int32) - plain[0].astype(np.int32))
      assert steps.max() <= 1 and steps.mean() < 0.05, (steps.max(), steps.mean())
      np.testing.assert_allclose(fused[1], plain[1], rtol=2 ** -7)
    np.testing.assert_array_equal(fused[2], fused[0].reshape(*fused[2].shape, 128).astype(np.int32).sum(-1))
    q_t, act = (np.asarray(a) for a in wk.quantize_activations_t(gate_up, a_bits=a_bits, block_m=32, swiglu=True,
                                                                  interpret=True))
    q, sx, xs = (np.asarray(a) for a in wk.quantize_activations(
        gate_up, a_bits=a_bits, config=wk.TileConfig(block_m=32, join_phases=False), swiglu=True, interpret=True))
    np.testing.assert_array_equal(q_t, q)
    np.testing.assert_array_equal(act[:, 0], sx.T)
    np.testing.assert_array_equal(act[:, 1], xs.T.astype(np.float32))
  with pytest.raises(ValueError, match="odd count"):
    wk.quantize_activations(gate_up[:, 1:], a_bits=6, swiglu=True, interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,m,k", [(jnp.float32, 33, 11008), (jnp.bfloat16, 16, 11008), (jnp.bfloat16, 1, 300)])
def test_swiglu_quantize_compiled_equals_interpret(dtype, m, k):
  """The compiled SwiGLU quantizer (Triton) against what it replaces on the same GPU: XLA's silu(gate) * up,
  then the compiled plain quantizer. The two exps may differ by an ulp and move a rounding, so q_x at most one
  step apart in under 1%, s_x within 2^-12 (fp32) or one bf16 ulp (2^-7 relative); sum(q_x) exact to the q_x
  written; the [G, 2, Mp] variant too. (Interpret mode is no reference for bf16 here: on the CPU XLA keeps
  silu's result in fp32 before the product, one rounding fewer; on an H200 2026-12-03 that put 2 of 1376
  s_x two bf16 ulps from the compiled kernel's, results/e2e/raw/h200-2026-12-03-s3-call1-fused-producers.log.)"""
  rng = _rng()
  gate_up = jnp.asarray(rng.standard_normal((m, 2 * k)) * 3, dtype)
  product = jax.jit(lambda a: jax.nn.silu(a[:, :k]) * a[:, k:])(gate_up)
  for a_bits in (6, 8):
    cfg = wk.default_config(m, 4096, k)
    got = [np.asarray(a) for a in wk.quantize_activations(gate_up, a_bits=a_bits, config=cfg, swiglu=True)]
    want = [np.asarray(a) for a in wk.quantize_activations(product, a_bits=a_bits, config=cfg)]
    steps = np.abs(got[0].astype(np.int32) - want[0].astype(np.int32))
    assert steps.max() <= 1 and steps.mean() < 0.01, (steps.max(), steps.mean())
    np.testing.assert_allclose(got[1], want[1], rtol=2 ** -12 if dtype == jnp.float32 else 2 ** -7)
    np.testing.assert_array_equal(got[2], got[0].reshape(*got[2].shape, 128).astype(np.int32).sum(-1))
    q_t, act = (np.asarray(a) for a in wk.quantize_activations_t(gate_up, a_bits=a_bits, block_m=32, swiglu=True))
    q, sx, xs = (np.asarray(a) for a in wk.quantize_activations(
        gate_up, a_bits=a_bits, config=wk.TileConfig(block_m=32, join_phases=False), swiglu=True))
    np.testing.assert_array_equal(q_t, q)
    np.testing.assert_array_equal(act[:, 0], sx.T)


def test_norm_quantize_refuses_a_wrong_weight():
  with pytest.raises(ValueError, match=r"RMSNorm weight must be \[300\]"):
    wk.norm_quantize(jnp.zeros((4, 300)), jnp.ones((256,)), 1e-5, a_bits=6, config=wk.default_config(4, 64, 300),
                     interpret=True)
