"""End-to-end benchmark: prefill latency, decode tokens/s, weight bytes and peak memory of a LLaMA
on one GPU with bf16, W8A8 and FlexQ linear layers (random weights at the real shapes).

    python -m evaluation.e2e_bench                       # LLaMA-2-7B and 13B, batch 1/8/32, prompt 128/1024
    python -m evaluation.e2e_bench --models llama2-7b,llama2-13b --batches 1 --prompts 128
    python -m evaluation.e2e_bench --models llama2-70b --batches 1 --prompts 128   # fits one H200
    flexq bench ...                                      # the same
    flexq bench --models llama2-70b,llama2-13b --methods bf16,flexq --tp 1,2,4 --batches 1,16 --prompts 128
                                                         # tensor parallel: split over 2 and 4 GPUs of a mesh
    python -m evaluation.e2e_bench --merge a.json b.json --tag all   # runs of several calls, one table

Methods (every linear layer of every block; embeddings, norms, attention and the KV cache stay bf16):
  bf16         XLA bf16 dots (cuBLAS).
  w8a8-xla     int8 weights per channel, per-token int8 activations, XLA's int8 dot
               (evaluation.baselines.Int8Linear): what a JAX user has today.
  w8a8-pallas  8-bit weights through our Pallas kernel (flexq_jax QuantizedLinear, layout
               "pallas8", group-128 scales, A8): the same kernel as FlexQ, only the weight width
               differs.
  flexq        W6A6 with A8 on every down_proj (FlexQ's released rule; the sensitivity analysis
               needs real weights), 6-bit weights on the backend flexq_jax.placement picks per layer ("auto").
  flexq-bmma   the same on the CUDA BMMA kernel (optional: --methods).
  flexq-cuda-gemv, flexq-mgpu-small, flexq-fused-norm
               flexq with kernels the card's tuning table does not (yet) turn on: the CUDA decode
               GEMV up to M = 8; the small-M Mosaic GPU GEMM from M = 2 to 255; the RMSNorms fused
               with the activation quantization of the GEMMs that read them (METHOD_TUNING).

Projections: q/k/v and gate/up fused into one GEMM each, for every method (`--unfused` keeps
them separate), as models.llama.fuse_projections serves a real model.

Layers: unrolled (a list of per-layer weights, what generate() runs) by default. `--layers
stacked` scans one stacked copy instead: it compiles faster, but XLA slices each layer's weights
out of the stack into a fresh buffer every decode step (a dynamic slice feeding a GEMM custom
call), which doubles the weight traffic (measured on an H200: results/e2e/NOTES.md).

Tensor parallelism (--tp N, flexq_jax/sharding.py): the model split over a mesh of N GPUs, one
shard's random weights copied to every GPU (sharding.replicate_local: the shapes, kernels and
all-reduces of a real split, not its values), each shard's kernels chosen by placement at the
shard's shapes; a row's "x TP=1" is its tok/s over the same method on one GPU.

Timing: the prefill (KV cache made inside, prompt [B, P]) and a jit-compiled greedy decode loop of
`new_tokens` steps (lax.fori_loop, no early stop; cache donated) are compiled ahead of time, run
once to warm up, then timed on the host around block_until_ready (the loop's one dispatch is
negligible against hundreds of steps). Peak memory is XLA's plan for the larger of the two
programs (arguments + outputs + temporaries - aliased). Every finished configuration is written at once (markdown, JSON, plot), so a
run cut short keeps what it measured; --budget-s stops starting new ones.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import gc
import gzip
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from evaluation import baselines, kernel_bench
from evaluation.tables import cell
from flexq_jax import backends, placement, sharding, tuning
from flexq_jax.qlinear import QuantizedLinear
from models import config as model_configs
from models import llama
from pallas_kernels import core

METHODS = ("bf16", "w8a8-xla", "w8a8-pallas", "flexq", "flexq-bmma", "flexq-cuda-gemv", "flexq-mgpu-small",
           "flexq-mgpu-small-split", "flexq-fused-norm", "flexq-triton-m16", "flexq-nosplit", "flexq-sw16", "flexq-glue",
           "flexq-cuda-small", "flexq-ragged", "flexq-divisor", "flexq-gemv-u2", "flexq-gemv-u4",
           "flexq-gemv-pdl", "flexq-qhead", "flexq-gemv-w16", "flexq-gemv-w32", "flexq-gemv-w32-narrow",
           "flexq-gemv-w16-narrow", "flexq-gemv-ring2", "flexq-gemv-ring4", "flexq-gemv-ring8",
           "flexq-fused-norm-small", "flexq-stream-k", "flexq-fused-swiglu", "flexq-fused-attention",
           "flexq-fused-producers", "flexq-gemv-fused", "flexq-gemv-fused-residual", "flexq-gemv-fused-all")
DEFAULT_METHODS = ("bf16", "w8a8-xla", "w8a8-pallas", "flexq")
MODELS = {"llama2-7b": model_configs.llama2_7b, "llama3-8b": model_configs.llama3_8b,
          "llama2-13b": model_configs.llama2_13b, "llama2-70b": model_configs.llama2_70b, "tiny": None}
A8_PROJECTIONS = ("down_proj",)  # FlexQ's released rule
# Methods pinned to one backend (flexq_jax/backends.py); "flexq" takes placement's "auto" choice.
METHOD_BACKENDS = {"w8a8-pallas": backends.PALLAS.name, "flexq-bmma": backends.BMMA.name}
# Methods that run "flexq" under tuning settings beyond the card's table (tuning.EXTRA_ENV):
# "flexq-cuda-gemv" = the pallas backend with the CUDA decode GEMV (flexq_jax/cuda/gemv.py) up to M = 8,
# its quantizer-inside variant up to M = 2 (the h200 table turns on only the latter, at M = 1).
# "flexq-mgpu-small" = the small-M Mosaic GPU GEMM (pallas_kernels/w6a_gemm_mgpu_small.py) from M = 2 to 255 in every
# layer (the h200 table uses it from M = 16 on every layer); "flexq-mgpu-small-split" the same
# split along K until every SM has a CTA (SmallConfig.split_k, w6a_gemm_mgpu_small.split_for).
# "flexq-fused-norm" = the RMSNorms fused with the q/k/v and gate/up activation quantization where the Triton
# GEMMs run (w6a_matmul.norm_quantize; backends.fused_norm_input); "flexq-fused-norm-small" the same where the
# small-M Mosaic GEMM runs (decode batches 16-255: norm_quantize writes its q_x and [G, 2, M] operand, so the q/k/v
# and gate/up quantizer launches go).
# "flexq-triton-m16" = the table with the small-M Mosaic GEMM from M = 17, as before 2026-12-02: batch-16 decode on
# the Triton kernels, beside "flexq" (the table: from M = 16) in one run.
# "flexq-cuda-small" = the small-M CUDA GEMM on the int8 tensor cores (flexq_jax/cuda/gemm_small.py) at M = 2-64.
# "flexq-nosplit" = the small-M Mosaic GEMM unsplit (no fp32 partials, no transposed output) on every layer.
# "flexq-sw16" = the small-M Mosaic GEMM reading the stored fp16 weight scales (SmallConfig.sw_f16; no fp32 copy a step).
# "flexq-glue" = that and its quantizer writing the fused TMA's [G, 2, M] operand (SmallConfig.quant_t; no transposes
# and stack between the kernels).
# "flexq-ragged" = the small-M Mosaic GEMM split by w6a_gemm_mgpu_small.split_ragged (any split count, by a cost model)
# on every layer from M = 16, LLaMA-2-7B's down_proj at M = 16 included (no mosaic_small_skip): the h200 table since
# 2026-12-02 afternoon; "flexq-divisor" = the table before it (split_for's divisor splits, down_proj at M = 16 on Triton).
# "flexq-gemv-u2" / "-u4" = the CUDA decode GEMV (quantizer inside) with 2 / 4 groups' loads in flight a warp.
# "flexq-gemv-pdl" = that GEMV launched with programmatic dependent launch (its weight loads start before the
# previous kernel has finished).
# "flexq-gemv-w16" / "-w32" = that GEMV in blocks of 16 / 32 warps on every layer (more of a layer's weights in
# flight at once); "-w32-narrow" / "-w16-narrow" = 32 / 16 warps on layers of at most 264 row tiles (2 blocks an
# SM), 8 elsewhere.
# "flexq-gemv-ring2" / "-ring4" / "-ring8" = that GEMV (8 warps) with the block's weights streamed through a
# shared-memory ring of 2 / 4 / 8 stages of 12 KB and x quantized once a block (M <= 2).
# "flexq-stream-k" = the small-M Mosaic GEMM streaming equal runs of (tile, ring slot) units a CTA across tile
# boundaries (SmallConfig.stream_k) instead of whole or split tiles, on every layer where the table runs it.
# "flexq-fused-swiglu" = down_proj's input silu(gate) * up quantized by one kernel reading the gate/up GEMM's output
# (w6a_matmul.quantize_activations(_t)(swiglu=True); backends.fused_swiglu_input) where the Triton or small-M Mosaic
# GEMM runs: XLA's SwiGLU kernel and the separate quantizer become one launch. "flexq-fused-attention" = o_proj's
# input quantized by the decode attention's merge kernel (decode_attention_quantized: XLA's merge and the quantizer
# become one launch; heads of 128); "flexq-fused-producers" = both.
# "flexq-gemv-fused" = the CUDA decode GEMV (batch 1) forming its own input: the RMSNorm of q/k/v and gate/up and
# down_proj's SwiGLU inside the GEMV (cuda.gemv.gemv_fused; backends.gemv_folds), and the residual add after o_proj
# and down_proj in its store; "flexq-gemv-fused-residual" = the residual adds only; "flexq-gemv-fused-all" = every
# fold and the batch-16+ producers (fused SwiGLU and attention quantizers) together.
# "flexq-qhead" = the table with a W6A8 lm_head (issue 14's optional quantized output projection, random weights
# at its real shape) instead of the bf16 one.
METHOD_TUNING = {"flexq-cuda-gemv": {"cuda_gemv_xq_max_m": 2, "cuda_gemv_max_m": 8},
                 "flexq-mgpu-small": {"mosaic_small_min_m": 1, "mosaic_small_max_m": 255, "mosaic_small_min_n": 0},
                 "flexq-mgpu-small-split": {"mosaic_small_min_m": 1, "mosaic_small_max_m": 255, "mosaic_small_min_n": 0,
                                            "mosaic_small_split": True},
                 "flexq-fused-norm": {"fuse_norm_quant": True},
                 "flexq-fused-norm-small": {"fuse_norm_quant_small": True},
                 "flexq-stream-k": {"mosaic_small_stream_k": True},
                 "flexq-fused-swiglu": {"fuse_swiglu_quant": True},
                 "flexq-fused-attention": {"fuse_attention_quant": True},
                 "flexq-fused-producers": {"fuse_swiglu_quant": True, "fuse_attention_quant": True},
                 "flexq-gemv-fused": {"cuda_gemv_fuse": ["norm", "swiglu", "residual"]},
                 "flexq-gemv-fused-residual": {"cuda_gemv_fuse": ["residual"]},
                 "flexq-gemv-fused-all": {"cuda_gemv_fuse": ["norm", "swiglu", "residual"], "fuse_swiglu_quant": True,
                                          "fuse_attention_quant": True},
                 "flexq-triton-m16": {"mosaic_small_min_m": 17},
                 "flexq-cuda-small": {"cuda_small_min_m": 2, "cuda_small_max_m": 64},
                 "flexq-nosplit": {"mosaic_small_split": False},
                 "flexq-sw16": {"mosaic_small_sw_f16": True},
                 "flexq-glue": {"mosaic_small_sw_f16": True, "mosaic_small_quant_t": True},
                 "flexq-ragged": {"mosaic_small_ragged": True, "mosaic_small_skip": []},
                 "flexq-divisor": {"mosaic_small_ragged": False, "mosaic_small_skip": [[4096, 11008, 16]]},
                 "flexq-gemv-u2": {"cuda_gemv_unroll": 2}, "flexq-gemv-u4": {"cuda_gemv_unroll": 4},
                 "flexq-gemv-pdl": {"cuda_gemv_pdl": True},
                 "flexq-gemv-w16": {"cuda_gemv_wide_warps": 16}, "flexq-gemv-w32": {"cuda_gemv_wide_warps": 32},
                 "flexq-gemv-w32-narrow": {"cuda_gemv_wide_warps": 32, "cuda_gemv_wide_max_tiles": 264},
                 "flexq-gemv-w16-narrow": {"cuda_gemv_wide_warps": 16, "cuda_gemv_wide_max_tiles": 264},
                 "flexq-gemv-ring2": {"cuda_gemv_ring": 2}, "flexq-gemv-ring4": {"cuda_gemv_ring": 4},
                 "flexq-gemv-ring8": {"cuda_gemv_ring": 8}}


@contextlib.contextmanager
def method_tuning(method: str):
  """Runs the body with `method`'s METHOD_TUNING merged over the tuning table. The kernels are
  chosen at trace time, so jax's caches are cleared on the way in and out: a program traced for
  another method (same shapes) is never reused."""
  extra = METHOD_TUNING.get(method)
  if extra is None:
    yield
    return
  old = os.environ.get(tuning.EXTRA_ENV)
  os.environ[tuning.EXTRA_ENV] = json.dumps(extra)
  jax.clear_caches()
  try:
    yield
  finally:
    if old is None:
      os.environ.pop(tuning.EXTRA_ENV, None)
    else:
      os.environ[tuning.EXTRA_ENV] = old
    jax.clear_caches()


def tiny_config() -> model_configs.LlamaConfig:
  """A small LLaMA for tests and CPU smoke runs (every dimension a multiple of 16)."""
  return model_configs.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
                                   num_heads=4, num_kv_heads=2, max_position_embeddings=2048)


def model_config(name: str) -> model_configs.LlamaConfig:
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
  return tiny_config() if name == "tiny" else MODELS[name]()


def random_linear(method: str, key, layers: int, k: int, n: int, a_bits: int):
  """A stacked [layers, ...] weight leaf of `method` with random values of a realistic scale."""
  kw, ks = jax.random.split(key)
  groups = core.padded_k(k) // 128
  if method == "bf16":
    return 0.02 * jax.random.normal(kw, (layers, k, n), jnp.bfloat16)
  if method == "w8a8-xla":
    w = jax.random.randint(kw, (layers, k, n), -127, 128, jnp.int32).astype(jnp.int8)
    return baselines.Int8Linear(w=w, scale=jax.random.uniform(ks, (layers, n), jnp.float32, 2e-4, 4e-4))
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; known: {METHODS}")
  w8 = method == "w8a8-pallas"
  w_bits, a_bits, scale = (8, 8, 3e-4) if w8 else (6, a_bits, 1e-3)
  template = QuantizedLinear(packed=None, scales=None, in_features=k, out_features=n, w_bits=w_bits, a_bits=a_bits,
                             group_size=128)
  backend = backends.get(METHOD_BACKENDS.get(method) or placement.choose(template, 1, dtype=jnp.bfloat16)[0])
  layout = backend.layout_for(w_bits) or "pallas6"  # reference (CPU): time the pallas6 bytes
  # Random bytes are valid weights in every layout (bitplanes_g4's padding words would be 0: timing only).
  shape = {"pallas6": (layers, n // 16, groups, 3, 16, 32), "pallas8": (layers, n // 16, groups, 16, 128),
           "bitplanes_g4": (layers, 6, n, core.g4_words(k))}[layout]
  packed = jax.random.bits(kw, shape, jnp.uint32 if layout == "bitplanes_g4" else jnp.uint8)
  if layout == "pallas8":
    packed = jax.lax.bitcast_convert_type(packed, jnp.int8)
  scales = jax.random.uniform(ks, (layers, n, groups), jnp.float32, 0.5 * scale, 1.5 * scale).astype(jnp.float16)
  return template.replace(packed=packed, scales=scales, layout=layout, backend=backend.name)


def random_params(cfg, method: str, seed: int = 0, layers: str = "list", fused: bool = True,
                  plan: sharding.TPPlan | None = None) -> dict:
  """Parameters with `method`'s linear layers: a list of per-layer dicts (layers="list", the form
  generate() runs unrolled) or the stacked form models.llama.stack_layers makes ("stacked": one
  lax.scan over the layers); fused: q/k/v and gate/up as one kernel each (what models.llama.fuse_projections makes
  of a real model).

  plan: tensor parallelism (flexq_jax/sharding.py): one shard's random weights (plan.local_config's
  shapes, backends chosen at the shard's shapes), made one layer at a time and copied to every
  device of the mesh (sharding.replicate_local), so no device holds more than its shard and one
  layer; list layers only.
  """
  if layers not in ("list", "stacked"):
    raise ValueError(f"layers must be 'list' or 'stacked', got {layers!r}")
  put = lambda name, leaf: leaf
  if plan is not None:
    if layers != "list":
      raise ValueError("tensor parallelism (--tp) runs list layers, not --layers stacked")
    if method == "w8a8-xla":
      raise ValueError("w8a8-xla's int8 leaves are not split by flexq_jax/sharding.py (--tp > 1)")
    put = lambda name, leaf: sharding.replicate_local(name, leaf, plan)
  local = cfg if plan is None else plan.local_config
  key = jax.random.key(seed)
  keys = iter(jax.random.split(key, 16))
  d, L = cfg.hidden_size, cfg.num_layers

  def block(key, count):  # `count` layers stacked on a leading axis
    ks = iter(jax.random.split(key, 8))
    out = {name: random_linear(method, next(ks), count, k, n, 8 if name in A8_PROJECTIONS else 6)
           for name, (k, n) in llama.projection_shapes(local, fused).items()}
    out["input_layernorm"] = jnp.ones((count, d), jnp.bfloat16)
    out["post_attention_layernorm"] = jnp.ones((count, d), jnp.bfloat16)
    return out

  layer_key = next(keys)
  if layers == "stacked":
    blocks = block(layer_key, L)
  else:  # made one layer at a time (no stacked transient: 13B's four methods fit one card)
    blocks = []
    for i in range(L):
      one = jax.tree.map(lambda a: a[0], block(jax.random.fold_in(layer_key, i), 1))
      blocks.append({name: put(name, leaf) for name, leaf in one.items()})
  embed = (0.02 * jax.random.normal(next(keys), (cfg.vocab_size, d), jnp.float32)).astype(jnp.bfloat16)
  params = {"embed_tokens": put("embed_tokens", embed), "layers": blocks,
            "norm": put("norm", jnp.ones((d,), jnp.bfloat16))}
  if method == "flexq-qhead":  # issue 14's quantized lm_head: W6A8 (flexq_jax/lm_head.py's "w6a8"), a copy when tied
    if plan is not None:
      raise ValueError("flexq-qhead runs at --tp 1 only (the quantized lm_head is not split by flexq_jax/sharding.py)")
    params["lm_head"] = jax.tree.map(lambda a: a[0], random_linear(method, next(keys), 1, d, cfg.vocab_size, 8))
  elif not cfg.tie_word_embeddings:
    vocab = cfg.vocab_size // plan.tp if plan is not None and plan.vocab_sharded else cfg.vocab_size  # a shard's
    head = (0.02 * jax.random.normal(next(keys), (d, vocab), jnp.float32)).astype(jnp.bfloat16)
    params["lm_head"] = put("lm_head", head)
  return params


def linear_bytes(params: dict) -> int:
  """Bytes of the linear layers' weights (packed weights + scales), all blocks."""
  layers = [params["layers"]] if llama.is_stacked(params) else params["layers"]
  return sum(int(x.size) * x.dtype.itemsize for layer in layers for name in layer if name.endswith("_proj")
             for x in jax.tree.leaves(layer[name]))


def _forward(params, cfg, tokens, cache, plan):
  if plan is None:
    return llama.forward(params, cfg, tokens, None, cache)
  return sharding.forward(params, plan, tokens, None, cache)


def _prefill(params, tokens, *, cfg, max_len, plan=None):
  if plan is None:
    cache = llama.init_cache(cfg, tokens.shape[0], max_len, jnp.bfloat16, stacked=llama.is_stacked(params))
  else:
    cache = sharding.init_cache(plan, tokens.shape[0], max_len, jnp.bfloat16)
  logits, cache = _forward(params, cfg, tokens, cache, plan)
  return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


def _decode(params, cache, token, *, cfg, steps, plan=None):
  def body(_, carry):
    token, cache = carry
    logits, cache = _forward(params, cfg, token[:, None], cache, plan)
    return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache
  return jax.lax.fori_loop(0, steps, body, (token, cache))


def _peak(compiled) -> int:
  m = compiled.memory_analysis()
  if m is None:
    return -1
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


@dataclasses.dataclass
class Row:
  model: str
  method: str
  batch: int
  prompt: int
  new_tokens: int
  layers: str = "list"
  fused: bool = True  # q/k/v and gate/up one kernel each
  prefill_ms: float = float("nan")
  decode_ms_per_step: float = float("nan")
  decode_tok_s: float = float("nan")
  linear_weight_bytes: int = 0
  peak_plan_bytes: int = 0
  backends: str = ""
  compile_s: float = float("nan")
  error: str = ""
  tp: int = 1  # tensor-parallel size: GPUs the model is split over (flexq_jax/sharding.py)


def measure(model: str, method: str, cfg, params, batch: int, prompt: int, new_tokens: int, log=print,
            plan: sharding.TPPlan | None = None) -> Row:
  row = Row(model, method, batch, prompt, new_tokens, "stacked" if llama.is_stacked(params) else "list",
            fused=any(llama.fused_count(params).values()), linear_weight_bytes=linear_bytes(params),
            tp=1 if plan is None else plan.tp)
  row.backends = ",".join(sorted(set(placement.backends_of(params["layers"]).values()))) or "xla"
  tokens = jax.random.randint(jax.random.key(batch * 7919 + prompt), (batch, prompt), 0, cfg.vocab_size, jnp.int32)
  t0 = time.perf_counter()
  prefill = jax.jit(functools.partial(_prefill, cfg=cfg, max_len=prompt + new_tokens, plan=plan)).lower(
      params, tokens).compile()
  tok, cache = prefill(params, tokens)
  decode = jax.jit(functools.partial(_decode, cfg=cfg, steps=new_tokens, plan=plan), donate_argnums=(1,)).lower(
      params, cache, tok).compile()
  row.compile_s = time.perf_counter() - t0
  row.peak_plan_bytes = max(_peak(prefill), _peak(decode))

  times = []
  for _ in range(3):
    t0 = time.perf_counter()
    tok, cache = jax.block_until_ready(prefill(params, tokens))
    times.append(time.perf_counter() - t0)
  row.prefill_ms = 1e3 * float(np.median(times))
  dec = []
  for _ in range(2):  # warm-up, then timed
    tok, cache = jax.block_until_ready(prefill(params, tokens))
    t0 = time.perf_counter()
    out = jax.block_until_ready(decode(params, cache, tok))
    dec.append(time.perf_counter() - t0)
    del out
  step = dec[-1] / new_tokens
  row.decode_ms_per_step = 1e3 * step
  row.decode_tok_s = batch / step
  log(f"{model} {method:12s} TP={row.tp} B={batch:3d} P={prompt:5d}: prefill {row.prefill_ms:8.1f} ms  decode "
      f"{row.decode_ms_per_step:7.2f} ms/step {row.decode_tok_s:9.1f} tok/s  linear weights "
      f"{row.linear_weight_bytes / 2**30:6.2f} GiB  peak plan {row.peak_plan_bytes / 2**30:6.2f} GiB  "
      f"[{row.backends}] compile {row.compile_s:.0f}s")
  return row


def _category(name: str) -> str:
  n = name.lower()
  if "w6a_gemv" in n or "w6a_gemm" in n:
    return "pallas GEMM/GEMV"
  if "w6a_quantize" in n:
    return "pallas activation quantization"
  if "flexq" in n and "gemv" in n:
    return "CUDA GEMV"
  if "flexq" in n and "gemm_small" in n:
    return "CUDA small-M GEMM"
  if "flexq" in n:
    return "BMMA (CUDA)"
  if any(t in n for t in ("gemm", "cutlass", "xmma", "cublas", "sm90_", "nvjet")):
    return "cuBLAS GEMM"
  if "reduce" in n:
    return "XLA reductions"
  return "other XLA kernels"


def profile_decode(model: str, method: str, cfg, params, batch: int, prompt: int, steps: int = 16,
                   log=print, plan: sharding.TPPlan | None = None, top_n: int = 20,
                   hlo_path: Path | None = None) -> dict:
  """Device time of one decode step by kernel category (jax.profiler), against its wall time
  (with a plan: the kernels of every GPU of the mesh, summed). With hlo_path, the compiled decode
  program's HLO text goes there (gzip): the profiler's kernel names are its fusions' names."""
  tokens = jax.random.randint(jax.random.key(1), (batch, prompt), 0, cfg.vocab_size, jnp.int32)
  prefill = jax.jit(functools.partial(_prefill, cfg=cfg, max_len=prompt + steps, plan=plan))
  decode = jax.jit(functools.partial(_decode, cfg=cfg, steps=steps, plan=plan), donate_argnums=(1,))
  tok, cache = prefill(params, tokens)
  jax.block_until_ready(decode(params, cache, tok))
  tok, cache = jax.block_until_ready(prefill(params, tokens))
  if hlo_path is not None:
    hlo_path.write_bytes(gzip.compress(decode.lower(params, cache, tok).compile().as_text().encode()))
    log(f"profile {model} {method}: decode HLO in {hlo_path}")
  timing = {}

  def run():  # timed inside the trace, as the kernels are
    t0 = time.perf_counter()
    out = jax.block_until_ready(decode(params, cache, tok))
    timing["wall"] = time.perf_counter() - t0
    return out

  events = kernel_bench.traced_kernels(run)
  wall = timing["wall"]
  cats: dict[str, list[float]] = {}
  for name, durations in events.items():
    cats.setdefault(_category(name), []).extend(durations)
  per_step = {c: dict(us=sum(v) / steps, launches=len(v) / steps) for c, v in cats.items()}
  busy = sum(v["us"] for v in per_step.values())
  # The kernels that take most of a step, by name (what a kind's total is made of).
  top = sorted(((name, sum(d) / steps, len(d) / steps) for name, d in events.items()), key=lambda t: -t[1])[:top_n]
  out = dict(model=model, method=method, batch=batch, prompt=prompt, tp=1 if plan is None else plan.tp,
             steps=steps, wall_us_per_step=1e6 * wall / steps,
             device_busy_us_per_step=busy, kernels=per_step,
             top_kernels=[dict(name=n[:160], us=u, launches=k) for n, u, k in top])
  log(f"profile {model} {method} B={batch} P={prompt}: step {out['wall_us_per_step']:.0f} us wall, "
      f"{busy:.0f} us of kernels: " + ", ".join(f"{c} {v['us']:.0f} us / {v['launches']:.0f}" for c, v in
                                               sorted(per_step.items(), key=lambda kv: -kv[1]["us"])))
  for t in out["top_kernels"]:
    log(f"  {t['us']:8.1f} us / {t['launches']:5.1f}  {_category(t['name']):30s} {t['name'][:120]}")
  return out


def markdown(rows: list[Row], card: str, device: str, date: str, profiles: list[dict] = ()) -> str:
  lines = [f"# End-to-end LLaMA on {device} ({card}), {date}", "",
           "Random weights at the real shapes; greedy decode of `new` tokens after a prompt of P tokens, batch B. "
           "Speedups are over bf16 and the two W8A8 runs of the same model, batch and prompt. Weight bytes: the linear "
           "layers only (packed weights + scales). Peak: XLA's memory plan of the larger program (prefill or decode "
           "loop: parameters, KV cache, temporaries). Projections: "
           + {(True,): "q/k/v and gate/up fused, one GEMM each (models.llama.fuse_projections), in every method.",
              (False,): "q/k/v and gate/up as separate GEMMs (--unfused), in every method."}.get(
               tuple(sorted({r.fused for r in rows})), "fused in some rows and not in others (see the JSON)."), "",
           "TP: GPUs the model is split over (tensor parallelism, flexq_jax/sharding.py; weight bytes are all "
           "shards', padding and replicated KV heads included); x TP=1: tok/s over the same method, batch and prompt "
           "on one GPU.", "",
           "| model | method | B | P | new | TP | prefill ms | decode ms/step | tok/s | x bf16 | x W8A8 xla | "
           "x W8A8 pallas | x TP=1 | linear GiB | of bf16 | peak GiB | backends |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
           "---: | --- |"]
  base = {(r.model, r.method, r.batch, r.prompt, r.tp): r for r in rows}
  for r in rows:
    def ratio(other, field="decode_tok_s", tp=r.tp):
      o = base.get((r.model, other, r.batch, r.prompt, tp))
      return getattr(r, field) / getattr(o, field) if o and getattr(o, field) > 0 else float("nan")
    bf = base.get((r.model, "bf16", r.batch, r.prompt, r.tp))
    of_bf16 = r.linear_weight_bytes / bf.linear_weight_bytes if bf and bf.linear_weight_bytes else float("nan")
    lines.append(f"| {r.model} | {r.method} | {r.batch} | {r.prompt} | {r.new_tokens} | {r.tp} | {cell(r.prefill_ms, '.1f')} | "
                 f"{cell(r.decode_ms_per_step, '.2f')} | {cell(r.decode_tok_s, '.1f')} | {cell(ratio('bf16'), '.2f')} | "
                 f"{cell(ratio('w8a8-xla'), '.2f')} | {cell(ratio('w8a8-pallas'), '.2f')} | {cell(ratio(r.method, tp=1), '.2f')} | "
                 f"{r.linear_weight_bytes / 2**30:.2f} | {cell(of_bf16, '.3f')} | {r.peak_plan_bytes / 2**30:.2f} | {r.backends} |")
  if profiles:
    lines += ["", "Decode step profile (jax.profiler, device kernel time a step by kind; the rest of the wall time "
              "is the GPU idle between kernels):", "",
              "| model | method | B | P | TP | wall us/step | kernels us/step | kernel launches/step | by kind (us / launches) |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for p in profiles:
      kinds = "; ".join(f"{c} {v['us']:.0f} / {v['launches']:.0f}" for c, v in
                        sorted(p["kernels"].items(), key=lambda kv: -kv[1]["us"]))
      launches = sum(v["launches"] for v in p["kernels"].values())
      lines.append(f"| {p['model']} | {p['method']} | {p['batch']} | {p['prompt']} | {p.get('tp', 1)} | "
                   f"{p['wall_us_per_step']:.0f} | "
                   f"{p['device_busy_us_per_step']:.0f} | {launches:.0f} | {kinds} |")
  lines += tp_lines(rows)
  failed = [r for r in rows if r.error]
  if failed:
    lines += ["", "Failed (left empty above):"] + [f"- {r.model} {r.method}{f' TP={r.tp}' if r.tp > 1 else ''} B={r.batch} P={r.prompt}: {r.error}"
                                                   for r in failed]
  return "\n".join(lines) + "\n"


def tp_lines(rows: list[Row], method: str = "flexq", baseline: str = "bf16") -> list[str]:
  """The tensor-parallel summary under the table (rows of several TP sizes): decode tok/s of
  `method` over its TP=1 run, and method / baseline at each TP against the same at TP=1."""
  ok = {(r.model, r.method, r.batch, r.prompt, r.tp): r.decode_tok_s for r in rows
        if not r.error and r.decode_tok_s > 0}
  keys = sorted({(m, b, p, t) for m, meth, b, p, t in ok if meth == method and t > 1})
  if not keys:
    return []
  nan = float("nan")
  lines = ["", f"Tensor parallelism, decode tok/s of {method}: over its TP=1 run, and {method} / {baseline} at each "
           f"TP against the same at TP=1 (issue 18's targets: LLaMA-2-70B {method} batch 1 at TP=2 >= 1.6x and at "
           f"TP=4 >= 2.5x its TP=1; {method} / {baseline} within 10% of its TP=1 value):", "",
           f"| model | B | P | TP | {method} tok/s | x its TP=1 | {baseline} x its TP=1 | {method} / {baseline} | "
           f"of TP=1's |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for m, b, p, t in keys:
    get = lambda meth, tp: ok.get((m, meth, b, p, tp), nan)
    ratio, ratio1 = get(method, t) / get(baseline, t), get(method, 1) / get(baseline, 1)
    lines.append(f"| {m} | {b} | {p} | {t} | {get(method, t):.1f} | {get(method, t) / get(method, 1):.2f} | "
                 f"{get(baseline, t) / get(baseline, 1):.2f} | {ratio:.2f} | {ratio / ratio1:.2f} |")
  return lines


def plot(rows: list[Row], path: Path, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  model_order = {m: i for i, m in enumerate(MODELS)}
  configs = sorted({(r.model, r.batch, r.prompt, r.tp) for r in rows}, key=lambda c: (model_order.get(c[0], 99), c))
  methods = [m for m in METHODS if any(r.method == m for r in rows)]
  if not configs:
    return
  fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(configs)), 4))
  width = 0.8 / max(1, len(methods))
  for i, m in enumerate(methods):
    vals = []
    for c in configs:
      r = next((r for r in rows if (r.model, r.batch, r.prompt, r.tp) == c and r.method == m), None)
      bf = next((r for r in rows if (r.model, r.batch, r.prompt, r.tp) == c and r.method == "bf16"), None)
      vals.append(r.decode_tok_s / bf.decode_tok_s if r and bf else 0.0)
    ax.bar(np.arange(len(configs)) + i * width, vals, width, label=m)
  ax.set_xticks(np.arange(len(configs)) + width * (len(methods) - 1) / 2)
  ax.set_xticklabels([f"{m}\nB={b} P={p}" + (f" TP={t}" if t > 1 else "") for m, b, p, t in configs], fontsize=7)
  ax.set_ylabel("decode tokens/s, x bf16")
  ax.axhline(1.0, color="gray", lw=0.5)
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def merge_runs(paths: list[str], out_dir: Path, tag: str) -> int:
  """Several saved runs of one card as one table (e.g. a model and batch matrix spread over device
  calls): a (model, method, B, P) row of a later file replaces an earlier one; failed rows do not
  replace measured ones."""
  if not tag:
    raise SystemExit("--merge needs --tag (the merged files' name)")
  runs = [json.loads(Path(p).read_text()) for p in paths]
  cards = {r["card"] for r in runs}
  if len(cards) != 1:
    raise SystemExit(f"--merge: runs of different cards {sorted(cards)}")
  rows: dict[tuple, Row] = {}
  profiles: dict[tuple, dict] = {}
  for run in runs:
    for d in run["rows"]:
      r = Row(**d)
      key = (r.model, r.method, r.batch, r.prompt, r.tp)
      if not r.error or key not in rows or rows[key].error:
        rows[key] = r
    for prof in run.get("profiles", []):
      profiles[(prof["model"], prof["method"], prof["batch"], prof["prompt"], prof.get("tp", 1))] = prof
  order = {m: i for i, m in enumerate(METHODS)}
  model_order = {m: i for i, m in enumerate(MODELS)}
  merged = sorted(rows.values(), key=lambda r: (model_order.get(r.model, 99), r.model, r.tp, r.batch, r.prompt,
                                                order.get(r.method, 99)))
  card, device, date = runs[-1]["card"], runs[-1]["device"], max(r["date"] for r in runs)
  stem = out_dir / f"{card}-{date}-e2e-{tag}"
  stem.with_suffix(".md").write_text(markdown(merged, card, device, date, list(profiles.values())) +
                                     "\nMerged from: " + ", ".join(Path(p).name for p in paths) + "\n")
  stem.with_suffix(".json").write_text(json.dumps(dict(card=card, device=device, date=date, merged_from=[
      Path(p).name for p in paths], rows=[dataclasses.asdict(r) for r in merged], profiles=list(profiles.values())),
                                                  indent=1))
  plot(merged, stem.with_suffix(".png"), f"decode tokens/s over bf16, {device}, {date}")
  print(stem.with_suffix(".md").read_text())
  return 0


def _out_of_memory(e: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


class Resident:
  """The methods' random weights on the device, made on first use and kept while they fit.

  run(method, fn) calls fn(weights of method). Before making a method's weights, the others are
  dropped when the device's free memory (memory_stats) is below what they take; when fn (or the
  making) still runs out of device memory, every other method's weights are dropped and it is
  tried once more. Dropped weights are made again, identically (fixed seeds), when next needed.
  """

  def __init__(self, make):
    self._make, self._held = make, {}

  def _drop_others(self, keep: str) -> None:
    for m in [m for m in self._held if m != keep]:
      del self._held[m]
    gc.collect()

  def _get(self, method: str):
    if method not in self._held:
      need = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(lambda: self._make(method))))
      stats = jax.devices()[0].memory_stats() or {}
      if stats.get("bytes_limit") and stats["bytes_limit"] - stats.get("bytes_in_use", 0) < 1.1 * need:
        self._drop_others(method)
      self._held[method] = jax.block_until_ready(self._make(method))
    return self._held[method]

  def run(self, method: str, fn):
    try:
      return fn(self._get(method))
    except Exception as e:
      if not _out_of_memory(e) or not [m for m in self._held if m != method]:
        raise
      print(f"{method}: out of device memory with {sorted(self._held)} resident; dropping the others and retrying")
      self._drop_others(method)
      return fn(self._get(method))


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(v) for v in text.split(",") if v)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="flexq bench", description=__doc__.split("\n\n")[0])
  ap.add_argument("--models", default="llama2-7b,llama2-13b", help=f"comma list of {", ".join(MODELS)} (default llama2-7b,llama2-13b)")
  ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma list of {', '.join(METHODS)}")
  ap.add_argument("--batches", default="1,8,32")
  ap.add_argument("--prompts", default="128,1024")
  ap.add_argument("--new-tokens", type=int, default=256)
  ap.add_argument("--layers", choices=("list", "stacked"), default="list",
                  help="list: the decoder blocks unrolled (default; generate()'s form); stacked: one lax.scan over "
                       "stacked weights (fast to compile, but XLA copies each layer's weight slice out of the stack "
                       "every step: measured ~2x slower decode on an H200)")
  ap.add_argument("--unfused", action="store_true",
                  help="keep q/k/v and gate/up as separate kernels (default: one fused kernel each, as "
                       "models.llama.fuse_projections serves a real model)")
  ap.add_argument("--budget-s", type=float, default=float("inf"),
                  help="start no new configuration after this many seconds (what finished is written)")
  ap.add_argument("--profile", action="store_true",
                  help="also profile one decode step of every method at the first batch and prompt (jax.profiler)")
  ap.add_argument("--dump-hlo", action="store_true",
                  help="with --profile: also write each profiled method's compiled decode program (HLO text, gzip) "
                       "beside the outputs, to read which operations a profiled kernel (fusion) holds")
  ap.add_argument("--tp", default="1",
                  help="comma list of tensor-parallel sizes: the model split over that many GPUs of a mesh "
                       "(flexq_jax/sharding.py), e.g. 1,2,4 (default 1: one GPU); w8a8-xla runs at TP=1 only")
  ap.add_argument("--decode-attention", choices=llama.DECODE_ATTENTION_MODES, default=None,
                  help="the decode steps' attention for every method (models/llama.py): auto (the Pallas kernel on a "
                       "GPU), pallas or xla (the einsums); default: $FLEXQ_DECODE_ATTENTION, else auto")
  ap.add_argument("--out-dir", default="results/e2e")
  ap.add_argument("--tag", default="", help="appended to the output file names")
  ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                  help="no GPU needed: merge saved runs of one card (rows and profiles, later files win) into "
                       "<out-dir>/<card>-<date>-e2e-<tag>.{md,json,png}; --tag is required")
  args = ap.parse_args(argv)
  if args.merge:
    return merge_runs(args.merge, Path(args.out_dir), args.tag)
  if args.decode_attention:
    os.environ[llama.DECODE_ATTENTION_ENV] = args.decode_attention
  try:  # a bad $FLEXQ_DECODE_ATTENTION stops here, before any work
    llama.decode_attention_mode()
  except ValueError as e:
    raise SystemExit(str(e)) from None
  # JAX takes 75% of a GPU's memory by default: 70B's weights need more of the card.
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  models = [m for m in args.models.split(",") if m]
  methods = [m for m in args.methods.split(",") if m]
  for m in methods:
    if m not in METHODS:
      raise SystemExit(f"unknown method {m!r}; known: {', '.join(METHODS)}")
  for m in models:
    model_config(m)
  batches, prompts = _ints(args.batches), _ints(args.prompts)
  if jax.default_backend() != "gpu" and models != ["tiny"]:
    raise SystemExit("the end-to-end benchmark times GPU kernels: run it on a GPU machine (or --models tiny to try it)")
  try:  # every split checked before any work: enough devices, heads that divide, whole groups
    tps = _ints(args.tp)
    plans = {(m, tp): None if tp == 1 else sharding.make_plan(model_config(m), sharding.make_mesh(tp))
             for m in models for tp in tps}
  except ValueError as e:
    raise SystemExit(f"--tp {args.tp}: {e}") from None
  if args.layers != "list" and any(tp > 1 for tp in tps):
    raise SystemExit("--tp > 1 runs list layers (flexq_jax/sharding.py), not --layers stacked")

  card = tuning.card_name()
  device = jax.devices()[0].device_kind
  date = datetime.date.today().isoformat()
  out = Path(args.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  stem = out / f"{card}-{date}-e2e{('-' + args.tag) if args.tag else ''}"
  rows: list[Row] = []
  profiles: list[dict] = []
  start = time.perf_counter()

  def write():
    stem.with_suffix(".md").write_text(markdown(rows, card, device, date, profiles))
    stem.with_suffix(".json").write_text(json.dumps(dict(card=card, device=device, date=date, jax=jax.__version__,
                                                         decode_attention=llama.decode_attention_mode(),
                                                         rows=[dataclasses.asdict(r) for r in rows],
                                                         profiles=profiles), indent=1))
    plot(rows, stem.with_suffix(".png"), f"decode tokens/s over bf16, {device}, {date}")

  # The methods' weights stay resident while they fit (7B: ~32 GB for the four), so the loop can go
  # configuration by configuration: batch 1 first, every method, so the headline rows survive a
  # short --budget-s. When they do not (13B at batch 32 with prompt 1024, 70B), the resident set
  # (Resident) drops the other methods' weights and remakes them when next needed.
  order = sorted(((b, p) for b in batches for p in prompts), key=lambda bp: (bp[0] != 1, bp[0], bp[1]))
  stopped = False
  for model, tp in plans:
    cfg, plan = model_config(model), plans[model, tp]
    params = Resident(lambda method: random_params(cfg, method, layers=args.layers, fused=not args.unfused, plan=plan))
    tp_methods = [m for m in methods if tp == 1 or m != "w8a8-xla"]  # int8 leaves are not split
    if args.profile:
      for method in tp_methods:
        try:
          with method_tuning(method):
            hlo = stem.parent / f"{stem.name}-{model}-{method}-decode-hlo.txt.gz" if args.dump_hlo else None
            profiles.append(params.run(method, lambda w: profile_decode(model, method, cfg, w, order[0][0],
                                                                        order[0][1], plan=plan, hlo_path=hlo)))
        except Exception as e:  # a diagnostic: report and go on
          print(f"profile {model} {method} TP={tp}: FAILED {type(e).__name__}: {str(e)[:300]}")
        write()
    for b, p in order:
      for method in tp_methods:
        if time.perf_counter() - start > args.budget_s:
          stopped = True
          break
        try:
          with method_tuning(method):
            rows.append(params.run(method, lambda w: measure(model, method, cfg, w, b, p, args.new_tokens, plan=plan)))
        except Exception as e:  # e.g. out of memory at a large batch: recorded, the run goes on
          msg = f"{type(e).__name__}: {str(e)[:300]}"
          print(f"{model} {method} TP={tp} B={b} P={p}: FAILED {msg}")
          rows.append(Row(model, method, b, p, args.new_tokens, args.layers, not args.unfused, error=msg, tp=tp))
        write()
    del params
    gc.collect()
  if stopped:
    print(f"budget of {args.budget_s:.0f}s reached: later configurations not run")
  print(stem.with_suffix(".md").read_text())
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
