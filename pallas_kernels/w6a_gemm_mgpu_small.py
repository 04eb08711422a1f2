"""W6A6 / W6A8 GEMM for Hopper at small M (decode batches, short prompts), Pallas Mosaic GPU.

    y = w6a_gemm_small(x, w_packed, w_scales, a_bits=6)   # x [M, K] -> [M, N], sm_90 only

The large-M kernel (pallas_kernels/w6a_gemm_mgpu.py) puts tokens on the WGMMA's M side and reads
weights unpacked to int8 by a separate pass: at M <= 256 that pass's bytes (0.75 read + 1 written
+ 1 read again a weight) and its 128-token tiles cost more than the GEMM. This kernel swaps the
operands: out^T = W q_x^T, so

  - A (WGMMA M = 64 weight rows a consumer warpgroup) is the weight tile, unpacked from the
    "pallas6" planes *in registers* (one TMA load of the packed bytes, 0.75 byte a weight from
    HBM, nothing written back) and fed to the int8 WGMMA from registers;
  - B (WGMMA N = the token tile, 16-128 rows of q_x) comes from shared memory by TMA, K-major
    as int8 WGMMA requires;
  - the unpacked u = q + 32 (0..63, a valid int8) meet q_x, so each group's exact sum is the
    WGMMA's int32 result minus 32 * sum(q_x) of the token (the quantizer's third output), as the
    Triton kernels do; then float(sum) * s_w[n, g] * s_x[m, g] into an fp32 carry.

The output tile is [weight rows, tokens]: the epilogue stores it through a transposed view of a
[tokens, 64] shared-memory buffer and TMA writes y [M, N] ("smem_transpose"), or (epilogue "out_t")
writes y^T and the op transposes it in XLA (M * N * 4 bytes more traffic).

Numerics: the contract of flexq_jax/DESIGN.md (flexq_jax.numerics.reference_matmul), exact group
sums. This module imports only jax, numpy and pallas_kernels (the kernel rule of flexq_jax/DESIGN.md).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import numpy as np
import jax.numpy as jnp
from jax import lax
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith
import jax.experimental.mosaic.gpu as mgpu
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import w6a_matmul
from pallas_kernels.w6a_gemm_mgpu import num_sms
from pallas_kernels.core import GROUP, PALLAS6_OFFSET

ROWS = 64  # weight rows per consumer warpgroup: the WGMMA's M
TILE16 = 16  # rows of one "pallas6" tile


@dataclasses.dataclass(frozen=True, kw_only=True)
class SmallConfig:
  """Tiling of the small-M kernel (hashable: a static argument)."""

  tile_t: int = 64  # tokens per CTA tile: the WGMMA's N (32, 64 or 128: the quantizer's row blocks). Not 16:
  #                   the TMA ring's slots of s_x and sum(q_x) are tile_t * 4 bytes, and TMA writes shared
  #                   memory at 128-byte-aligned addresses only (at 16, slot 1 sits at byte 64: "misaligned
  #                   shared address" in the memory warpgroup, seen on an H200 2026-12-01)
  max_concurrent_steps: int = 4  # TMA ring depth (one 128-group a step)
  schedule: str = "serial"  # "serial": each consumer waits for its WGMMA and scales; "pingpong": the
  #                           two consumers take turns on the tensor cores (see w6a_gemm_mgpu)
  epilogue: str = "smem_transpose"  # "smem_transpose": each [64, tile_t] tile stored through a transposed view
  #                                   of a [tile_t, 64] buffer, TMA to y [M, N]; "out_t": y^T [N, M] written,
  #                                   the op transposes it (XLA; M * N * 4 bytes more traffic)
  groups_per_step: int = 1  # 128-groups in one ring slot (1, 2 or 4): each group's WGMMA is issued as soon as its
  #                           weights are unpacked, and a group is scaled while the next ones run on the tensor
  #                           cores (wgmma_wait(n)); fewer ring handshakes a group. Must divide a split's groups
  split_k: int = 1  # CTAs sharing one output tile along K: each sums a contiguous 1/split_k of the groups into
  #                  an fp32 partial [split_k, ...] that XLA adds (epilogue "out_t": fp32 values do not take the
  #                  transposed store) (a narrow layer has fewer 128-row tiles than SMs,
  #                  and each CTA's steps run one after another: 4096 x 4096 took ~19 us at M = 16-32 on an H200
  #                  with 32 CTAs busy, as long as 12288 x 4096 with 96); any count up to the ring slots: where
  #                  it does not divide them, the first splits take one slot more and each shorter split runs one
  #                  slot of its predecessor's with that slot's weight scales zeroed (one wasted slot, no bad sums)
  num_sms: int | None = None
  wide_tma: bool = True  # the weight planes' TMA boxes read as [.., 2, 256] (256-byte rows) instead of their stored
  #                        [.., 16, 32] (32-byte rows; same bytes, same shared-memory image): with 32-byte rows the TMA
  #                        ring alone took ~19 us on 12288 x 4096 at M = 16 (H200, 2026-12-02, probe "tma_only"),
  #                        about the whole kernel's time
  fused_tma: bool = True  # fewer TMAs a ring slot: the three weight planes of all the slot's groups in one box
  #                         [8, groups_per_step, 3, ...] (the stored order: a row tile's planes are adjacent, so a
  #                         consumer reads each plane as 4 row tiles 3 * groups_per_step * 512 bytes apart), and
  #                         s_x with sum(q_x) (exact in fp32: |sum| <= 128 * 127) as one [G, 2, Mp] array: 4 TMAs a
  #                         slot instead of 4 + 3 * groups_per_step. Alone it changed nothing (H200, 2026-12-02: the
  #                         cost is not per TMA); with 2 groups a slot it is the fastest tiling measured (NOTES.md)
  persistent: bool = False  # one TMA ring across a CTA's output tiles (Pallas' pipeline of pipelines: the first
  #                          tile's pipeline START, the later ones STEADY), so the producer loads the next tile's
  #                          first groups while the consumers finish the current one, instead of draining and
  #                          refilling the ring per tile; matters where a CTA runs several tiles (split-K). Needs
  #                          the ring depth to divide a split's ring slots. Exact, and 1-4% faster on 7b.o at M = 16
  #                          (H200, 2026-12-02: noise), so off
  sw_f16: bool = False  # the weight scales read as the stored fp16 [N, G] (transposed to [G, N]: in a decode loop XLA
  #                      keeps the loop's copy column-major, so that is free) and widened in registers, instead of
  #                      an fp32 copy the op makes every call: in the decode loop that conversion was 4 XLA kernels
  #                      a layer, ~280 us a step of LLaMA-2-7B at batch 64 (H200, 2026-12-02; XLA does not hoist a
  #                      convert that doubles the bytes). Same numbers (fp16 -> fp32 is exact): exact in
  #                      the GPU tests, decode 5% faster at batch 16 and 3% at 64 (H200,
  #                      2026-12-02, results/e2e/h200-2026-12-02-e2e-glue.md)
  quant_t: bool = False  # (fused_tma only) the quantizer writes s_x and sum(q_x) as the [G, 2, Mp] array the fused TMA
  #                       reads (w6a_matmul.quantize_activations_t) instead of [Mp, G] arrays that XLA transposes and
  #                       stacks: 3 XLA kernels a layer fewer in the decode loop (~110 us a step of LLaMA-2-7B at
  #                       batch 16, H200 2026-12-02). Same numbers: exact in the GPU tests; with sw_f16, decode 1% (batch 16) to 2% (64)
  #                       faster again (same file)
  stream_k: bool = False  # (fused_tma, out_t, unsplit) every CTA streams an equal run of (output tile, ring slot) units
  #                         in order, across tile boundaries: the last slot of a tile (or of the CTA's run) stores
  #                         its fp32 sum into one of a few partial buffers, which XLA adds (stream_k_plan). A
  #                         persistent grid of whole tiles leaves SMs idle where the tiles are not a multiple of
  #                         them (LLaMA-2-7B q/k/v: 96 tiles on 132 SMs; gate/up 172: two rounds, the second 40
  #                         CTAs), and split-K only changes which multiple
  probe: str = ""  # timing probes for evaluation.kernel_bench --probe-mgpu-small, WRONG results: "tma_only" (the
  #                  consumers only release the ring), "no_unpack" (a constant weight tile instead of the unpack),
  #                  "no_scale" (the int32 sums added unscaled)

  def __post_init__(self):
    if self.stream_k and not (self.fused_tma and self.epilogue == "out_t" and self.split_k == 1
                              and not self.persistent and self.schedule == "serial"):
      raise ValueError("stream_k=True takes fused_tma=True, epilogue='out_t' (fp32 partial sums), split_k=1, "
                       "persistent=False and schedule='serial'")
    if self.quant_t and not self.fused_tma:
      raise ValueError("quant_t=True writes the fused TMA's [G, 2, Mp] operand: it needs fused_tma=True")
    if self.probe not in ("", "tma_only", "no_unpack", "no_scale"):
      raise ValueError(f"probe={self.probe!r} must be '', 'tma_only', 'no_unpack' or 'no_scale'")
    if self.groups_per_step not in (1, 2, 4):
      raise ValueError(f"groups_per_step={self.groups_per_step} must be 1, 2 or 4")
    if self.groups_per_step > 1 and self.schedule == "pingpong":
      raise ValueError("schedule='pingpong' takes groups_per_step=1 only")
    if self.split_k < 1:
      raise ValueError(f"split_k={self.split_k} must be >= 1")
    if self.epilogue not in ("smem_transpose", "out_t"):
      raise ValueError(f"epilogue={self.epilogue!r} must be 'smem_transpose' or 'out_t'")
    if self.tile_t not in (32, 64, 128):
      raise ValueError(f"tile_t={self.tile_t} must be 32, 64 or 128")
    if self.max_concurrent_steps < 2:
      raise ValueError(f"max_concurrent_steps={self.max_concurrent_steps} must be >= 2")
    if self.schedule not in ("serial", "pingpong"):
      raise ValueError(f"schedule={self.schedule!r} must be 'serial' or 'pingpong'")
    if self.schedule == "pingpong" and self.epilogue == "smem_transpose":
      # Lowers on the CPU machine, but compiling it on an H200 (jax 0.11.2, 2026-12-01) fails
      # Mosaic GPU's layout inference ("Failed to infer a possible set of layouts"); pingpong with
      # "out_t" compiled and was exact.
      raise ValueError("schedule='pingpong' takes epilogue='out_t' only (Mosaic GPU cannot lay out the "
                       "transposed store beside the turn barriers)")

  @property
  def cta_rows(self) -> int:
    return 2 * ROWS  # two consumer warpgroups


SMEM_LIMIT = 227 * 1024  # shared memory a Hopper CTA may use
SMEM_BUDGET = 200 * 1024  # what max_ring fills of it, with room for barriers


def stage_bytes(tile_t: int, groups_per_step: int = 1) -> int:
  """Shared memory of one TMA ring slot, per group: q_x [tile_t, 128] int8, three planes of 128 weight
  rows (128 x 32 bytes each), s_x and sum(q_x) [tile_t] 4 bytes each, s_w [128] fp32."""
  return groups_per_step * (tile_t * GROUP + 3 * 2 * ROWS * 32 + 2 * tile_t * 4 + 2 * ROWS * 4)


def epilogue_bytes(tile_t: int, out_itemsize: int) -> int:
  """The two consumers' epilogue buffers: [tile_t, 64] outputs each."""
  return 2 * tile_t * ROWS * out_itemsize


def out_itemsize(config: "SmallConfig", out_dtype) -> int:
  """Bytes of one value the kernel writes: fp32 partial sums where it splits K, else out_dtype."""
  return 4 if config.split_k > 1 or config.stream_k else jnp.dtype(out_dtype).itemsize


def max_ring(tile_t: int, out_itemsize: int = 4, groups_per_step: int = 1) -> int:
  """The deepest TMA ring that fits SMEM_BUDGET beside the two epilogue buffers."""
  return (SMEM_BUDGET - epilogue_bytes(tile_t, out_itemsize)) // stage_bytes(tile_t, groups_per_step)


def stream_k_plan(tiles: int, slots: int, num_sms: int) -> tuple[int, int, int]:
  """SmallConfig.stream_k's schedule of `tiles` output tiles of `slots` ring slots each: (CTAs, units a CTA,
  partial buffers). Unit u = tile * slots + slot; CTA c runs units [c * per, (c + 1) * per) (the last CTA may
  run fewer: the rest count zero), per = ceil(units / num_sms). A tile's units fall to consecutive CTAs; the
  i-th of them stores its partial sum in buffer i, so the buffers are the most CTAs any tile spans."""
  units = tiles * slots
  per = -(-units // min(num_sms, units))
  ctas = -(-units // per)
  return ctas, per, int(_stream_k_spans(tiles, slots, per).max())


def _stream_k_spans(tiles: int, slots: int, per: int) -> np.ndarray:
  """int [tiles]: how many CTAs of runs of `per` units each tile's units fall to."""
  t = np.arange(tiles)
  return ((t + 1) * slots - 1) // per - (t * slots) // per + 1


def stream_k_written(tiles: int, slots: int, per: int, buffers: int) -> np.ndarray:
  """bool [buffers, tiles]: which partial buffers stream_k_plan's CTAs write for each tile (the others
  are never written and must count zero)."""
  return np.arange(buffers)[:, None] < _stream_k_spans(tiles, slots, per)[None, :]


def default_config(m: int) -> SmallConfig:
  """The token tile: M rounded up to a power of two >= 32, at most 128 (larger M: several tiles)."""
  return SmallConfig(tile_t=min(128, max(32, 1 << (m - 1).bit_length())))


_L8 = plgpu.Layout.WGMMA_8BIT  # the int8 WGMMA's A fragment: 4 consecutive bytes of a row a register


@dataclasses.dataclass(frozen=True)
class _WordOps:
  shr: Callable
  shl: Callable
  band: Callable
  bor: Callable


def phase_word(lo, hi, p: int, ops: _WordOps):
  """Four weights of phase p (one 32-bit word: bytes t..t+3 of a row's lo and hi planes) -> their
  u = q + 32 bytes: ((lo >> 4 (p % 2)) & 0x0F0F0F0F) | (((hi >> 2 p) & 0x03030303) << 4). Every
  mask keeps each byte's bits inside it, so the word-wide shifts are byte-local. The kernel runs
  it on MLIR values (inside _unpack), the tests on numpy words (NUMPY_OPS)."""
  if p % 2:
    lo = ops.shr(lo, 4)
  lo = ops.band(lo, 0x0F0F0F0F)
  if p:
    hi = ops.shr(hi, 2 * p)
  return ops.bor(lo, ops.shl(ops.band(hi, 0x03030303), 4))


NUMPY_OPS = _WordOps(shr=lambda a, n: a >> np.uint32(n), shl=lambda a, n: a << np.uint32(n),
                     band=lambda a, m: a & np.uint32(m), bor=lambda a, b: a | b)


@plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(), plgpu.RefType()),
                   return_type=plgpu.ShapeDtypeStruct((ROWS, GROUP), jnp.int8, layout=_L8))
def _unpack(ctx, lo01_ref, lo23_ref, hi_ref):
  """The three "pallas6" planes of 64 weight rows (smem uint8 [4, 1, 1, 16, 32] each, or the same
  bytes as [4, 1, 1, 2, 256], as TMA wrote them) -> int8 [64, 128] u = q + 32 in registers, columns phase-major (32 p + t), in the
  layout of the int8 WGMMA's A operand.

  On whole 32-bit registers (4 weights each; Mosaic GPU shifts no 8-bit vectors):
  u_p = ((lo >> 4 (p % 2)) & 0x0F0F0F0F) | (((hi >> 2 p) & 0x03030303) << 4), byte-local."""
  del ctx
  i32 = ir.IntegerType.get_signless(32)
  const = lambda v: arith.constant(i32, v)

  def load(ref):  # the plane as [64, 32], 4 consecutive bytes of a row per register
    if len(ir.MemRefType(ref.type).shape) == 3:  # fused_tma: [4 row tiles, 16, 32] (or [4, 2, 256]), the tiles
      #                                           strided: read as a (16, 32)-tiled [64, 32]
      ref = mgpu_utils.memref_unfold(mgpu_utils.memref_fold(ref, 1, 2), 1, (1, TILE16, 32))  # [4, 1, 16, 32]
      return mgpu.FragmentedArray.load_tiled(ref, swizzle=16, layout=mgpu.WGMMA_LAYOUT_8BIT, is_signed=False,
                                             optimized=False)
    ref = mgpu_utils.memref_reshape(ref, (ROWS, 32))
    return mgpu.FragmentedArray.load_untiled(ref, layout=mgpu.WGMMA_LAYOUT_8BIT, is_signed=False, optimized=False)

  lo01, lo23, hi = load(lo01_ref), load(lo23_ref), load(hi_ref)

  ops = _WordOps(shr=lambda a, n: arith.shrui(a, const(n)), shl=lambda a, n: arith.shli(a, const(n)),
                 band=lambda a, m: arith.andi(a, const(m)), bor=arith.ori)

  def phase(p):
    def word(lo, h):
      return phase_word(mgpu_utils.bitcast(lo, i32), mgpu_utils.bitcast(h, i32), p, ops)
    src = lo01 if p < 2 else lo23
    regs = np.empty_like(src.registers)
    for idx, (lo, h) in enumerate(zip(src.registers.flat, hi.registers.flat)):
      regs.flat[idx] = mgpu_utils.bitcast(word(lo, h), lo.type)
    return mgpu.FragmentedArray(_registers=regs, _layout=src.layout, _is_signed=True)

  return mgpu.fragmented_array.concatenate([phase(p) for p in range(4)], axis=1)


def _kernel(*refs, out_smem, cfg: SmallConfig, sk_per: int = 0):
  """refs, in order:
    qx_gmem: [Mp, Kp] int8, phase-major groups;
    w_gmem: "pallas6" [N/16, G, 3, 16, 32] uint8 (wide_tma: viewed as [N/16, G, 3, 2, 256]);
    the activation scales: s_x [G, Mp] f32 and sum(q_x) [G, Mp] int32, or (fused_tma) both as one [G, 2, Mp] f32;
    sw_gmem: [G, Np] f32 (sw_f16: f16);
    out_gmem: [Mp, Np] (epilogue "out_t": [Np, Mp]); split_k > 1: [split_k, ...] fp32 partial sums; stream_k:
      [buffers, Np, Mp] fp32 partial sums (stream_k_plan).
  out_smem: [2, tile_t, 64] ("out_t": [2, 64, tile_t]), one epilogue buffer per consumer.
  sk_per: stream_k's units a CTA (stream_k_plan; the grid is its CTAs)."""
  qx_gmem, w_gmem, *act_gmem, sw_gmem, out_gmem = refs
  mp, kp = qx_gmem.shape
  np_ = sw_gmem.shape[1]
  tile_t, cta_rows = cfg.tile_t, cfg.cta_rows
  tiles16 = cta_rows // TILE16
  t_iters, n_iters, k_iters = mp // tile_t, np_ // cta_rows, kp // GROUP
  splits, gps = cfg.split_k, cfg.groups_per_step
  # Ring slots (gps groups each; gemm checks that gps divides the groups) shared out over the splits: the
  # first `extra` splits take one slot more. Every split runs k_steps slots, ending at its own last slot; a
  # shorter split's first slot is its predecessor's last, loaded and counted zero (`skip_first` below).
  slots = k_iters // gps  # ring slots of a whole output tile
  base, extra = divmod(slots, splits)
  k_steps = base + (extra > 0)  # ring slots of one split's pipeline
  k_iters = k_steps * gps  # the groups one split's pipeline reads
  swizzle = plgpu.find_swizzle(GROUP * 8)  # a 128-byte K row of int8
  qx_transforms = (plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle))

  def plane_spec(i, j):  # plane j of group i of the step, the CTA's 8 row tiles: smem [8, 1, 1, 16, 32] (wide: [.., 2, 256])
    return plgpu.BlockSpec((tiles16, 1, 1, *w_gmem.shape[3:]), lambda k, i=i, j=j: (0, k * gps + i, j, 0, 0))

  if cfg.fused_tma:  # one box of every plane and group of the slot; s_x and sum(q_x) together
    w_specs = [plgpu.BlockSpec((tiles16, gps, 3, *w_gmem.shape[3:]), lambda k: (0, k, 0, 0, 0))]
    act_specs = [plgpu.BlockSpec((gps, 2, tile_t), lambda k: (k, 0, 0))]
  else:
    w_specs = [plane_spec(i, j) for i in range(gps) for j in range(3)]
    act_specs = [plgpu.BlockSpec((gps, tile_t), lambda k: (k, 0))] * 2
  n_w, n_act = len(w_specs), len(act_specs)

  def pipeline(body, compute_context, state=None, specs=None):
    return plgpu.emit_pipeline_warp_specialized(
        body,
        grid=(sk_per if cfg.stream_k else k_steps,),
        memory_registers=40,
        in_specs=specs or [
            plgpu.BlockSpec((tile_t, gps * GROUP), lambda k: (0, k), transforms=qx_transforms),
            *w_specs,
            *act_specs,
            plgpu.BlockSpec((gps, cta_rows), lambda k: (k, 0)),
        ],
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=cfg.max_concurrent_steps,
        compute_context=compute_context,
        pipeline_state=state,
    )

  ignore = lambda *_, **__: None
  allocs = pipeline(ignore, ignore).get_allocations(qx_gmem, *[w_gmem] * n_w, *act_gmem, sw_gmem)

  @functools.partial(pl.run_scoped, allocs=allocs,
                     turns=plgpu.Barrier(num_arrivals=1, num_barriers=2) if cfg.schedule == "pingpong" else None,
                     collective_axes="wg")
  def _scope(allocs, turns):
    wg = lax.axis_index("wg")
    if cfg.schedule == "pingpong":
      @pl.when(wg == 1)
      def _first_turn():
        plgpu.barrier_arrive(turns.at[0])

    loop = -(-(n_iters * t_iters * slots) // sk_per) if cfg.stream_k else n_iters * t_iters * splits

    @plgpu.nd_loop((loop,), collective_axes="sm")
    def _tiles(info: plgpu.NDLoopInfo):
      (lin,) = info.index
      s_idx, lin = lin % splits, lin // splits
      n_idx, t_idx = lin // t_iters, lin % t_iters  # token tiles minor: a weight tile's reads share L2
      out = out_gmem.at[s_idx] if splits > 1 else out_gmem
      end_slot = (s_idx + 1) * base + jnp.minimum(s_idx + 1, extra)
      first = (end_slot - k_steps) * gps  # this split's first K-group (its predecessor's last slot if skip_first)
      skip_first = s_idx >= extra if extra else None  # a shorter split: its first slot is not its own
      groups = pl.ds(first, k_iters)
      t_slice = pl.ds(t_idx * tile_t, tile_t)
      rows = pl.ds(wg * ROWS, ROWS)

      if cfg.stream_k:  # this CTA's run of units u = lin * sk_per + k (lin: the CTA, one loop turn each)
        units = n_iters * t_iters * slots

        def unit(k):  # -> (u is a real unit, n_idx, t_idx, slot, output tile); past the end: the last unit again
          u = lin * sk_per + k
          uc = jnp.minimum(u, units - 1)
          tile = uc // slots
          return u < units, tile // t_iters, tile % t_iters, uc % slots, tile

        sk_specs = [
            plgpu.BlockSpec((tile_t, gps * GROUP), lambda k: unit(k)[2:4], transforms=qx_transforms),
            plgpu.BlockSpec((tiles16, gps, 3, *w_gmem.shape[3:]), lambda k: (unit(k)[1], unit(k)[3], 0, 0, 0)),
            plgpu.BlockSpec((gps, 2, tile_t), lambda k: (unit(k)[3], 0, unit(k)[2])),
            plgpu.BlockSpec((gps, cta_rows), lambda k: (unit(k)[3], unit(k)[1])),
        ]

      def epilogue(acc, n_idx=n_idx, t_slice=t_slice, out=out):
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        my_rows = pl.ds(n_idx * cta_rows + wg * ROWS, ROWS)
        if cfg.epilogue == "out_t":
          out_smem[wg] = acc.astype(out_gmem.dtype)
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(out_smem.at[wg], out.at[my_rows, t_slice])
        else:
          out_smem.at[wg].T[...] = acc.astype(out_gmem.dtype)  # [64, tile_t] into the [tile_t, 64] buffer
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(out_smem.at[wg], out.at[t_slice, my_rows])

      def compute_context(run):
        acc = plgpu.layout_cast(jnp.zeros((ROWS, tile_t), jnp.float32), plgpu.Layout.WGMMA)
        if cfg.stream_k:  # every tile's sum is stored inside the steps (sk_flush)
          run(acc)
        else:
          epilogue(run(acc))

      def sk_flush(k, acc):
        """stream_k: after unit k's slot, store the sum where the unit ends its output tile or the CTA's run
        (into buffer i for the tile's i-th CTA) and start again from zero."""
        real, n_idx, t_idx, slot, tile = unit(k)
        flush = real & ((slot == slots - 1) | (k == sk_per - 1))

        @pl.when(flush)
        def _store():
          epilogue(acc, n_idx, pl.ds(t_idx * tile_t, tile_t), out_gmem.at[lin - (tile * slots) // sk_per])

        return plgpu.layout_cast(acc * jnp.where(flush, 0.0, 1.0), plgpu.Layout.WGMMA)

      def step(indices, qx_smem, *refs):
        planes, act_smem, (sw_smem, carry) = refs[:n_w], refs[n_w:n_w + n_act], refs[n_w + n_act:]
        # 0 for a shorter split's borrowed first slot (its s_w zeroed: the slot's sums count nothing), else 1;
        # stream_k: 0 past the last unit
        if cfg.stream_k:
          keep = jnp.where(unit(indices[0])[0], 1.0, 0.0)
        else:
          keep = None if skip_first is None else jnp.where(skip_first & (indices[0] == 0), 0.0, 1.0)
        mine = pl.ds(wg * (ROWS // TILE16), ROWS // TILE16)  # this consumer's 4 row tiles
        wg_layout = lambda v: plgpu.layout_cast(v, plgpu.Layout.WGMMA)  # pinned: Mosaic's layout search gives up otherwise

        def scaled(part, i):  # group i's exact sums (int32 WGMMA result - 32 sum(q_x)) * s_w[n] * s_x[m]
          if cfg.probe == "no_scale":
            return wg_layout(wg_layout(part).astype(jnp.float32))
          sw = plgpu.load(sw_smem.at[i, rows], (), layout=plgpu.Layout.WGMMA.reduce(1))  # [64]
          if sw.dtype != jnp.float32:  # sw_f16: widened here (exact)
            sw = sw.astype(jnp.float32)
          if keep is not None:
            sw = sw * keep
          tokens = lambda ref: plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(0))  # [tile_t]
          if cfg.fused_tma:  # sum(q_x) as fp32: the difference of two integers below 2^24 is exact
            sx, xs = tokens(act_smem[0].at[i, 0]), tokens(act_smem[0].at[i, 1])
            exact = wg_layout(wg_layout(wg_layout(part).astype(jnp.float32))
                              - wg_layout(PALLAS6_OFFSET * lax.broadcast_in_dim(xs, (ROWS, tile_t), (1,))))
          else:
            sx, xs = tokens(act_smem[0].at[i]), tokens(act_smem[1].at[i])
            exact = wg_layout(wg_layout(part) - wg_layout(PALLAS6_OFFSET * lax.broadcast_in_dim(xs, (ROWS, tile_t), (1,))))
            exact = wg_layout(exact.astype(jnp.float32))
          scale = wg_layout(lax.broadcast_in_dim(sw, (ROWS, tile_t), (0,))) * wg_layout(
              lax.broadcast_in_dim(sx, (ROWS, tile_t), (1,)))
          return wg_layout(exact * wg_layout(scale))

        def group_sums(*acc_refs):
          for i, acc_ref in enumerate(acc_refs):  # issue every group's WGMMA as soon as its weights are unpacked
            if cfg.probe == "no_unpack":
              a = plgpu.layout_cast(jnp.full((ROWS, GROUP), 1, jnp.int8), _L8)
            else:
              a = _unpack(*[planes[0].at[mine, i, j] if cfg.fused_tma else planes[3 * i + j].at[mine]
                            for j in range(3)])  # [64, 128] int8 in registers
            b = qx_smem.T if gps == 1 else qx_smem.at[:, pl.ds(i * GROUP, GROUP)].T
            if cfg.schedule == "pingpong":
              plgpu.barrier_wait(turns.at[wg])
            plgpu.wgmma(acc_ref, a, b)
          if cfg.schedule == "pingpong":
            part = plgpu.wgmma_accumulator_load(acc_refs[0])
            plgpu.barrier_arrive(turns.at[1 - wg])
            return carry + scaled(part, 0)
          acc = carry
          for i, acc_ref in enumerate(acc_refs):  # group i scaled while the later groups' WGMMAs run
            acc = wg_layout(acc + scaled(plgpu.wgmma_accumulator_load(acc_ref, wait_n=gps - 1 - i), i))
          return acc

        if cfg.probe == "tma_only":
          return carry
        acc = pl.run_scoped(group_sums, *[plgpu.ACC((ROWS, tile_t), jnp.int32)] * gps)
        return sk_flush(indices[0], acc) if cfg.stream_k else acc

      operands = (qx_gmem.at[t_slice, pl.ds(first * GROUP, k_iters * GROUP)],
                  *[w_gmem.at[pl.ds(n_idx * tiles16, tiles16), groups]] * n_w,
                  *[ref.at[groups, :, t_slice] if cfg.fused_tma else ref.at[groups, t_slice] for ref in act_gmem],
                  sw_gmem.at[groups, pl.ds(n_idx * cta_rows, cta_rows)])
      if cfg.stream_k:
        pipeline(step, compute_context, specs=sk_specs)(qx_gmem, w_gmem, *act_gmem, sw_gmem, allocations=allocs)
        return
      if not cfg.persistent:
        pipeline(step, compute_context)(*operands, allocations=allocs)
        return
      # One ring over the CTA's tiles: the first tile's pipeline fills it (START), the later ones keep the
      # producer running ahead across tile boundaries (STEADY). None is STOP: the producer's final wait for
      # the consumers only tidies barriers, and the kernel ends with its tiles.
      @pl.when(info.local_index == 0)
      def _first():
        pipeline(step, compute_context, plgpu.PipelinePipeline.START)(*operands, allocations=allocs)

      @pl.when(info.local_index != 0)
      def _later():
        pipeline(step, compute_context, plgpu.PipelinePipeline.STEADY)(*operands, allocations=allocs)

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


@functools.partial(jax.jit, static_argnames=("out_dtype", "config"))
def gemm(qx: jax.Array, sx_t: jax.Array | None, xs_t: jax.Array | None, w_packed: jax.Array, sw_t: jax.Array, *,
         out_dtype, config: SmallConfig, act: jax.Array | None = None) -> jax.Array:
  """y [Mp, Np] (epilogue "out_t": y^T [Np, Mp]) on prepared operands: q_x int8 [Mp, Kp] phase-major,
  s_x and sum(q_x) [G, Mp] (or, fused_tma, `act`: both as one fp32 [G, 2, Mp], sx_t and xs_t None),
  "pallas6" weights [Np/16, G, 3, 16, 32], s_w fp32 [G, Np] (sw_f16: fp16) (Np a multiple of 128, Mp
  of tile_t)."""
  mp, kp = qx.shape
  groups = kp // GROUP
  np_ = sw_t.shape[1]
  if qx.dtype != jnp.int8 or kp % GROUP or mp % config.tile_t:
    raise ValueError(f"qx must be int8 [Mp, Kp] with Mp a multiple of {config.tile_t} and Kp of {GROUP}; "
                     f"got {qx.dtype} {qx.shape}")
  if w_packed.dtype != jnp.uint8 or w_packed.shape != (np_ // TILE16, groups, 3, TILE16, 32) or np_ % (2 * ROWS):
    raise ValueError(f"w_packed must be 'pallas6' uint8 [Np/16, {groups}, 3, 16, 32] with Np = {np_} a multiple "
                     f"of {2 * ROWS}; got {w_packed.dtype} {w_packed.shape}")
  sw_dtype = jnp.float16 if config.sw_f16 else jnp.float32
  if sw_t.dtype != sw_dtype:
    raise ValueError(f"sw_t must be {jnp.dtype(sw_dtype).name} (sw_f16={config.sw_f16}), got {sw_t.dtype}")
  if act is not None:
    if not config.fused_tma or sx_t is not None or xs_t is not None:
      raise ValueError("act (s_x and sum(q_x) as one [G, 2, Mp] array) is the fused TMA's operand: fused_tma=True, "
                       "and sx_t, xs_t None")
    if act.shape != (groups, 2, mp) or act.dtype != jnp.float32:
      raise ValueError(f"act must be float32 [G, 2, Mp] = {(groups, 2, mp)}; got {act.dtype} {act.shape}")
  elif sx_t is None or xs_t is None or sx_t.shape != (groups, mp) or xs_t.shape != (groups, mp):
    raise ValueError(f"sx_t {getattr(sx_t, 'shape', None)}, xs_t {getattr(xs_t, 'shape', None)} must be [G, Mp] = "
                     f"{(groups, mp)} (or act given)")
  if sw_t.shape != (groups, np_):
    raise ValueError(f"sw_t {sw_t.shape} must be [G, Np] = {(groups, np_)}")
  if groups % config.groups_per_step:
    raise ValueError(f"groups_per_step={config.groups_per_step} must divide the {groups} K-groups")
  if config.split_k > groups // config.groups_per_step:
    raise ValueError(f"split_k={config.split_k} is more than the {groups // config.groups_per_step} ring slots of "
                     f"{config.groups_per_step} K-groups: each split needs one")
  if config.persistent and not persistent_fits(config, groups):
    raise ValueError(f"persistent=True needs the ring depth {config.max_concurrent_steps} to divide a split's "
                     f"{split_slots(config, groups)} ring slots (Pallas' pipeline of pipelines)")
  out_t = config.epilogue == "out_t"
  splits = config.split_k
  smem = config.max_concurrent_steps * stage_bytes(config.tile_t, config.groups_per_step) + epilogue_bytes(
      config.tile_t, out_itemsize(config, out_dtype))
  if smem > SMEM_LIMIT:
    raise ValueError(f"{config}: the TMA ring and epilogue buffers need {smem} bytes of shared memory, more than a Hopper "
                     f"CTA's 227 KB: fewer max_concurrent_steps (max_ring gives the deepest that fits) or groups_per_step")
  if splits > 1 or config.stream_k:  # fp32 partial sums, added below
    out_dtype, final_dtype = jnp.float32, out_dtype
  if out_t is False and jnp.dtype(out_dtype).itemsize != 2:
    # Mosaic GPU (jax 0.11.2) finds no register layout for the transposed store of 4-byte values.
    raise ValueError(f"epilogue='smem_transpose' writes 2-byte outputs only; the kernel writes {jnp.dtype(out_dtype).name}"
                     + (" partial sums (split_k > 1)" if splits > 1 else "") + ": use epilogue='out_t'")
  if config.wide_tma:  # the same bytes, 256-byte TMA rows (a free reshape: each plane's 16 x 32 bytes are contiguous)
    w_packed = w_packed.reshape(*w_packed.shape[:3], 2, TILE16 * 32 // 2)
  tile = (ROWS, config.tile_t) if out_t else (config.tile_t, ROWS)
  out_swizzle = plgpu.find_swizzle(tile[1] * jnp.dtype(out_dtype).itemsize * 8)
  out_transforms = (plgpu.TilingTransform((8, out_swizzle // jnp.dtype(out_dtype).itemsize)),
                    plgpu.SwizzleTransform(out_swizzle))
  tiles = (np_ // (2 * ROWS)) * (mp // config.tile_t) * splits
  n_sms = config.num_sms or num_sms()
  if config.stream_k:
    ctas, per, buffers = stream_k_plan(tiles, groups // config.groups_per_step, n_sms)
  if act is not None:
    acts = (act,)
  else:
    acts = (jnp.stack([sx_t, xs_t.astype(jnp.float32)], axis=1),) if config.fused_tma else (sx_t, xs_t)
  shape = (np_, mp) if out_t else (mp, np_)
  if config.stream_k:
    shape = (buffers, *shape)
  elif splits > 1:
    shape = (splits, *shape)
  y = plgpu.kernel(
      functools.partial(_kernel, cfg=config, sk_per=per if config.stream_k else 0),
      out_type=jax.ShapeDtypeStruct(shape, out_dtype),
      scratch_types=dict(out_smem=plgpu.SMEM((2, *tile), out_dtype, transforms=out_transforms)),
      grid=(ctas if config.stream_k else min(n_sms, tiles),),
      grid_names=("sm",),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
  )(qx, w_packed, *acts, sw_t)
  if config.stream_k:  # buffer i holds the i-th CTA's share of each tile it reached; the rest was never written
    n_t, m_t = np_ // (2 * ROWS), mp // config.tile_t
    written = stream_k_written(n_t * m_t, groups // config.groups_per_step, per, buffers)
    y = y.reshape(buffers, n_t, 2 * ROWS, m_t, config.tile_t)
    y = jnp.where(written.reshape(buffers, n_t, 1, m_t, 1), y, 0.0)
    return jnp.sum(y, axis=0).reshape(np_, mp).astype(final_dtype)
  return jnp.sum(y, axis=0).astype(final_dtype) if splits > 1 else y


def split_slots(config: SmallConfig, groups: int) -> int:
  """Ring slots one split's pipeline runs: the slots (groups_per_step groups each) shared out over split_k,
  rounded up (the kernel's shorter splits borrow their predecessor's last slot and count it zero)."""
  return -(-(groups // config.groups_per_step) // config.split_k)


def persistent_fits(config: SmallConfig, groups: int) -> bool:
  """Whether one ring can run across a CTA's tiles (SmallConfig.persistent): Pallas' pipeline of pipelines
  needs the ring depth (at most a split's slots) to divide a split's ring slots."""
  slots = split_slots(config, groups)
  return slots % min(config.max_concurrent_steps, slots) == 0


def split_for(groups: int, tiles: int, num_sms: int) -> int:
  """The split_k that brings `tiles` CTA tiles closest to filling `num_sms` SMs without going past
  them: the largest divisor d of the K-groups with tiles * d <= num_sms (1 when tiles fill them), and
  each split keeping at least 4 groups. (The rule before ragged splits; split_ragged is the model.)"""
  best = 1
  for d in range(1, groups + 1):
    if groups % d == 0 and tiles * d <= num_sms and groups // d >= 4:
      best = d
  return best


# split_ragged's cost model of one CTA tile, fitted to the H200's kernel times at M = 16 (2026-12-02,
# results/kernels/NOTES.md "Small-M Mosaic GEMM: glue, ragged splits"): ~0.35 us a K-group streamed
# with 2 groups a slot, ~2 us a tile to fill the ring and store; fp32 partials written and summed at
# ~3 TB/s.
SLOT_US_PER_GROUP, TILE_US, PARTIAL_BYTES_PER_US = 0.35, 2.0, 3.0e6


def split_cost(split: int, groups: int, gps: int, tiles: int, num_sms: int, n: int, mp: int) -> float:
  """Modelled microseconds of the op at split_k = split: rounds of CTAs (the persistent grid takes the
  tiles num_sms at a time) x one tile's slots, plus the fp32 partials' traffic where it splits."""
  slots = -(-(groups // gps) // split)
  rounds = -(-(tiles * split) // num_sms)
  partials = 2 * split * n * mp * 4 / PARTIAL_BYTES_PER_US if split > 1 else 0.0
  return rounds * (slots * gps * SLOT_US_PER_GROUP + TILE_US) + partials


def stream_k_cost(tiles: int, groups: int, gps: int, num_sms: int, n: int, mp: int) -> float:
  """split_cost's model for SmallConfig.stream_k: one round of CTAs each streaming its run of slots and filling
  the ring for (and storing) up to two tiles, plus its fp32 partial buffers written and added."""
  _, per, buffers = stream_k_plan(tiles, groups // gps, num_sms)
  return per * gps * SLOT_US_PER_GROUP + 2 * TILE_US + 2 * buffers * n * mp * 4 / PARTIAL_BYTES_PER_US


def split_ragged(groups: int, gps: int, tiles: int, num_sms: int, n: int, mp: int, most: int = 16) -> int:
  """The split_k (any count up to `most` and the ring slots, not only divisors) that split_cost
  models fastest; the fewest splits on a tie."""
  slots = groups // gps
  return min(range(1, min(most, slots) + 1), key=lambda d: (split_cost(d, groups, gps, tiles, num_sms, n, mp), d))


def stream_k_config(m: int, groups: int) -> SmallConfig:
  """default_config(m) streamed (SmallConfig.stream_k: no split, equal runs of (tile, slot) units a CTA), fused
  TMAs with 2 groups a slot where they divide the groups and the token tile is at most 64, as split_config's."""
  cfg = default_config(m)
  gps = 2 if cfg.tile_t <= 64 and groups % 2 == 0 else 1
  cfg = dataclasses.replace(cfg, stream_k=True, epilogue="out_t", groups_per_step=gps)
  return dataclasses.replace(cfg, max_concurrent_steps=min(cfg.max_concurrent_steps, max_ring(cfg.tile_t, 4, gps)))


def split_config(m: int, n: int, groups: int, ragged: bool = False, stream_k: bool = False) -> SmallConfig:
  """default_config(m) split along K by split_for until every SM has a CTA (the out_t epilogue where
  it splits: fp32 partials), with 2 groups a ring slot where they divide a split's groups and the token
  tile is at most 64 (the fastest measured at M = 16 and 64 on the LLaMA-2-7B layers, H200 2026-12-02,
  results/kernels/h200-2026-12-02-mgpu-small-fused.md; 128-token tiles were not timed with it).

  ragged: 2 groups a slot wherever they divide the groups (token tile <= 64), and the split by
  split_ragged's cost model, any count (not only divisors of the groups).

  stream_k: stream_k_config where stream_k_cost models it faster than the split (the whole tiles' last round
  leaves many SMs idle: LLaMA-2-7B gate/up, 172 tiles, 12-17% faster at M = 16 and 64; not at 96 tiles (q/k/v),
  32 (o, down) or LLaMA-3-8B's 224 (gate/up, 3% slower end to end at batch 64): H200, 2026-12-03,
  results/kernels/NOTES.md "Stream-K")."""
  cfg = default_config(m)
  tiles = -(-n // cfg.cta_rows) * -(-m // cfg.tile_t)
  if stream_k:
    split_cfg = split_config(m, n, groups, ragged)
    sk = stream_k_config(m, groups)
    mp, np_ = -(-m // cfg.tile_t) * cfg.tile_t, -(-n // cfg.cta_rows) * cfg.cta_rows
    split_us = split_cost(split_cfg.split_k, groups, split_cfg.groups_per_step, tiles, num_sms(), np_, mp)
    return sk if stream_k_cost(tiles, groups, sk.groups_per_step, num_sms(), np_, mp) < split_us else split_cfg
  if ragged:
    gps = 2 if cfg.tile_t <= 64 and groups % 2 == 0 else 1
    mp = -(-m // cfg.tile_t) * cfg.tile_t
    split = split_ragged(groups, gps, tiles, num_sms(), -(-n // cfg.cta_rows) * cfg.cta_rows, mp)
  else:
    split = split_for(groups, tiles, num_sms())
    gps = 2 if cfg.tile_t <= 64 and (groups // split) % 2 == 0 else 1
  cfg = dataclasses.replace(cfg, split_k=split, epilogue="out_t" if split > 1 else cfg.epilogue)
  if gps > 1:
    ring = min(cfg.max_concurrent_steps, max_ring(cfg.tile_t, out_itemsize(cfg, jnp.bfloat16), gps))
    cfg = dataclasses.replace(cfg, groups_per_step=gps, max_concurrent_steps=ring)
  return cfg


@functools.partial(jax.jit, static_argnames=("a_bits", "config"))
def w6a_gemm_small(x: jax.Array, w_packed: jax.Array, w_scales: jax.Array, *, a_bits: int,
                   config: SmallConfig | None = None) -> jax.Array:
  """Quantized linear y = x W^T by the numerics contract at small M on Hopper (sm_90).

  Args:
    x: [M, K] float activations; any M (token tiles of config.tile_t), any K.
    w_packed: "pallas6" uint8 [N/16, Kp/128, 3, 16, 32] (6-bit weights only).
    w_scales: fp16 [N, Kp / 128].
    a_bits: 6 or 8.
    config: tiling; default_config(M) when None.

  Returns:
    [M, N] in x.dtype.
  """
  m, k, n = w6a_matmul.check_operands(x, w_packed, w_scales, a_bits)
  if w6a_matmul.weight_bits(w_packed) != 6:
    raise ValueError("w6a_gemm_small takes 'pallas6' weights only (W8A8 runs the large-M Mosaic kernel)")
  cfg = config or default_config(m)
  if config is None and jnp.dtype(x.dtype).itemsize != 2:  # fp32 out: the transposed store takes 2 bytes only
    cfg = dataclasses.replace(cfg, epilogue="out_t")
  if cfg.quant_t:  # s_x and sum(q_x) written as the fused TMA reads them
    qx, act = w6a_matmul.quantize_activations_t(x, a_bits=a_bits, block_m=cfg.tile_t)
    return _gemm_padded(qx, None, None, act, w_packed, w_scales, m=m, out_dtype=x.dtype, config=cfg)
  qcfg = w6a_matmul.TileConfig(block_m=cfg.tile_t, join_phases=False)
  qx, sx, xs = w6a_matmul.quantize_activations(x, a_bits=a_bits, config=qcfg)
  return _gemm_padded(qx, sx.T, xs.T, None, w_packed, w_scales, m=m, out_dtype=x.dtype, config=cfg)


@functools.partial(jax.jit, static_argnames=("m", "out_dtype", "config"))
def gemm_quantized(qx: jax.Array, act: jax.Array, w_packed: jax.Array, w_scales: jax.Array, *, m: int,
                   out_dtype, config: SmallConfig) -> jax.Array:
  """w6a_gemm_small on activations another kernel already quantized (config.quant_t's input: phase-major
  q_x int8 [Mp, Kp] and act fp32 [G, 2, Mp], as w6a_matmul.quantize_activations_t or
  norm_quantize(act_t=True) write them for block_m = config.tile_t) -> [M, N] in out_dtype."""
  if not config.quant_t:
    raise ValueError("gemm_quantized takes the fused TMA's [G, 2, Mp] operand: it needs config.quant_t")
  groups = w_packed.shape[1]
  mp = -(-m // config.tile_t) * config.tile_t
  if qx.shape != (mp, groups * GROUP) or qx.dtype != jnp.int8 or act.shape != (groups, 2, mp):
    raise ValueError(f"quantized activations for M={m} at tile_t={config.tile_t} must be int8 q_x {(mp, groups * GROUP)} "
                     f"and act {(groups, 2, mp)}, got {qx.dtype} {qx.shape} and {act.shape}")
  return _gemm_padded(qx, None, None, act, w_packed, w_scales, m=m, out_dtype=out_dtype, config=config)


def _gemm_padded(qx, sx_t, xs_t, act, w_packed, w_scales, *, m: int, out_dtype, config: SmallConfig) -> jax.Array:
  """gemm() on whole CTA tiles of weight rows (zero row tiles added where N needs them), sliced back."""
  n = w_packed.shape[0] * TILE16
  np_ = -(-n // (2 * ROWS)) * 2 * ROWS
  extra = np_ // TILE16 - w_packed.shape[0]  # zero row tiles up to whole CTA tiles (none at LLaMA widths)
  w = jnp.pad(w_packed, ((0, extra), (0, 0), (0, 0), (0, 0), (0, 0))) if extra else w_packed
  sw_t = jnp.pad(w_scales.astype(jnp.float16 if config.sw_f16 else jnp.float32), ((0, np_ - n), (0, 0))).T
  out = gemm(qx, sx_t, xs_t, w, sw_t, out_dtype=out_dtype, config=config, act=act)
  return out[:n, :m].T if config.epilogue == "out_t" else out[:m, :n]
