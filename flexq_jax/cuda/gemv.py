"""The CUDA decode GEMV on "pallas6" weights (csrc/gemv_pallas6.cuh) as an XLA FFI custom call.

Not yet run on a GPU (written 2026-12-01, no device time left that session): `gemv_plan` below
restates the kernel's arithmetic lane by lane in numpy and is tested against the numerics
contract on CPU; the GPU tests (tests/flexq_jax/test_cuda_gemv.py, marked gpu) and the kernel
benchmark (`kernel_bench --gemv-cuda`) are its first real check. Nothing chooses it until a
card's tuning table names `cuda_gemv_max_m` (flexq_jax/backends.py, Pallas.kernel_for).

Why it exists (issue: batch-1 decode at the memory floor): the Pallas GEMV's split-K partial sums
go through global memory and a second kernel adds them; this kernel splits K between the warps of
one block and adds in shared memory, so a decode linear is the activation quantizer and one GEMV.
It reads the operands the Pallas GEMV reads (one stored copy of the weights, "pallas6"):
q_x int8 [Mp, Kp] phase-major within each group, s_x fp32 [Mp, G], sum(q_x) int32 [Mp, G] from
pallas_kernels.w6a_matmul.quantize_activations, the packed weights and fp16 scales.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flexq_jax import numerics
from flexq_jax.cuda import bmma
from pallas_kernels import core
from pallas_kernels import w6a_matmul as wk
from pallas_kernels.core import GROUP, TILE_ROWS

MAX_M = 8  # rows of x the kernel takes (templates for 1, 2, 4, 8)
PLANE = core.PALLAS6_PLANE_BYTES
OFFSET = core.PALLAS6_OFFSET
WARPS = 8  # csrc/gemv_pallas6.cuh kGemvWarps: warps of a block, which take the K-groups in turn
WARP_CHOICES = (8, 16, 32)  # the quantizer-inside kernel's block sizes (its kWarps)
RING_CHOICES = (0, 2, 4, 8)  # the quantizer-inside kernel's shared-memory weight ring: 0 = off, else stages
RING_MAX_M = 2  # csrc/gemv_pallas6.cuh kGemvRingMaxM
RING_SMEM_LIMIT = 227 * 1024 - 1024  # dynamic shared memory a Hopper block may take beside the kernel's 1 KB of static


def ring_smem_bytes(ring: int, m: int, groups: int) -> int:
  """Shared memory of the ring GEMV (csrc gemv_ring_smem_bytes): the ring of 12 KB stages, q_x, s_x and
  sum(q_x) of the block's rows (1 or 2), the tile's weight scales."""
  rows = 1 if m <= 1 else 2
  return ring * 8 * 3 * TILE_ROWS * PLANE + rows * groups * GROUP + rows * groups * 8 + groups * TILE_ROWS * 2


def rows_read(m: int) -> int:
  """Rows of q_x / s_x / sum(q_x) the kernel reads for M = m: m rounded up to 1, 2, 4 or 8."""
  return 1 if m <= 1 else 2 if m <= 2 else 4 if m <= 4 else 8


def check_operands(qx, sx, xsum, w_packed, w_scales, m: int) -> tuple[int, int]:
  """(N, groups); a ValueError naming the operand for anything the kernel cannot take."""
  return check_pallas6_operands("the CUDA GEMV", qx, sx, xsum, w_packed, w_scales, m, MAX_M, rows_read(m))


def check_pallas6_operands(kernel: str, qx, sx, xsum, w_packed, w_scales, m: int, max_m: int,
                           rows: int) -> tuple[int, int]:
  """(N, groups) of the operands the CUDA kernels on "pallas6" weights share (this GEMV and
  gemm_small.py): quantize_activations' q_x / s_x / sum(q_x) with at least `rows` rows, the packed
  weights and fp16 scales, 1 <= m <= max_m; a ValueError naming the operand otherwise."""
  if wk.weight_bits(w_packed) != 6:
    raise ValueError(f"{kernel} reads 6-bit 'pallas6' weights only")
  tiles, groups = w_packed.shape[:2]
  n = tiles * TILE_ROWS
  if not 1 <= m <= max_m:
    raise ValueError(f"{kernel} takes 1 <= M <= {max_m} rows, got M={m}")
  if qx.dtype != jnp.int8 or qx.ndim != 2 or qx.shape[1] != groups * GROUP or qx.shape[0] < rows:
    raise ValueError(f"q_x must be int8 [Mp >= {rows}, {groups * GROUP}], got {qx.dtype} {qx.shape}")
  for name, a, dtype in (("s_x", sx, jnp.float32), ("sum(q_x)", xsum, jnp.int32)):
    if a.dtype != dtype or a.shape != (qx.shape[0], groups):
      raise ValueError(f"{name} must be {jnp.dtype(dtype).name} {(qx.shape[0], groups)}, got {a.dtype} {a.shape}")
  if w_scales.dtype != jnp.float16 or w_scales.shape != (n, groups):
    raise ValueError(f"w_scales must be float16 {(n, groups)}, got {w_scales.dtype} {w_scales.shape}")
  return n, groups


def gemv_pallas6(qx: jax.Array, sx: jax.Array, xsum: jax.Array, w_packed: jax.Array, w_scales: jax.Array, *,
                 m: int, out_dtype=jnp.bfloat16) -> jax.Array:
  """y [m, N] in out_dtype (bf16 or fp32) from quantize_activations' outputs and "pallas6" weights."""
  n, _ = check_operands(qx, sx, xsum, w_packed, w_scales, m)
  out_dtype = jnp.dtype(out_dtype)
  if out_dtype.name not in bmma.GEMV_TARGETS:
    raise ValueError(f"the CUDA GEMV writes bfloat16 or float32, not {out_dtype}")
  bmma._register()
  target = bmma.GEMV_TARGETS[out_dtype.name][0]
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((m, n), out_dtype))(qx, sx, xsum, w_packed, w_scales)


def gemv_pallas6_xq(x: jax.Array, w_packed: jax.Array, w_scales: jax.Array, *, a_bits: int,
                    unroll: int = 1, warps: int = WARPS, pdl: bool = False, ring: int = 0) -> jax.Array:
  """The variant with the activation quantizer inside the kernel: x bf16 or fp32 [M <= 8, K] ->
  y [M, N] of x's dtype, one kernel (each warp quantizes the groups it takes by the contract's
  rule; every block does so again). unroll (1, 2, 4): groups whose weight and x loads a warp issues
  before it quantizes and dots the first of them (same groups, same order, same sums). pdl: launched
  with programmatic dependent launch (sm_90): its blocks may start while the previous kernel in the
  stream drains and load their first weights, then wait for that kernel before reading x or writing y.
  warps (8, 16, 32): warps of a block, which take a tile's K-groups in turn (16 and 32 with unroll 1 only):
  more warps put more of a narrow layer's weights in flight at once; the fp32 sums are added in another
  order (gemv_plan's `warps`).
  ring (2, 4, 8; 0 = off): the block copies its tile's weights into a shared-memory ring of that many
  12 KB stages (cp.async) before it quantizes x once into shared memory, then dots stage by stage: the
  same groups, order and sums as warps=8, unroll=1 (bit-identical), with the tile's weights in flight
  at once instead of one group a warp; M <= 2, warps 8, unroll 1. Measured not faster (H200, 2026-12-02:
  results/kernels/NOTES.md, "Ring GEMV"), so no table turns it on (key cuda_gemv_ring)."""
  if ring not in RING_CHOICES:
    raise ValueError(f"ring must be one of {RING_CHOICES} (0 = off), got {ring}")
  if ring and (unroll != 1 or warps != WARPS):
    raise ValueError(f"the ring GEMV runs {WARPS} warps a block at unroll 1, got warps={warps}, unroll={unroll}")
  if unroll not in (1, 2, 4):
    raise ValueError(f"unroll must be 1, 2 or 4, got {unroll}")
  if warps not in WARP_CHOICES or (warps != WARPS and unroll != 1):
    raise ValueError(f"warps must be one of {WARP_CHOICES} (16 and 32 with unroll 1 only), got warps={warps}, "
                     f"unroll={unroll}")
  m, k, n = wk.check_operands(x, w_packed, w_scales, a_bits)
  if wk.weight_bits(w_packed) != 6:
    raise ValueError("the CUDA GEMV reads 6-bit 'pallas6' weights only")
  if not 1 <= m <= MAX_M:
    raise ValueError(f"the CUDA GEMV takes 1 <= M <= {MAX_M} rows, got M={m}")
  if ring and m > RING_MAX_M:
    raise ValueError(f"the ring GEMV takes 1 <= M <= {RING_MAX_M} rows, got M={m}")
  if ring and ring_smem_bytes(ring, m, w_packed.shape[1]) > RING_SMEM_LIMIT:
    raise ValueError(f"the ring GEMV at K={k} with {ring} stages needs {ring_smem_bytes(ring, m, w_packed.shape[1])} "
                     f"bytes of shared memory, over a Hopper block's {RING_SMEM_LIMIT}: use fewer stages")
  if x.dtype.name not in bmma.GEMV_XQ_TARGETS:
    raise ValueError(f"the CUDA GEMV takes bfloat16 or float32 activations, not {x.dtype}")
  if w_scales.dtype != jnp.float16:
    raise ValueError(f"w_scales must be float16, got {w_scales.dtype}")
  bmma._register()
  target = bmma.GEMV_XQ_TARGETS[x.dtype.name][0]
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((m, n), x.dtype))(x, w_packed, w_scales,
                                                                         a_bits=np.int32(a_bits),
                                                                         unroll=np.int32(unroll),
                                                                         warps=np.int32(warps),
                                                                         pdl=np.int32(bool(pdl)),
                                                                         ring=np.int32(ring))


PROLOGUES = {"plain": 0, "norm": 1, "swiglu": 2}  # csrc/gemv_pallas6.cuh kFusePlain, kFuseNorm, kFuseSwiglu
FUSED_MAX_M = 2  # csrc/gemv_pallas6.cuh kGemvFusedMaxM: rows the fused GEMV takes (decode at batch 1 and 2)


def gemv_fused(x: jax.Array, w_packed: jax.Array, w_scales: jax.Array, *, a_bits: int, prologue: str = "plain",
               norm_weight: jax.Array | None = None, eps: float = 0.0, residual: jax.Array | None = None) -> jax.Array:
  """The quantizer-inside GEMV at 8 warps a block with its producer and its consumer folded in, one kernel
  (csrc/gemv_pallas6.cuh gemv_pallas6_fused_kernel): y [M, N] of x's dtype (bf16 or fp32), M <= FUSED_MAX_M.

  prologue: what the GEMV's input is, made from x inside the kernel:
    "plain"   x itself (then the kernel equals gemv_pallas6_xq at 8 warps, unroll 1, bit for bit);
    "norm"    models.llama.rms_norm(x, norm_weight, eps) (x: the residual stream [M, K]);
    "swiglu"  silu(gate) * up of x = [M, 2K], the fused gate/up projection's output (gate first).
  residual: [M, N] of x's dtype or None: y = residual + (input @ W), the product rounded to x's dtype first
  (what XLA's add of the two gives).
  fused_reference is the same function in jnp."""
  if prologue not in PROLOGUES:
    raise ValueError(f"prologue must be one of {', '.join(PROLOGUES)}, got {prologue!r}")
  if x.ndim != 2:
    raise ValueError(f"x must be [M, K], got shape {x.shape}")
  if x.dtype.name not in bmma.GEMV_FUSED_TARGETS:
    raise ValueError(f"the fused CUDA GEMV takes bfloat16 or float32 activations, not {x.dtype}")
  if prologue == "swiglu" and x.shape[1] % 2:
    raise ValueError(f"prologue 'swiglu' takes x = [M, 2K] (gate, then up), got {x.shape[1]} columns, an odd count")
  k = x.shape[1] // 2 if prologue == "swiglu" else x.shape[1]
  m, _, n = wk.check_operands(jax.ShapeDtypeStruct((x.shape[0], k), x.dtype), w_packed, w_scales, a_bits)
  if wk.weight_bits(w_packed) != 6:
    raise ValueError("the CUDA GEMV reads 6-bit 'pallas6' weights only")
  if w_scales.dtype != jnp.float16:
    raise ValueError(f"w_scales must be float16, got {w_scales.dtype}")
  if not 1 <= m <= FUSED_MAX_M:
    raise ValueError(f"the fused CUDA GEMV takes 1 <= M <= {FUSED_MAX_M} rows, got M={m}")
  if prologue == "norm":
    if norm_weight is None or norm_weight.shape != (k,):
      raise ValueError(f"prologue 'norm' needs norm_weight [{k}], got "
                       f"{None if norm_weight is None else norm_weight.shape}")
    if not (eps >= 0.0 and np.isfinite(eps)):
      raise ValueError(f"eps must be finite and >= 0, got {eps}")
  elif norm_weight is not None:
    raise ValueError(f"norm_weight is for prologue 'norm', not {prologue!r}")
  if residual is not None and residual.shape != (m, n):
    raise ValueError(f"residual must be [{m}, {n}] like y, got {residual.shape}")
  empty = jnp.zeros((0,), x.dtype)
  gamma = empty if norm_weight is None else norm_weight.astype(x.dtype)
  res = empty if residual is None else residual.astype(x.dtype)
  bmma._register()
  target = bmma.GEMV_FUSED_TARGETS[x.dtype.name][0]
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((m, n), x.dtype))(
      x, w_packed, w_scales, gamma, res, a_bits=np.int32(a_bits), prologue=np.int32(PROLOGUES[prologue]),
      eps=np.float32(eps))


def fused_input(x: jax.Array, prologue: str, norm_weight: jax.Array | None = None, eps: float = 0.0) -> jax.Array:
  """The GEMV's input as gemv_fused's prologue forms it, in jnp with the kernel's roundings (x's dtype after
  each step): models.llama.rms_norm for "norm" (its sum of squares in XLA's order here, not the kernel's:
  the rsqrt may differ in the last bit), pallas_kernels.w6a_matmul._swiglu's steps for "swiglu"."""
  dt, f32 = x.dtype, jnp.float32
  r = lambda v: v.astype(dt).astype(f32)
  if prologue == "plain":
    return x
  if prologue == "norm":
    v = x.astype(f32)
    rstd = jax.lax.rsqrt(jnp.mean(v * v, axis=-1, keepdims=True) + eps)
    return (norm_weight.astype(dt).astype(f32) * r(v * rstd)).astype(dt)
  if prologue == "swiglu":
    k = x.shape[-1] // 2
    g, u = x[..., :k].astype(f32), x[..., k:].astype(f32)
    sig = r(1.0 / r(r(jnp.exp(-g)) + 1.0))
    return (r(g * sig) * u).astype(dt)
  raise ValueError(f"prologue must be one of {', '.join(PROLOGUES)}, got {prologue!r}")


def fused_reference(x: jax.Array, q_w: jax.Array, s_w: jax.Array, *, a_bits: int, prologue: str = "plain",
                    norm_weight: jax.Array | None = None, eps: float = 0.0,
                    residual: jax.Array | None = None) -> jax.Array:
  """What gemv_fused computes, from the logical weights q_w [N, Kp] by the numerics contract's reference
  (flexq_jax/numerics.py): the prologue's input, the quantized product in x's dtype, plus the residual."""
  y = numerics.reference_matmul(fused_input(x, prologue, norm_weight, eps), q_w, s_w, a_bits=a_bits)
  if residual is None:
    return y
  return (residual.astype(jnp.float32) + y.astype(jnp.float32)).astype(x.dtype)


def w6a_gemv(x: jax.Array, w_packed: jax.Array, w_scales: jax.Array, *, a_bits: int, out_dtype=None,
             fused_quant: bool = False, unroll: int = 1, warps: int = WARPS, pdl: bool = False,
             ring: int = 0) -> jax.Array:
  """The numerics contract for M <= 8 rows on the GPU: the Pallas activation quantizer, then this
  GEMV; or, with fused_quant, the one kernel that quantizes inside (gemv_pallas6_xq; `unroll`, `warps`,
  `pdl` and `ring` its)."""
  if ring and not fused_quant:
    raise ValueError("ring is an option of the quantizer-inside GEMV (fused_quant=True)")
  if fused_quant:
    y = gemv_pallas6_xq(x, w_packed, w_scales, a_bits=a_bits, unroll=unroll, warps=warps, pdl=pdl, ring=ring)
    return y if out_dtype is None else y.astype(out_dtype)
  m, k, n = wk.check_operands(x, w_packed, w_scales, a_bits)
  cfg = wk.default_config(m, n, k)  # its quantizer tiling: phase-major q_x, rows padded to >= 16
  qx, sx, xsum = wk.quantize_activations(x, a_bits=a_bits, config=cfg)
  return gemv_pallas6(qx, sx, xsum, w_packed, w_scales, m=m, out_dtype=out_dtype or x.dtype)


def gemv_plan(qx, sx, xsum, w_packed, w_scales, m: int, warps: int = WARPS) -> np.ndarray:
  """What the kernel computes, restated in numpy with its lane mapping (fp32 [m, N]).

  Per block (tile of 16 rows) and warp w (groups w, w + warps, ...; 8 warps but in the quantizer-inside
  kernel's wider blocks): lane l = 2r + h loads bytes
  16h .. 16h + 15 of plane p's row r (words j = 4h .. 4h + 3); phase p of word j unpacks to four
  u bytes that dp4a meets with q_x bytes 32p + 4j .. 32p + 4j + 3 of the group; the two lanes of
  a row add; minus 32 sum(q_x), times s_x s_w (fp32, that order) into the warp's accumulator;
  the warps' accumulators are added in warp order. Tests compare this with the contract, and the
  GPU tests compare the kernel with it.
  """
  qx, sx, xsum = np.asarray(qx), np.asarray(sx, np.float32), np.asarray(xsum)
  w, sw = np.asarray(w_packed), np.asarray(w_scales).astype(np.float32)
  check_operands(jnp.asarray(qx), jnp.asarray(sx), jnp.asarray(xsum), jnp.asarray(w), jnp.asarray(sw, jnp.float16), m)
  tiles, groups = w.shape[:2]
  lanes = np.arange(32)
  r, h = lanes // 2, lanes % 2
  acc = np.zeros((tiles, warps, m, TILE_ROWS), np.float32)
  for g in range(groups):
    warp = g % warps
    # bytes [tiles, 32 lanes, 16] of each plane; as four little-endian words each
    planes = [w[:, g, p].reshape(tiles, TILE_ROWS * PLANE)[:, lanes[:, None] * 16 + np.arange(16)] for p in range(3)]
    words = [p.reshape(tiles, 32, 4, 4).astype(np.uint32) for p in planes]  # [tiles, lane, word, byte]
    words = [(x[..., 0] | x[..., 1] << 8 | x[..., 2] << 16 | x[..., 3] << 24) for x in words]
    lo01, lo23, hi = words
    for i in range(m):
      xg = qx[i, g * GROUP:(g + 1) * GROUP]
      dot = np.zeros((tiles, 32), np.int64)
      for p in range(4):
        lo = lo01 if p < 2 else lo23
        u = (((lo >> 4) if p & 1 else lo) & 0x0F0F0F0F) | (((hi >> (2 * p)) & 0x03030303) << 4)  # [tiles, lane, 4]
        xb = xg[32 * p + 16 * h[:, None, None] + 4 * np.arange(4)[None, :, None] + np.arange(4)[None, None, :]]  # [lane, 4, 4]
        ub = np.stack([(u >> (8 * b)) & 0xFF for b in range(4)], axis=-1).astype(np.int64)  # [tiles, lane, 4, 4]
        dot += (ub * xb[None].astype(np.int64)).sum(axis=(-1, -2))
      dot = dot + dot[:, lanes ^ 1]  # the shuffle: the row's two halves
      exact = (dot[:, 0::2] - OFFSET * int(xsum[i, g])).astype(np.int32)  # lane 2r: [tiles, 16]
      scale = np.float32(sx[i, g]) * sw.reshape(tiles, TILE_ROWS, groups)[:, :, g]
      acc[:, warp, i] += exact.astype(np.float32) * scale.astype(np.float32)
  out = np.zeros((tiles, m, TILE_ROWS), np.float32)
  for warp in range(warps):
    out += acc[:, warp]
  return out.transpose(1, 0, 2).reshape(m, tiles * TILE_ROWS)
