"""The Mosaic GPU GEMM (pallas_kernels/w6a_gemm_mgpu.py) for prefill and large batches.

CPU: the phase-major weight unpacking against flexq_jax.formats, the tile math, and the whole op
lowered for CUDA (Mosaic GPU lowers to its MLIR module without a GPU; Pallas' interpret mode does
not run the warp-specialized pipeline). GPU (marker `gpu`, sm_90): the kernel against the jnp
reference at prefill and batch sizes, ragged N and K, A6 and A8, 6- and 8-bit weights.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.mesh import AbstractDevice

from flexq_jax import formats, numerics
from pallas_kernels import core
from pallas_kernels import w6a_gemm_mgpu as mg
from pallas_kernels import w6a_matmul as wk
from tests.helpers import fresh_rng as _rng
from tests.helpers import has_gpu

S = jax.ShapeDtypeStruct


def _phase_major(q: np.ndarray) -> np.ndarray:
  """[N, Kp] in K order -> each group's columns phase-major (column 32p + t <- k = 4t + p)."""
  n, kp = q.shape
  return q.reshape(n, kp // 128, 32, 4).transpose(0, 1, 3, 2).reshape(n, kp)


@pytest.mark.parametrize("bits", [6, 8])
@pytest.mark.parametrize("n", [48, 64])  # odd and even counts of 16-row tiles
def test_unpack_phase_major_is_the_layout_in_phase_order(bits, n):
  rng = _rng()
  lo, hi = core.qrange(bits)
  q = rng.integers(lo, hi + 1, (n, 384)).astype(np.int8)
  q[0, :4] = [lo, hi, 0, -1]  # the signed bounds
  packed = formats.pack(jnp.asarray(q), bits, f"pallas{bits}", 384)
  interpret = not has_gpu()  # the Triton kernel; interpret mode on CPU
  w = wk.unpack_phase_major(packed, interpret=interpret)
  assert w.dtype == jnp.int8 and w.shape == (n, 384)
  np.testing.assert_array_equal(np.asarray(w), _phase_major(q))
  padded = wk.unpack_phase_major(packed, 80, interpret=interpret)
  assert padded.shape == (80, 384) and not np.asarray(padded[n:]).any()


def test_a_shared_phase_order_keeps_every_group_sum():
  rng = _rng()
  qx = rng.integers(-31, 32, (5, 256))
  qw = rng.integers(-32, 32, (7, 256))
  want = np.asarray(numerics.group_dots(jnp.asarray(qx), jnp.asarray(qw), 128))
  got = np.asarray(numerics.group_dots(jnp.asarray(_phase_major(qx)), jnp.asarray(_phase_major(qw)), 128))
  np.testing.assert_array_equal(got, want)


def test_config_tile_math_and_errors():
  cfg = mg.GemmConfig()
  assert cfg.cta_tile == (128, 128) and mg.GemmConfig(wg_split="m", tile_m=64, tile_n=128).cta_tile == (128, 128)
  assert mg.GemmConfig(wg_split="m", tile_m=128, tile_n=64).cta_tile == (256, 64)
  assert mg.padded(300, 200, cfg) == (384, 256) and mg.padded(128, 128, cfg) == (128, 128)
  assert cfg.smem_bytes() <= 227 * 1024  # Hopper's shared memory a block may take
  for bad in (dict(tile_m=96), dict(tile_n=4), dict(wg_split="k"), dict(convert="round"), dict(max_concurrent_steps=1),
              dict(epi_tile_n=48), dict(groups_per_step=2), dict(groups_per_step=3, schedule="serial"),
              dict(scaling="fast"), dict(schedule="fast"), dict(schedule="overlap", groups_per_step=2)):
    with pytest.raises(ValueError):
      mg.GemmConfig(**bad)
  with pytest.raises(ValueError, match="timing probe"):
    mg.w6a_gemm(jnp.zeros((4, 128)), jnp.zeros((1, 1, 3, 16, 32), jnp.uint8), jnp.zeros((16, 1), jnp.float16),
                a_bits=6, config=mg.GemmConfig(scaling="none"))
  with pytest.raises(ValueError, match="multiples of the CTA tile"):
    mg.gemm(jnp.zeros((100, 128), jnp.int8), jnp.zeros((1, 100)), jnp.zeros((128, 128), jnp.int8),
            jnp.zeros((1, 128)), out_dtype=jnp.bfloat16, config=cfg)


_H200 = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
    device_kind="NVIDIA H200", num_cores=132, platform="gpu"))


@pytest.mark.parametrize("bits,config", [(6, mg.GemmConfig()), (8, mg.GemmConfig(convert="magic", schedule="overlap")),
                                         (6, mg.GemmConfig(schedule="serial", groups_per_step=2, max_concurrent_steps=2)),
                                         (8, mg.GemmConfig(convert="init")),
                                         (6, mg.GemmConfig(schedule="overlap", pin=False))])
def test_the_op_lowers_for_cuda_without_a_gpu(bits, config):
  """Every trace- and lowering-time check of Mosaic GPU (shapes, layouts, swizzles, the pipeline)
  runs on CPU when lowering for CUDA against an abstract H200."""
  w = S((13, 5, 3, 16, 32), jnp.uint8) if bits == 6 else S((13, 5, 16, 128), jnp.int8)
  with jax.sharding.use_abstract_mesh(_H200):
    lowered = jax.jit(lambda x, w, s: mg.w6a_gemm(x, w, s, a_bits=8, config=config)).trace(
        S((300, 600), jnp.bfloat16), w, S((208, 5), jnp.float16)).lower(lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert "mosaic_gpu" in text and "w6a_quantize_activations" in text


# ---- the kernel on a Hopper GPU ------------------------------------------------------------------

def _hopper() -> bool:
  return has_gpu() and jax.devices()[0].compute_capability == "9.0"


def _check(m, n, k, a_bits, w_bits=6, dtype=jnp.bfloat16, config=None):
  rng = _rng()
  w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
  q, s = numerics.quantize_weight(jnp.asarray(w), w_bits, 128)
  packed = formats.pack(q, w_bits, f"pallas{w_bits}", k)
  x = jnp.asarray(rng.standard_normal((m, k)) * 2, dtype)
  out = mg.w6a_gemm(x, packed, s, a_bits=a_bits, config=config)
  ref = np.asarray(numerics.reference_matmul(x, q, s, a_bits=a_bits), np.float32)
  assert out.shape == (m, n) and out.dtype == dtype
  out = np.asarray(out, np.float32)
  assert np.isfinite(out).all()
  rtol = 1e-5 if dtype == jnp.float32 else 2 ** -7
  np.testing.assert_allclose(out, ref, rtol=rtol, atol=rtol * float(np.abs(ref).max()))


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU")
@pytest.mark.parametrize("m", [16, 17, 100, 128, 777, 2048, 4099])
@pytest.mark.parametrize("a_bits", [6, 8])
@pytest.mark.parametrize("n,k", [(4096, 4096), (208, 600)])  # LLaMA-sized, and ragged N and K
def test_gpu_against_reference(m, a_bits, n, k):
  if n == 4096 and m in (17, 777):
    pytest.skip("ragged M is covered by the small shape")
  _check(m, n, k, a_bits)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU")
@pytest.mark.parametrize("config", [mg.GemmConfig(convert="magic"), mg.GemmConfig(schedule="overlap"),
                                    mg.GemmConfig(wg_split="n", tile_m=128, tile_n=64, max_concurrent_steps=2,
                                                  grid_minor="m"),
                                    mg.GemmConfig(schedule="serial", groups_per_step=2, max_concurrent_steps=2),
                                    mg.GemmConfig(convert="init"),
                                    mg.GemmConfig(convert="init", schedule="serial", groups_per_step=2,
                                                  max_concurrent_steps=2),
                                    mg.GemmConfig(schedule="serial")])
def test_gpu_other_configs_and_w8_and_fp32(config):
  _check(300, 256, 640, 6, config=config)
  _check(257, 112, 384, 8, w_bits=8, config=config)
  _check(130, 208, 256, 6, dtype=jnp.float32, config=config)
