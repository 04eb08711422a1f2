"""An optional quantized lm_head: 8-bit activations, 8- or 6-bit weights (off by default).

    qparams, report = quantize_lm_head(qparams, params, calib_batch, report, fmt="w8a8")

quantize() leaves the output projection in float, as FlexQ does: it reads hidden states once per
token but its weights are a large share of a small model's bytes (SmolLM2-135M: 28 MB of 576 x
49152, against 60 MB for all 210 linear layers in bf16) and of every decode step's reads. This adds
it as one more QuantizedLinear under params["lm_head"], which models.llama.forward uses whenever
it is there. With tied embeddings the input embedding stays float and the quantized lm_head is a
separate copy (its bytes are added, not saved, in memory; a decode step reads the copy instead of
the float matrix).

The activations are always 8-bit: the logits feed a softmax over the whole vocabulary, and the
hidden states entering lm_head are where LLM outliers are largest. Weights by GPTQ (the Hessian of
the final-norm outputs from one forward pass over the calibration batch) or round to nearest. The
accuracy cost on the real model is in results/README.md ("quantized lm_head").
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp
import numpy as np

from flexq_jax import formats, gptq, input_stats, numerics
from flexq_jax.qlinear import QuantizedLinear
from flexq_jax.report import QuantReport
from models import llama
from models.config import LlamaConfig
from pallas_kernels import core

FORMATS = {"w8a8": (8, 8), "w6a8": (6, 8)}  # name -> (w_bits, a_bits)
METHODS = ("gptq", "rtn")


def float_lm_head(params: dict) -> jnp.ndarray:
  """The float [D, V] output projection: params["lm_head"], or the tied embeddings transposed."""
  head = params.get("lm_head")
  if head is not None and not isinstance(head, QuantizedLinear):
    return jnp.asarray(head)
  if head is not None:
    raise ValueError("params already hold a quantized lm_head")
  return jnp.asarray(params["embed_tokens"]).T


def quantize_lm_head(qparams: dict, params: dict, calib_batch, report: QuantReport | None = None, *,
                     fmt: str = "w8a8", method: str = "gptq", model_config: LlamaConfig | None = None,
                     layout: str = "bitplanes", gptq_damp: float = 0.01,
                     progress: Callable[[str], None] | None = None) -> tuple[dict, QuantReport | None]:
  """Adds a quantized lm_head to quantized params.

  Args:
    qparams: quantize()'s output (the float lm_head or tied embeddings untouched).
    params: the float params quantize() started from (the lm_head weight and, for GPTQ, the model
      that produces its inputs).
    calib_batch: [B, T] int tokens (GPTQ only).
    report: quantize()'s report; a copy comes back with config["lm_head"] = "<fmt> <method>".
    fmt: "w8a8" or "w6a8".
    method: "gptq" or "rtn" (round to nearest).
    model_config: the architecture (inferred from the shapes for known presets).
    layout: storage layout of the packed weight (checkpoints store "bitplanes").
    gptq_damp: GPTQ's dampening, a fraction of the Hessian's mean diagonal.
    progress: optional status callback.

  Returns:
    (qparams with "lm_head" a QuantizedLinear [D -> V], the updated report or None).
  """
  if fmt not in FORMATS:
    raise ValueError(f"lm_head format {fmt!r}: choose one of {', '.join(FORMATS)} (or leave lm_head float)")
  if method not in METHODS:
    raise ValueError(f"lm_head method {method!r}: choose one of {', '.join(METHODS)}")
  w_bits, a_bits = FORMATS[fmt]
  w = float_lm_head(params)  # [D, V]
  numerics.check_finite("lm_head weights", w)
  model_config = model_config or llama.infer_config(params)
  say = progress or (lambda msg: None)
  wt = w.T.astype(jnp.float32)  # [V, D]: rows are output channels
  if method == "gptq":
    calib_batch = np.asarray(calib_batch)
    if calib_batch.ndim != 2 or not np.issubdtype(calib_batch.dtype, np.integer):
      raise ValueError(f"calib_batch must be [batch, seq] integer tokens, got {calib_batch.dtype} {calib_batch.shape}")
    say("lm_head: statistics of its input (one forward pass)")
    untied = dict(params, lm_head=w)  # the float model, its head as a kernel the probe can stand in for
    forward = lambda p, tokens: llama.forward(p, model_config, tokens)[0]
    st = input_stats.collect_input_stats(untied, {"lm_head": ("lm_head",)}, forward, calib_batch)["lm_head"]
    say(f"lm_head: GPTQ to {w_bits}-bit weights")
    q, s = gptq.gptq_quantize(wt, st.hessian / max(1, st.count), bits=w_bits, group=core.GROUP, damp=gptq_damp,
                              act_order=False)
  else:
    q, s = numerics.quantize_weight(wt, w_bits, core.GROUP)
  numerics.check_finite("the lm_head scales", s)
  d, v = w.shape
  layer = QuantizedLinear(packed=formats.pack(q, w_bits, layout, d), scales=s, in_features=d, out_features=v,
                          w_bits=w_bits, a_bits=a_bits, group_size=core.GROUP, layout=layout)
  qparams = dict(qparams, lm_head=layer)
  if report is not None:
    report = dataclasses.replace(report, config={**report.config, "lm_head": f"{fmt} {method}"})
  return qparams, report
