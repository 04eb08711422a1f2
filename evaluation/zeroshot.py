"""Zero-shot accuracy through EleutherAI's lm-evaluation-harness (lm-eval).

Three parts:

- `FlexQLM`, an lm-eval model (registered as "flexq") running our JAX model, float or quantized on
  any backend: `loglikelihood` (multiple-choice tasks), `loglikelihood_rolling` (perplexity tasks)
  and `generate_until`. Requests are deduplicated (the choices of a yes/no task share one forward),
  cut into length buckets with a fixed number of rows per bucket, and scored by one jit-compiled
  function per bucket, so a whole task compiles a handful of times. lm-eval builds the prompts
  from its own task YAMLs and scores the answers; this module only computes log-likelihoods.
- Local task data: `task_manager(tasks, data_dir)` points lm-eval's own task configs at offline
  copies (`datasets.save_to_disk` folders, README of ../shared/data/zeroshot/) by writing, per
  task, a YAML that includes lm-eval's and only replaces where the rows come from. Without a data
  folder lm-eval reads the Hugging Face hub as usual.
- The table: one row per model configuration, acc (and acc_norm where the task has it) with
  lm-eval's standard errors, as markdown and JSON, updated row by row (`flexq zeroshot`).

lm-eval is the `eval` extra; without it this module imports, and `require_lm_eval` says what to
install.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import flexq_jax
from flexq_jax import checkpoint
from models import generate as gen
from models import llama, loaders

try:  # the `eval` extra (pip install 'flexq-jax[eval]')
  import lm_eval
  from lm_eval import utils as lm_utils
  from lm_eval.__main__ import cli_evaluate as lm_eval_main
  from lm_eval.api.model import TemplateLM
  from lm_eval.api.registry import register_model
  from lm_eval.tasks import TaskManager
except ImportError as _e:  # the rest of the project works without it
  lm_eval = None
  _LM_EVAL_MISSING = str(_e)
  TemplateLM = object
  lm_eval_main = None

  def register_model(*_names):
    return lambda cls: cls

# The tasks with offline copies: lm-eval task -> (folder under the data folder, split lm-eval scores).
LOCAL_TASKS = {
    "piqa": ("piqa/validation", "validation"),
    "arc_easy": ("ARC-Easy/test", "test"),
    "boolq": ("boolq/validation", "validation"),
    "winogrande": ("winogrande_xl/validation", "validation"),
}
DEFAULT_TASKS = ("piqa", "arc_easy", "boolq", "winogrande")
# Where tests, CI and the default of `flexq zeroshot` look for the offline copies: beside the checkout.
REPO_DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "zeroshot"
# Sequence lengths a batch is padded to: each (length, kind) pair is one compilation. Steps of
# about 1.4x keep padding under ~30% of a batch.
BUCKETS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
# Coarser steps for accelerators (`flexq score-requests --fixed-rows`): fewer compilations, more padding.
GPU_BUCKETS = (128, 512, 2048, 8192)


def require_lm_eval() -> None:
  if lm_eval is None:
    raise ValueError(f"zero-shot evaluation needs lm-eval: pip install 'flexq-jax[eval]' ({_LM_EVAL_MISSING})")


def bucket(n: int) -> int:
  """The smallest bucket length >= n (n itself past the last bucket)."""
  return next((b for b in BUCKETS if b >= n), n)


# ----------------------------------------------------------------------------------------------
# The model adapter.


@register_model("flexq")
class FlexQLM(TemplateLM):
  """Our LLaMA (float or quantized) as an lm-eval language model.

  From Python: `FlexQLM.from_loaded(config, params, tokenizer)` with a model already loaded (and
  placed, if quantized), then `lm_eval.simple_evaluate(model=lm, ...)`. By name (lm-eval's CLI
  through `flexq lm-eval`, or `simple_evaluate(model="flexq", model_args=...)`): the arguments
  below, e.g. "model=org/name,quantized=runs/q,backend=dequant".

  Args:
    model: a .gguf file, a Hugging Face checkpoint directory or hub id (None: the built-in model).
    quantized: a checkpoint directory written by `flexq quantize`, used instead of the float weights.
    dtype: parameter and compute dtype, "float32" or "bfloat16".
    backend: the quantized matmuls' backend ("auto", or a name of flexq_jax.backends).
    batch_tokens: tokens per forward pass (rows per batch = batch_tokens // bucket length).
    max_length: the longest sequence fed to the model; longer contexts lose their start.
    add_bos_token: prepend BOS to every encoded string (off, as lm-eval's Hugging Face model does).
    progress: show a progress bar over the tokens scored.
    loaded: (config, params, tokenizer) instead of model/quantized (see `from_loaded`).
    scorer: what computes the log-likelihoods, instead of a PairScorer over the model: a
      RequestRecorder (writes the requests for another machine) or a ScoreReplay (reads that
      machine's scores back), each with its own max_length.
    **lm_eval_kwargs: what lm-eval passes every model (batch_size, device, ...): batches are
      sized by batch_tokens, the device is JAX's default.
  """

  def __init__(self, model: str | None = None, quantized: str | None = None, dtype: str = "float32",
               backend: str = "auto", batch_tokens: int = 2048, max_length: int = 2048,
               add_bos_token: bool = False, progress: bool = True, *, loaded=None, scorer=None, **lm_eval_kwargs):
    require_lm_eval()
    super().__init__()
    if loaded is None:
      loaded = load_for_eval(model, quantized, dtype, backend)
    self.config, self.params, self.tokenizer = loaded
    if self.tokenizer is None:
      raise ValueError("this checkpoint has no tokenizer (no tokenizer.json / GGUF tokenizer metadata)")
    # The log-likelihoods: our model (PairScorer), or a RequestRecorder / ScoreReplay (two-machine runs).
    self.scorer = scorer or PairScorer(self.config, self.params, batch_tokens,
                                       min(int(max_length), self.config.max_position_embeddings))
    self._max_length = self.scorer.max_length
    self.add_bos_token = _as_bool(add_bos_token)
    self.scorer.progress = self.progress = _as_bool(progress)

  # What the scorer did (its compiled shapes, tokens scored), for logs and tests.
  @property
  def compiled_shapes(self) -> set[tuple]:
    return self.scorer.compiled_shapes

  @property
  def tokens_scored(self) -> int:
    return self.scorer.tokens_scored

  @property
  def tokens_padded(self) -> int:
    return self.scorer.tokens_padded

  @classmethod
  def from_loaded(cls, config, params, tokenizer, **kwargs) -> "FlexQLM":
    """An adapter around a model already in memory (placed and fused, if quantized)."""
    return cls(loaded=(config, params, tokenizer), **kwargs)

  # -- what lm-eval asks of a model ------------------------------------------------------------

  @property
  def eot_token_id(self) -> int:
    eos = self.tokenizer.eos_id
    if eos is None:
      eos = self.config.eos_token_ids[0] if self.config.eos_token_ids else 0
    return eos

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def tokenizer_name(self) -> str:
    return "flexq"

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    add_bos = self.add_bos_token if add_special_tokens is None else bool(add_special_tokens)
    return self.tokenizer.encode(string, add_bos=add_bos and self.tokenizer.bos_id is not None)

  def tok_decode(self, tokens, **kwargs) -> str:
    return self.tokenizer.decode(list(tokens))

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
    """(sum of the continuation's log-probabilities, whether it is the greedy continuation) for
    every ((context, continuation), context ids, continuation ids) request."""
    pairs = [(list(ctx), list(cont)) for _, ctx, cont in requests]
    return self.scorer.score_pairs(pairs, disable_tqdm=disable_tqdm)

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Log-likelihood of whole strings, in windows of max_length tokens (each token scored once)."""
    pairs, owner = [], []
    for i, req in enumerate(requests):
      (string,) = req.args
      windows = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                                                   max_seq_len=self.max_length, context_len=1)
      for ctx, cont in map(lm_utils.make_disjoint_window, windows):
        pairs.append((list(ctx), list(cont)))
        owner.append(i)
    totals = [0.0] * len(requests)
    for i, (logprob, _) in zip(owner, self.scorer.score_pairs(pairs, disable_tqdm=disable_tqdm)):
      totals[i] += logprob
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy (or sampled, if the task asks) generation, cut at the task's stop strings."""
    out = [""] * len(requests)
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
      groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
    rows = 8
    for key, members in groups.items():
      kwargs = dict(json.loads(key))
      until = kwargs.pop("until", None) or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = int(kwargs.pop("max_gen_toks", 256))
      temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
      if not _as_bool(kwargs.pop("do_sample", False)):
        temperature = 0.0
      sampling = gen.SamplingConfig(temperature=temperature, top_p=float(kwargs.pop("top_p", 1.0) or 1.0))
      keep = max(1, self.max_length - max_new)
      prompts = [self.tok_encode(requests[i].args[0])[-keep:] or [self.prefix_token_id] for i in members]
      for start in range(0, len(members), rows):
        chunk = prompts[start:start + rows]
        length = min(bucket(max(map(len, chunk))), keep)
        tokens = np.zeros((rows, length), np.int32)
        mask = np.zeros((rows, length), bool)
        for r in range(rows):
          ids = chunk[r] if r < len(chunk) else chunk[0]
          tokens[r, length - len(ids):] = ids
          mask[r, length - len(ids):] = True
        result = gen.generate(self.params, self.config, jnp.asarray(tokens), jnp.asarray(mask),
                              jax.random.key(start), max_new_tokens=max_new, sampling=sampling)
        new, n = jax.device_get(result.tokens), jax.device_get(result.num_generated)
        for r in range(len(chunk)):
          text = self.tok_decode(new[r, :n[r]].tolist())
          for stop in until:
            if stop and stop in text:
              text = text[:text.index(stop)]
          out[members[start + r]] = text
    return out

class PairScorer:
  """Log-likelihoods of (context ids, continuation ids) pairs by our model: what FlexQLM asks of
  the model, without lm-eval (so it also runs where lm-eval is not installed: `flexq
  score-requests` on a GPU machine).

  Args:
    config, params: the model (placed and fused, if quantized).
    batch_tokens: tokens per forward pass (rows per batch = batch_tokens // bucket length).
    max_length: the longest sequence fed to the model; longer contexts lose their start.
    buckets: the sequence lengths a batch is padded to (each one compilation per batch size).
    fixed_rows: every batch of a bucket has batch_tokens // length rows (a short last batch is
      padded with empty rows) and every row gets the whole-sequence scoring: one compilation per
      bucket, for accelerators where compiling costs more than the padded work.
  """

  def __init__(self, config, params, batch_tokens: int = 2048, max_length: int = 2048, *,
               buckets: Sequence[int] = BUCKETS, fixed_rows: bool = False, progress: bool = True):
    self.config, self.params = config, params
    self.batch_tokens = int(batch_tokens)
    self.max_length = int(max_length)
    if self.batch_tokens < 1 or self.max_length < 2:
      raise ValueError(f"batch_tokens {batch_tokens} must be >= 1 and max_length {max_length} >= 2")
    self.buckets = tuple(sorted(int(b) for b in buckets))
    self.fixed_rows = bool(fixed_rows)
    self.progress = progress
    self.compiled_shapes: set[tuple] = set()  # (kind, rows, length) of every scoring call made
    self.tokens_scored = 0  # real (unpadded) tokens fed to the model
    self.tokens_padded = 0  # tokens fed including padding

  def score_pairs(self, pairs: Sequence[tuple[list[int], list[int]]], disable_tqdm: bool = False
                  ) -> list[tuple[float, bool]]:
    """(log P(continuation | context), greedy?) for (context ids, continuation ids) pairs.

    The model reads context + continuation without its last token, left-truncated to
    max_length. Requests that feed the same tokens (the choices of a one-token answer) share one
    row; a row whose requests need only the last position's distribution skips the output
    projection everywhere else.
    """
    rows: dict[tuple[int, ...], list[tuple[int, int, int]]] = {}  # fed tokens -> (request, last token, scored)
    for i, (ctx, cont) in enumerate(pairs):
      if not cont:
        raise ValueError(f"request {i} has an empty continuation")
      if not ctx:
        raise ValueError(f"request {i} has an empty context (lm-eval puts the prefix token there)")
      whole = (ctx + cont)[-(self.max_length + 1):]
      fed = tuple(whole[:-1])
      rows.setdefault(fed, []).append((i, whole[-1], min(len(cont), len(fed))))
    batches: dict[tuple[str, int], list[tuple[int, ...]]] = {}
    for fed, members in rows.items():
      kind = "last" if not self.fixed_rows and all(scored == 1 for _, _, scored in members) else "all"
      length = next((b for b in self.buckets if b >= len(fed)), len(fed))
      batches.setdefault((kind, length), []).append(fed)
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    total = sum(len(fed) for fed in rows)
    bar = tqdm(total=total, unit="tok", desc="flexq loglikelihood", disable=disable_tqdm or not self.progress,
               file=sys.stderr, mininterval=5.0)
    for (kind, length), feds in sorted(batches.items(), key=lambda kv: -kv[0][1]):
      full = max(1, self.batch_tokens // length) if self.fixed_rows else _pow2_floor(max(1, self.batch_tokens // length))
      for start in range(0, len(feds), full):
        chunk = feds[start:start + full]
        per_batch = full if self.fixed_rows else min(full, _pow2_ceil(len(chunk)))  # a short last batch: fewer padded rows
        tokens = np.zeros((per_batch, length), np.int32)
        last = np.zeros((per_batch,), np.int32)
        for r, fed in enumerate(chunk):
          tokens[r, :len(fed)] = fed
          last[r] = len(fed) - 1
        self.compiled_shapes.add((kind, per_batch, length))
        if kind == "last":
          last_logp, last_argmax = jax.device_get(_score_last(self.config, self.params, tokens, last))
          nxt = greedy = None
        else:
          nxt, greedy, last_logp, last_argmax = jax.device_get(_score_all(self.config, self.params, tokens, last))
        for r, fed in enumerate(chunk):
          n = len(fed)
          for i, last_token, scored in rows[fed]:
            logprob = float(last_logp[r, last_token])
            is_greedy = bool(last_argmax[r] == last_token)
            if scored > 1:
              logprob += float(nxt[r, n - scored:n - 1].sum(dtype=np.float64))
              is_greedy = is_greedy and bool(greedy[r, n - scored:n - 1].all())
            results[i] = (logprob, is_greedy)
        done = sum(map(len, chunk))
        self.tokens_scored += done
        self.tokens_padded += per_batch * length
        bar.update(done)
    bar.close()
    return results


@functools.partial(jax.jit, static_argnums=0)  # one compilation per (config, params structure, shapes)
def _score_last(config, params, tokens, last):
  """The log-softmax [B, V] (and argmax [B]) of the next token after position last[b] of each row."""
  h, _ = llama.forward(params, config, tokens, head=False)  # right padding: causal rows are unaffected
  h_last = h[jnp.arange(h.shape[0]), last]
  logits = llama.lm_head(params, config, h_last)
  return jax.nn.log_softmax(logits, axis=-1), jnp.argmax(logits, axis=-1)


@functools.partial(jax.jit, static_argnums=0)
def _score_all(config, params, tokens, last):
  """Per position p < T - 1: log P(tokens[p + 1]) and whether it is the argmax; and what
  _score_last gives at position last[b]."""
  h, _ = llama.forward(params, config, tokens, head=False)
  logits = llama.lm_head(params, config, h)  # [B, T, V]
  logp = jax.nn.log_softmax(logits, axis=-1)
  nxt = jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
  greedy = jnp.argmax(logits[:, :-1], axis=-1) == tokens[:, 1:]
  rows = jnp.arange(tokens.shape[0])
  return nxt, greedy, logp[rows, last], jnp.argmax(logits[rows, last], axis=-1)


# ----------------------------------------------------------------------------------------------
# Two machines: lm-eval where its tasks are (here), the log-likelihoods where the accelerator is.
#
# `flexq zeroshot --export-requests F` runs lm-eval with a RequestRecorder: every (context ids,
# continuation ids) pair the tasks ask for goes into F (with the calibration batch and evaluation
# windows the quantized rows need); `flexq score-requests F --out S` computes them with the model
# on any machine with jax (no lm-eval, no task data); `flexq zeroshot --scores-from S` runs lm-eval
# again with a ScoreReplay, which answers every request from S, so lm-eval's own scoring makes the
# accuracies.

REQUESTS_VERSION = 1


class RequestRecorder:
  """A scorer that records the pairs asked for and answers (0.0, False): lm-eval's results of a
  recording run are meaningless; only `pairs` matters."""

  def __init__(self, max_length: int):
    self.max_length = int(max_length)
    self.pairs: dict[tuple[tuple[int, ...], tuple[int, ...]], None] = {}  # ordered, deduplicated
    self.compiled_shapes: set[tuple] = set()
    self.tokens_scored = self.tokens_padded = 0
    self.progress = False

  def score_pairs(self, pairs, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    for ctx, cont in pairs:
      if not cont or not ctx:
        raise ValueError("a request with an empty context or continuation")
      self.pairs[(tuple(ctx), tuple(cont))] = None
    return [(0.0, False)] * len(pairs)


def save_requests(path: str | os.PathLike, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], meta: dict, *,
                  calib: np.ndarray | None = None, windows: np.ndarray | None = None,
                  scores: tuple[np.ndarray, np.ndarray] | None = None) -> Path:
  """Writes a requests file (and, with scores = (logprob, greedy), a scores file): plain arrays in
  an .npz, no pickled objects."""
  lengths = [len(c) + len(t) for c, t in pairs]
  arrays = {"tokens": np.fromiter((x for c, t in pairs for x in (*c, *t)), np.int32, sum(lengths)),
            "offsets": np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64),
            "ctx_len": np.array([len(c) for c, _ in pairs], np.int32),
            "meta": np.array(json.dumps({**meta, "version": REQUESTS_VERSION}))}
  if calib is not None:
    arrays["calib"] = np.asarray(calib, np.int32)
  if windows is not None:
    arrays["windows"] = np.asarray(windows, np.int32)
  if scores is not None:
    arrays["logprob"] = np.asarray(scores[0], np.float64)
    arrays["greedy"] = np.asarray(scores[1], bool)
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "wb") as f:  # np.savez would add .npz to a name without it
    np.savez_compressed(f, **arrays)
  return path


@dataclasses.dataclass
class RequestFile:
  """A requests (or scores) file, read and checked by `load_requests`."""
  path: Path
  pairs: list[tuple[list[int], list[int]]]
  meta: dict
  calib: np.ndarray | None
  windows: np.ndarray | None
  logprob: np.ndarray | None  # scores files only
  greedy: np.ndarray | None


def load_requests(path: str | os.PathLike, *, need_scores: bool = False, option: str = "--requests") -> RequestFile:
  """Reads a file of `save_requests`; a ValueError naming the option and file for anything that is
  not one (missing arrays, inconsistent offsets, token ids out of range, non-finite or positive
  log-probabilities)."""
  path = Path(path)
  where = f"{option} {path}"
  if not path.is_file():
    raise ValueError(f"{where}: no such file")
  try:
    with np.load(path, allow_pickle=False) as z:
      data = {k: z[k] for k in z.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # not an npz, truncated, pickled objects
    raise ValueError(f"{where}: not a requests file written by flexq ({type(e).__name__}: {e})") from None
  missing = [k for k in ("tokens", "offsets", "ctx_len", "meta") + (("logprob", "greedy") if need_scores else ())
             if k not in data]
  if missing:
    kind = "scores file (from `flexq score-requests`)" if need_scores else "requests file"
    raise ValueError(f"{where}: not a {kind}: no {', '.join(missing)}")
  try:
    meta = json.loads(str(data["meta"]))
  except ValueError as e:
    raise ValueError(f"{where}: its meta is not JSON ({e})") from None
  if not isinstance(meta, dict) or meta.get("version") != REQUESTS_VERSION:
    raise ValueError(f"{where}: version {meta.get('version') if isinstance(meta, dict) else None}, "
                     f"this flexq reads version {REQUESTS_VERSION}")
  if not isinstance(meta.get("max_length"), int) or meta["max_length"] < 2 or not isinstance(meta.get("tasks"), list):
    raise ValueError(f"{where}: its meta lacks the tasks or max_length (>= 2) the export writes")
  tokens, offsets, ctx_len = data["tokens"], data["offsets"], data["ctx_len"]
  n = len(ctx_len)
  if (tokens.ndim != 1 or offsets.shape != (n + 1,) or offsets[0] != 0 or offsets[-1] != len(tokens)
      or np.any(np.diff(offsets) < 2) or np.any(ctx_len < 1) or np.any(ctx_len >= np.diff(offsets))):
    raise ValueError(f"{where}: inconsistent arrays (tokens {tokens.shape}, offsets {offsets.shape}, "
                     f"ctx_len {ctx_len.shape}): a truncated or edited file")
  vocab = meta.get("vocab_size")
  if len(tokens) and (tokens.min() < 0 or (vocab and tokens.max() >= vocab)):
    raise ValueError(f"{where}: token ids outside [0, {vocab})")
  logprob = greedy = None
  if "logprob" in data:
    logprob, greedy = data["logprob"], data.get("greedy")
    if logprob.shape != (n,) or greedy is None or greedy.shape != (n,):
      raise ValueError(f"{where}: {logprob.shape} log-probabilities for {n} requests")
    bad = ~np.isfinite(logprob) | (logprob > 1e-4)
    if bad.any():
      raise ValueError(f"{where}: {int(bad.sum())} log-probabilities are non-finite or positive "
                       f"(first: request {int(np.argmax(bad))}, {logprob[np.argmax(bad)]})")
  pairs = [(tokens[offsets[i]:offsets[i] + ctx_len[i]].tolist(), tokens[offsets[i] + ctx_len[i]:offsets[i + 1]].tolist())
           for i in range(n)]
  return RequestFile(path, pairs, meta, data.get("calib"), data.get("windows"), logprob, greedy)


class ScoreReplay:
  """A scorer that answers from a scores file: every pair lm-eval asks for must be in it."""

  def __init__(self, scores: RequestFile):
    self.file = scores
    self.max_length = int(scores.meta["max_length"])
    self.index = {(tuple(c), tuple(t)): i for i, (c, t) in enumerate(scores.pairs)}
    self.compiled_shapes: set[tuple] = set()
    self.tokens_scored = self.tokens_padded = 0
    self.progress = False

  def score_pairs(self, pairs, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    out = []
    for ctx, cont in pairs:
      i = self.index.get((tuple(ctx), tuple(cont)))
      if i is None:
        raise ValueError(f"--scores-from {self.file.path}: no score for a request of these tasks (made with "
                         f"tasks {self.file.meta.get('tasks')}, limit {self.file.meta.get('limit')}; export the "
                         f"requests again with the same --tasks / --limit / --max-length and score them)")
      out.append((float(self.file.logprob[i]), bool(self.file.greedy[i])))
      self.tokens_scored += len(ctx) + len(cont) - 1
    return out


def score_request_file(requests: RequestFile, config, params, *, batch_tokens: int = 2048,
                       fixed_rows: bool = False, buckets: Sequence[int] = BUCKETS,
                       progress: bool = True) -> tuple[np.ndarray, np.ndarray, PairScorer]:
  """(logprob [n], greedy [n], the scorer) for every pair of a requests file, with its max_length."""
  scorer = PairScorer(config, params, batch_tokens, int(requests.meta["max_length"]), buckets=buckets,
                      fixed_rows=fixed_rows, progress=progress)
  results = scorer.score_pairs(requests.pairs)
  return np.array([r[0] for r in results], np.float64), np.array([r[1] for r in results], bool), scorer


def _pow2_floor(n: int) -> int:
  return 1 << (n.bit_length() - 1)


def _pow2_ceil(n: int) -> int:
  return 1 << (n - 1).bit_length()


def _as_bool(value) -> bool:
  if isinstance(value, str):
    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
      raise ValueError(f"expected true/false, got {value!r}")
    return value.lower() in ("true", "1", "yes")
  return bool(value)


def load_for_eval(model: str | None, quantized: str | None, dtype: str = "float32", backend: str = "auto"):
  """(config, params, tokenizer) for evaluation: the float model, or the quantized checkpoint
  placed on `backend` with q/k/v and gate/up fused (the same path as `flexq eval --quantized`)."""
  config, params, tokenizer = loaders.load_model(model, jnp.dtype(dtype))
  if quantized:
    params, config, _ = checkpoint.load(quantized)
    params, _ = flexq_jax.place(params, backend, dtype=jnp.dtype(dtype))
    params = llama.fuse_projections(params)
  return config, params, tokenizer


# ----------------------------------------------------------------------------------------------
# Tasks and their data.


def parse_tasks(text: str) -> tuple[str, ...]:
  tasks = tuple(t.strip() for t in text.split(",") if t.strip())
  if not tasks:
    raise ValueError(f"--tasks {text!r} names no task (comma-separated lm-eval task names, e.g. piqa,arc_easy)")
  if len(set(tasks)) != len(tasks):
    raise ValueError(f"--tasks {text!r} names a task twice")
  return tasks


def check_data_dir(tasks: Sequence[str], data_dir: str | os.PathLike) -> dict[str, list[Path]]:
  """The arrow files of every task's offline copy in data_dir; a ValueError naming --data-dir if
  a task has no copy there or its folder is not a `datasets.save_to_disk` folder."""
  root = Path(data_dir)
  if not root.is_dir():
    raise ValueError(f"--data-dir {root}: no such folder (it should hold the offline task copies, "
                     f"see ../shared/data/zeroshot/README.md)")
  files = {}
  for task in tasks:
    if task not in LOCAL_TASKS:
      raise ValueError(f"--tasks: {task!r} has no offline copy (local copies exist for {', '.join(LOCAL_TASKS)}); "
                       f"use --data-dir hub to read it from the Hugging Face hub")
    folder = root / LOCAL_TASKS[task][0]
    arrows = sorted(folder.glob("data-*.arrow"))
    if not arrows or not (folder / "dataset_info.json").is_file():
      raise ValueError(f"--data-dir {root}: {folder} is not a datasets.save_to_disk folder "
                       f"(data-*.arrow and dataset_info.json)")
    files[task] = arrows
  return files


@functools.cache
def _registered_tasks():
  """lm-eval's TaskManager over its own tasks (indexing them takes seconds: once per process)."""
  return TaskManager()


def task_manager(tasks: Sequence[str], data_dir: str | os.PathLike | None, workdir: str | os.PathLike):
  """An lm-eval TaskManager for `tasks`, reading offline copies from data_dir (None: the hub).

  For local data, workdir receives one YAML per task that includes lm-eval's own task YAML (its
  prompt, choices, target and metrics) and replaces only the rows' source: the task's arrow files
  through the `datasets` arrow loader, with the split lm-eval scores and no other split.
  Unknown task names are a ValueError naming --tasks.
  """
  require_lm_eval()
  registered = _registered_tasks()
  unknown = [t for t in tasks if t not in registered.all_tasks]
  if unknown:
    raise ValueError(f"--tasks: unknown lm-eval task(s) {', '.join(unknown)} (see `lm-eval ls tasks`)")
  if data_dir is None:
    return registered
  files = check_data_dir(tasks, data_dir)
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  for task in tasks:
    source = registered.task_index[task].yaml_path
    split = LOCAL_TASKS[task][1]
    spec = {"include": str(source), "task": task, "dataset_path": "arrow", "dataset_name": None,
            "dataset_kwargs": {"data_files": {split: [str(f) for f in files[task]]}},
            "training_split": None, "validation_split": split if split == "validation" else None,
            "test_split": split if split == "test" else None}
    (workdir / f"{task}.yaml").write_text(json.dumps(spec, indent=1))  # JSON is YAML
  return TaskManager(include_path=str(workdir), include_defaults=False)


def evaluate(lm: "FlexQLM", tasks: Sequence[str], *, data_dir: str | os.PathLike | None = None,
             limit: int | None = None, manager=None, log: Callable[[str], None] = print) -> dict:
  """lm-eval's results for `tasks`, zero-shot: {"results": {task: {"acc,none": ...}}, "n-samples": ...}.

  data_dir: the offline copies (None: the hub), unless `manager` (from `task_manager`) is given.
  """
  require_lm_eval()
  with tempfile.TemporaryDirectory(prefix="flexq-zeroshot-") as workdir:
    manager = manager or task_manager(tasks, data_dir, workdir)
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                  num_fewshot=0, log_samples=True, verbosity="WARNING")
  log(f"lm-eval done in {time.perf_counter() - t0:.0f}s: {lm.tokens_scored} tokens scored "
      f"({lm.tokens_padded} with padding) in {len(lm.compiled_shapes)} batch shapes")
  return out


# ----------------------------------------------------------------------------------------------
# The table.

METRICS = ("acc", "acc_norm")


@dataclasses.dataclass
class Row:
  label: str
  scores: dict[str, dict[str, float]]  # task -> {"acc": , "acc_stderr": , "acc_norm": , ..., "n": }
  meta: dict

  @property
  def average_acc(self) -> float:
    return float(np.mean([s["acc"] for s in self.scores.values()]))


def row_from_results(label: str, out: dict, meta: dict) -> Row:
  scores = {}
  for task, res in out["results"].items():
    s = {}
    for m in METRICS:
      if f"{m},none" in res:
        s[m] = float(res[f"{m},none"])
        err = res.get(f"{m}_stderr,none")
        s[f"{m}_stderr"] = float(err) if isinstance(err, (int, float)) else float("nan")
    n = out.get("n-samples", {}).get(task, {})
    s["n"] = int(n.get("effective", n.get("original", 0))) if isinstance(n, dict) else 0
    s["n_total"] = int(n.get("original", s["n"])) if isinstance(n, dict) else s["n"]
    # Each example's acc, in document order ("1" right, "0" wrong): paired differences between rows.
    samples = sorted(out.get("samples", {}).get(task, []), key=lambda x: x["doc_id"])
    if samples and all(x.get("acc") in (0, 1, 0.0, 1.0, True, False) for x in samples):
      s["acc_per_doc"] = "".join(str(int(x["acc"])) for x in samples)
    scores[task] = s
  return Row(label, scores, meta)


def _shared_prefix(a: dict, b: dict) -> int:
  """How many leading examples two runs of a task share: lm-eval's --limit N takes the first N
  examples, so runs of one task on the same data share min(N) of them; 0 if unknown."""
  na, nb = (s.get("n", len(s.get("acc_per_doc", ""))) for s in (a, b))
  if a.get("n_total", na) != b.get("n_total", nb):
    return 0
  if na == nb:
    return na
  if a.get("acc_per_doc") and b.get("acc_per_doc"):
    return min(na, nb)
  return 0


def compare(a: dict, b: dict, tasks: Sequence[str] | None = None) -> tuple[float, float | None, dict[str, int]] | None:
  """(mean over tasks of acc_a - acc_b, its standard error from the paired per-example
  differences or None, examples compared per task) over the tasks and examples both rows share;
  None when they share none. Each task's mean difference has variance var(d) / n; tasks are
  independent."""
  shared = {t: k for t in (tasks or a) if t in b and (k := _shared_prefix(a[t], b[t]))}
  if not shared:
    return None
  deltas, var = [], 0.0
  for t, k in shared.items():
    x, y = a[t].get("acc_per_doc"), b[t].get("acc_per_doc")
    if x and y and len(x) >= k and len(y) >= k:
      d = np.array([int(i) for i in x[:k]], float) - np.array([int(j) for j in y[:k]], float)
      deltas.append(d.mean())
      var = None if var is None else var + (d.var(ddof=1) / k if k > 1 else 0.0)
    else:
      deltas.append(a[t]["acc"] - b[t]["acc"])
      var = None
  se = None if var is None else float(np.sqrt(var)) / len(shared)
  return float(np.mean(deltas)), se, shared


def paired_stderr(a: dict, b: dict, tasks: Sequence[str]) -> float | None:
  """Standard error of mean_t(acc_a[t] - acc_b[t]) over `tasks` from the per-example differences
  on the examples both rows ran (see `compare`), or None without per-example results."""
  cmp = compare(a, b, tasks)
  return None if cmp is None else cmp[1]


def to_markdown(rows: Sequence[Row], header: str = "") -> str:
  """The table: acc (and acc_norm) ± standard error per task (a task run on its first N examples
  only is marked "(N)"), the mean acc over the row's tasks, and the change against the first row
  with its paired standard error on the examples both rows ran (`compare`)."""
  tasks = list(dict.fromkeys(t for r in rows for t in r.scores))
  cols = [(t, m) for t in tasks for m in METRICS if any(m in r.scores.get(t, {}) for r in rows)]
  lines = [header, ""] if header else []
  lines.append("| configuration | " + " | ".join(f"{t} {m}" for t, m in cols) + " | mean acc | vs first row |")
  lines.append("| --- |" + " ---: |" * (len(cols) + 2))
  for r in rows:
    cells = []
    for t, m in cols:
      s = r.scores.get(t, {})
      limited = f" ({s['n']})" if s.get("n_total") and s["n"] < s["n_total"] else ""
      cells.append(f"{100 * s[m]:.2f} ± {100 * s[m + '_stderr']:.2f}{limited}" if m in s else "")
    cmp = compare(r.scores, rows[0].scores)
    if cmp is None:
      delta_cell = "no common examples"
    else:
      delta, se, shared = cmp
      delta_cell = f"{100 * delta:+.2f}" + (f" ± {100 * se:.2f}" if se is not None and r is not rows[0] else "")
      if len(shared) < max(len(r.scores), len(rows[0].scores)) or any(k != r.scores[t]["n"] or k != rows[0].scores[t]["n"]
                                            for t, k in shared.items()):
        ks = set(shared.values())
        delta_cell += (f" (first {ks.pop()} of each task)" if len(ks) == 1 and len(shared) == len(rows[0].scores)
                       else " (" + ", ".join(f"{t} first {k}" for t, k in shared.items()) + ")")
    lines.append(f"| {r.label} | " + " | ".join(cells) + f" | {100 * r.average_acc:.2f} | {delta_cell} |")
  lines.append("")
  lines.append("Accuracy in %, ± lm-eval's standard error; (N): the task's first N examples only (--limit), "
               "otherwise every example; mean acc: over the row's tasks; vs first row: the change of the mean acc "
               "against the first row on the examples both rows ran (named when not all of both rows' examples: "
               "--limit N runs share their first examples), ± the standard error of that change from the paired "
               "per-example differences.")
  return "\n".join(lines) + "\n"


def load_rows(out_dir: str | os.PathLike) -> list[Row]:
  js = Path(out_dir) / "zeroshot.json"
  if not js.is_file():
    return []
  try:
    data = json.loads(js.read_text())
    return [Row(r["label"], r["scores"], r.get("meta", {})) for r in data["rows"]]
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{js}: not a zero-shot table written by flexq zeroshot ({e})") from None


def write_row(row: Row, out_dir: str | os.PathLike, header: str = "") -> tuple[Path, Path]:
  """Adds `row` to the table in out_dir and rewrites zeroshot.md and zeroshot.json. A row of the
  same label is updated task by task (a task evaluated again replaces its earlier score), so the
  tasks of one configuration can come from several runs; meta["runs"][task] says which."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  rows = load_rows(out)
  labels = [r.label for r in rows]
  if row.label in labels:  # the same configuration: this run's tasks replace or join the earlier ones
    old = rows[labels.index(row.label)]
    runs = {t: old.meta.get("runs", {}).get(t, old.meta) for t in old.scores}
    runs.update({t: row.meta for t in row.scores})
    rows[labels.index(row.label)] = Row(row.label, {**old.scores, **row.scores}, {"runs": runs})
  else:
    rows.append(Row(row.label, row.scores, {"runs": {t: row.meta for t in row.scores}}))
  js = out / "zeroshot.json"
  js.write_text(json.dumps({"header": header, "rows": [dataclasses.asdict(r) for r in rows]}, indent=1))
  return render(out), js


def render(out_dir: str | os.PathLike) -> Path:
  """Rewrites zeroshot.md from zeroshot.json in out_dir."""
  md = Path(out_dir) / "zeroshot.md"
  header = json.loads((Path(out_dir) / "zeroshot.json").read_text()).get("header", "")
  md.write_text(to_markdown(load_rows(out_dir), header))
  return md
