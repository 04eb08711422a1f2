"""Perplexity with the WikiText-2 protocol: the text tokenized once, cut into non-overlapping
windows of ``seq_len`` tokens, each window scored on its own (no context carried over).

Within a window of T tokens, tokens 1..T-1 are predicted from the tokens before them, so every
window contributes T-1 targets (the Hugging Face / GPTQ evaluation loop does the same).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from models import llama

# logits_fn(tokens int32 [B, T]) -> logits [B, T, V], any float dtype; must be jittable.
LogitsFn = Callable[[jax.Array], jax.Array]
_MAX_EXP_ARG = math.log(np.finfo(np.float64).max)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerplexityResult:
  """Outcome of one perplexity run."""

  ppl: float  # exp(nll)
  nll: float  # mean negative log-likelihood per predicted token, in nats
  num_tokens: int  # predicted tokens: num_windows * (seq_len - 1)
  num_windows: int
  seconds: float  # wall time of the whole run, compilation included


def eval_windows(token_ids: np.ndarray, seq_len: int = 2048,
                 num_windows: int | None = 8) -> np.ndarray:
  """The first ``num_windows`` non-overlapping windows of a token stream.

  Args:
    token_ids: 1-D integer array: the evaluation text tokenized once.
    seq_len: Tokens per window.
    num_windows: How many windows, from the start; None for every full window (the tail that
      does not fill a window is dropped).

  Returns:
    int32 array ``[num_windows, seq_len]``; row ``i`` is ``token_ids[i*seq_len:(i+1)*seq_len]``.

  Raises:
    ValueError: the stream is shorter than the windows asked for.
  """
  ids = np.asarray(token_ids)
  if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"token_ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
  if seq_len < 2:
    raise ValueError(f"{seq_len=} must be >= 2: a window predicts tokens 1..seq_len-1")
  available = ids.size // seq_len
  if available == 0:
    raise ValueError(
        f"the text has {ids.size} tokens; one window of {seq_len=} needs {seq_len}")
  if num_windows is None:
    num_windows = available
  elif num_windows < 1:
    raise ValueError(f"{num_windows=} must be >= 1 (or None for all windows)")
  elif num_windows > available:
    raise ValueError(
        f"the text has {ids.size} tokens, enough for {available} windows of {seq_len=}; "
        f"{num_windows=} needs {num_windows * seq_len}")
  return ids[:num_windows * seq_len].reshape(num_windows, seq_len).astype(np.int32)


def _hoist_bound_arrays(logits_fn: LogitsFn) -> tuple[Callable, list]:
  """Splits ``functools.partial(f, params)`` into ``f`` and the arrays it binds.

  A jitted function bakes the arrays it closes over into the program as constants: XLA then
  constant-folds the weights (8 windows of SmolLM2-135M on a 2-core CPU: 211 s with the
  weights closed over, 145 s passed as arguments) and a 7B model's weights would sit inside
  the HLO. Arrays bound by ``functools.partial`` are therefore passed
  to the jitted step as arguments; everything else bound (configs, Python numbers) stays
  static. Arrays captured by a lambda or a closure cannot be seen and remain constants.

  Returns:
    ``(call, arrays)`` with ``call(arrays, tokens) == logits_fn(tokens)``.
  """
  if not isinstance(logits_fn, functools.partial):
    return (lambda arrays, tokens: logits_fn(tokens)), []
  leaves, treedef = jax.tree_util.tree_flatten((logits_fn.args, logits_fn.keywords))
  is_array = [isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves]

  def call(arrays: list, tokens: jax.Array) -> jax.Array:
    arrays_iter = iter(arrays)
    merged = [next(arrays_iter) if hoisted else leaf for leaf, hoisted in zip(leaves, is_array)]
    args, kwargs = jax.tree_util.tree_unflatten(treedef, merged)
    return logits_fn.func(*args, tokens, **kwargs)

  return call, [leaf for leaf, hoisted in zip(leaves, is_array) if hoisted]


def _make_batch_nll(call: Callable) -> Callable:
  """One jitted step: model forward and NLL together, so only two scalars leave the device."""

  @jax.jit
  def batch_nll(arrays: list, tokens: jax.Array,
                weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    # tokens: [B, T] int32; weights: [B] fp32, 0 for padding rows of the last batch.
    logits = call(arrays, tokens)[:, :-1].astype(jnp.float32)  # [B, T-1, V]
    targets = tokens[:, 1:]  # [B, T-1]
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logits  # [B, T-1] = -log_softmax[target]
    count = weights.sum() * targets.shape[1]
    return (nll.sum(axis=-1) * weights).sum(), count

  return batch_nll


def perplexity(logits_fn: LogitsFn, windows: np.ndarray, batch_size: int = 1,
               progress: bool = True) -> PerplexityResult:
  """Perplexity of a model over evaluation windows.

  Each batch runs one jitted function that calls ``logits_fn`` and reduces the log-softmax (in
  fp32) to a summed NLL on the device; [B, T, V] logits never reach the host. A last partial
  batch is padded with copies of its first window at weight 0, so every batch has one shape and
  the function compiles once.

  Args:
    logits_fn: ``tokens int32 [B, T] -> logits [B, T, V]``, jittable, e.g.
      ``functools.partial(model_forward, params)``. Arrays bound by ``functools.partial`` are
      passed to the jitted step as arguments; arrays captured in a closure become compile-time
      constants, which is slow to compile for real weights.
    windows: int ``[num_windows, T]``, e.g. from ``eval_windows``.
    batch_size: Windows per forward pass.
    progress: Show a tqdm bar over windows.

  Returns:
    The result; ``ppl = exp(total_nll / total_count)`` with ``total_count = num_windows * (T-1)``.
  """
  windows = np.asarray(windows)
  if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
    raise ValueError(f"windows must be [num_windows >= 1, T >= 2], got {windows.shape}")
  if batch_size < 1:
    raise ValueError(f"{batch_size=} must be >= 1")
  num_windows, _ = windows.shape
  windows = windows.astype(np.int32)
  call, bound_arrays = _hoist_bound_arrays(logits_fn)
  batch_nll = _make_batch_nll(call)

  start = time.perf_counter()
  pending: list[tuple[jax.Array, jax.Array]] = []
  total_nll, total_count = 0.0, 0
  with tqdm(total=num_windows, unit="window", desc="perplexity", disable=not progress) as bar:
    for first in range(0, num_windows, batch_size):
      batch = windows[first:first + batch_size]
      real = batch.shape[0]
      if real < batch_size:
        batch = np.concatenate([batch, np.repeat(batch[:1], batch_size - real, axis=0)])
      weights = np.zeros(batch_size, np.float32)
      weights[:real] = 1.0
      pending.append(batch_nll(bound_arrays, jnp.asarray(batch), jnp.asarray(weights)))
      # Read the previous batch's scalars only after queueing this one, so the host never
      # leaves the device idle waiting for a transfer.
      if len(pending) == 2:
        nll, count = pending.pop(0)
        total_nll += float(nll)
        total_count += int(count)
        bar.update(batch_size)
    for nll, count in pending:
      total_nll += float(nll)
      total_count += int(count)
    bar.update(num_windows - bar.n)
  return _result(total_nll, total_count, num_windows, time.perf_counter() - start)


def _result(total_nll: float, total_count: int, num_windows: int, seconds: float) -> PerplexityResult:
  mean_nll = total_nll / total_count
  # A non-finite figure is an error, not a result: NaN logits (e.g. token ids outside the model's
  # vocabulary under jit, or a broken model) or a mean NLL past exp's float range.
  if not math.isfinite(mean_nll) or mean_nll >= _MAX_EXP_ARG:
    raise ValueError(f"perplexity is not finite (mean NLL {mean_nll}) over {num_windows} windows: the model's "
                     f"logits are NaN or overflow (token ids outside its vocabulary, or broken weights)")
  ppl = math.exp(mean_nll)
  return PerplexityResult(ppl=ppl, nll=mean_nll, num_tokens=total_count,
                          num_windows=num_windows, seconds=seconds)


def chunked_perplexity(config, params, windows: np.ndarray, *, chunk: int = 512,
                       progress: bool = True) -> PerplexityResult:
  """perplexity() of a models/ LLaMA, each window run in chunks of `chunk` tokens through the KV
  cache (a chunk attends to the cached keys of the chunks before it, as in the whole-window
  forward), so the activations and logits alive at once are a chunk's, not a window's: a fraction
  of the memory for long windows. The same predictions and targets as perplexity(); the figures
  agree to fp32 rounding (reductions over the cache's masked slots and smaller matmuls round
  differently), not bit for bit.

  Args:
    config, params: the model (list or stacked layers, float or quantized).
    windows: int [num_windows, T].
    chunk: tokens per forward (the last chunk of a window may be shorter).
    progress: show a tqdm bar over windows.
  """
  windows = np.asarray(windows)
  if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
    raise ValueError(f"windows must be [num_windows >= 1, T >= 2], got {windows.shape}")
  num_windows, t = windows.shape
  if not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f"{chunk=} must be a positive number of tokens")
  dtype = jax.tree.leaves(params["norm"])[0].dtype

  @jax.jit
  def step(params, cache, tokens, targets, weights):
    logits, cache = llama.forward(params, config, tokens, cache=cache)
    logits = logits.astype(jnp.float32)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logits
    return jnp.sum(nll * weights), cache

  start = time.perf_counter()
  total_nll, total_count = 0.0, 0
  for row in tqdm(windows.astype(np.int32), unit="window", desc="perplexity", disable=not progress):
    cache = llama.init_cache(config, 1, t, dtype, stacked=llama.is_stacked(params))
    targets = np.concatenate([row[1:], row[:1]])  # the last token has no target: weight 0
    weights = np.ones(t, np.float32)
    weights[-1] = 0.0
    for first in range(0, t, chunk):
      part = slice(first, first + chunk)
      nll, cache = step(params, cache, jnp.asarray(row[None, part]), jnp.asarray(targets[None, part]),
                        jnp.asarray(weights[None, part]))
      total_nll += float(nll)
    total_count += t - 1
  return _result(total_nll, total_count, num_windows, time.perf_counter() - start)
