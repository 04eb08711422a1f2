"""The small-M tensor-core GEMM on "pallas6" weights (csrc/gemm_small_pallas6.cuh) as an XLA FFI custom call.

Written 2026-12-02 on a machine without a GPU: `gemm_small_plan` restates the kernel's arithmetic lane
by lane in numpy (its fragments, its k order, the unpack, the warps' K split and their order of
addition) and is tested against the numerics contract on CPU; nvcc builds it in the CPU tests; the
GPU tests (tests/flexq_jax/test_cuda_gemm_small.py, marked gpu) and `kernel_bench --cuda-small` are
its first real check. Nothing chooses it until a card's tuning table sets `cuda_small_max_m`
(flexq_jax/backends.py, Pallas.kernel_for).

Why it exists (issue 13, decode batches): the Mosaic GPU small-M kernel's TMA ring streams the weights
at 2.4-2.7 TB/s on an H200 however it is tuned (results/kernels/NOTES.md), while the CUDA decode GEMV's
plain 16-byte loads reach 88-97% of HBM on large layers. This kernel keeps the GEMV's structure (whole
16-row tiles and all of K a block, warps taking the groups in turn, partial sums added in shared
memory) with an int8 mma.sync per 16 weight rows x 8 tokens x 32 k instead of a dp4a per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flexq_jax.cuda import bmma, gemv
from pallas_kernels import core
from pallas_kernels import w6a_matmul as wk
from pallas_kernels.core import GROUP, TILE_ROWS

MAX_M = 64  # token rows the kernel takes: 8, 16, 32 or 64 (token tiles of 8)
PLANE = core.PALLAS6_PLANE_BYTES
OFFSET = core.PALLAS6_OFFSET
WARPS = 8  # csrc/gemm_small_pallas6.cuh kSmallWarps


def token_tiles(m: int) -> int:
  """Token tiles of 8 the kernel runs for M rows (it reads 8 x this many rows of q_x)."""
  return 1 if m <= 8 else 2 if m <= 16 else 4 if m <= 32 else 8


def max_tiles_per_block(m: int) -> int:
  """The most 16-row weight tiles a block takes at M rows: tiles x token tiles <= 8 keeps its int32
  and fp32 accumulators in registers (ptxas, sm_90a: 48-128 registers, no spills)."""
  return min(4, 8 // token_tiles(m))


def check_operands(qx, sx, xsum, w_packed, w_scales, m: int, tiles_per_block: int) -> tuple[int, int]:
  """(N, groups); a ValueError naming the operand or option for anything the kernel cannot take."""
  n, groups = gemv.check_pallas6_operands("the small-M CUDA GEMM", qx, sx, xsum, w_packed, w_scales, m, MAX_M,
                                          8 * token_tiles(m))
  tiles = n // TILE_ROWS
  if tiles_per_block not in (1, 2, 4) or tiles_per_block > max_tiles_per_block(m) or tiles % tiles_per_block:
    raise ValueError(f"tiles_per_block={tiles_per_block} must be 1, 2 or 4, at most {max_tiles_per_block(m)} at M={m}, "
                     f"and divide the {tiles} row tiles of 16")
  return n, groups


def default_tiles_per_block(m: int, n: int) -> int:
  """1 (a block a 16-row tile, as the decode GEMV); larger values share each q_x fragment between
  tiles at the price of fewer blocks: the benchmark times them (`kernel_bench --cuda-small`)."""
  del m, n
  return 1


def gemm_small_pallas6(qx: jax.Array, sx: jax.Array, xsum: jax.Array, w_packed: jax.Array, w_scales: jax.Array, *,
                       m: int, out_dtype=jnp.bfloat16, tiles_per_block: int = 1) -> jax.Array:
  """y [m, N] in out_dtype (bf16 or fp32) from quantize_activations' outputs and "pallas6" weights."""
  n, _ = check_operands(qx, sx, xsum, w_packed, w_scales, m, tiles_per_block)
  out_dtype = jnp.dtype(out_dtype)
  if out_dtype.name not in bmma.GEMM_SMALL_TARGETS:
    raise ValueError(f"the small-M CUDA GEMM writes bfloat16 or float32, not {out_dtype}")
  bmma._register()
  target = bmma.GEMM_SMALL_TARGETS[out_dtype.name][0]
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((m, n), out_dtype))(
      qx, sx, xsum, w_packed, w_scales, tiles_per_block=np.int32(tiles_per_block))


def w6a_gemm_small_cuda(x: jax.Array, w_packed: jax.Array, w_scales: jax.Array, *, a_bits: int, out_dtype=None,
                        tiles_per_block: int | None = None) -> jax.Array:
  """The numerics contract for M <= 64 rows on the GPU: the Pallas activation quantizer (phase-major
  q_x, rows padded to >= 16), then this kernel."""
  m, k, n = wk.check_operands(x, w_packed, w_scales, a_bits)
  if not 1 <= m <= MAX_M:
    raise ValueError(f"the small-M CUDA GEMM takes 1 <= M <= {MAX_M} rows, got M={m}")
  qcfg = wk.TileConfig(block_m=max(16, 8 * token_tiles(m)), join_phases=False)
  qx, sx, xsum = wk.quantize_activations(x, a_bits=a_bits, config=qcfg)
  kt = tiles_per_block or default_tiles_per_block(m, n)
  return gemm_small_pallas6(qx, sx, xsum, w_packed, w_scales, m=m, out_dtype=out_dtype or x.dtype,
                            tiles_per_block=kt)


def _words(b: np.ndarray) -> np.ndarray:
  """Little-endian uint32 words of the last axis' bytes (4 a word)."""
  b = b.astype(np.uint32).reshape(*b.shape[:-1], -1, 4)
  return b[..., 0] | b[..., 1] << 8 | b[..., 2] << 16 | b[..., 3] << 24


def _bytes(words: np.ndarray) -> np.ndarray:
  return np.stack([(words >> (8 * i)) & 0xFF for i in range(4)], axis=-1).reshape(*words.shape[:-1], -1)


def gemm_small_plan(qx, sx, xsum, w_packed, w_scales, m: int, tiles_per_block: int = 1) -> np.ndarray:
  """What the kernel computes, restated in numpy with its lane mapping (fp32 [m, N]).

  Per group g (warp g % 8) and phase p, lane (gid = l / 4, c = l % 4) loads bytes 8c .. 8c + 7 of rows gid
  and gid + 8 of each plane (two words each), unpacks phase p, and hands the mma A = {row gid, words
  (t 8c..), row gid+8, same, row gid, words (t 8c+4..), row gid+8, same}; B = q_x bytes 32p + 8c .. +7 of
  token 8j + gid as two words. The mma's logical k 4c+i / 16+4c+i are bytes t 8c+i / 8c+4+i, in A and B
  alike. The s32 sums of the four phases, minus 32 sum(q_x), times s_x s_w (fp32, that order) go into
  the warp's accumulator; the warps' accumulators are added in warp order.
  """
  qx, sx, xsum = np.asarray(qx), np.asarray(sx, np.float32), np.asarray(xsum)
  w, sw = np.asarray(w_packed), np.asarray(w_scales).astype(np.float32)
  check_operands(jnp.asarray(qx), jnp.asarray(sx), jnp.asarray(xsum), jnp.asarray(w), jnp.asarray(sw, jnp.float16), m,
                 tiles_per_block)
  tiles, groups = w.shape[:2]
  tokens = 8 * token_tiles(m)
  gid, c = np.arange(32) // 4, np.arange(32) % 4
  acc = np.zeros((WARPS, tiles, TILE_ROWS, tokens), np.float32)
  for g in range(groups):
    # lane words [tiles, plane, lane, h (row gid + 8h), 2 words]
    rows = gid[:, None] + 8 * np.arange(2)[None, :]  # [lane, h]
    cols = 8 * c[:, None] + np.arange(8)[None, :]  # [lane, 8 bytes]
    raw = w[:, g][:, :, rows[:, :, None], cols[:, None, :]]  # [tiles, plane, lane, h, 8]
    words = _words(raw)  # [tiles, plane, lane, h, 2]
    sums = np.zeros((tiles, TILE_ROWS, tokens), np.int64)
    for p in range(4):
      lo, hi = words[:, 0 if p < 2 else 1], words[:, 2]
      u = ((((lo >> 4) if p & 1 else lo) & 0x0F0F0F0F) | (((hi >> (2 * p)) & 0x03030303) << 4)).astype(np.uint32)
      a = np.zeros((tiles, TILE_ROWS, 32), np.int64)  # logical A of the mma
      ub = _bytes(u[..., None]).reshape(tiles, 32, 2, 2, 4)  # [tiles, lane, h, word, byte]
      for lane in range(32):
        for h in range(2):
          a[:, gid[lane] + 8 * h, 4 * c[lane]:4 * c[lane] + 4] = ub[:, lane, h, 0]  # a0 / a1
          a[:, gid[lane] + 8 * h, 16 + 4 * c[lane]:16 + 4 * c[lane] + 4] = ub[:, lane, h, 1]  # a2 / a3
      b = np.zeros((32, tokens), np.int64)  # logical B: k x token
      for j in range(tokens // 8):
        for lane in range(32):
          tok = 8 * j + gid[lane]
          src = qx[tok, g * GROUP + 32 * p + 8 * c[lane]:g * GROUP + 32 * p + 8 * c[lane] + 8].astype(np.int64)
          b[4 * c[lane]:4 * c[lane] + 4, tok] = src[:4]  # b0
          b[16 + 4 * c[lane]:16 + 4 * c[lane] + 4, tok] = src[4:]  # b1
      sums += a @ b
    exact = (sums - OFFSET * xsum[:tokens, g][None, None, :].astype(np.int64)).astype(np.int32)
    scale = sx[:tokens, g][None, None, :] * sw.reshape(tiles, TILE_ROWS, groups)[:, :, g][:, :, None]
    acc[g % WARPS] += exact.astype(np.float32) * scale.astype(np.float32)
  out = np.zeros((tiles, TILE_ROWS, tokens), np.float32)
  for warp in range(WARPS):
    out += acc[warp]
  return out.transpose(2, 0, 1).reshape(tokens, tiles * TILE_ROWS)[:m]
