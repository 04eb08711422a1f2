"""W6A6 / W6A8 (and W8A8) GEMM for Hopper in Pallas Mosaic GPU: int8 WGMMA, the group scales fused.

    y = w6a_gemm(x, w_packed, w_scales, a_bits=6)    # x [M, K] float -> [M, N] in x.dtype, sm_90 only

computes the numerics contract (flexq_jax/DESIGN.md; flexq_jax.numerics.reference_matmul) for the
large-M regime (prefill, large batches), on the same stored weights as the Triton kernels of
pallas_kernels/w6a_matmul.py ("pallas6", or "pallas8" for the W8A8 baseline): one placed model
serves decode (Triton) and prefill (this) and the backend picks by M at trace time.

Three steps, all under one jit:
  1. q_x, s_x: the Triton activation quantizer of w6a_matmul (one pass over x; q_x phase-major
     within each group, rows padded to the tile).
  2. The weights as int8 [Np, Kp] in the same phase-major column order (column 128 g + 32 p + t
     holds k = 128 g + 4 t + p), by w6a_matmul.unpack_phase_major (a Triton kernel at memory speed):
     "pallas6" unpacked by byte-lane operations, "pallas8" only re-tiled. A K-permutation within a group that both operands share changes no group sum. This
     transient costs 1.75 bytes a weight of memory traffic once per call; at the M this kernel
     runs for (>= several hundred rows) it is a few percent of the GEMM.
  3. The GEMM (_gemm_kernel): a persistent grid of CTAs, each looping over output tiles of
     [2 * tile_m, tile_n] or [tile_m, 2 * tile_n] (two consumer warpgroups) fed by a producer
     warpgroup through a `max_concurrent_steps`-deep ring of TMA loads (q_x tile, weight tile and
     the group's two scale vectors; tile_k = one 128-group a step). Per step each consumer runs an
     int8 WGMMA into an int32 accumulator (exact group sums), then adds
     float(sum) * s_x[m, g] * s_w[n, g] into an fp32 carry; the epilogue casts and stores by TMA.

Where the time goes (results/kernels/NOTES.md, "Mosaic GEMM: the scaling"): with one int32
accumulator over all of K this pipeline runs at 1140-1470 TOPS (1.4-1.8x cuBLAS bf16); the
per-group conversion and scaling, three CUDA-core instructions an element and group, bring it to
650-830 TOPS, about the sum of the two times: the tensor cores sit idle while the scaling runs.
`schedule="pingpong"` (the default) makes the two consumers take turns on the tensor cores, so
one scales while the other's WGMMA runs: 3-14% faster than each consumer overlapping its own
scaling with its next WGMMA (`"overlap"`). The int32 -> fp32 conversion: `convert="cvt"` (the
default, one instruction) measured faster than the full-rate bit tricks that replace it
(`"magic"`: float(v) = bitcast(v + 0x4B400000) - 1.5 * 2^23 for |v| < 2^22; `"init"`: the
accumulator starts at those magic bits, so the WGMMA adds them): on this pipeline the instruction
count an element decides, not the conversion's rate.

This module imports only jax, numpy and pallas_kernels (the kernel rule of flexq_jax/DESIGN.md).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jax._src.pallas.mosaic_gpu.primitives import wgmma_accumulator_store as _acc_store  # not in plgpu's API yet

from pallas_kernels import core, w6a_matmul
from pallas_kernels.core import GROUP, TILE_ROWS

A_BITS = (6, 8)
_MAGIC = 0x4B400000  # bits of 1.5 * 2^23: v + _MAGIC, read as fp32, is 1.5 * 2^23 + v for |v| < 2^22
_MAGIC_F = np.float32(12582912.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GemmConfig:
  """Tiling of the Mosaic GPU GEMM (hashable: a static argument)."""

  tile_m: int = 128  # rows of q_x per consumer warpgroup (a multiple of 64)
  tile_n: int = 64  # output channels per consumer warpgroup (a multiple of 8)
  wg_split: str = "n"  # "n": the two consumers split a [tile_m, 2 tile_n] tile; "m": [2 tile_m, tile_n]
  max_concurrent_steps: int = 4  # TMA ring depth
  epi_tile_n: int = 64  # epilogue sub-tiles stored by TMA
  epi_tile_m: int = 64
  grid_minor: str = "n"  # persistent loop order over output tiles (planar snake)
  grid_tile_width: int = 8
  convert: str = "cvt"  # int32 -> fp32 of a group sum: "cvt" (I2F), "magic" (add the magic bits, read as fp32),
  #                       "init" (the accumulator starts at the magic bits: the WGMMA adds them for free)
  schedule: str = "pingpong"  # how the per-group scaling (CUDA cores) meets the WGMMAs (tensor cores):
  #   "pingpong": the two consumers take turns on the tensor cores, ordered by a pair of barriers (one's
  #               WGMMA runs while the other scales its last group);
  #   "overlap":  each consumer scales group g - 1 (carried in registers) while its group g WGMMA runs;
  #   "serial":   each consumer waits for its group's WGMMA, then scales it.
  groups_per_step: int = 1  # 2 ("serial" only): two groups a pipeline step, two int32 accumulators: the
  #                           second group's WGMMA runs while the first's sums are scaled (wgmma_wait(1))
  pin: bool = True  # "overlap": an optimization barrier holds the scaling before the WGMMA wait (LLVM may
  #                   sink it past the wait otherwise; -5% to +6% across runs, noise). Also holding its
  #                   inputs after the WGMMA's issue was 6-10% slower (results/kernels/raw/h200-2026-12-01-mgpu-probes.md)
  scaling: str = "group"  # the contract; "convert" and "none" are timing probes that break it (measure what
  #                         the per-group scaling costs: sums only converted, or one int32 sum over all of K)
  num_sms: int | None = None  # persistent CTAs (default: the device's SM count)

  def __post_init__(self):
    if self.tile_m % 64 or self.tile_n % 8 or self.tile_m < 64 or self.tile_n < 8:
      raise ValueError(f"tile_m={self.tile_m} must be a multiple of 64 and tile_n={self.tile_n} of 8")
    if self.wg_split not in ("m", "n") or self.grid_minor not in ("m", "n"):
      raise ValueError(f"wg_split={self.wg_split!r} and grid_minor={self.grid_minor!r} must be 'm' or 'n'")
    if self.convert not in ("magic", "cvt", "init"):
      raise ValueError(f"convert={self.convert!r} must be 'cvt', 'magic' or 'init'")
    if self.tile_m % self.epi_tile_m or self.tile_n % self.epi_tile_n:
      raise ValueError(f"the epilogue tile {self.epi_tile_m}x{self.epi_tile_n} must divide the warpgroup tile "
                       f"{self.tile_m}x{self.tile_n}")
    if self.schedule not in ("pingpong", "overlap", "serial"):
      raise ValueError(f"schedule={self.schedule!r} must be 'pingpong', 'overlap' or 'serial'")
    if self.groups_per_step not in (1, 2) or (self.groups_per_step == 2 and self.schedule != "serial"):
      raise ValueError(f"groups_per_step={self.groups_per_step} must be 1, or 2 with schedule='serial'")
    if self.scaling not in ("group", "convert", "none"):
      raise ValueError(f"scaling={self.scaling!r} must be 'group' (or the probes 'convert', 'none')")
    if self.max_concurrent_steps < 2:
      raise ValueError(f"max_concurrent_steps={self.max_concurrent_steps} must be >= 2")

  @property
  def cta_tile(self) -> tuple[int, int]:
    """The [rows, output channels] one CTA computes per loop step (two consumer warpgroups)."""
    return (2 * self.tile_m, self.tile_n) if self.wg_split == "m" else (self.tile_m, 2 * self.tile_n)

  def smem_bytes(self, out_itemsize: int = 2) -> int:
    """Shared memory the kernel asks for: the ring of operand tiles and scales, and the epilogue."""
    cm, cn = self.cta_tile
    step = self.groups_per_step * (cm * GROUP + cn * GROUP + 4 * (cm + cn))  # int8 q_x, weights, fp32 scales
    return self.max_concurrent_steps * step + 2 * 2 * self.epi_tile_m * self.epi_tile_n * out_itemsize


def padded(m: int, n: int, config: GemmConfig) -> tuple[int, int]:
  """(Mp, Np): M and N rounded up to whole CTA tiles."""
  cm, cn = config.cta_tile
  return -(-m // cm) * cm, -(-n // cn) * cn


def _to_f32(part: jax.Array, convert: str) -> jax.Array:
  """An exact int32 group sum (|v| < 2^22) as fp32."""
  if convert == "cvt":
    return part.astype(jnp.float32)
  if convert == "magic":
    part = part + jnp.int32(_MAGIC)
  return lax.bitcast_convert_type(part, jnp.float32) - _MAGIC_F  # "init": part already holds _MAGIC + sum


def _gemm_kernel(qx_gmem,  # [Mp, Kp] int8, phase-major groups
                 w_gmem,  # [Np, Kp] int8, phase-major groups
                 sx_gmem,  # [G, Mp] f32 (s_x transposed: a group's scales are contiguous)
                 sw_gmem,  # [G, Np] f32
                 out_gmem,  # [Mp, Np] out dtype
                 out_smem,  # [2, 2, epi_tile_m, epi_tile_n] out dtype: per warpgroup, two store slots
                 *, cfg: GemmConfig):
  mp, kp = qx_gmem.shape
  np_ = w_gmem.shape[0]
  tile_m, tile_n = cfg.tile_m, cfg.tile_n
  cta_m, cta_n = cfg.cta_tile
  gps = cfg.groups_per_step
  m_iters, n_iters, k_iters = mp // cta_m, np_ // cta_n, kp // (GROUP * gps)
  swizzle = plgpu.find_swizzle(GROUP * 8)  # a 128-byte K row of int8
  op_transforms = (plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle))

  def pipeline(body, compute_context):
    return plgpu.emit_pipeline_warp_specialized(
        body,
        grid=(k_iters,),
        memory_registers=40,
        in_specs=[
            plgpu.BlockSpec((cta_m, GROUP * gps), lambda k: (0, k), transforms=op_transforms),
            plgpu.BlockSpec((cta_n, GROUP * gps), lambda k: (0, k), transforms=op_transforms),
            plgpu.BlockSpec((gps, cta_m), lambda k: (k, 0)),
            plgpu.BlockSpec((gps, cta_n), lambda k: (k, 0)),
        ],
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=cfg.max_concurrent_steps,
        compute_context=compute_context,
    )

  ignore = lambda *_, **__: None

  @functools.partial(pl.run_scoped,
                     allocs=pipeline(ignore, ignore).get_allocations(qx_gmem, w_gmem, sx_gmem, sw_gmem),
                     turns=plgpu.Barrier(num_arrivals=1, num_barriers=2) if cfg.schedule == "pingpong" else None,
                     collective_axes="wg")
  def _scope(allocs, turns):
    wg = lax.axis_index("wg")
    if cfg.schedule == "pingpong":  # consumer 0 has the first turn
      @pl.when(wg == 1)
      def _first_turn():
        plgpu.barrier_arrive(turns.at[0])

    @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
    def _tiles(info: plgpu.NDLoopInfo):
      (lin,) = info.index
      m_idx, n_idx = plgpu.planar_snake(lin, (m_iters, n_iters), 1 if cfg.grid_minor == "n" else 0,
                                        cfg.grid_tile_width)
      cta_m_slice = pl.ds(m_idx * cta_m, cta_m)
      cta_n_slice = pl.ds(n_idx * cta_n, cta_n)
      if cfg.wg_split == "m":
        wg_m, wg_n = pl.ds(wg * tile_m, tile_m), slice(None)
      else:
        wg_m, wg_n = slice(None), pl.ds(wg * tile_n, tile_n)
      zeros = lambda dtype, shape, layout: plgpu.layout_cast(jnp.zeros(shape, dtype), layout)

      def epilogue(acc):
        out = acc.astype(out_gmem.dtype)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        epi_n_count = tile_n // cfg.epi_tile_n
        for i in range(tile_m // cfg.epi_tile_m):
          for j in range(epi_n_count):
            rows = slice(i * cfg.epi_tile_m, (i + 1) * cfg.epi_tile_m)
            cols = slice(j * cfg.epi_tile_n, (j + 1) * cfg.epi_tile_n)
            slot = (i * epi_n_count + j) % 2
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
            out_smem[wg, slot] = out[rows, cols]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(
                out_smem.at[wg, slot],
                out_gmem.at[cta_m_slice, cta_n_slice].at[wg_m, wg_n].at[rows, cols])

      def compute_context(run):
        if cfg.scaling == "none":  # probe: one int32 accumulator over all of K, like a plain int8 GEMM
          def _acc_scope(acc_ref):
            run(acc_ref)
            epilogue(acc_ref[...].astype(jnp.float32))
          pl.run_scoped(_acc_scope, plgpu.ACC((tile_m, tile_n), jnp.int32))
          return
        acc = zeros(jnp.float32, (tile_m, tile_n), plgpu.Layout.WGMMA)
        if cfg.schedule == "overlap":  # carry: (fp32 sums, the last group's int32 sums and its scale vectors)
          acc, part, sx, sw = run((acc, zeros(jnp.int32, (tile_m, tile_n), plgpu.Layout.WGMMA),
                                   zeros(jnp.float32, (tile_m,), plgpu.Layout.WGMMA.reduce(1)),
                                   zeros(jnp.float32, (tile_n,), plgpu.Layout.WGMMA.reduce(0))))
          acc = acc + _scaled(part, sx, sw)
        else:
          acc = run(acc)
        epilogue(acc)

      def _scaled(part, sx, sw):  # float(sum) * s_x[m] * s_w[n]
        if cfg.scaling == "convert":  # probe
          return _to_f32(part, cfg.convert)
        scale = (lax.broadcast_in_dim(sx, (tile_m, tile_n), (0,))
                 * lax.broadcast_in_dim(sw, (tile_m, tile_n), (1,)))
        return _to_f32(part, cfg.convert) * scale

      def operands(qx_smem, w_smem, j):  # group j of the step: q_x [tile_m, 128], weights^T [128, tile_n]
        if gps == 1:
          return qx_smem.at[wg_m], w_smem.at[wg_n].T
        cols = pl.ds(j * GROUP, GROUP)
        return qx_smem.at[wg_m].at[:, cols], w_smem.at[wg_n].at[:, cols].T

      def group_acc(acc_ref):  # a fresh group accumulator: zeros (run_scoped's), or the magic bits
        if cfg.convert == "init":
          _acc_store(acc_ref, plgpu.layout_cast(jnp.full((tile_m, tile_n), _MAGIC, jnp.int32), plgpu.Layout.WGMMA))

      def scales(sx_smem, sw_smem, j):
        return (plgpu.load(sx_smem.at[j, wg_m], layout=plgpu.Layout.WGMMA.reduce(1)),  # [tile_m]
                plgpu.load(sw_smem.at[j, wg_n], layout=plgpu.Layout.WGMMA.reduce(0)))  # [tile_n]

      def step(_, qx_smem, w_smem, sx_smem, sw_smem, carry):
        if cfg.scaling == "none":
          plgpu.wgmma(carry, *operands(qx_smem, w_smem, 0))
          if gps == 2:
            plgpu.wgmma(carry, *operands(qx_smem, w_smem, 1))
          plgpu.wgmma_wait(0)
          return carry

        if gps == 2:  # both groups' WGMMAs in flight; scale the first while the second runs
          def two_groups(acc_a, acc_b):
            group_acc(acc_a)
            group_acc(acc_b)
            plgpu.wgmma(acc_a, *operands(qx_smem, w_smem, 0))
            plgpu.wgmma(acc_b, *operands(qx_smem, w_smem, 1))
            sx0, sw0 = scales(sx_smem, sw_smem, 0)
            sx1, sw1 = scales(sx_smem, sw_smem, 1)
            acc = carry + _scaled(plgpu.wgmma_accumulator_load(acc_a, wait_n=1), sx0, sw0)  # wait_n=1: B runs on
            if cfg.pin:  # the first group scaled before waiting for the second
              acc = lax.optimization_barrier(acc)
            return acc + _scaled(plgpu.wgmma_accumulator_load(acc_b, wait_n=0), sx1, sw1)
          return pl.run_scoped(two_groups, plgpu.ACC((tile_m, tile_n), jnp.int32),
                               plgpu.ACC((tile_m, tile_n), jnp.int32))

        sx, sw = scales(sx_smem, sw_smem, 0)

        def group_sum(acc_ref):  # the group's exact int32 sums
          group_acc(acc_ref)
          if cfg.schedule == "pingpong":  # wait for my turn; the other consumer's turn comes when my WGMMA is done
            plgpu.barrier_wait(turns.at[wg])
            plgpu.wgmma(acc_ref, *operands(qx_smem, w_smem, 0))
            part = plgpu.wgmma_accumulator_load(acc_ref)
            plgpu.barrier_arrive(turns.at[1 - wg])
            return part
          plgpu.wgmma(acc_ref, *operands(qx_smem, w_smem, 0))
          if cfg.schedule == "overlap":  # the previous group's scaling runs on the CUDA cores meanwhile
            acc, prev, prev_sx, prev_sw = carry
            acc = acc + _scaled(prev, prev_sx, prev_sw)
            if cfg.pin:
              acc = lax.optimization_barrier(acc)
            return acc, plgpu.wgmma_accumulator_load(acc_ref)
          return plgpu.wgmma_accumulator_load(acc_ref)

        if cfg.schedule == "overlap":
          acc, part = pl.run_scoped(group_sum, plgpu.ACC((tile_m, tile_n), jnp.int32))
          return acc, part, sx, sw
        part = pl.run_scoped(group_sum, plgpu.ACC((tile_m, tile_n), jnp.int32))
        return carry + _scaled(part, sx, sw)

      pipeline(step, compute_context)(qx_gmem.at[cta_m_slice], w_gmem.at[cta_n_slice],
                                      sx_gmem.at[:, cta_m_slice], sw_gmem.at[:, cta_n_slice], allocations=allocs)

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def num_sms() -> int:
  """SMs of the default device (132 off the GPU, where the kernel is only lowered, e.g. in tests)."""
  device = jax.devices()[0]
  return getattr(device, "core_count", None) or 132


@functools.partial(jax.jit, static_argnames=("out_dtype", "config"))
def gemm(qx: jax.Array, sx_t: jax.Array, w: jax.Array, sw_t: jax.Array, *, out_dtype, config: GemmConfig) -> jax.Array:
  """The GEMM on prepared operands (exposed for benchmarks and lowering tests).

  Args:
    qx: int8 [Mp, Kp] phase-major q_x (Mp a multiple of the CTA tile's rows).
    sx_t: fp32 [G, Mp] activation scales, transposed.
    w: int8 [Np, Kp] phase-major weights (Np a multiple of the CTA tile's columns).
    sw_t: fp32 [G, Np] weight scales, transposed.
    out_dtype: the output dtype.
    config: the tiling.

  Returns:
    [Mp, Np] in out_dtype.
  """
  mp, kp = qx.shape
  np_ = w.shape[0]
  cm, cn = config.cta_tile
  kstep = GROUP * config.groups_per_step
  if qx.dtype != jnp.int8 or w.dtype != jnp.int8 or w.shape[1] != kp or kp % kstep:
    raise ValueError(f"qx and w must be int8 [*, Kp] with one Kp, a multiple of {kstep}; got {qx.dtype} {qx.shape} "
                     f"and {w.dtype} {w.shape}")
  if mp % cm or np_ % cn:
    raise ValueError(f"{mp=} and {np_=} must be multiples of the CTA tile {cm}x{cn} (pad them)")
  if sx_t.shape != (kp // GROUP, mp) or sw_t.shape != (kp // GROUP, np_):  # noqa: SIM114
    raise ValueError(f"sx_t {sx_t.shape} and sw_t {sw_t.shape} must be [G, Mp] = {(kp // GROUP, mp)} and [G, Np] = "
                     f"{(kp // GROUP, np_)}")
  epi = (config.epi_tile_m, config.epi_tile_n)
  out_swizzle = plgpu.find_swizzle(config.epi_tile_n * jnp.dtype(out_dtype).itemsize * 8)
  out_transforms = (plgpu.TilingTransform((8, out_swizzle // jnp.dtype(out_dtype).itemsize)),
                    plgpu.SwizzleTransform(out_swizzle))
  sms = config.num_sms or num_sms()
  return plgpu.kernel(
      functools.partial(_gemm_kernel, cfg=config),
      out_type=jax.ShapeDtypeStruct((mp, np_), out_dtype),
      scratch_types=dict(out_smem=plgpu.SMEM((2, 2, *epi), out_dtype, transforms=out_transforms)),
      grid=(min(sms, (mp // cm) * (np_ // cn)),),
      grid_names=("sm",),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
  )(qx, w, sx_t, sw_t)


def default_config(m: int, n: int, k: int) -> GemmConfig:
  """The tiling for an [M, K] x [K, N] product: 128 x 64 per consumer warpgroup (a 128 x 128 CTA
  tile; the fastest of five tilings on 5 of 6 cases of results/kernels/raw/h200-2026-12-01-mgpu-sweep2.json),
  the consumers taking turns on the tensor cores (the fastest schedule in
  results/kernels/raw/h200-2026-12-01-mgpu-probes.md and -sweep3.json)."""
  del m, n, k
  return GemmConfig()


@functools.partial(jax.jit, static_argnames=("a_bits", "config"))
def w6a_gemm(x: jax.Array, w_packed: jax.Array, w_scales: jax.Array, *, a_bits: int,
             config: GemmConfig | None = None) -> jax.Array:
  """Quantized linear y = x W^T by the numerics contract on Hopper tensor cores (sm_90).

  Args:
    x: [M, K] float activations; any M, any K (zero-padded to a multiple of 128).
    w_packed: "pallas6" uint8 [N/16, Kp/128, 3, 16, 32] or "pallas8" int8 [N/16, Kp/128, 16, 128].
    w_scales: fp16 [N, Kp / 128].
    a_bits: 6 or 8.
    config: tiling; default_config(M, N, K) when None.

  Returns:
    [M, N] in x.dtype.
  """
  m, k, n = w6a_matmul.check_operands(x, w_packed, w_scales, a_bits)
  cfg = config or default_config(m, n, k)
  if cfg.scaling != "group":
    raise ValueError(f"scaling={cfg.scaling!r} is a timing probe of gemm(), not the numerics contract")
  mp, np_ = padded(m, n, cfg)
  # Phase-major q_x, rows padded to a whole CTA tile (the quantizer pads to its block_m).
  qcfg = w6a_matmul.TileConfig(block_m=cfg.cta_tile[0], join_phases=False)
  qx, sx, _ = w6a_matmul.quantize_activations(x, a_bits=a_bits, config=qcfg)
  w = w6a_matmul.unpack_phase_major(w_packed, np_)
  sw_t = jnp.pad(w_scales.astype(jnp.float32), ((0, np_ - n), (0, 0))).T
  sx_t = sx.T
  extra = -w.shape[1] % (GROUP * cfg.groups_per_step)  # a zero group (zero sums, zero scales) to fill a step
  if extra:
    qx, w = jnp.pad(qx, ((0, 0), (0, extra))), jnp.pad(w, ((0, 0), (0, extra)))
    sx_t, sw_t = jnp.pad(sx_t, ((0, extra // GROUP), (0, 0))), jnp.pad(sw_t, ((0, extra // GROUP), (0, 0)))
  y = gemm(qx, sx_t, w, sw_t, out_dtype=x.dtype, config=cfg)
  return y[:m, :n]
