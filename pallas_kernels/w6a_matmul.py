"""W6A6 / W6A8 quantized linear layer: Pallas kernels with the Triton lowering (NVIDIA GPUs).

    y = w6a_matmul(x, w_packed, w_scales, a_bits=6)     # x [M, K] float -> y [M, N] in x.dtype

computes the numerics contract (flexq_jax/DESIGN.md; flexq_jax.numerics.reference_matmul) with
6-bit weights stored in the "pallas6" layout (flexq_jax.formats: u = q + 32 split 4 + 2 bits in
three byte planes, contiguous tiles of 16 rows x 1 group: uint8 [N/16, Kp/128, 3, 16, 32]) and fp16
group scales [N, Kp / 128]. N must be a multiple of 16 (the layout's tile); any M, any K.

Two kernels, both timed as the op:
  1. _quantize_kernel: x [M, K] -> q_x int8 [Mp, Kp], s_x fp32 [Mp, G], sum(q_x) int32 [Mp, G]
     (per token and 128-group, dynamic, symmetric; rows padded to the GEMM's block_m with zeros).
  2. _gemm_kernel: for every 128-group, the four phases of the packed weights (p: k = 4t + p)
     are unpacked (byte-lane operations on words of four weights) and give, through int8
     tensor-core dots, the exact int32 group sum of q_x * u; subtracting 32 * sum(q_x) turns it
     into sum(q_x * q_w), and the group's scales s_x[m] * s_w[n] are applied to it in fp32.
     Two ways to meet the phases (TileConfig.join_phases):
       join: interleave the four [bn, 32] phases back to K order in registers and make one
             K = 128 dot (one accumulator: what large tiles need; the joins cost byte shuffles);
       split: four K = 32 dots, one per phase, against q_x that the quantization kernel wrote
             phase-major within each group (no shuffles: what decode needs).
     Partial sums over K splits (split_k > 1: decode, where N alone does not fill the SMs) are
     added by XLA after the kernel.
  2'. _gemv_kernel (TileConfig.gemv; the default at M <= 2) replaces the tensor-core GEMM in
     decode: each thread unpacks its weight words and multiplies them with dp4a (four int8
     products a CUDA-core instruction, exact int32), no shared memory and no barrier in the loop;
     at M = 1 the tensor-core kernel wastes 15/16 of every dot and stalls on its cp.async ring.

Regimes (default_config, chosen from H200 sweeps; results/kernels/NOTES.md): decode M <= 2 (the
gemv kernel: dp4a on CUDA cores, no shared memory, ~8 programs per SM by split-K), decode M <= 16
(64-wide N tiles and split-K give ~4 programs per SM, mma.sync on split phases),
middle M <= 256, prefill (128 x 128 tiles, 8 warps, joined phases for one wgmma chain per group,
grouped program order so weight tiles are reused from L2).

Unpacking: with unpack_asm (GPU only), one PTX sequence turns four packed bytes held in a
32-bit register into four int8 weights (shift, mask, or on the whole word); otherwise, and always
in interpret mode, the same arithmetic is written as jnp byte operations.

8-bit weights (W8A8 / W8A6, a baseline that differs from W6 only in the weight width): w_packed may
instead be the "pallas8" layout (int8 [N/16, Kp/128, 16, 128], signed q_w, no offset, each group in
the phase-major order of q_x); the weight bits follow from the array (weight_bits). The same two
kernels run with no unpacking and no sum(q_x) correction: the tensor-core kernel makes one K = 128
dot per group of phase-major q_x (always phase-major for w8; join_phases does not apply) against the
[block_n, 128] int8 tile, and the gemv kernel feeds matching 4-byte words of weights and q_x to
dp4a.s32.s32 (jnp int32 products in interpret mode). default_config(..., w_bits=8) halves the gemv's
groups per step to keep its registers at most those of w6.

This module imports only jax, numpy and pallas_kernels.core (the kernel rule of flexq_jax/DESIGN.md,
"Where code lives"); its reference is flexq_jax.numerics.reference_matmul on the unpacked layout.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import core
from pallas_kernels.core import GROUP, TILE_ROWS

PLANE = core.PALLAS6_PLANE_BYTES  # 32 bytes of one "pallas6" plane per row and group
PLANES = core.PALLAS6_PLANES
OFFSET = core.PALLAS6_OFFSET  # stored u = q + 32
W_BITS = (6, 8)  # "pallas6" (uint8 [N/16, G, 3, 16, 32]) or "pallas8" (int8 [N/16, G, 16, 128])
A_BITS = (6, 8)

# PTX for one phase of a group, four weights per 32-bit register: {lo} = four lo bytes (phases
# 0|1 or 2|3 as nibbles), {hi} = four hi bytes (four 2-bit fields); {u} = four u bytes, built in
# the scratch registers a, b. Every step keeps to its byte lane (the masks cut what a shift
# carries across lanes).
_PHASE_OPS = (
    "and.b32 a, {lo}, 0x0F0F0F0F; shl.b32 b, {hi}, 4; and.b32 b, b, 0x30303030; or.b32 {u}, a, b;",
    "shr.b32 a, {lo}, 4; and.b32 a, a, 0x0F0F0F0F; shl.b32 b, {hi}, 2; and.b32 b, b, 0x30303030; or.b32 {u}, a, b;",
    "and.b32 a, {lo}, 0x0F0F0F0F; and.b32 b, {hi}, 0x30303030; or.b32 {u}, a, b;",
    "shr.b32 a, {lo}, 4; and.b32 a, a, 0x0F0F0F0F; shr.b32 b, {hi}, 2; and.b32 b, b, 0x30303030; or.b32 {u}, a, b;",
)
_UNPACK_PTX = {p: "{.reg .b32 a, b; " + ops.format(lo="$1", hi="$2", u="$0") + "}" for p, ops in enumerate(_PHASE_OPS)}


def _unpack_dp4a_ptx(lo01: str, lo23: str, hi: str, xs: list[str]) -> str:
  """PTX of the gemv kernel's dot: the four u words of one row and group (t .. t+3) unpacked as in
  _UNPACK_PTX and multiplied by dp4a with q_x of the same t for phases 0..3 (signed bytes `xs`).
  $0 = the exact sum of the 16 products; $1..$3 = 0 (the asm returns one int32 per input byte; the
  caller sums them, ptxas drops the zero adds)."""
  body = []
  for p, ops in enumerate(_PHASE_OPS):
    body.append(ops.format(lo=lo01 if p < 2 else lo23, hi=hi, u="u"))
    body.append(f"dp4a.u32.s32 {'$0' if p == 3 else 't'}, u, {xs[p]}, {'0' if p == 0 else 't'};")
  return "{.reg .b32 a, b, u; .reg .s32 t; " + " ".join(body) + " mov.b32 $1, 0; mov.b32 $2, 0; mov.b32 $3, 0;}"


# Planes as uint8 [..., 32] (pack=4: one register each): $4, $5, $6 = lo01, lo23, hi; $7..$10 = q_x.
_UNPACK_DP4A_PTX = _unpack_dp4a_ptx("$4", "$5", "$6", ["$7", "$8", "$9", "$10"])

# Software pipelining in the gemv kernel carries the next step's weights through the loop. Carried
# as int8 tensors, LLVM splits them into bytes and repacks them for the asm (~9 PRMT a dp4a), so
# they are carried as 32-bit words instead: _WORD_PTX puts the four bytes of a register into the
# first of four int32 elements (the other three are 0 and fold away), and _WORDS_DP4A_PTX reads
# those words (four registers an operand: $4, $8, $12) and q_x in $16..$19.
_WORD_PTX = "mov.b32 $0, $4; mov.b32 $1, 0; mov.b32 $2, 0; mov.b32 $3, 0;"
_WORDS_DP4A_PTX = _unpack_dp4a_ptx("$4", "$8", "$12", ["$16", "$17", "$18", "$19"])

# The 8-bit ("pallas8") gemv dot: four signed weight bytes and the four q_x bytes of the same
# positions (both phase-major) in one dp4a each, pack=4: $4 = weights (int8, one register), or in
# the words variant $4..$7 (the word from _as_words in $4); q_x in the next register. $0 = the exact
# sum of the four products, $1..$3 = 0 (summed by the caller; the zero adds fold away).
_DP4A_TAIL = " mov.b32 $1, 0; mov.b32 $2, 0; mov.b32 $3, 0;"
_DP4A_S8_PTX = "dp4a.s32.s32 $0, $4, $5, 0;" + _DP4A_TAIL
_WORDS_DP4A_S8_PTX = "dp4a.s32.s32 $0, $4, $8, 0;" + _DP4A_TAIL


@dataclasses.dataclass(frozen=True, kw_only=True)
class TileConfig:
  """Tiling of the GEMM kernel (hashable: a static argument of the jitted wrapper)."""

  block_m: int = 16  # rows of x per program (>= 16: the tensor-core dot's minimum)
  block_n: int = 128  # output channels per program
  split_k: int = 1  # programs sharing one output tile along K (partial sums added after)
  group_m: int = 8  # programs along M that run next to each other (L2 reuse of weight tiles)
  num_warps: int = 4
  num_stages: int = 3
  unpack_asm: bool = True  # PTX word unpacking on GPU (interpret mode always uses jnp ops)
  join_phases: bool = False  # one K=128 dot on re-interleaved weights, else four K=32 dots
  quant_block_m: int = 16  # rows per program of the activation-quantization kernel
  gemv: bool = False  # decode kernel: CUDA-core dp4a dots, activation quantization fused (M <= 16)
  block_kg: int = 4  # gemv: K-groups per loop step (the step's loads are issued together)
  prefetch: bool = False  # gemv: issue the next step's loads before this step's dots (words carried)

  def __post_init__(self):
    for name in ("block_m", "block_n", "quant_block_m"):
      v = getattr(self, name)
      if v < 16 or v & (v - 1):
        raise ValueError(f"{name}={v} must be a power of two >= 16")
    if self.block_kg < 1:
      raise ValueError(f"block_kg={self.block_kg} must be >= 1")
    if self.split_k < 1 or self.group_m < 1:
      raise ValueError(f"split_k={self.split_k} and group_m={self.group_m} must be >= 1")


def default_config(m: int, n: int, k: int, num_sms: int = 132, *, w_bits: int = 6) -> TileConfig:
  """The tiling the wrapper picks for an [M, K] x [K, N] product (K may be unpadded).

  w_bits = 8 ("pallas8") changes the decode gemv only: a group is 128 bytes a row instead of 96,
  so a step takes 2 groups instead of 4 (256 loaded bytes a thread against w6's 384, kept at or
  below w6 because those bytes are live registers until their dp4a; 3 groups would match exactly
  but leave a masked, yet loaded, slot in every 8-group K split). The tensor-core tilings are
  shared (a w8 group tile is the [bn, 128] int8 that w6 unpacks to); join_phases is off for w8.
  """
  if w_bits not in W_BITS:
    raise ValueError(f"{w_bits=} must be one of {W_BITS}")
  groups = core.padded_k(k) // GROUP
  if m <= 2:  # decode GEMV: ~1024 programs (8 an SM) of 64 rows x a K range, 4 (w8: 2) groups a step
    kg = 4 if w_bits == 6 else 2
    tiles = pl.cdiv(n, 64)
    split_k = 1 << max(0, (pl.cdiv(1024, tiles) - 1).bit_length())  # next power of two
    return TileConfig(gemv=True, block_n=64, num_warps=2, block_kg=kg, num_stages=1,
                      split_k=max(1, min(split_k, groups // kg)))
  if m <= 16:  # decode: stream the weights with every SM; split K until ~4 programs per SM
    block_n = 64
    tiles = pl.cdiv(n, block_n)
    split_k = max(1, min(groups // 4, pl.cdiv(4 * num_sms, tiles)))
    return TileConfig(block_m=16, block_n=block_n, split_k=split_k, num_warps=4, num_stages=4)
  if m <= 256:
    block_m = 32 if m <= 32 else 64
    tiles = pl.cdiv(n, 128) * pl.cdiv(m, block_m)
    split_k = max(1, min(groups // 4, pl.cdiv(2 * num_sms, tiles)))
    return TileConfig(block_m=block_m, block_n=128, split_k=split_k, num_warps=4, num_stages=3)
  return TileConfig(block_m=128, block_n=128, split_k=1, num_warps=8, num_stages=3, join_phases=w_bits == 6)


def _quantize_kernel(x_ref,  # [M, K] float (whole array; rows >= M and columns >= K read as 0)
                     q_ref,  # [Mp, Kp] int8
                     *scale_refs,  # s_x [Mp, G] f32 and sum(q_x) [Mp, G] int32; or with act_t, act [G, 2, Mp] f32
                     m: int, k: int, block_m: int, qmax: int, phase_major: bool, act_t: bool = False,
                     swiglu: bool = False):
  """One row block's K-group quantized (_quantize_program) and stored (_store_group)."""
  m0, g, q, s = _quantize_program(x_ref, m=m, k=k, block_m=block_m, qmax=qmax, swiglu=swiglu)
  _store_group(q_ref, scale_refs, pl.ds(m0, block_m), g, q, s, phase_major=phase_major, act_t=act_t)


def _store_group(q_ref, scale_refs, rows, g: int, q: jax.Array, s: jax.Array, *, phase_major: bool, act_t: bool):
  """q_x [rows, 128] and s_x [rows] of K-group g written in the layout of the GEMM that reads them: s_x and
  sum(q_x) as [Mp, G] arrays, or (act_t) transposed and stacked as the small-M Mosaic GEMM's fused TMA reads
  them, one fp32 [G, 2, Mp] (pallas_kernels/w6a_gemm_mgpu_small.py, SmallConfig.fused_tma; sum(q_x) is exact in
  fp32: |sum| <= 128 * 127); q_x phase-major (column 32p + t <- k = 4t + p) or in K order."""
  if act_t:
    [act_ref] = scale_refs
    act_ref[g, 0, rows] = s
    act_ref[g, 1, rows] = jnp.sum(q, axis=1).astype(jnp.int32).astype(jnp.float32)
  else:
    s_ref, sum_ref = scale_refs
    s_ref[rows, g] = s
    sum_ref[rows, g] = jnp.sum(q, axis=1).astype(jnp.int32)
  if phase_major:
    q = q.reshape(q.shape[0], PLANE, 4).transpose(0, 2, 1).reshape(q.shape[0], GROUP)
  q_ref[rows, pl.ds(g * GROUP, GROUP)] = q.astype(jnp.int8)


def _swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """models.llama's MLP activation jax.nn.silu(gate) * up with the roundings XLA gives it as written: the
  sigmoid expanded to 1 / (1 + exp(-x)) and every step rounded to the activations' dtype (XLA's CPU
  program, so interpret mode matches the unfused model bit for bit). On a GPU, XLA's excess precision may
  skip some of those roundings in the unfused program: q_x can then differ by a step in a few elements
  (tests/pallas_kernels/test_w6a_matmul.py bounds it)."""
  dt, f32 = gate.dtype, jnp.float32
  r = lambda v: v.astype(dt).astype(f32)  # one rounding to the activations' dtype (each op in fp32: Triton has no
  #                                         bf16 division)
  g = gate.astype(f32)
  sig = r(1.0 / r(r(jnp.exp(-g)) + 1.0))
  return (r(g * sig) * up.astype(f32)).astype(dt)


def _quantize_program(x_ref, *, m: int, k: int, block_m: int, qmax: int, swiglu: bool = False):
  """(m0, g, q, s) of this program's row block and K-group: x masked to its M rows and K columns, then
  the contract's q_x [block_m, 128] and s_x [block_m] by the one definition (pallas_kernels/core.py)
  the reference calls too. swiglu: x_ref is [M, 2K], the gate then the up projection, and x is
  silu(gate) * up (_swiglu)."""
  pid_m, g = pl.program_id(0), pl.program_id(1)
  m0 = pid_m * block_m
  mask = ((m0 + jnp.arange(block_m)) < m)[:, None] & ((g * GROUP + jnp.arange(GROUP)) < k)[None, :]
  x = plgpu.load(x_ref.at[pl.ds(m0, block_m), pl.ds(g * GROUP, GROUP)], mask=mask, other=0)
  if swiglu:
    up = plgpu.load(x_ref.at[pl.ds(m0, block_m), pl.ds(k + g * GROUP, GROUP)], mask=mask, other=0)
    x = _swiglu(x, up)
  q, s = core.quantize_groups(x.astype(jnp.float32), qmax)
  return m0, g, q, s


def _unpack_phase(lo: jax.Array, hi: jax.Array, phase: int, use_asm: bool) -> jax.Array:
  """uint8 [bn, 32] lo / hi plane tiles -> int8 [bn, 32] u = q + 32 at k = 4t + phase."""
  if use_asm:
    [u] = plgpu.elementwise_inline_asm(_UNPACK_PTX[phase], args=[lo, hi], constraints="=r,r,r", pack=4,
                                       result_shape_dtypes=[jax.ShapeDtypeStruct(lo.shape, jnp.int8)])
    return u
  lo4 = (lo >> 4 if phase % 2 else lo) & 0xF
  hi2 = (hi >> (2 * phase)) & 0x3
  return (lo4 | (hi2 << 4)).astype(jnp.int8)


def _interleave(a: jax.Array, b: jax.Array) -> jax.Array:
  """[r, c], [r, c] -> [r, 2c] with a in the even columns, b in the odd ones (a register join)."""
  return jnp.stack([a, b], axis=-1).reshape(a.shape[0], 2 * a.shape[1])


def _unpack_group(lo01: jax.Array, lo23: jax.Array, hi: jax.Array, use_asm: bool) -> jax.Array:
  """The three uint8 [bn, 32] planes of a group -> int8 [bn, 128] u = q + 32 in K order."""
  u = [_unpack_phase(lo01 if p < 2 else lo23, hi, p, use_asm) for p in range(4)]
  # interleave(u0, u2)[2t + i] = u_2i[t]; interleaving that with (u1, u3) puts u_p[t] at 4t + p.
  return _interleave(_interleave(u[0], u[2]), _interleave(u[1], u[3]))


def _gemm_kernel(qx_ref,  # [Mp, Kp] int8
                 sx_ref,  # [Mp, G] f32
                 xsum_ref,  # [Mp, G] int32
                 w_ref,  # [N/16, G, 3, 16, 32] uint8 ("pallas6") or [N/16, G, 16, 128] int8 ("pallas8")
                 sw_ref,  # [N, G] f16
                 o_ref,  # [M, N] out dtype, or [split_k, M, N] f32 partial sums
                 *, m: int, n: int, groups: int, cfg: TileConfig, use_asm: bool, w_bits: int = 6):
  bm, bn = cfg.block_m, cfg.block_n
  w8 = w_bits == 8
  num_m, num_n = pl.cdiv(m, bm), pl.cdiv(n, bn)
  # Grouped order: cfg.group_m consecutive programs walk down M over the same weight columns.
  pid, pid_k = pl.program_id(0), pl.program_id(1)
  span = cfg.group_m * num_n
  first_m = (pid // span) * cfg.group_m
  rows_here = jnp.minimum(num_m - first_m, cfg.group_m)
  pid_m = first_m + (pid % span) % rows_here
  pid_n = (pid % span) // rows_here
  m0, n0 = pid_m * bm, pid_n * bn
  col_ok = (n0 + jnp.arange(bn)) < n
  groups_per_split = pl.cdiv(groups, cfg.split_k)
  g_begin = pid_k * groups_per_split
  g_end = jnp.minimum(g_begin + groups_per_split, groups)

  tiles = bn // TILE_ROWS
  tile_ok = (pid_n * tiles + jnp.arange(tiles) < n // TILE_ROWS)[:, None, None]

  def load_w(g, plane):  # -> [bn, 32] uint8
    ref = w_ref.at[pl.ds(pid_n * tiles, tiles), g, jnp.int32(plane), :, :]  # [bn/16, 16, 32]: 512-byte runs
    w = plgpu.load(ref, mask=tile_ok, other=0) if n % bn else ref[...]
    return w.reshape(bn, PLANE)

  def group_dot(g):  # -> [bm, bn] int32: sum over group g of q_x * u (w8: q_x * q_w), exact
    if w8:  # one K = 128 dot of phase-major q_x against the phase-major int8 tile
      ref = w_ref.at[pl.ds(pid_n * tiles, tiles), g, :, :]  # [bn/16, 16, 128]: 2048-byte runs
      w = (plgpu.load(ref, mask=tile_ok, other=0) if n % bn else ref[...]).reshape(bn, GROUP)
      xq = qx_ref[pl.ds(m0, bm), pl.ds(g * GROUP, GROUP)]  # [bm, 128] int8, phase-major
      return jax.lax.dot_general(xq, w, _NT, preferred_element_type=jnp.int32)
    lo01, lo23, hi = (load_w(g, plane) for plane in range(PLANES))  # [bn, 32] uint8 each
    if cfg.join_phases:
      u = _unpack_group(lo01, lo23, hi, use_asm)  # [bn, 128] int8 in K order
      xq = qx_ref[pl.ds(m0, bm), pl.ds(g * GROUP, GROUP)]  # [bm, 128] int8
      return jax.lax.dot_general(xq, u, _NT, preferred_element_type=jnp.int32)
    dot = jnp.zeros((bm, bn), jnp.int32)
    for p in range(4):
      u = _unpack_phase(lo01 if p < 2 else lo23, hi, p, use_asm)  # [bn, 32] int8: k = 4t + p
      xq = qx_ref[pl.ds(m0, bm), pl.ds(g * GROUP + p * PLANE, PLANE)]  # [bm, 32] int8, phase-major q_x
      dot += jax.lax.dot_general(xq, u, _NT, preferred_element_type=jnp.int32)
    return dot

  def group_scales(g):  # -> ([bm] int32 sum(q_x) (w8: None, no offset), [bm] f32 s_x, [bn] f32 s_w)
    sw_tile = sw_ref.at[pl.ds(n0, bn), g]
    sw = plgpu.load(sw_tile, mask=col_ok, other=0) if n % bn else sw_tile[...]
    xsum = None if w8 else xsum_ref[pl.ds(m0, bm), g]
    return xsum, sx_ref[pl.ds(m0, bm), g], sw.astype(jnp.float32)

  def apply(acc, dot, scales):
    xsum, sx, sw = scales
    exact = dot if w8 else dot - OFFSET * xsum[:, None]  # sum_k q_x q_w, exact int32
    return acc + exact.astype(jnp.float32) * (sx[:, None] * sw[None, :])

  # Each step loads the next group's scales ahead of use: their latency hides behind this
  # group's loads, unpacking and dots. (Issuing the next group's dot before scaling this one's
  # does not overlap them: Triton waits for a wgmma right after it unless it chains an
  # accumulator, and group sums must stay apart until scaled.)
  last = jnp.maximum(g_end - 1, 0)

  def body(g, carry):
    acc, scales = carry
    scales_next = group_scales(jnp.minimum(g + 1, last))
    return apply(acc, group_dot(g), scales), scales_next

  init = (jnp.zeros((bm, bn), jnp.float32), group_scales(jnp.minimum(g_begin, last)))
  acc, _ = jax.lax.fori_loop(g_begin, g_end, body, init)
  mask = ((m0 + jnp.arange(bm)) < m)[:, None] & col_ok[None, :]
  if cfg.split_k == 1:
    plgpu.store(o_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)], acc.astype(o_ref.dtype), mask=mask)
  else:
    plgpu.store(o_ref.at[pid_k, pl.ds(m0, bm), pl.ds(n0, bn)], acc, mask=mask)


def _as_words(plane: jax.Array) -> jax.Array:
  """uint8 [..., 32] -> int32 [..., 32]: each 4-byte register's word in its first element, 0 after."""
  [w] = plgpu.elementwise_inline_asm(_WORD_PTX, args=[plane], constraints="=r,=r,=r,=r,r", pack=4,
                                     result_shape_dtypes=[jax.ShapeDtypeStruct(plane.shape, jnp.int32)])
  return w


def _group_dots(lo01: jax.Array, lo23: jax.Array, hi: jax.Array, xq: list, use_asm: bool) -> jax.Array:
  """Row sums over a group of u * q_x: planes uint8 [..., 32], xq: 4 phases of int8 [..., 32] (broadcast)."""
  if use_asm:
    shape = lo01.shape
    words = lo01.dtype == jnp.int32  # planes from _as_words
    [d] = plgpu.elementwise_inline_asm(
        _WORDS_DP4A_PTX if words else _UNPACK_DP4A_PTX, args=[lo01, lo23, hi, *(jnp.broadcast_to(x, shape) for x in xq)],
        constraints="=r,=r,=r,=r," + ",".join("r" * (16 if words else 7)), pack=4,
        result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.int32)])
  else:
    u = [_unpack_phase(lo01 if p < 2 else lo23, hi, p, use_asm=False) for p in range(4)]
    d = sum(up.astype(jnp.int32) * xp.astype(jnp.int32) for up, xp in zip(u, xq))
  return jnp.sum(d, axis=-1)


def _group_dots8(w: jax.Array, xq: jax.Array, use_asm: bool) -> jax.Array:
  """Row sums over a group of q_w * q_x, "pallas8": w int8 [..., 128] (or its _as_words words),
  xq int8 [..., 128] (broadcast), both phase-major; dp4a on matching 4-byte words, exact int32."""
  if use_asm:
    shape = w.shape
    words = w.dtype == jnp.int32
    [d] = plgpu.elementwise_inline_asm(
        _WORDS_DP4A_S8_PTX if words else _DP4A_S8_PTX, args=[w, jnp.broadcast_to(xq, shape)],
        constraints="=r,=r,=r,=r," + ",".join("r" * (5 if words else 2)), pack=4,
        result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.int32)])
  else:
    d = w.astype(jnp.int32) * xq.astype(jnp.int32)
  return jnp.sum(d, axis=-1)


def _gemv_kernel(qx_ref,  # [Mp, Kp] int8, phase-major within each group
                 sx_ref,  # [Mp, G] f32
                 xsum_ref,  # [Mp, G] int32
                 w_ref,  # [N/16, G, 3, 16, 32] uint8 ("pallas6") or [N/16, G, 16, 128] int8 ("pallas8")
                 sw_ref,  # [N, G] f16
                 o_ref,  # [M, N] out dtype, or [split_k, M, N] f32 partial sums
                 *, m: int, n: int, groups: int, cfg: TileConfig, use_asm: bool, w_bits: int = 6):
  """Decode GEMV: every program takes block_n rows and a K range, block_kg groups a step.

  Per step: the three weight planes of block_kg groups are loaded together; each row's group sum
  of u * q_x comes from dp4a (four byte products a CUDA-core instruction, exact int32), then
  sum q_x q_w = that - 32 sum q_x, scaled by s_x s_w in fp32 once per group. No shared memory, no
  barriers in the loop. With "pallas8" weights a group is one int8 [tiles, 16, 128] load, whose
  signed bytes meet the phase-major q_x in dp4a.s32.s32 directly (no unpacking, no offset).
  """
  w8 = w_bits == 8
  nplanes = 1 if w8 else PLANES
  tiles, kg = cfg.block_n // TILE_ROWS, cfg.block_kg
  pid_n, pid_k = pl.program_id(0), pl.program_id(1)
  t0 = pid_n * tiles
  n0 = t0 * TILE_ROWS
  gps = pl.cdiv(groups, cfg.split_k)
  steps = pl.cdiv(gps, kg)
  g_begin = pid_k * gps
  g_end = jnp.minimum(g_begin + gps, groups)
  ragged_k = gps % kg != 0 or groups % gps != 0  # a step can run past this program's groups
  mask_n = n % cfg.block_n != 0
  tile_ok = (t0 + jnp.arange(tiles) < n // TILE_ROWS)[:, None, None] if mask_n else None
  col_ok = (n0 + jnp.arange(cfg.block_n)) < n if mask_n else None

  def group(step, j):  # the j-th group of a step (clamped in range: past g_end it counts zero)
    g = g_begin + step * kg + j
    return jnp.minimum(g, groups - 1) if ragged_k else g

  def load_w(step):  # -> kg x 3 planes, uint8 [tiles, 16, 32] (w8: kg x 1 tile, int8 [tiles, 16, 128])
    out = []
    for j in range(kg):
      for plane in range(nplanes):
        if w8:
          ref = w_ref.at[pl.ds(t0, tiles), group(step, j), :, :]
        else:
          ref = w_ref.at[pl.ds(t0, tiles), group(step, j), jnp.int32(plane), :, :]
        w = ref[...] if tile_ok is None else plgpu.load(ref, mask=tile_ok, other=0)
        out.append(_as_words(w) if cfg.prefetch and use_asm else w)
    return tuple(out)

  def compute(step, w, accs):
    accs = list(accs)
    for j in range(kg):
      g = group(step, j)
      planes = w[nplanes * j: nplanes * (j + 1)]
      sw_ref_g = sw_ref.at[pl.ds(n0, cfg.block_n), g]
      sw = (sw_ref_g[...] if col_ok is None else plgpu.load(sw_ref_g, mask=col_ok, other=0)).astype(jnp.float32)
      sw = sw.reshape(tiles, TILE_ROWS)
      if ragged_k:
        sw = jnp.where(g_begin + step * kg + j < g_end, sw, 0.0)
      for row in range(m):
        r = jnp.int32(row)
        if w8:
          xq = qx_ref[r, pl.ds(g * GROUP, GROUP)][None, None, :]  # int8 [1, 1, 128], phase-major
          exact = _group_dots8(planes[0], xq, use_asm)  # [tiles, 16] int32: sum q_x q_w
        else:
          xq = [qx_ref[r, pl.ds(g * GROUP + p * PLANE, PLANE)][None, None, :] for p in range(4)]  # int8 [1, 1, 32]
          dots = _group_dots(*planes, xq, use_asm)  # [tiles, 16] int32
          exact = dots - OFFSET * xsum_ref[r, g]
        accs[row] = accs[row] + exact.astype(jnp.float32) * (sx_ref[r, g] * sw)
    return tuple(accs)

  # Each step's loads are issued together at its top (block_kg groups x 3 planes: 16-byte loads when
  # block_n = 16 x num_warps); latency is hidden by the many programs an SM holds (no cp.async ring:
  # Triton pipelines only loads that feed a dot). cfg.prefetch pipelines by hand instead: the next
  # step's planes ride the loop as 32-bit words (_as_words), at the cost of registers.
  zeros = tuple(jnp.zeros((tiles, TILE_ROWS), jnp.float32) for _ in range(m))
  if cfg.prefetch:
    def body(step, carry):
      w, accs = carry
      w_next = load_w(jnp.minimum(step + 1, steps - 1))
      return w_next, compute(step, w, accs)
    _, accs = jax.lax.fori_loop(0, steps, body, (load_w(0), zeros))
  else:
    accs = jax.lax.fori_loop(0, steps, lambda step, a: compute(step, load_w(step), a), zeros)

  cols = pl.ds(n0, cfg.block_n)
  for row in range(m):
    y = accs[row].reshape(cfg.block_n)
    if cfg.split_k == 1:
      dst, y = o_ref.at[jnp.int32(row), cols], y.astype(o_ref.dtype)
    else:
      dst = o_ref.at[pid_k, jnp.int32(row), cols]
    if col_ok is None:
      dst[...] = y
    else:
      plgpu.store(dst, y, mask=col_ok)


_NT = (((1,), (1,)), ((), ()))  # dot_general: contract the last axes of [bm, K] and [bn, K]


def weight_bits(w_packed: jax.Array) -> int:
  """6 for a "pallas6" array (uint8 [N/16, G, 3, 16, 32]), 8 for "pallas8" (int8 [N/16, G, 16, 128])."""
  if w_packed.ndim == 5 and w_packed.dtype == jnp.uint8 and w_packed.shape[2:] == (PLANES, TILE_ROWS, PLANE):
    return 6
  if w_packed.ndim == 4 and w_packed.dtype == jnp.int8 and w_packed.shape[2:] == (TILE_ROWS, GROUP):
    return 8
  raise ValueError(f"w_packed must be 'pallas6' uint8 [N/16, groups, 3, 16, 32] or 'pallas8' int8 "
                   f"[N/16, groups, 16, 128], got {w_packed.dtype} {w_packed.shape}")


def check_operands(x: jax.Array, w_packed: jax.Array, w_scales: jax.Array, a_bits: int) -> tuple[int, int, int]:
  if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x must be a float [M, K] array, got {x.dtype} {x.shape}")
  weight_bits(w_packed)
  if a_bits not in A_BITS:
    raise ValueError(f"{a_bits=} must be one of {A_BITS}")
  m, k = x.shape
  n = w_packed.shape[0] * TILE_ROWS
  groups = w_packed.shape[1]
  if core.padded_k(k) != groups * GROUP:
    raise ValueError(f"x has {k=}, padded to {core.padded_k(k)}, but the weights hold {groups * GROUP}")
  if w_scales.shape != (n, groups):
    raise ValueError(f"w_scales must be [N, Kp / 128] = {(n, groups)}, got {w_scales.shape}")
  return m, k, n


def _swiglu_k(x: jax.Array, swiglu: bool) -> int:
  """The K the quantizer's output has: x's columns, or half of them with swiglu (gate, then up)."""
  if not swiglu:
    return x.shape[1]
  if x.shape[1] % 2:
    raise ValueError(f"swiglu=True takes the gate and up projections side by side, [M, 2K]; got {x.shape[1]} "
                     "columns, an odd count")
  return x.shape[1] // 2


@functools.partial(jax.jit, static_argnames=("a_bits", "config", "swiglu", "interpret"))
def quantize_activations(x: jax.Array, *, a_bits: int, config: TileConfig | None = None, swiglu: bool = False,
                         interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-token, per-128-group dynamic quantization (the contract's q_x, s_x) as a Pallas kernel.

  Args:
    x: [M, K] float activations (swiglu: [M, 2K], the gate and up projections side by side, as a fused
      gate/up GEMM writes them; what is quantized is silu(gate) * up, issue 14's SwiGLU producer: the
      product never goes to memory).
    a_bits: 6 or 8.
    config: the GEMM's tiling (rows are padded to a multiple of its block_m).
    interpret: run the kernel in Pallas interpret mode (CPU).

  Returns:
    (q_x int8 [Mp, Kp], s_x fp32 [Mp, G], sum(q_x) int32 [Mp, G]); rows >= M are zeros. Unless
    config.join_phases, q_x is phase-major within each group: column 128g + 32p + t holds
    k = 128g + 4t + p (the order of the "pallas6" phases).
  """
  m, k = x.shape[0], _swiglu_k(x, swiglu)
  config = config or default_config(m, 1, k)
  kp = core.padded_k(k)
  groups = kp // GROUP
  mp = pl.cdiv(m, config.block_m) * config.block_m
  bq = min(config.quant_block_m, config.block_m)
  qmax = core.qrange(a_bits)[1]
  return pl.pallas_call(
      functools.partial(_quantize_kernel, m=m, k=k, block_m=bq, qmax=qmax, phase_major=not config.join_phases,
                        swiglu=swiglu),
      out_shape=(jax.ShapeDtypeStruct((mp, kp), jnp.int8), jax.ShapeDtypeStruct((mp, groups), jnp.float32),
                 jax.ShapeDtypeStruct((mp, groups), jnp.int32)),
      grid=(mp // bq, groups),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret,
      name="w6a_quantize_activations",
  )(x)


def quantize_activations_t(x: jax.Array, *, a_bits: int, block_m: int, swiglu: bool = False,
                           interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """quantize_activations (phase-major q_x) with s_x and sum(q_x) as one fp32 [G, 2, Mp] array
  (act[g, 0] = s_x[:, g], act[g, 1] = sum(q_x)[:, g]), the layout the small-M Mosaic GEMM's fused TMA
  takes: no transposes and no stack between the two kernels. swiglu as quantize_activations'.

  Returns:
    (q_x int8 [Mp, Kp], act fp32 [G, 2, Mp]), Mp = M rounded up to block_m; rows >= M are zeros.
  """
  m, k = x.shape[0], _swiglu_k(x, swiglu)
  kp = core.padded_k(k)
  groups = kp // GROUP
  mp = pl.cdiv(m, block_m) * block_m
  bq = min(TileConfig().quant_block_m, block_m)
  return pl.pallas_call(
      functools.partial(_quantize_kernel, m=m, k=k, block_m=bq, qmax=core.qrange(a_bits)[1], phase_major=True,
                        act_t=True, swiglu=swiglu),
      out_shape=(jax.ShapeDtypeStruct((mp, kp), jnp.int8), jax.ShapeDtypeStruct((groups, 2, mp), jnp.float32)),
      grid=(mp // bq, groups),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret,
      name="w6a_quantize_activations_t",
  )(x)


NORM_CHUNK = 1024  # columns of h a step of norm_quantize's sum of squares reads (4 steps at K = 4096)


def _norm_quantize_kernel(h_ref,  # [M, K] float: the residual stream
                          w_ref,  # [K] the RMSNorm weight
                          q_ref,  # [Mp, Kp] int8
                          *out_refs,  # s_x [Mp, G] f32 and sum(q_x) [Mp, G] int32; or with act_t, act [G, 2, Mp] f32
                          m: int, k: int, block_m: int, groups_per_program: int, qmax: int, phase_major: bool,
                          eps: float, norm_dtype, out_dtype, act_t: bool = False):
  """quantize_activations(models.llama.rms_norm(h, w)) for one row block and `groups_per_program`
  K-groups: the row block's sum of squares over the whole K (wide steps of NORM_CHUNK columns; the
  programs of one row block each read it, from L2 after the first), then normalize, scale and
  quantize this program's groups. The normalized activations never go to memory.

  Spreading a row block over programs along K matters at decode sizes: one program a row block
  (M = 16: a single program for the whole layer) took ~60 us on an H200 for K = 4096, two serial
  passes of 32 dependent group loads (results/e2e/h200-2026-12-01-e2e-fused-norm.md)."""
  m0 = pl.program_id(0) * block_m
  g0 = pl.program_id(1) * groups_per_program
  groups = q_ref.shape[1] // GROUP
  rows_ok = (m0 + jnp.arange(block_m)) < m

  def squares(c, acc):
    cols = c * NORM_CHUNK + jnp.arange(NORM_CHUNK)
    x = plgpu.load(h_ref.at[pl.ds(m0, block_m), pl.ds(c * NORM_CHUNK, NORM_CHUNK)],
                   mask=rows_ok[:, None] & (cols < k)[None, :], other=0).astype(jnp.float32)
    return acc + jnp.sum(x * x, axis=1)

  total = jax.lax.fori_loop(0, pl.cdiv(k, NORM_CHUNK), squares, jnp.zeros((block_m,), jnp.float32))
  inv = jax.lax.rsqrt(total / k + eps)

  def group(g, carry):
    @pl.when(g < groups)
    def _():
      cols_ok = (g * GROUP + jnp.arange(GROUP)) < k
      x = plgpu.load(h_ref.at[pl.ds(m0, block_m), pl.ds(g * GROUP, GROUP)],
                     mask=rows_ok[:, None] & cols_ok[None, :], other=0).astype(jnp.float32)
      w = plgpu.load(w_ref.at[pl.ds(g * GROUP, GROUP)], mask=cols_ok, other=0)
      # rms_norm's arithmetic as written: x32 * rsqrt(mean + eps), rounded to h's dtype, times the
      # weight in the promoted dtype.
      y = w.astype(out_dtype) * (x * inv[:, None]).astype(norm_dtype).astype(out_dtype)
      q, s = core.quantize_groups(y.astype(jnp.float32), qmax)  # [block_m, 128], [block_m]
      _store_group(q_ref, out_refs, pl.ds(m0, block_m), g, q, s, phase_major=phase_major, act_t=act_t)
    return carry

  jax.lax.fori_loop(g0, g0 + groups_per_program, group, 0)


def norm_groups_per_program(row_blocks: int, groups: int, target_programs: int = 512) -> int:
  """K-groups a norm_quantize program quantizes: one while row blocks x groups stays within
  ~4 programs an SM, more at larger M so the whole-row sums of squares are not re-read too often."""
  return max(1, pl.cdiv(row_blocks * groups, target_programs))


@functools.partial(jax.jit, static_argnames=("eps", "a_bits", "config", "groups_per_program", "act_t", "interpret"))
def norm_quantize(h: jax.Array, weight: jax.Array, eps: float, *, a_bits: int, config: TileConfig,
                  groups_per_program: int | None = None, act_t: bool = False, interpret: bool = False
                  ) -> tuple[jax.Array, ...]:
  """quantize_activations(rms_norm(h, weight, eps)) fused (issue 14's producer fusion for the
  q/k/v and gate/up GEMMs): the same (q_x, s_x, sum(q_x)) arrays for the same `config`. With
  act_t (the small-M Mosaic GEMM's input; config.join_phases must be False): (q_x, act) as
  quantize_activations_t(rms_norm(...), block_m=config.block_m) writes them.

  rms_norm is models.llama.rms_norm: weight * (h32 * rsqrt(mean(h32^2) + eps)).astype(h.dtype).
  It computes rms_norm as written. The unfused program can differ in two ways: XLA adds the sum
  of squares in its own order, and with its default xla_allow_excess_precision it may skip the
  rounding to h's dtype before the weight multiply. Either can move a normalized value across a
  rounding boundary, so q_x can differ by one step in a few elements and s_x by about one ulp of
  h's dtype. tests/pallas_kernels/test_w6a_matmul.py bounds both.
  """
  m, k = h.shape
  if weight.shape != (k,):
    raise ValueError(f"the RMSNorm weight must be [{k}], got {weight.shape}")
  kp = core.padded_k(k)
  mp = pl.cdiv(m, config.block_m) * config.block_m
  bq = min(config.quant_block_m, config.block_m)
  out_dtype = jnp.result_type(weight.dtype, h.dtype)
  groups = kp // GROUP
  gpp = groups_per_program or norm_groups_per_program(mp // bq, groups)
  if act_t and config.join_phases:
    raise ValueError("act_t=True writes the small-M Mosaic GEMM's input, whose q_x is phase-major: "
                     "config.join_phases must be False")
  scales = ((jax.ShapeDtypeStruct((groups, 2, mp), jnp.float32),) if act_t else
            (jax.ShapeDtypeStruct((mp, groups), jnp.float32), jax.ShapeDtypeStruct((mp, groups), jnp.int32)))
  return pl.pallas_call(
      functools.partial(_norm_quantize_kernel, m=m, k=k, block_m=bq, groups_per_program=gpp,
                        qmax=core.qrange(a_bits)[1], phase_major=not config.join_phases, eps=float(eps),
                        norm_dtype=h.dtype, out_dtype=out_dtype, act_t=act_t),
      out_shape=(jax.ShapeDtypeStruct((mp, kp), jnp.int8), *scales),
      grid=(mp // bq, pl.cdiv(groups, gpp)),
      compiler_params=plgpu.CompilerParams(num_warps=8, num_stages=1),
      interpret=interpret,
      name="w6a_norm_quantize",
  )(h, weight)


def quantizer_config(config: TileConfig, w_bits: int) -> TileConfig:
  """The tiling whose q_x layout the GEMM of `config` reads: the gemv and every w8 kernel read
  phase-major q_x (join_phases only concerns unpacking w6)."""
  return dataclasses.replace(config, join_phases=False) if config.gemv or w_bits == 8 else config


@functools.partial(jax.jit, static_argnames=("a_bits", "config", "interpret"))
def w6a_matmul(x: jax.Array, w_packed: jax.Array, w_scales: jax.Array, *, a_bits: int,
               config: TileConfig | None = None, interpret: bool = False) -> jax.Array:
  """Quantized linear y = x W^T by the numerics contract, with "pallas6" (or 8-bit "pallas8") weights.

  Args:
    x: [M, K] float activations (bf16, fp16 or fp32); any M, any K (K is zero-padded to a
      multiple of 128 as the contract says).
    w_packed: uint8 [N/16, Kp/128, 3, 16, 32], formats.pack_pallas6 of the int weights [N, Kp], or
      int8 [N/16, Kp/128, 16, 128], formats.pack_pallas8 of 8-bit ones (W8A8 / W8A6; the weight bits
      follow from the layout).
    w_scales: fp16 [N, Kp / 128] weight group scales.
    a_bits: activation bits, 6 or 8.
    config: tiling; default_config(M, N, K, w_bits=...) when None.
    interpret: run the kernels in Pallas interpret mode (CPU; for tests).

  Returns:
    [M, N] in x.dtype.
  """
  m, k, n = check_operands(x, w_packed, w_scales, a_bits)
  groups = w_packed.shape[1]
  w_bits = weight_bits(w_packed)
  cfg = config or default_config(m, n, k, w_bits=w_bits)
  if cfg.split_k > groups:
    raise ValueError(f"split_k={cfg.split_k} exceeds the {groups} K-groups")
  qx, sx, xsum = quantize_activations(x, a_bits=a_bits, config=quantizer_config(cfg, w_bits), interpret=interpret)
  return gemm(qx, sx, xsum, w_packed, w_scales, m=m, out_dtype=x.dtype, config=cfg, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("m", "out_dtype", "config", "interpret"))
def gemm(qx: jax.Array, sx: jax.Array, xsum: jax.Array, w_packed: jax.Array, w_scales: jax.Array, *, m: int,
         out_dtype, config: TileConfig, interpret: bool = False) -> jax.Array:
  """The GEMM half of w6a_matmul, on quantize_activations' outputs (exposed for benchmarks): the
  tensor-core kernel, or the gemv kernel when config.gemv (M rows of x per program, not block_m).
  With "pallas8" weights qx must be phase-major (quantize_activations with join_phases=False)."""
  cfg = config
  w_bits = weight_bits(w_packed)
  n, groups = w_packed.shape[0] * TILE_ROWS, w_packed.shape[1]
  if cfg.gemv:
    kernel, grid, name = _gemv_kernel, (pl.cdiv(n, cfg.block_n), cfg.split_k), "w6a_gemv"
  else:
    kernel, grid, name = _gemm_kernel, (pl.cdiv(m, cfg.block_m) * pl.cdiv(n, cfg.block_n), cfg.split_k), "w6a_gemm"
  out_shape = (jax.ShapeDtypeStruct((m, n), out_dtype) if cfg.split_k == 1
               else jax.ShapeDtypeStruct((cfg.split_k, m, n), jnp.float32))
  y = pl.pallas_call(
      functools.partial(kernel, m=m, n=n, groups=groups, cfg=cfg, use_asm=cfg.unpack_asm and not interpret,
                        w_bits=w_bits),
      out_shape=out_shape,
      grid=grid,
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=interpret,
      name=name,
  )(qx, sx, xsum, w_packed, w_scales)
  if cfg.split_k > 1:
    y = jnp.sum(y, axis=0).astype(out_dtype)
  return y


def _unpack_kernel(w_ref,  # "pallas6" [rb, gb, 3, 16, 32] uint8, or "pallas8" [rb, gb, 16, 128] int8
                   o_ref,  # [16 rb, 128 gb] int8: signed weights, each group's columns phase-major
                   *, rb: int, gb: int, w_bits: int, use_asm: bool):
  for r in range(rb):
    rows = slice(r * TILE_ROWS, (r + 1) * TILE_ROWS)
    for j in range(gb):
      if w_bits == 8:  # already signed and phase-major
        o_ref[rows, pl.ds(j * GROUP, GROUP)] = w_ref[r, j]
        continue
      lo01, lo23, hi = w_ref[r, j, 0], w_ref[r, j, 1], w_ref[r, j, 2]  # [16, 32] uint8 each
      for p in range(core.PHASES):
        u = _unpack_phase(lo01 if p < 2 else lo23, hi, p, use_asm)
        o_ref[rows, pl.ds(j * GROUP + p * PLANE, PLANE)] = u - jnp.int8(OFFSET)


@functools.partial(jax.jit, static_argnames=("n_to", "interpret"))
def unpack_phase_major(w_packed: jax.Array, n_to: int | None = None, *, interpret: bool = False) -> jax.Array:
  """"pallas6" uint8 [N/16, G, 3, 16, 32] or "pallas8" int8 [N/16, G, 16, 128] -> the signed weights
  int8 [N (or n_to, zero rows added), G * 128], each group's columns phase-major (column 128 g + 32 p + t
  holds k = 128 g + 4 t + p): the int8 operand of a tensor-core GEMM against phase-major q_x.

  One pass at memory speed (1536 or 2048 bytes in, 2048 out per 16 rows and group), a Pallas kernel
  rather than XLA's transposes."""
  w_bits = weight_bits(w_packed)
  blocks, groups = w_packed.shape[:2]
  rb = 2 if blocks % 2 == 0 else 1
  gb = next(g for g in (8, 4, 2, 1) if groups % g == 0)
  tail = w_packed.shape[2:]
  out = pl.pallas_call(
      functools.partial(_unpack_kernel, rb=rb, gb=gb, w_bits=w_bits, use_asm=not interpret),
      out_shape=jax.ShapeDtypeStruct((blocks * TILE_ROWS, groups * GROUP), jnp.int8),
      grid=(blocks // rb, groups // gb),
      in_specs=[pl.BlockSpec((rb, gb, *tail), lambda b, j: (b, j) + (0,) * len(tail))],
      out_specs=pl.BlockSpec((rb * TILE_ROWS, gb * GROUP), lambda b, j: (b, j)),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      name="w6a_unpack_phase_major",
  )(w_packed)
  if n_to is not None and n_to > out.shape[0]:
    out = jnp.pad(out, ((0, n_to - out.shape[0]), (0, 0)))
  return out
