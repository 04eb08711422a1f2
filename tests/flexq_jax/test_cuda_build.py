"""The BMMA CUDA kernel (flexq_jax/cuda): the build and the plan on CPU; the kernel on a GPU.

CPU: nvcc compiles csrc/ for sm_90a; the build cache is keyed as documented; a NumPy model of
exactly what the kernels compute (ballot-built activation planes, Horner-ordered MMA chains,
scales fused per group in fp32) equals the numerics contract; wrappers fail with clear errors.
GPU (marker `gpu`, skipped without one): the kernels against the contract.
"""

import ctypes
import subprocess

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from flexq_jax import formats, numerics
from flexq_jax.placement import place
from flexq_jax.cuda import bmma
from flexq_jax.qlinear import QuantizedLinear

from tests.helpers import fresh_rng as _rng
from tests.helpers import has_gpu as _has_gpu
from pallas_kernels import core


def _nvcc_or_skip() -> str:
  try:
    return bmma.find_nvcc()
  except RuntimeError as e:
    pytest.skip(f"nvcc is not installed here: {e}")


def _layer_inputs(rng, m: int, n: int, k: int, *, extremes: bool = False):
  """bf16 x [M, K]; q_w int8 [N, Kp], s_w fp16, and the "bitplanes_g4" weights of a W6 layer."""
  x = rng.standard_normal((m, k)).astype(np.float32) * 3
  if m > 1:
    x[1] = 0  # an all-zero token: scale 0, q 0
  w = rng.standard_normal((n, k)).astype(np.float32)
  if extremes:  # weights at both signed bounds -32 and 31 in one group
    w[0, :64], w[0, 64:128] = -1.0, 31 / 32
  q_w, s_w = numerics.quantize_weight(jnp.asarray(w), 6, 128)
  return jnp.asarray(x, jnp.bfloat16), q_w, s_w, formats.pack(q_w, 6, "bitplanes_g4", k)


# ---- the build (CPU) ---------------------------------------------------------------------------

def test_sources_compile_for_sm90a(tmp_path):
  nvcc = _nvcc_or_skip()
  library = tmp_path / "flexq_bmma.so"
  done = subprocess.run(bmma.compile_command(nvcc, "sm_90a", library), capture_output=True, text=True)
  assert done.returncode == 0, done.stderr
  # jaxlib's FFI headers warn under nvcc; our own sources must not.
  ours = [line for line in done.stderr.splitlines() if "warning" in line and str(bmma.CSRC) in line]
  assert not ours, "\n".join(ours)
  lib = ctypes.CDLL(str(library))  # cudart is linked statically: loads without a GPU
  assert lib.FlexqBmmaActQuant and lib.FlexqBmmaGemm


def test_build_cache_is_keyed_by_arch_and_reused(tmp_path):
  nvcc = _nvcc_or_skip()
  hopper = bmma.library_path(nvcc, "sm_90a", tmp_path)
  assert hopper != bmma.library_path(nvcc, "sm_80", tmp_path)
  assert hopper == bmma.library_path(nvcc, "sm_90a", tmp_path)
  hopper.write_bytes(b"cached")  # a cached build is returned as is, nvcc is not run again
  assert bmma.build_library("sm_90a", tmp_path) == hopper and hopper.read_bytes() == b"cached"


def test_arch_for_compute_capability():
  assert bmma.arch_for("9.0") == "sm_90a"
  assert bmma.arch_for("8.0") == "sm_80"
  assert bmma.arch_for("8.9") == "sm_89"
  with pytest.raises(RuntimeError, match="sm_80 or newer"):
    bmma.arch_for("7.5")


# ---- the kernels' plan as NumPy (CPU) ----------------------------------------------------------

_WORDS_PER_GROUP = core.GROUP // core.WORD_BITS


def _word_index(g: int, quad: int) -> int:
  """configs.h word_index: where word `quad` of group g sits in a "bitplanes_g4" row."""
  return 16 * (g // 4) + 4 * quad + g % 4


def _model_act_quant(x: np.ndarray, a_bits: int) -> tuple[np.ndarray, np.ndarray]:
  """act_quant.cuh: one warp per (token, group); lane t holds elements 128g + 32e + t; word e of
  group g is stored at word_index(g, e) of a row padded to whole blocks of 4 groups."""
  m, k = x.shape
  groups = core.padded_k(k) // core.GROUP
  v = np.zeros((m, groups * core.GROUP), np.float32)
  v[:, :k] = x
  v = v.reshape(m, groups, _WORDS_PER_GROUP, core.WORD_BITS)  # [M, G, e, lane]
  qmax = np.float32((1 << (a_bits - 1)) - 1)
  s = np.abs(v).max(axis=(2, 3)) * (np.float32(1) / qmax)
  s = (s.view(np.uint32) & np.uint32(0xFFFFFE00)).view(np.float32)  # 15 significant bits
  sb = np.where(s > 0, s, np.float32(1))[..., None, None]
  half = np.float32(0.5)
  q = np.floor(v * (np.float32(1) / sb) + half)  # act_quant.cuh's steps, in fp32
  q = np.where(v > (q + half) * sb, q + 1, np.where(v < (q - half) * sb, q - 1, q))
  odd = (q.astype(np.int64) & 1) != 0
  q = np.where(odd & (v == (q + half) * sb), q + 1, np.where(odd & (v == (q - half) * sb), q - 1, q))
  q = np.where(s[..., None, None] > 0, q, 0)
  u = np.clip(q, -qmax - 1, qmax).astype(np.int64) & ((1 << a_bits) - 1)
  lane_bit = np.uint64(1) << np.arange(core.WORD_BITS, dtype=np.uint64)
  # __ballot_sync: bit t of word e of plane i = bit i of lane t's element e.
  planes = [(((u >> i) & 1).astype(np.uint64) * lane_bit).sum(-1) for i in range(a_bits)]  # [M, G, e]
  planes = np.stack(planes).astype(np.uint32)  # [a_bits, M, G, e]
  out = np.zeros((a_bits, m, core.g4_words(k)), np.uint32)
  for g in range(groups):
    for e in range(_WORDS_PER_GROUP):
      out[:, :, _word_index(g, e)] = planes[:, :, g, e]
  return out, s.astype(np.float32)


def _model_group_dot(xw: np.ndarray, ww: np.ndarray) -> np.ndarray:
  """bmma_gemm.cuh's group_dot: Horner over both plane indices, one m8n8k128 MMA a step.

  xw [a_bits, M, 4], ww [6, N, 4] uint32 words of one group -> int32 [M, N].
  """
  def mma(c, i, j):  # popc(A AND B) over the 128 bits, added to the accumulator input
    pop = np.bitwise_count(xw[i][:, None, :] & ww[j][None, :, :]).sum(-1, dtype=np.int64)
    return c + pop

  a_bits, w_bits = xw.shape[0], ww.shape[0]
  out = None
  for i in range(a_bits - 1, -1, -1):
    t = np.zeros((xw.shape[1], ww.shape[1]), np.int64)
    for j in range(w_bits - 1, -1, -1):
      t = mma(t * (-2 if j == w_bits - 2 else 2), i, j)
    out = t if out is None else out * (-2 if i == a_bits - 2 else 2) + t
  assert np.abs(out).max() < 2**31
  return out.astype(np.int32)


def _model_group_dot_rows(xw: np.ndarray, ww: np.ndarray) -> np.ndarray:
  """bmma_decode_m1_kernel's group sum at M = 1: row i of the MMA's A is activation plane i, one
  MMA a weight plane j (Horner over j through the accumulator), then every row weighted by its c_i
  and the rows added by the xor-shuffle butterfly (lanes 4, 8, 16 apart).

  xw [a_bits, 1, 4], ww [6, N, 4] uint32 words of one group -> int32 [1, N].
  """
  a_bits, w_bits = xw.shape[0], ww.shape[0]
  rows = np.zeros((8, 4), np.uint32)
  rows[:a_bits] = xw[:, 0]  # rows a_bits..7 zero (A6)
  t = np.zeros((8, ww.shape[1]), np.int64)  # [row i, channel c]: the m8n8 tile, 8 channels at a time
  for j in range(w_bits - 1, -1, -1):
    t = t * (-2 if j == w_bits - 2 else 2) + np.bitwise_count(rows[:, None, :] & ww[j][None, :, :]).sum(-1)
  weight = np.array([-(1 << i) if i == a_bits - 1 else (1 << i) if i < a_bits else 1 << i for i in range(8)])
  d = t * weight[:, None]
  for offset in (1, 2, 4):  # lane_row bits: lanes 4, 8, 16 apart
    d = d + d[np.arange(8) ^ offset]
  assert np.all(d == d[0]) and np.abs(t).max() < 2**31 and np.abs(d).max() < 2**31
  return d[:1].astype(np.int32)


def _model_gemm(x_planes, x_scales, w_planes, w_scales, k: int, decode_split: tuple[int, int] | None = None):
  """bmma_gemm.cuh: per group, exact D_g from the words at word_index(g, 0..3), then
  acc += (s_x * s_w) * D_g in fp32; bf16 out.

  decode_split = (kDecodeSplit, 4): bmma_decode_kernel's order instead (M <= 8): warp w sums the
  blocks of 4 groups w, w + kSplit, ..., then the warps' sums are added in order.
  """
  groups = core.padded_k(k) // core.GROUP
  assert x_planes.shape[2] == w_planes.shape[2] == core.g4_words(k)
  sw = np.asarray(w_scales).astype(np.float32)
  sums, terms = [], []
  for g in range(groups):
    words = [_word_index(g, q) for q in range(_WORDS_PER_GROUP)]
    d = _model_group_dot(x_planes[..., words], w_planes[..., words])
    sums.append(d)
    terms.append((x_scales[:, g, None] * sw[None, :, g]) * d.astype(np.float32))
  shape = (x_planes.shape[1], w_planes.shape[1])
  if decode_split is None:
    order = [list(range(groups))]
  else:
    split, unroll = decode_split
    order = [[g0 + u for g0 in range(w * unroll, groups, split * unroll) for u in range(unroll) if g0 + u < groups]
             for w in range(split)]
    assert sorted(g for warp in order for g in warp) == list(range(groups))
  partials = []
  for groups_of_warp in order:
    acc = np.zeros(shape, np.float32)
    for g in groups_of_warp:
      acc += terms[g]
    partials.append(acc)
  y = partials[0]
  for p in partials[1:]:
    y = y + p
  return y.astype(ml_dtypes.bfloat16), np.stack(sums)


@pytest.mark.parametrize("a_bits", [6, 8])
@pytest.mark.parametrize("m,n,k", [(5, 20, 200), (8, 24, 2200),  # the rest with -m slow (CI time)
                                   pytest.param(3, 13, 576, marks=pytest.mark.slow),
                                   pytest.param(2, 9, 256, marks=pytest.mark.slow)])
def test_kernel_plan_equals_contract(a_bits, m, n, k):
  x, q_w, s_w, w_planes = _layer_inputs(_rng(), m, n, k, extremes=True)
  x_planes, x_scales = _model_act_quant(np.asarray(x, np.float32), a_bits)
  q_x, s_x = numerics.quantize_activation(x, a_bits)
  # The activation planes are formats' "bitplanes_g4" layout of the contract's q_x, bit for bit.
  np.testing.assert_array_equal(x_planes, np.asarray(formats.interleave_groups(formats.pack_bitplanes(q_x, a_bits))))
  np.testing.assert_array_equal(x_scales, np.asarray(s_x))
  ref = np.asarray(numerics.reference_matmul(x, q_w, s_w, a_bits=a_bits), np.float32)
  for order in (None, (4, 4), (2, 4)):  # the M > 8 kernels, bmma_decode_kernel's (kDecodeSplit 4) and another split
    y, sums = _model_gemm(x_planes, x_scales, np.asarray(w_planes), s_w, k, decode_split=order)
    np.testing.assert_array_equal(sums, np.asarray(numerics.group_dots(q_x, q_w, 128)))  # exact
    # Only the fp32 summation order differs: at most one bf16 rounding step apart.
    np.testing.assert_allclose(y.astype(np.float32), ref, rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("a_bits", [6, 8])
@pytest.mark.parametrize("n,k", [(20, 200), (13, 576), (24, 2200)])
def test_m1_plane_rows_plan_equals_the_decode_plan(a_bits, n, k):
  """bmma_decode_m1_kernel's integer group sums (planes as the MMA's rows) are group_dot's, exactly."""
  x, q_w, _, w_planes = _layer_inputs(_rng(), 1, n, k, extremes=True)
  x_planes, _ = _model_act_quant(np.asarray(x, np.float32), a_bits)
  q_x, _ = numerics.quantize_activation(x, a_bits)
  contract = np.asarray(numerics.group_dots(q_x, q_w, 128))
  for g in range(core.padded_k(k) // core.GROUP):
    words = [_word_index(g, q) for q in range(_WORDS_PER_GROUP)]
    rows = _model_group_dot_rows(x_planes[..., words], np.asarray(w_planes)[..., words])
    np.testing.assert_array_equal(rows, _model_group_dot(x_planes[..., words], np.asarray(w_planes)[..., words]))
    np.testing.assert_array_equal(rows, contract[g])


# ---- wrappers (CPU) ----------------------------------------------------------------------------

def test_wrapper_rejects_bad_inputs():
  x, q_w, s_w, w_planes = _layer_inputs(_rng(), 2, 16, 200)
  with pytest.raises(ValueError, match="a_bits"):
    bmma.bmma_matmul(x, w_planes, s_w, a_bits=4, k=200)
  with pytest.raises(ValueError, match="bf16"):
    bmma.bmma_matmul(x.astype(jnp.float32), w_planes, s_w, a_bits=6, k=200)
  with pytest.raises(ValueError, match="weight planes"):
    bmma.bmma_matmul(x, formats.pack(q_w, 6, "pallas6", 200), s_w, a_bits=6, k=200)
  with pytest.raises(ValueError, match="weight scales"):
    bmma.bmma_matmul(x, w_planes, s_w.astype(jnp.float32), a_bits=6, k=200)
  with pytest.raises(ValueError, match="m1_rows"):
    bmma.bmma_matmul(x, w_planes, s_w, a_bits=6, k=200, m1_rows=5)


@pytest.mark.skipif(_has_gpu(), reason="checks the error raised without a GPU")
def test_clear_error_without_gpu():
  x, _, s_w, w_planes = _layer_inputs(_rng(), 2, 16, 200)
  with pytest.raises(RuntimeError, match="GPU|nvcc"):
    bmma.bmma_matmul(x, w_planes, s_w, a_bits=6, k=200)


def test_dispatch_routes_bmma_and_checks_the_layer():
  _, q_w, s_w, w_planes = _layer_inputs(_rng(), 2, 16, 200)
  layer = QuantizedLinear(packed=w_planes, scales=s_w, in_features=200, out_features=16, w_bits=6, a_bits=6,
                          group_size=128, layout="bitplanes_g4", backend="bmma")
  with pytest.raises(ValueError, match="bf16"):
    jnp.ones((2, 200), jnp.float32) @ layer
  assert place({"l": layer.replace(backend="reference")}, "bmma")[0]["l"].backend == "bmma"
  w4 = layer.replace(backend="reference", w_bits=4)  # not W6: keeps its backend
  assert place({"l": w4}, "bmma")[0]["l"].backend == "reference"


# ---- the kernels (GPU) ------------------------------------------------------------

gpu = pytest.mark.skipif(not _has_gpu(), reason="needs a CUDA GPU")


def _assert_matches_contract(y, x, q_w, s_w, a_bits):
  ref = np.asarray(numerics.reference_matmul(x, q_w, s_w, a_bits=a_bits), np.float32)
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=2**-7, atol=1e-6)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("a_bits", [6, 8])
@pytest.mark.parametrize("m", list(range(1, 18)) + [64, 256])
def test_gpu_bmma_matmul_equals_contract(a_bits, m):
  n, k = 200, 840  # N not a multiple of any tile; 7 groups (the last ragged) padded to a block of 8
  x, q_w, s_w, w_planes = _layer_inputs(_rng(), m, n, k, extremes=True)
  y = jax.jit(bmma.bmma_matmul, static_argnames=("a_bits", "k"))(x, w_planes, s_w, a_bits=a_bits, k=k)
  assert y.shape == (m, n) and y.dtype == jnp.bfloat16
  _assert_matches_contract(y, x, q_w, s_w, a_bits)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("a_bits", [6, 8])
@pytest.mark.parametrize("m,n,k", [(3, 40, 200), (17, 13, 576), (33, 72, 128), (8, 4096, 4096)])
def test_gpu_shapes_and_padding(a_bits, m, n, k):
  x, q_w, s_w, w_planes = _layer_inputs(_rng(), m, n, k)
  _assert_matches_contract(bmma.bmma_matmul(x, w_planes, s_w, a_bits=a_bits, k=k), x, q_w, s_w, a_bits)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("a_bits", [6, 8])
def test_gpu_activation_planes_are_the_contract(a_bits):
  x, *_ = _layer_inputs(_rng(), 19, 8, 300)
  planes, scales = bmma.quantize_activation_planes(x, a_bits=a_bits)
  q_x, s_x = numerics.quantize_activation(x, a_bits)
  np.testing.assert_array_equal(np.asarray(scales), np.asarray(s_x))
  # Bit-equal: the nearest integer to the exact x / s (ties even) is one number everywhere.
  np.testing.assert_array_equal(np.asarray(planes), np.asarray(formats.interleave_groups(formats.pack_bitplanes(q_x, a_bits))))


@pytest.mark.gpu
@gpu
def test_gpu_dispatch_through_quantized_linear():
  x, q_w, s_w, w_planes = _layer_inputs(_rng(), 4, 48, 576)
  layer = QuantizedLinear(packed=w_planes, scales=s_w, in_features=576, out_features=48, w_bits=6, a_bits=8,
                          group_size=128, layout="bitplanes_g4", backend="bmma")
  y = jax.jit(lambda x, l: x @ l)(x.reshape(2, 2, 576), layer)
  _assert_matches_contract(y.reshape(4, 48), x, q_w, s_w, 8)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("a_bits", [6, 8])
@pytest.mark.parametrize("n,k", [(200, 840), (13, 576), (40, 11008), (4096, 4096), (1000, 8192), (8200, 8320)])
def test_gpu_m1_plane_rows_kernel_is_bit_identical(a_bits, n, k):
  """At M = 1 the planes-as-rows kernel gives the M <= 8 decode kernel's output bit for bit."""
  x, q_w, s_w, w_planes = _layer_inputs(_rng(), 1, n, k, extremes=True)
  run = jax.jit(bmma.bmma_matmul, static_argnames=("a_bits", "k", "m1_rows"))
  tile = np.asarray(run(x, w_planes, s_w, a_bits=a_bits, k=k, m1_rows=False))
  for variant in (1, 2):  # 4 warps a block, as the M <= 8 kernel: the same fp32 order
    rows = np.asarray(run(x, w_planes, s_w, a_bits=a_bits, k=k, m1_rows=variant))
    np.testing.assert_array_equal(rows.view(np.uint16), tile.view(np.uint16))
  _assert_matches_contract(rows, x, q_w, s_w, a_bits)
  for variant in (3, 4, True):  # 8 warps: exact group sums, the warps' fp32 partials in another order
    _assert_matches_contract(run(x, w_planes, s_w, a_bits=a_bits, k=k, m1_rows=variant), x, q_w, s_w, a_bits)


def test_m1_rows_variant_by_shape():
  assert bmma.m1_rows_variant(8192, 8192) == bmma.m1_rows_variant(8192, 28672) == 3  # LLaMA-2-70B o, down
  assert bmma.m1_rows_variant(4096, 11008) == bmma.m1_rows_variant(12288, 4096) == 1  # LLaMA-2-7B
  assert set(bmma.M1_ROWS_VARIANTS) == {0, 1, 2, 3, 4}
