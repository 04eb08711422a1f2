"""Attention of one new token a sequence over a KV cache (a decode step): a Pallas kernel (Triton lowering).

    out = decode_attention(q, k, v, visible)   # q [B, Hq, hd]; k, v [B, S, Hkv, hd]; visible [B, S] bool
                                               # -> [B, Hq, hd] in q's dtype

Why: XLA compiles a decode step's attention (models/llama.attention's two einsums with one query row)
to multiply-and-reduce fusions that read the cache at a fraction of HBM speed. On an H200 at batch 64
(LLaMA-2-7B, a 144-slot cache) the scores' reduction took 46 us a layer, 2.7x the time to read the
keys once, and the reductions were ~2.5 ms of a 6-7 ms step in the bf16 and quantized programs alike
(results/e2e/NOTES.md, "The value cache's layout").

The kernel (flash decoding): program (b, kv head, split) walks its split of the cache in blocks of
`block_s` slots: scores of the G query heads that share the kv head by one tensor-core dot (the G rows
padded to 16, the dot's least M), the visibility mask, an online softmax in fp32 (running max and sum),
and the probabilities (in the cache's dtype, as models/llama.attention casts them) times the values
into an fp32 accumulator. The splits' partial results are merged in jnp by their maxima (log-sum-exp).
Splits exist so that small batches still have enough programs for the SMs (`MIN_PROGRAMS`).

Numerics: the same products and fp32 sums as models/llama.attention, in another order (the online
softmax rescales partial sums). Masked keys get no weight; a row with no visible key (never the case in
decode: the new token sees itself) comes out as the average of its S values, as the einsums give.

decode_attention_quantized: the same attention with the splits' merge done by a second kernel that also
quantizes the result for o_proj (issue 14: attention's output quantized on its way to o_proj; one kernel
instead of XLA's merge and the activation quantizer). A head's hd = 128 outputs are one quantization group.

This module imports only jax, numpy and pallas_kernels (the kernel rule of flexq_jax/DESIGN.md).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import core

MASK_VALUE = -1e30  # a masked score (finite: exp(MASK_VALUE - MASK_VALUE) is 1, never NaN)
MIN_PROGRAMS = 264  # two programs an SM on an H100 / H200 (132 SMs): splits of S are added up to this
MIN_ROWS = 16  # the least M of a Triton tensor-core dot: the G query heads of a kv head are padded to it


def supported(q_shape, k_shape, dtype) -> str | None:
  """Why decode_attention cannot take these shapes (None: it can). q [B, Hq, hd], k [B, S, Hkv, hd]."""
  if len(q_shape) != 3 or len(k_shape) != 4:
    return f"needs q [B, Hq, hd] and k/v [B, S, Hkv, hd], got {tuple(q_shape)} and {tuple(k_shape)}"
  b, hq, hd = q_shape
  kb, _, hkv, khd = k_shape
  if kb != b or khd != hd or hkv == 0 or hq % hkv:
    return f"q {tuple(q_shape)} and k {tuple(k_shape)} disagree (batch, head size, or Hq not a multiple of Hkv)"
  if hd < 16 or hd & (hd - 1):
    return f"needs a head size that is a power of two >= 16, got {hd}"
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
    return f"needs bf16, fp16 or fp32 keys and values, got {jnp.dtype(dtype)}"
  return None


def _kernel(q_ref,  # [B, Hkv, Gp, hd]
            k_ref,  # [B, S, Hkv, hd]
            v_ref,  # [B, S, Hkv, hd]
            vis_ref,  # [B, S] int32: 1 where the key is visible
            o_ref,  # [B, Hkv, NS, Gp, hd] f32: the split's unnormalized output
            m_ref,  # [B, Hkv, NS, Gp] f32: the split's score maximum
            l_ref,  # [B, Hkv, NS, Gp] f32: the split's sum of exp(score - maximum)
            *, s_len: int, blocks_per_split: int, block_s: int, scale: float):
  b, h, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  q = q_ref.at[b, h][...]
  gp, hd = q.shape

  def body(i, carry):
    m_i, l_i, acc = carry
    s0 = (c * blocks_per_split + i) * block_s
    slots = s0 + jnp.arange(block_s)
    inside = slots < s_len
    kb = plgpu.load(k_ref.at[b, pl.ds(s0, block_s), h, :], mask=inside[:, None], other=0)
    vb = plgpu.load(v_ref.at[b, pl.ds(s0, block_s), h, :], mask=inside[:, None], other=0)
    vis = plgpu.load(vis_ref.at[b, pl.ds(s0, block_s)], mask=inside, other=0)
    scores = jnp.dot(q, kb.T, preferred_element_type=jnp.float32) * scale  # [Gp, block_s]
    # masked slots score MASK_VALUE (a row with none visible averages them, as the einsums do); slots past S
    # score lower still, so they get no weight even then
    scores = jnp.where((vis != 0)[None, :], scores, jnp.where(inside, MASK_VALUE, 2 * MASK_VALUE)[None, :])
    m_new = jnp.maximum(m_i, jnp.max(scores, axis=1))
    p = jnp.exp(scores - m_new[:, None])
    alpha = jnp.exp(m_i - m_new)
    acc = acc * alpha[:, None] + jnp.dot(p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
    return m_new, l_i * alpha + jnp.sum(p, axis=1), acc

  init = (jnp.full((gp,), MASK_VALUE, jnp.float32), jnp.zeros((gp,), jnp.float32), jnp.zeros((gp, hd), jnp.float32))
  m_i, l_i, acc = jax.lax.fori_loop(0, blocks_per_split, body, init)
  o_ref.at[b, h, c][...] = acc
  m_ref.at[b, h, c][...] = m_i
  l_ref.at[b, h, c][...] = l_i


def splits_for(batch: int, kv_heads: int, blocks: int, min_programs: int = MIN_PROGRAMS) -> int:
  """Splits of the cache's blocks a (sequence, kv head): enough programs for the SMs, none empty."""
  want = max(1, min(blocks, -(-min_programs // max(1, batch * kv_heads))))
  per = -(-blocks // want)
  return -(-blocks // per)


def block_for(batch: int, slots: int, kv_heads: int) -> int:
  """Cache slots a loop step: the fastest of seven configs on an H200 at LLaMA-2-7B's heads, B 1-64,
  S 160 and 1024 (results/kernels/h200-2026-12-02-decode-attention.md): 32 for short caches, 128 when
  the batch alone gives few programs (one block a split), else 64."""
  if slots <= 256:
    return 32
  return 128 if batch * kv_heads <= 64 else 64


def _partials(q, k, v, visible, block_s, splits, num_warps, interpret):
  """The flash-decoding kernel's per-split partial results (o, m, l), G and Gp (checks included)."""
  why = supported(q.shape, k.shape, k.dtype)
  if why is not None:
    raise ValueError(f"decode_attention {why}")
  if v.shape != k.shape or v.dtype != k.dtype:
    raise ValueError(f"v {v.shape} {v.dtype} must match k {k.shape} {k.dtype}")
  b, hq, hd = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  if visible.shape != (b, s_len):
    raise ValueError(f"visible must be [B, S] = {(b, s_len)}, got {visible.shape}")
  block_s = block_s or block_for(b, s_len, hkv)
  if block_s < 16 or block_s & (block_s - 1):
    raise ValueError(f"block_s must be a power of two >= 16, got {block_s}")
  g = hq // hkv
  gp = max(MIN_ROWS, 1 << (g - 1).bit_length())
  qg = jnp.pad(q.reshape(b, hkv, g, hd).astype(k.dtype), ((0, 0), (0, 0), (0, gp - g), (0, 0)))
  blocks = -(-s_len // block_s)
  ns = splits or splits_for(b, hkv, blocks)
  if not 1 <= ns <= blocks:
    raise ValueError(f"splits must be in [1, {blocks}] ({blocks} blocks of {block_s} slots), got {ns}")
  per = -(-blocks // ns)
  ns = -(-blocks // per)
  o, m, l = pl.pallas_call(
      functools.partial(_kernel, s_len=s_len, blocks_per_split=per, block_s=block_s, scale=1.0 / math.sqrt(hd)),
      out_shape=(jax.ShapeDtypeStruct((b, hkv, ns, gp, hd), jnp.float32),
                 jax.ShapeDtypeStruct((b, hkv, ns, gp), jnp.float32),
                 jax.ShapeDtypeStruct((b, hkv, ns, gp), jnp.float32)),
      grid=(b, hkv, ns),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
      interpret=interpret,
      name="decode_attention",
  )(qg, k, v, visible.astype(jnp.int32))
  return o, m, l, g


def _merge_quantize_kernel(o_ref,  # [B, Hkv, NS, Gp, hd] f32
                           m_ref,  # [B, Hkv, NS, Gp] f32
                           l_ref,  # [B, Hkv, NS, Gp] f32
                           q_ref,  # [Mp, Hq * hd] int8
                           *out_refs,  # act [Hq, 2, Mp] f32 (act_t), or s_x [Mp, Hq] f32 and sum(q_x) [Mp, Hq] int32
                           batch: int, g: int, qmax: int, out_dtype, act_t: bool, phase_major: bool):
  """One (token row, kv head): the splits merged as decode_attention's jnp merge writes it (the maximum over
  the splits, then the weighted sums in split order), rounded to the attention's dtype, then each of the G
  heads' 128 outputs quantized as one group (pallas_kernels/core.py). Rows past the batch write zeros."""
  b, h = pl.program_id(0), pl.program_id(1)
  ns, gp, hd = o_ref.shape[2], o_ref.shape[3], o_ref.shape[4]
  real = b < batch
  bb = jnp.minimum(b, batch - 1)
  top = jax.lax.fori_loop(1, ns, lambda c, t: jnp.maximum(t, m_ref.at[bb, h, c][...]), m_ref.at[bb, h, 0][...])

  def add(c, carry):
    num, den = carry
    w = jnp.exp(m_ref.at[bb, h, c][...] - top)
    return num + o_ref.at[bb, h, c][...] * w[:, None], den + l_ref.at[bb, h, c][...] * w

  num, den = jax.lax.fori_loop(0, ns, add, (jnp.zeros((gp, hd), jnp.float32), jnp.zeros((gp,), jnp.float32)))
  rows = jnp.arange(gp)
  keep = real & (rows < g)
  out = jnp.where(keep[:, None], num / jnp.where(keep, den, 1.0)[:, None], 0.0)
  q, s = core.quantize_groups(out.astype(out_dtype).astype(jnp.float32), qmax)  # [Gp, 128], [Gp]
  xsum = jnp.sum(q, axis=1).astype(jnp.int32)
  if phase_major:  # column 32p + t <- k = 4t + p
    q = q.reshape(gp, 32, 4).transpose(0, 2, 1).reshape(gp, hd)
  heads = pl.ds(h * g, gp)
  ok = rows < g
  plgpu.store(q_ref.at[b, pl.ds(h * g * hd, gp * hd)], q.astype(jnp.int8).reshape(gp * hd),
              mask=jnp.arange(gp * hd) < g * hd)
  if act_t:
    [act_ref] = out_refs
    for i, val in enumerate((s, xsum.astype(jnp.float32))):
      plgpu.store(act_ref.at[heads, pl.ds(i, 1), b], val[:, None], mask=ok[:, None])
  else:
    s_ref, sum_ref = out_refs
    plgpu.store(s_ref.at[b, heads], s, mask=ok)
    plgpu.store(sum_ref.at[b, heads], xsum, mask=ok)


@functools.partial(jax.jit, static_argnames=("a_bits", "rows", "act_t", "phase_major", "block_s", "splits",
                                             "num_warps", "interpret"))
def decode_attention_quantized(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array, *, a_bits: int,
                               rows: int, act_t: bool, phase_major: bool = True, block_s: int | None = None,
                               splits: int | None = None, num_warps: int = 4,
                               interpret: bool = False) -> tuple[jax.Array, ...]:
  """decode_attention(q, k, v, visible) flattened to [B, Hq * hd] and quantized for o_proj, by the numerics
  contract, in the layout of the GEMM that reads it: q_x int8 [rows, Hq * hd] (phase-major groups unless
  phase_major=False; rows >= B zeros) with either act fp32 [Hq, 2, rows] (act_t: the small-M Mosaic GEMM's
  operand, as w6a_matmul.quantize_activations_t writes it) or s_x fp32 [rows, Hq] and sum(q_x) int32 [rows, Hq]
  (the Triton GEMMs', as w6a_matmul.quantize_activations). Needs hd = 128 (a head is one group).

  The same numbers as quantizing decode_attention's output, up to the fp32 order of the splits' merge (an
  output on a rounding boundary of the attention's dtype may land one step apart)."""
  b, hq, hd = q.shape
  if hd != core.GROUP:
    raise ValueError(f"decode_attention_quantized needs a head size of {core.GROUP} (one quantization group a "
                     f"head), got {hd}")
  if rows < b:
    raise ValueError(f"rows={rows} must be at least the batch, {b}")
  o, m, l, g = _partials(q, k, v, visible, block_s, splits, num_warps, interpret)
  scales = ((jax.ShapeDtypeStruct((hq, 2, rows), jnp.float32),) if act_t else
            (jax.ShapeDtypeStruct((rows, hq), jnp.float32), jax.ShapeDtypeStruct((rows, hq), jnp.int32)))
  return pl.pallas_call(
      functools.partial(_merge_quantize_kernel, batch=b, g=g, qmax=core.qrange(a_bits)[1], out_dtype=q.dtype,
                        act_t=act_t, phase_major=phase_major),
      out_shape=(jax.ShapeDtypeStruct((rows, hq * hd), jnp.int8), *scales),
      grid=(rows, k.shape[2]),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret,
      name="decode_attention_quantize",
  )(o, m, l)


@functools.partial(jax.jit, static_argnames=("block_s", "splits", "num_warps", "interpret"))
def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array, *, block_s: int | None = None,
                     splits: int | None = None, num_warps: int = 4, interpret: bool = False) -> jax.Array:
  """softmax(q k^T / sqrt(hd), masked by `visible`) v for one query token a sequence.

  Args:
    q: [B, Hq, hd] the new token's queries.
    k, v: [B, S, Hkv, hd] the cache (grouped-query: query head j reads kv head j // (Hq / Hkv)).
    visible: [B, S] bool, True where the token may attend to the slot.
    block_s: cache slots a loop step (a power of two >= 16; None: block_for's choice).
    splits: splits of S a (sequence, kv head), merged afterwards (None: splits_for's count).
    num_warps: Triton warps a program.
    interpret: run the kernel in Pallas' interpret mode (CPU tests).

  Returns:
    [B, Hq, hd] in q's dtype.
  """
  b, hq, hd = q.shape
  o, m, l, g = _partials(q, k, v, visible, block_s, splits, num_warps, interpret)
  top = jnp.max(m, axis=2, keepdims=True)  # merge the splits: weights exp(m_split - max)
  w = jnp.exp(m - top)
  out = jnp.sum(o * w[..., None], axis=2) / jnp.sum(l * w, axis=2)[..., None]  # [B, Hkv, Gp, hd]
  return out[:, :, :g].reshape(b, hq, hd).astype(q.dtype)
