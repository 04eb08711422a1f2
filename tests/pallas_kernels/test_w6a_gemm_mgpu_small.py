"""The small-M Mosaic GPU GEMM (pallas_kernels/w6a_gemm_mgpu_small.py): weights unpacked in registers.

CPU: the tiling rules and the whole op lowered for CUDA against an abstract H200 (every trace- and
lowering-time check of Mosaic GPU: layouts, the register-A WGMMA, the pipeline). GPU (marker
`gpu`, sm_90): the kernel against the jnp reference at decode-batch sizes, ragged N and K, A6/A8.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.mesh import AbstractDevice

from flexq_jax import formats, numerics
from pallas_kernels import w6a_gemm_mgpu_small as ms
from tests.helpers import fresh_rng as _rng
from tests.helpers import has_gpu

S = jax.ShapeDtypeStruct


def test_config_rules():
  assert [ms.default_config(m).tile_t for m in (1, 16, 17, 33, 64, 100, 128, 129, 4096)] == \
      [32, 32, 32, 64, 64, 128, 128, 128, 128]
  for bad in (8, 16, 48, 256):
    with pytest.raises(ValueError, match="tile_t"):
      ms.SmallConfig(tile_t=bad)
  with pytest.raises(ValueError, match="schedule"):
    ms.SmallConfig(schedule="overlap")
  with pytest.raises(ValueError, match="epilogue"):
    ms.SmallConfig(epilogue="registers")
  with pytest.raises(ValueError, match="pingpong.*out_t"):
    ms.SmallConfig(schedule="pingpong")
  with pytest.raises(ValueError, match="'pallas6' weights only"):
    ms.w6a_gemm_small(jnp.zeros((4, 128)), jnp.zeros((1, 1, 16, 128), jnp.int8), jnp.zeros((16, 1), jnp.float16),
                      a_bits=6)
  with pytest.raises(ValueError, match="Mp a multiple of 32"):
    ms.gemm(jnp.zeros((16, 128), jnp.int8), jnp.zeros((1, 16)), jnp.zeros((1, 16), jnp.int32),
              jnp.zeros((8, 1, 3, 16, 32), jnp.uint8), jnp.zeros((1, 128)), out_dtype=jnp.bfloat16,
              config=ms.SmallConfig(tile_t=32))


def test_the_word_unpack_gives_the_phase_major_weights():
  """The kernel's unpack arithmetic (phase_word, run on numpy words: the planes' bytes 4 at a time,
  little-endian as in a register) against flexq_jax.formats: every weight of random tiles, the
  extremes included, equals q + 32 at its phase-major column."""
  rng = _rng()
  q = rng.integers(-32, 32, (32, 256)).astype(np.int8)
  q[0, :2], q[1, :2] = -32, 31
  packed = np.asarray(formats.pack(jnp.asarray(q), 6, "pallas6", 256))  # [2, 2, 3, 16, 32]
  for tile in range(2):
    for g in range(2):
      words = packed[tile, g].view(np.uint32)  # [3, 16, 8]: plane, row, word
      u = np.concatenate([ms.phase_word(words[p // 2], words[2], p, ms.NUMPY_OPS).view(np.uint8)
                          for p in range(4)], axis=1)  # [16, 128], columns 32 p + t
      want = q[16 * tile:16 * tile + 16, 128 * g:128 * g + 128].astype(np.int32) + 32
      want = want.reshape(16, 32, 4).transpose(0, 2, 1).reshape(16, 128)  # k = 4 t + p at column 32 p + t
      np.testing.assert_array_equal(u, want)


_H200 = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
    device_kind="NVIDIA H200", num_cores=132, platform="gpu"))


@pytest.mark.parametrize("m,schedule,epilogue,split_k,gps,k,fused", [
    (1, "serial", "smem_transpose", 1, 1, 600, False), (17, "pingpong", "out_t", 1, 1, 600, False),
    (100, "serial", "out_t", 5, 1, 600, False), (300, "pingpong", "out_t", 1, 1, 600, False),
    (32, "serial", "out_t", 5, 1, 600, False), (16, "serial", "smem_transpose", 1, 2, 1024, False),
    (64, "serial", "out_t", 2, 4, 1024, False), (1, "serial", "smem_transpose", 1, 1, 600, True),
    (17, "pingpong", "out_t", 1, 1, 600, True), (64, "serial", "out_t", 2, 4, 1024, True),
    (16, "serial", "out_t", 4, 2, 1024, "persistent"),
    (16, "serial", "out_t", 3, 2, 1024, True), (64, "pingpong", "out_t", 3, 1, 1000, True),
    (100, "serial", "out_t", 5, 1, 1024, False),  # the three before ragged: split_k does not divide the slots
    (16, "serial", "out_t", 1, 2, 1024, "stream_k"), (300, "serial", "out_t", 1, 1, 1000, "stream_k")])
def test_the_op_lowers_for_cuda_without_a_gpu(m, schedule, epilogue, split_k, gps, k, fused):
  cfg = dataclasses.replace(ms.default_config(m), schedule=schedule, epilogue=epilogue, split_k=split_k,
                            groups_per_step=gps, fused_tma=bool(fused), persistent=fused == "persistent",
                            stream_k=fused == "stream_k")
  cfg = dataclasses.replace(cfg, max_concurrent_steps=min(4, ms.max_ring(cfg.tile_t, 4, gps)))
  g = -(-k // 128)
  with jax.sharding.use_abstract_mesh(_H200):
    lowered = jax.jit(lambda x, w, s: ms.w6a_gemm_small(x, w, s, a_bits=6, config=cfg)).trace(
        S((m, k), jnp.bfloat16), S((13, g, 3, 16, 32), jnp.uint8), S((208, g), jnp.float16)).lower(
            lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.parametrize("m,split_k,gps,epilogue", [(1, 1, 1, "smem_transpose"), (16, 1, 2, "smem_transpose"),
                                                     (64, 2, 2, "out_t"), (100, 4, 1, "out_t")])
@pytest.mark.parametrize("quant_t", [False, True])
def test_fp16_weight_scales_lower_for_cuda_without_a_gpu(m, split_k, gps, epilogue, quant_t):
  """SmallConfig.sw_f16: the kernel takes the stored fp16 scales (no fp32 copy in the program); with
  quant_t the quantizer's own [G, 2, Mp] output goes to the kernel (no stack between them)."""
  cfg = dataclasses.replace(ms.default_config(m), split_k=split_k, groups_per_step=gps, epilogue=epilogue, sw_f16=True,
                            quant_t=quant_t)
  cfg = dataclasses.replace(cfg, max_concurrent_steps=min(4, ms.max_ring(cfg.tile_t, 4, gps)))
  g = 8
  with jax.sharding.use_abstract_mesh(_H200):
    lowered = jax.jit(lambda x, w, s: ms.w6a_gemm_small(x, w, s, a_bits=6, config=cfg)).trace(
        S((m, 1000), jnp.bfloat16), S((13, g, 3, 16, 32), jnp.uint8), S((208, g), jnp.float16)).lower(
            lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert "mosaic_gpu" in text
  assert "tensor<8x256xf32>" not in text and "tensor<8x256xf16>" in text  # s_w [G, Np] handed over as fp16
  assert ("w6a_quantize_activations_t" in text) == quant_t and ("concatenate" in text) != quant_t
  with pytest.raises(ValueError, match="sw_t must be float16"):
    ms.gemm(jnp.zeros((64, 1024), jnp.int8), jnp.zeros((8, 64)), jnp.zeros((8, 64), jnp.int32),
            jnp.zeros((8, 8, 3, 16, 32), jnp.uint8), jnp.zeros((8, 128), jnp.float32), out_dtype=jnp.bfloat16,
            config=dataclasses.replace(ms.default_config(64), sw_f16=True, fused_tma=False))


def test_split_rules():
  """split_for fills the SMs with CTAs without passing them, on divisors of the K-groups, >= 4 groups each."""
  assert ms.split_for(32, 32, 132) == 4  # 4096 x 4096: 32 tiles -> 128 CTAs
  assert ms.split_for(86, 32, 132) == 2  # K = 11008: 86 = 2 x 43 groups
  assert ms.split_for(32, 96, 132) == 1 and ms.split_for(32, 200, 132) == 1
  assert ms.split_for(8, 4, 132) == 2  # at least 4 groups a split
  def gemm_on_zeros(config, m=32, groups=5):  # prepared operands of zeros: only the checks run
    return ms.gemm(jnp.zeros((m, groups * 128), jnp.int8), jnp.zeros((groups, m)), jnp.zeros((groups, m), jnp.int32),
                   jnp.zeros((8, groups, 3, 16, 32), jnp.uint8), jnp.zeros((groups, 128)), out_dtype=jnp.bfloat16,
                   config=config)

  with pytest.raises(ValueError, match="2-byte outputs only.*partial sums"):
    gemm_on_zeros(ms.SmallConfig(tile_t=32, split_k=5))
  with pytest.raises(ValueError, match="split_k=6 is more than the 5 ring slots"):
    gemm_on_zeros(ms.SmallConfig(tile_t=32, split_k=6, epilogue="out_t"))
  with pytest.raises(ValueError, match="split_k=3 is more than the 2 ring slots of 2 K-groups"):
    gemm_on_zeros(ms.SmallConfig(tile_t=32, split_k=3, groups_per_step=2, epilogue="out_t"), groups=4)
  with pytest.raises(ValueError, match="groups_per_step=2 must divide the 5 K-groups"):
    gemm_on_zeros(ms.SmallConfig(tile_t=32, groups_per_step=2))
  with pytest.raises(ValueError, match="more than a Hopper CTA's 227 KB"):
    gemm_on_zeros(ms.SmallConfig(tile_t=128, groups_per_step=4), m=128, groups=8)
  with pytest.raises(ValueError, match="pingpong' takes groups_per_step=1"):
    ms.SmallConfig(schedule="pingpong", epilogue="out_t", groups_per_step=2)


def test_ragged_split_rules():
  """split_ragged: any split count, by the cost model; each split's pipeline runs split_slots slots."""
  assert ms.split_ragged(86, 2, 32, 132, 4096, 32) == 4  # LLaMA-2-7B down_proj: 43 slots -> 11, 11, 11, 10
  assert ms.split_ragged(32, 2, 96, 132, 12288, 32) == 1  # q/k/v: 96 tiles; splitting costs more than it fills
  assert ms.split_ragged(32, 2, 32, 132, 4096, 32) == 4  # o_proj: as split_for
  assert ms.split_ragged(8, 2, 1, 132, 128, 32) == 4  # one tile, 4 slots: one slot a split
  cfg = ms.split_config(16, 4096, 86, ragged=True)
  assert (cfg.split_k, cfg.groups_per_step, cfg.epilogue) == (4, 2, "out_t")
  assert ms.split_slots(cfg, 86) == 11
  assert ms.split_config(16, 4096, 86).split_k == 2  # the divisor rule
  # the model: more splits fill more SMs but each tile pays the ring's fill and the partials their bytes
  assert ms.split_cost(4, 86, 2, 32, 132, 4096, 32) < ms.split_cost(2, 86, 2, 32, 132, 4096, 32)
  assert ms.split_cost(8, 86, 2, 32, 132, 4096, 32) > ms.split_cost(4, 86, 2, 32, 132, 4096, 32)


def test_stream_k_rules():
  for bad in (dict(epilogue="smem_transpose"), dict(fused_tma=False), dict(split_k=2), dict(persistent=True)):
    with pytest.raises(ValueError, match="stream_k=True takes"):
      ms.SmallConfig(**{"stream_k": True, "epilogue": "out_t", **bad})
  cfg = ms.split_config(16, 22016, 32, stream_k=True)  # LLaMA-2-7B gate/up at batch 16: 172 tiles
  assert (cfg.stream_k, cfg.split_k, cfg.groups_per_step, cfg.epilogue) == (True, 1, 2, "out_t")
  assert cfg == ms.stream_k_config(16, 32)
  assert ms.split_config(64, 22016, 32, ragged=True, stream_k=True).stream_k
  # 96 or 32 tiles fit one round, and 224 fill two rounds well (LLaMA-3-8B gate/up): the split rule's tiling,
  # as without stream_k (the model: stream_k_cost against split_cost)
  for m, n, g in ((16, 12288, 32), (16, 4096, 86), (16, 4096, 32), (16, 28672, 32), (64, 28672, 32)):
    assert ms.split_config(m, n, g, ragged=True, stream_k=True) == ms.split_config(m, n, g, ragged=True)
  assert ms.out_itemsize(cfg, jnp.bfloat16) == 4
  assert ms.stream_k_plan(172, 16, 132) == (132, 21, 2)  # 2752 units: 21 a CTA, every SM busy
  assert ms.stream_k_plan(96, 16, 132) == (128, 12, 2)  # q/k/v: 128 CTAs instead of 96
  assert ms.stream_k_plan(1, 4, 132) == (4, 1, 4)  # one tile, one slot a CTA


@pytest.mark.parametrize("tiles,slots,sms", [(172, 16, 132), (96, 16, 132), (32, 43, 132), (3, 5, 4), (7, 3, 5),
                                             (1, 8, 132), (13, 1, 4), (448, 32, 132)])
def test_stream_k_schedule_covers_every_slot_once(tiles, slots, sms):
  """The kernel's stream-K arithmetic (w6a_gemm_mgpu_small._kernel's unit() and sk_flush, restated in
  numpy): every (tile, slot) unit is summed by exactly one CTA step, each stored partial holds a contiguous
  run of one tile's slots, a tile's partials go to distinct buffers, and the buffers marked written are
  exactly those stored (the rest, never written, are masked to zero before the sum)."""
  ctas, per, buffers = ms.stream_k_plan(tiles, slots, sms)
  assert ctas <= sms and (ctas - 1) * per < tiles * slots <= ctas * per
  units, seen, stored = tiles * slots, np.zeros(tiles * slots, int), {}
  for c in range(ctas):
    run = []
    for k in range(per):
      u = c * per + k
      real, uc = u < units, min(u, units - 1)
      tile, slot = uc // slots, uc % slots
      if real:
        seen[u] += 1
        run.append(u)
      if real and (slot == slots - 1 or k == per - 1):
        buf = c - (tile * slots) // per
        assert 0 <= buf < buffers and (buf, tile) not in stored
        assert run and all(v // slots == tile for v in run) and run == list(range(run[0], run[0] + len(run)))
        stored[(buf, tile)] = run
        run = []
    assert not run  # nothing summed is left unstored
  assert (seen == 1).all()
  written = ms.stream_k_written(tiles, slots, per, buffers)
  assert {(b, t) for b, t in zip(*np.nonzero(written))} == set(stored)


def _hopper() -> bool:
  return has_gpu() and jax.devices()[0].compute_capability == "9.0"


def _check(m, n, k, a_bits, dtype=jnp.bfloat16, schedule="serial", epilogue="smem_transpose", split_k=1, gps=1,
           **more):
  rng = _rng()
  w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
  q, s = numerics.quantize_weight(jnp.asarray(w), 6, 128)
  packed = formats.pack(q, 6, "pallas6", k)
  x = jnp.asarray(rng.standard_normal((m, k)) * 2, dtype)
  cfg = dataclasses.replace(ms.default_config(m), schedule=schedule, epilogue=epilogue, split_k=split_k,
                            groups_per_step=gps, **more)
  ring = ms.max_ring(cfg.tile_t, ms.out_itemsize(cfg, dtype), gps)
  cfg = dataclasses.replace(cfg, max_concurrent_steps=min(cfg.max_concurrent_steps, ring))
  out = ms.w6a_gemm_small(x, packed, s, a_bits=a_bits, config=cfg)
  ref = np.asarray(numerics.reference_matmul(x, q, s, a_bits=a_bits), np.float32)
  assert out.shape == (m, n) and out.dtype == dtype
  out = np.asarray(out, np.float32)
  assert np.isfinite(out).all()
  rtol = 1e-5 if dtype == jnp.float32 else 2 ** -7
  np.testing.assert_allclose(out, ref, rtol=rtol, atol=rtol * float(np.abs(ref).max()))


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU")
@pytest.mark.parametrize("m", [1, 16, 17, 64, 100, 128, 300])
@pytest.mark.parametrize("a_bits", [6, 8])
@pytest.mark.parametrize("n,k", [(4096, 4096), (208, 600)])  # LLaMA-sized, and ragged N and K
def test_gpu_against_reference(m, a_bits, n, k):
  _check(m, n, k, a_bits)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU")
@pytest.mark.parametrize("m", [16, 100])
def test_gpu_pingpong_out_t_and_fp32(m):
  _check(m, 256, 640, 6, schedule="pingpong", epilogue="out_t")
  _check(m, 384, 640, 8, epilogue="out_t")
  _check(m, 208, 384, 8, dtype=jnp.float32, epilogue="out_t")


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU")
@pytest.mark.parametrize("m", [16, 100])
def test_gpu_split_k(m):
  _check(m, 256, 640, 6, split_k=5, epilogue="out_t")
  _check(m, 4096, 4096, 8, split_k=4, epilogue="out_t")
  _check(m, 208, 384, 6, dtype=jnp.float32, split_k=3, epilogue="out_t")


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU")
@pytest.mark.parametrize("m,gps", [(16, 2), (100, 2), (16, 4), (64, 4)])  # (4 groups of 128 tokens do not fit)
def test_gpu_groups_per_step(m, gps):
  _check(m, 4096, 4096, 6, gps=gps)
  _check(m, 256, 1024, 8, split_k=2, gps=gps, epilogue="out_t")
  _check(m, 208, 1000, 6, gps=gps)  # ragged N and K: 8 groups, the last zero-padded


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU")
@pytest.mark.parametrize("m,gps", [(1, 1), (16, 2), (64, 4), (100, 1), (128, 2)])
def test_gpu_fused_tma(m, gps):
  """One TMA of all planes and groups of a slot (the consumer reads each plane's 4 row tiles strided),
  s_x and sum(q_x) as one fp32 array: wide and narrow TMA rows, split, ragged N and K, A6 and A8."""
  _check(m, 4096, 4096, 6, gps=gps, fused_tma=True)
  _check(m, 4096, 4096, 8, gps=gps, fused_tma=True, wide_tma=False)
  _check(m, 256, 1024, 6, split_k=2, gps=gps, epilogue="out_t", fused_tma=True)
  _check(m, 208, 1000, 8, gps=gps if gps < 4 else 2, fused_tma=True)  # 8 groups, the last zero-padded


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU")
@pytest.mark.parametrize("m,gps", [(1, 1), (16, 2), (64, 2), (100, 1)])
def test_gpu_fp16_weight_scales(m, gps):
  """SmallConfig.sw_f16 (the stored fp16 scales widened in registers) and quant_t (the quantizer writes the
  fused TMA's operand): unsplit, split, ragged, A6 and A8."""
  _check(m, 4096, 4096, 6, gps=gps, sw_f16=True)
  _check(m, 256, 1024, 8, split_k=2, gps=gps, epilogue="out_t", sw_f16=True)
  _check(m, 208, 1000, 6, gps=gps, sw_f16=True)  # 8 groups, the last zero-padded
  _check(m, 4096, 4096, 8, gps=gps, sw_f16=True, quant_t=True)
  _check(m, 256, 1024, 6, split_k=2, gps=gps, epilogue="out_t", quant_t=True)
  _check(m, 208, 1000, 8, gps=gps, quant_t=True)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU")
@pytest.mark.parametrize("m,gps", [(16, 2), (64, 2), (100, 1)])
def test_gpu_ragged_split(m, gps):
  """split_k that does not divide the ring slots: the shorter splits' borrowed first slot counts zero.
  LLaMA-2-7B's down_proj as the table splits it (86 groups, 43 slots in 4 splits), a 1-slot split, ragged
  N and K, A6 and A8, fp16 and fp32 scales, pingpong."""
  _check(m, 4096, 11008, 8, gps=gps, split_k=4, epilogue="out_t", fused_tma=True, sw_f16=True, quant_t=True)
  _check(m, 256, 1024, 6, gps=gps, split_k=3, epilogue="out_t", fused_tma=True)
  _check(m, 208, 1000, 6, gps=1, split_k=5, epilogue="out_t", fused_tma=gps == 2)  # 8 groups: 2, 2, 2, 1, 1
  _check(m, 256, 640, 8, split_k=4 // gps, epilogue="out_t", schedule="pingpong")  # 5 groups
  _check(m, 256, 1024, 6, gps=gps, split_k=8 // gps, epilogue="out_t")  # one slot a split


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU")
@pytest.mark.parametrize("m", [16, 64, 100, 300])
def test_gpu_stream_k(m):
  """SmallConfig.stream_k: equal runs of (tile, slot) units a CTA across tile boundaries, partials in buffers.
  LLaMA-2-7B's o_proj (4 buffers) and down_proj (86 groups), few SMs (a CTA spans several tiles; a tile several
  CTAs), token tiles (M = 300), ragged N and K, A6 and A8."""
  sk = dict(epilogue="out_t", fused_tma=True, stream_k=True)
  gps = 2 if m <= 64 else 1
  _check(m, 4096, 4096, 6, gps=gps, sw_f16=True, quant_t=True, **sk)
  _check(m, 4096, 11008, 8, gps=gps, quant_t=True, **sk)
  _check(m, 208, 1000, 6, gps=gps, num_sms=5, **sk)  # 8 groups, the last zero-padded
  _check(m, 384, 1024, 8, gps=1, num_sms=7, sw_f16=True, **sk)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU")
@pytest.mark.parametrize("m", [16, 100])
def test_gpu_persistent_ring(m):
  """One TMA ring across a CTA's tiles (several tiles a CTA: split-K, token tiles, ragged N)."""
  _check(m, 4096, 4096, 6, split_k=4, gps=2, epilogue="out_t", persistent=True)
  _check(m, 256, 1024, 8, split_k=2, gps=2, epilogue="out_t", persistent=True, num_sms=3)
  _check(m, 208, 1024, 6, persistent=True, num_sms=1)  # one CTA runs every tile


@pytest.mark.parametrize("tile_t", [32, 64, 128])
def test_the_deepest_ring_fits_shared_memory(tile_t):
  """max_ring: the ring and both epilogue buffers stay inside the budget, which leaves room under
  the 227 KB a Hopper CTA may use; one slot more would not fit."""
  for size in (2, 4):
    ring = ms.max_ring(tile_t, size)
    used = ring * ms.stage_bytes(tile_t) + 2 * tile_t * ms.ROWS * size
    assert ring >= 4 and used <= ms.SMEM_BUDGET < used + ms.stage_bytes(tile_t) and ms.SMEM_BUDGET < 227 * 1024


def test_gemm_quantized_refuses_operands_for_another_tiling():
  """gemm_quantized (the small GEMM on a producer's q_x and [G, 2, Mp] operand) checks them before any kernel."""
  q, s = numerics.quantize_weight(jnp.zeros((208, 640), jnp.float32), 6, 128)
  packed = formats.pack(q, 6, "pallas6", 640)
  cfg = dataclasses.replace(ms.default_config(16), quant_t=True)
  qx, act = jnp.zeros((cfg.tile_t, 640), jnp.int8), jnp.zeros((5, 2, cfg.tile_t), jnp.float32)
  with pytest.raises(ValueError, match="needs config.quant_t"):
    ms.gemm_quantized(qx, act, packed, s, m=16, out_dtype=jnp.bfloat16, config=ms.default_config(16))
  with pytest.raises(ValueError, match="quantized activations for M=16"):
    ms.gemm_quantized(qx[:, :512], act, packed, s, m=16, out_dtype=jnp.bfloat16, config=cfg)
  with pytest.raises(ValueError, match="quantized activations for M=16"):
    ms.gemm_quantized(qx, act[:4], packed, s, m=16, out_dtype=jnp.bfloat16, config=cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU")
@pytest.mark.parametrize("m", [16, 64, 100])
@pytest.mark.parametrize("a_bits", [6, 8])
def test_gpu_gemm_quantized_equals_the_whole_op(m, a_bits):
  """The small GEMM on operands its own quantizer made (gemm_quantized) is w6a_gemm_small bit for bit; on
  norm_quantize(act_t=True)'s operands it is the GEMM of the fused RMSNorm's q_x (the norm's own bounds:
  tests/pallas_kernels/test_w6a_matmul.py)."""
  from models.llama import rms_norm
  from pallas_kernels import w6a_matmul as wk
  rng = _rng()
  n, k = 4096, 4096
  q, s = numerics.quantize_weight(jnp.asarray(rng.standard_normal((n, k)).astype(np.float32) * 0.05), 6, 128)
  packed = formats.pack(q, 6, "pallas6", k)
  h = jnp.asarray(rng.standard_normal((m, k)) * 2, jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal(k) * 0.5 + 1, jnp.bfloat16)
  cfg = dataclasses.replace(ms.split_config(m, n, packed.shape[1], ragged=True), sw_f16=True, quant_t=True)
  x = rms_norm(h, w, 1e-5)
  qx, act = wk.quantize_activations_t(x, a_bits=a_bits, block_m=cfg.tile_t)
  whole = np.asarray(ms.w6a_gemm_small(x, packed, s, a_bits=a_bits, config=cfg))
  split = np.asarray(ms.gemm_quantized(qx, act, packed, s, m=m, out_dtype=x.dtype, config=cfg))
  np.testing.assert_array_equal(split.view(np.uint16), whole.view(np.uint16))
  qn, actn = wk.norm_quantize(h, w, 1e-5, a_bits=a_bits, config=wk.TileConfig(block_m=cfg.tile_t, join_phases=False),
                              act_t=True)
  fused = np.asarray(ms.gemm_quantized(qn, actn, packed, s, m=m, out_dtype=x.dtype, config=cfg), np.float32)
  ref = np.asarray(numerics.reference_matmul(x, q, s, a_bits=a_bits), np.float32)
  np.testing.assert_allclose(fused, ref, rtol=2 ** -6, atol=2 ** -6 * float(np.abs(ref).max()))
