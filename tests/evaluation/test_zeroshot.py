"""The lm-eval adapter (evaluation/zeroshot.py) and `flexq zeroshot`.

The adapter's log-likelihoods are compared with a direct computation through models.llama.forward
on a tiny random model (float, and quantized on the reference backend); the task data tests read
the offline copies at ../shared/data/zeroshot/ beside the checkout and skip only when it is absent.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evaluation import cli, zeroshot
from flexq_jax.placement import place
from flexq_jax.qconfig import QuantConfig
from flexq_jax.quantize import quantize
from models import generate as gen
from models import llama, loaders
from tests.helpers import tiny_hf_checkpoint

lm_eval = pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")
from lm_eval.api.instance import Instance  # noqa: E402

needs_data = pytest.mark.skipif(not zeroshot.REPO_DATA_DIR.is_dir(),
                                reason=f"no offline task data at {zeroshot.REPO_DATA_DIR}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tiny")
  tiny_hf_checkpoint(directory)
  return directory, loaders.load_model(directory)


_forward = jax.jit(lambda params, config, tokens: llama.forward(params, config, tokens)[0], static_argnums=1)


def _requests(kind, args):
  return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _direct(config, params, tokenizer, context, continuation, max_length=None):
  """log P(continuation | context) and greedy? by one forward of the whole sequence (lm-eval's
  split: trailing spaces of the context belong to the continuation)."""
  n = len(context) - len(context.rstrip())
  if n:
    context, continuation = context[:-n], context[-n:] + continuation
  whole = tokenizer.encode(context + continuation)
  cont = whole[len(tokenizer.encode(context)):]
  if max_length is not None:
    whole = whole[-(max_length + 1):]
  fed = whole[:-1]
  logits = np.asarray(_forward(params, config, jnp.asarray([fed]))[0], np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
  positions = range(len(fed) - len(cont), len(fed))
  total = sum(logp[p, whole[p + 1]] for p in positions)
  greedy = all(int(np.argmax(logits[p])) == whole[p + 1] for p in positions)
  return total, greedy


PAIRS = [
    ("Question: Is the sky blue?\nAnswer:", " yes"),  # one-token answers sharing a context: one row
    ("Question: Is the sky blue?\nAnswer:", " no"),
    ("The capital of France is", " Paris, a city on the Seine."),
    ("Sarah was a much better surgeon than Maria so ", "Maria always got the harder cases."),
    ("A" * 3, " b c d e f g"),
]


def test_loglikelihoods_match_a_direct_forward(tiny):
  _, (config, params, tokenizer) = tiny
  lm = zeroshot.FlexQLM.from_loaded(config, params, tokenizer, progress=False)
  got = lm.loglikelihood(_requests("loglikelihood", PAIRS))
  for (ctx, cont), (logprob, greedy) in zip(PAIRS, got):
    want, want_greedy = _direct(config, params, tokenizer, ctx, cont)
    assert logprob == pytest.approx(want, rel=1e-4, abs=1e-3), (ctx, cont)
    assert greedy == want_greedy
  # the two one-token answers were scored from one row (one forward), by the last-position path
  assert any(kind == "last" for kind, _, _ in lm.compiled_shapes)


def test_greedy_flag_and_truncation_to_max_length(tiny):
  _, (config, params, tokenizer) = tiny
  context = "one two three four five six seven eight nine ten eleven twelve"
  ids = tokenizer.encode(context)
  logits = llama.forward(params, config, jnp.asarray([ids]))[0][0, -1]
  best = tokenizer.decode([int(jnp.argmax(logits))])
  lm = zeroshot.FlexQLM.from_loaded(config, params, tokenizer, progress=False, max_length=8)
  short = zeroshot.FlexQLM.from_loaded(config, params, tokenizer, progress=False)
  (lp, greedy), = short.loglikelihood(_requests("loglikelihood", [(context, best)]))
  if tokenizer.encode(context + best)[:len(ids)] == ids:  # the argmax token re-encodes as itself
    assert greedy
  # a context longer than max_length keeps its end: the same as a forward over the last 8 + 1 tokens
  (lp8, _), = lm.loglikelihood(_requests("loglikelihood", [(context, " thirteen")]))
  want, _ = _direct(config, params, tokenizer, context, " thirteen", max_length=8)
  assert lp8 == pytest.approx(want, rel=1e-4, abs=1e-3)
  full, _ = _direct(config, params, tokenizer, context, " thirteen")
  assert abs(lp8 - full) > 1e-3  # the truncation did change the context


def test_quantized_model_matches_its_own_forward(tiny):
  _, (config, params, tokenizer) = tiny
  calib = np.random.default_rng(0).integers(0, 1000, (2, 32), dtype=np.int32)
  qparams, _ = quantize(params, calib, QuantConfig(weight_method="rtn", smooth_alpha=None, a8_selection="down_proj"), model_config=config)
  qparams = llama.fuse_projections(place(qparams, "reference")[0])
  lm = zeroshot.FlexQLM.from_loaded(config, qparams, tokenizer, progress=False)
  got = lm.loglikelihood(_requests("loglikelihood", PAIRS[2:4]))
  for (ctx, cont), (logprob, _) in zip(PAIRS[2:4], got):
    want, _ = _direct(config, qparams, tokenizer, ctx, cont)
    assert logprob == pytest.approx(want, rel=1e-4, abs=1e-3)
  float_lp = zeroshot.FlexQLM.from_loaded(config, params, tokenizer, progress=False).loglikelihood(
      _requests("loglikelihood", PAIRS[2:3]))[0][0]
  assert float_lp != got[0][0]  # the quantized weights were really used


def test_rolling_loglikelihood_is_the_sum_over_every_token(tiny):
  _, (config, params, tokenizer) = tiny
  text = "The quick brown fox jumps over the lazy dog. " * 3
  for max_length in (2048, 16):  # one window, and several disjoint windows
    lm = zeroshot.FlexQLM.from_loaded(config, params, tokenizer, progress=False, max_length=max_length)
    (got,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    ids = tokenizer.encode(text)
    if max_length == 2048:
      fed = [lm.prefix_token_id] + ids
      logits = np.asarray(llama.forward(params, config, jnp.asarray([fed[:-1]]))[0][0], np.float64)
      logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
      want = sum(logp[p, fed[p + 1]] for p in range(len(ids)))
      assert got == pytest.approx(want, rel=1e-4)
      one_window = got
    else:
      assert got != pytest.approx(one_window, rel=1e-6)  # shorter contexts: a different number
      assert np.isfinite(got) and got < 0


def test_generate_until_is_greedy_generation_cut_at_the_stop_string(tiny):
  _, (config, params, tokenizer) = tiny
  lm = zeroshot.FlexQLM.from_loaded(config, params, tokenizer, progress=False)
  prompts = ["Once upon a time", "The best thing about"]
  texts = lm.generate_until(_requests("generate_until", [(p, {"until": [], "max_gen_toks": 6}) for p in prompts]))
  for prompt, text in zip(prompts, texts):
    ids = tokenizer.encode(prompt)
    out = gen.generate(params, config, jnp.asarray([ids]), jnp.ones((1, len(ids)), bool), jax.random.key(0),
                       max_new_tokens=6)
    want = tokenizer.decode(np.asarray(out.tokens[0, :int(out.num_generated[0])]).tolist())
    assert text == want
  stop = texts[0][len(texts[0]) // 2:][:2] or texts[0]
  cut = lm.generate_until(_requests("generate_until", [(prompts[0], {"until": [stop], "max_gen_toks": 6})]))[0]
  assert cut == texts[0][:texts[0].index(stop)]


def test_many_lengths_compile_few_shapes(tiny):
  _, (config, params, tokenizer) = tiny
  rng = np.random.default_rng(0)
  words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
  pairs = [(" ".join(rng.choice(words, int(n))), " " + str(rng.choice(words))) for n in rng.integers(1, 40, 60)]
  lm = zeroshot.FlexQLM.from_loaded(config, params, tokenizer, progress=False, batch_tokens=512)
  results = lm.loglikelihood(_requests("loglikelihood", pairs))
  assert len(results) == 60 and all(np.isfinite(lp) and lp < 0 for lp, _ in results)
  # one shape per (kind, length bucket), and one more for a short last batch
  buckets = {(kind, length) for kind, _, length in lm.compiled_shapes}
  assert len({length for _, length in buckets}) <= 5 and len(lm.compiled_shapes) <= 2 * len(buckets)
  for kind, length in buckets:
    rows = sorted(r for k, r, n in lm.compiled_shapes if (k, n) == (kind, length))
    assert len(rows) <= 2 and rows[-1] <= 512 // length, lm.compiled_shapes
  assert lm.tokens_padded < 2 * lm.tokens_scored


def test_registered_with_lm_eval():
  from lm_eval.api.registry import get_model
  assert get_model("flexq") is zeroshot.FlexQLM


def test_bad_options_are_clear_errors_before_any_work(capsys, tmp_path):
  assert cli.main(["zeroshot", "--limit", "0"]) == 2
  assert "--limit 0 must be >= 1" in capsys.readouterr().err
  assert cli.main(["zeroshot", "--tasks", "piqa", "--data-dir", str(tmp_path / "none")]) == 2
  assert "--data-dir" in capsys.readouterr().err
  assert cli.main(["zeroshot", "--tasks", " , "]) == 2
  assert "--tasks" in capsys.readouterr().err
  assert cli.main(["zeroshot", "--row", "no such row"]) == 2
  assert "--row" in capsys.readouterr().err
  (tmp_path / "piqa" / "validation").mkdir(parents=True)
  assert cli.main(["zeroshot", "--tasks", "piqa", "--data-dir", str(tmp_path)]) == 2
  assert "not a datasets.save_to_disk folder" in capsys.readouterr().err
  assert cli.main(["zeroshot", "--tasks", "hellaswag", "--data-dir", str(tmp_path)]) == 2
  assert "no offline copy" in capsys.readouterr().err


def test_unknown_task_is_refused_by_name(tmp_path):
  with pytest.raises(ValueError, match="unknown lm-eval task.*no_such_task"):
    zeroshot.task_manager(["no_such_task"], None, tmp_path)


@needs_data
def test_local_tasks_use_lm_evals_own_prompts_on_the_offline_rows(tmp_path):
  manager = zeroshot.task_manager(list(zeroshot.LOCAL_TASKS), zeroshot.REPO_DATA_DIR, tmp_path)
  tasks = manager.load(list(zeroshot.LOCAL_TASKS))["tasks"]
  expected_rows = {"piqa": 1838, "arc_easy": 2376, "boolq": 3270, "winogrande": 1267}  # the data README
  for name, task in tasks.items():
    assert len(list(task.eval_docs)) == expected_rows[name]
  # lm-eval's own templates (the YAMLs we write only include them)
  piqa, arc = tasks["piqa"], tasks["arc_easy"]
  doc = next(iter(arc.eval_docs))
  assert arc.doc_to_text(doc) == f"Question: {doc['question']}\nAnswer:"
  assert arc.doc_to_target(doc) == doc["choices"]["label"].index(doc["answerKey"])
  doc = next(iter(piqa.eval_docs))
  assert piqa.doc_to_text(doc) == f"Question: {doc['goal']}\nAnswer:"
  assert piqa.doc_to_choice(doc) == [doc["sol1"], doc["sol2"]]


def _zeroshot_tiny(directory, out, *extra) -> int:
  """`flexq zeroshot` on the tiny model: PIQA and WinoGrande, 6 examples each."""
  return cli.main(["zeroshot", "--model", str(directory), "--tasks", "piqa,winogrande", "--limit", "6",
                   "--out", str(out), *extra])


@needs_data
def test_zeroshot_command_on_a_tiny_model(tiny, tmp_path, capsys):
  directory, _ = tiny
  out = tmp_path / "table"
  assert _zeroshot_tiny(directory, out, "--label", "tiny") == 0
  printed = capsys.readouterr().out
  assert "| tiny |" in printed
  table = json.loads((out / "zeroshot.json").read_text())
  (row,) = table["rows"]
  assert set(row["scores"]) == {"piqa", "winogrande"}
  assert row["scores"]["piqa"]["n"] == 6 and "acc_norm" in row["scores"]["piqa"]
  assert "acc_norm" not in row["scores"]["winogrande"]  # the task has none
  piqa = row["scores"]["piqa"]
  assert 0 <= piqa["acc"] <= 1 and row["meta"]["runs"]["piqa"]["limit"] == 6
  assert len(piqa["acc_per_doc"]) == 6 and piqa["acc_per_doc"].count("1") / 6 == pytest.approx(piqa["acc"])
  md = (out / "zeroshot.md").read_text()
  assert "piqa acc_norm" in md and "| tiny |" in md


@pytest.mark.slow
@needs_data
def test_zeroshot_command_on_a_quantized_checkpoint(tiny, tmp_path, capsys):
  directory, _ = tiny
  out = tmp_path / "table"
  assert _zeroshot_tiny(directory, out, "--label", "tiny") == 0
  # a quantized checkpoint (flexq quantize) is a second row, compared on the same examples
  assert cli.main(["quantize", "--model", str(directory), "--calib-batch", "2", "--calib-len", "32",
                   "--weight-method", "rtn", "--a8-selection", "down_proj", "--out", str(tmp_path / "q")]) == 0
  assert _zeroshot_tiny(directory, out, "--quantized", str(tmp_path / "q")) == 0
  rows = json.loads((out / "zeroshot.json").read_text())["rows"]
  assert [r["label"] for r in rows] == ["tiny", f"quantized {tmp_path / 'q'}"]
  assert rows[1]["meta"]["runs"]["piqa"]["backend"] == "auto"
  assert f"| quantized {tmp_path / 'q'} |" in (out / "zeroshot.md").read_text()


def test_table_rows_replace_rows_of_the_same_label(tmp_path):
  def row(label, acc):
    return zeroshot.Row(label, {"piqa": {"acc": acc, "acc_stderr": 0.01, "n": 10}}, {})
  zeroshot.write_row(row("FP32", 0.6), tmp_path)
  zeroshot.write_row(row("Q", 0.5), tmp_path)
  zeroshot.write_row(row("FP32", 0.7), tmp_path)
  zeroshot.write_row(zeroshot.Row("FP32", {"boolq": {"acc": 0.9, "acc_stderr": 0.02, "n": 5}}, {"limit": 5}),
                     tmp_path)
  rows = zeroshot.load_rows(tmp_path)
  assert rows[0].scores["boolq"]["acc"] == 0.9 and rows[0].meta["runs"]["boolq"] == {"limit": 5}
  rows[0].scores.pop("boolq")
  assert [r.label for r in rows] == ["FP32", "Q"] and rows[0].scores["piqa"]["acc"] == 0.7
  md = (tmp_path / "zeroshot.md").read_text()
  assert "| FP32 | 70.00 ± 1.00 | 90.00 ± 2.00 | 80.00 | +0.00 |" in md
  assert "| Q | 50.00 ± 1.00 |  | 50.00 | -20.00 (piqa first 10) |" in md  # compared on the common task only
  zeroshot.write_row(zeroshot.Row("Q", {"boolq": {"acc": 0.8, "acc_stderr": 0.02, "n": 3, "n_total": 9}}, {}),
                     tmp_path)
  md = (tmp_path / "zeroshot.md").read_text()
  assert "| Q | 50.00 ± 1.00 | 80.00 ± 2.00 (3) | 65.00 | -20.00 (piqa first 10) |" in md  # boolq: other examples


@pytest.mark.slow
@needs_data
def test_piqa_limit_50_on_the_default_model(tmp_path, capsys):
  """The issue's quick run: `flexq zeroshot --tasks piqa --limit 50` (a few minutes on 2 CPU cores)."""
  assert cli.main(["zeroshot", "--tasks", "piqa", "--limit", "50", "--out", str(tmp_path)]) == 0
  (row,) = json.loads((tmp_path / "zeroshot.json").read_text())["rows"]
  assert row["scores"]["piqa"]["n"] == 50
  assert row["scores"]["piqa"]["acc"] > 0.55  # far above chance (0.5) for SmolLM2-135M-Instruct


@needs_data
def test_lm_eval_command_line_runs_the_registered_model(tiny, tmp_path, capsys):
  directory, _ = tiny
  yamls = tmp_path / "tasks"
  assert cli.main(["zeroshot", "--tasks", "piqa", "--write-tasks", str(yamls)]) == 0
  assert (yamls / "piqa.yaml").is_file()
  capsys.readouterr()
  assert cli.main(["lm-eval", "run", "--model", "flexq", "--model_args", f"model={directory},progress=false",
                   "--tasks", "piqa", "--include_path", str(yamls), "--limit", "3"]) == 0
  printed = capsys.readouterr().out
  assert "piqa" in printed and "acc_norm" in printed


def test_paired_standard_error_of_a_change():
  a = {"t": {"acc_per_doc": "1100110011"}, "u": {"acc_per_doc": "1111"}}
  b = {"t": {"acc_per_doc": "1100110011"}, "u": {"acc_per_doc": "1111"}}
  assert zeroshot.paired_stderr(a, b, ["t", "u"]) == 0.0  # the same answers: no noise in the change
  b["t"]["acc_per_doc"] = "0100110011"
  d = np.array([1.0] + [0.0] * 9)
  want = np.sqrt(d.var(ddof=1) / 10) / 2
  assert zeroshot.paired_stderr(a, b, ["t", "u"]) == pytest.approx(want)
  a["t"].update(acc=0.6, n=10)
  assert zeroshot.paired_stderr(a, {"t": {"acc": 0.5, "n": 10}, "u": b["u"]}, ["t", "u"]) is None  # no per-example data


def test_limited_runs_are_compared_on_their_shared_first_examples():
  full = {"t": {"acc": 0.6, "n": 5, "n_total": 9, "acc_per_doc": "11100"}}
  short = {"t": {"acc": 1 / 3, "n": 3, "n_total": 9, "acc_per_doc": "010"}}
  delta, se, shared = zeroshot.compare(short, full)
  assert shared == {"t": 3} and delta == pytest.approx(1 / 3 - 1)  # against the first 3 of 5: 111
  d = np.array([-1.0, 0.0, -1.0])
  assert se == pytest.approx(np.sqrt(d.var(ddof=1) / 3))
  other_split = {"t": {"acc": 0.5, "n": 3, "n_total": 7, "acc_per_doc": "010"}}
  assert zeroshot.compare(other_split, full) is None
  assert "| B | 33.33 ± 0.00 (3) | 33.33 | -66.67 ± 33.33 (first 3 of each task) |" in zeroshot.to_markdown(
      [zeroshot.Row("A", {"t": {**full["t"], "acc_stderr": 0.1}}, {}),
       zeroshot.Row("B", {"t": {**short["t"], "acc_stderr": 0.0}}, {})])


# -- two machines: --export-requests, score-requests, --scores-from ------------------------------


@needs_data
def test_exported_requests_scored_elsewhere_give_the_direct_table(tiny, tmp_path, capsys):
  """export -> score-requests -> --scores-from: lm-eval's table equals a direct run's, example by example."""
  directory, (config, params, tokenizer) = tiny
  assert _zeroshot_tiny(directory, tmp_path / "direct", "--label", "tiny") == 0
  requests = tmp_path / "req.npz"
  assert _zeroshot_tiny(directory, "", "--export-requests", str(requests)) == 0
  assert not (tmp_path / "direct" / "req.npz").exists()
  req = zeroshot.load_requests(requests)
  assert req.meta["tasks"] == ["piqa", "winogrande"] and req.meta["limit"] == 6 and req.logprob is None
  assert req.calib.shape == (8, 512) and req.windows.shape[1] == 2048 and len(req.pairs) >= 2 * 6 + 2 * 6 - 6
  scores = tmp_path / "fp32.npz"
  assert cli.main(["score-requests", str(requests), "--model", str(directory), "--out", str(scores)]) == 0
  got = zeroshot.load_requests(scores, need_scores=True)
  assert got.pairs == req.pairs and got.meta["label"] == "FP32" and np.isfinite(got.meta["perplexity"])
  want = [_direct(config, params, tokenizer, tokenizer.decode(c), tokenizer.decode(t)) for c, t in req.pairs[:3]]
  lm = zeroshot.FlexQLM.from_loaded(config, params, tokenizer, progress=False)
  direct = lm.scorer.score_pairs(req.pairs[:3])
  np.testing.assert_allclose(got.logprob[:3], [d[0] for d in direct], rtol=1e-5)
  assert all(np.isfinite(w[0]) for w in want)
  # the fixed-rows scoring of accelerators: the same numbers, one compilation per bucket
  fixed = zeroshot.score_request_file(req, config, params, batch_tokens=256, fixed_rows=True,
                                      buckets=zeroshot.GPU_BUCKETS, progress=False)
  np.testing.assert_allclose(fixed[0], got.logprob, rtol=1e-5, atol=1e-5)
  assert (fixed[1] == got.greedy).all()
  assert len(fixed[2].compiled_shapes) == len({length for _, _, length in fixed[2].compiled_shapes})
  assert _zeroshot_tiny(directory, tmp_path / "replayed", "--scores-from", str(scores), "--label", "tiny") == 0
  a, b = (json.loads((tmp_path / d / "zeroshot.json").read_text())["rows"][0] for d in ("direct", "replayed"))
  for task in ("piqa", "winogrande"):
    assert a["scores"][task]["acc_per_doc"] == b["scores"][task]["acc_per_doc"]
    assert a["scores"][task]["acc"] == b["scores"][task]["acc"]
  assert b["meta"]["runs"]["piqa"]["device"].startswith("cpu")
  # another task set or limit than the export's: refused before any work
  capsys.readouterr()
  assert cli.main(["zeroshot", "--model", str(directory), "--tasks", "piqa", "--limit", "6",
                   "--scores-from", str(scores)]) == 2
  assert "scored for tasks ['piqa', 'winogrande'] with limit 6" in capsys.readouterr().err


def test_score_requests_quantizes_an_accuracy_table_row(tiny, tmp_path):
  """--row on the file's calibration batch: a rotated row is rotated first, and says so."""
  directory, (config, params, tokenizer) = tiny
  pairs = [(tokenizer.encode(c), tokenizer.encode(t)) for c, t in PAIRS[2:4]]
  calib = np.random.default_rng(0).integers(0, config.vocab_size, (2, 32), dtype=np.int32)
  requests = zeroshot.save_requests(tmp_path / "req.npz", pairs, {"tasks": ["x"], "limit": None, "max_length": 64,
                                                                   "vocab_size": config.vocab_size}, calib=calib)
  scores = tmp_path / "q.npz"
  assert cli.main(["score-requests", str(requests), "--model", str(directory), "--row",
                   "W6A6 + down_proj A8, paper rule (Hadamard rotation + GPTQ)", "--backend", "reference",
                   "--out", str(scores)]) == 0
  got = zeroshot.load_requests(scores, need_scores=True)
  assert got.meta["rotation"] == "hadamard" and got.meta["backend"] == "reference"
  assert got.meta["a8_layers"] and all(p.endswith("down_proj") for p in got.meta["a8_layers"])
  fp = zeroshot.PairScorer(config, params, 2048, 64).score_pairs(pairs)
  assert all(np.isfinite(got.logprob)) and not np.allclose(got.logprob, [f[0] for f in fp], rtol=1e-6)


def test_request_files_refuse_what_they_are_not(tiny, tmp_path, capsys):
  directory, (config, _, tokenizer) = tiny
  pairs = [([1, 2, 3], [4]), ([1, 2], [5, 6])]
  meta = {"tasks": ["piqa"], "limit": None, "max_length": 64, "vocab_size": config.vocab_size}
  good = zeroshot.save_requests(tmp_path / "s.npz", pairs, meta, scores=(np.array([-1.0, -2.0]), np.array([True, False])))
  assert zeroshot.load_requests(good, need_scores=True).pairs == [([1, 2, 3], [4]), ([1, 2], [5, 6])]
  truncated = tmp_path / "t.npz"
  truncated.write_bytes(good.read_bytes()[:100])
  with pytest.raises(ValueError, match=r"--scores-from .*t\.npz: not a requests file"):
    zeroshot.load_requests(truncated, need_scores=True, option="--scores-from")
  with pytest.raises(ValueError, match="not a scores file"):
    zeroshot.load_requests(zeroshot.save_requests(tmp_path / "r.npz", pairs, meta), need_scores=True)
  bad = zeroshot.save_requests(tmp_path / "nan.npz", pairs, meta, scores=(np.array([-1.0, np.nan]), np.array([1, 0])))
  with pytest.raises(ValueError, match="1 log-probabilities are non-finite or positive"):
    zeroshot.load_requests(bad, need_scores=True)
  with pytest.raises(ValueError, match=r"token ids outside"):
    zeroshot.load_requests(zeroshot.save_requests(tmp_path / "v.npz", [([1], [10**6])], meta))
  with np.load(good) as z:
    arrays = {k: z[k] for k in z.files}
  arrays["offsets"] = arrays["offsets"][:-1]
  np.savez(tmp_path / "edited.npz", **arrays)
  with pytest.raises(ValueError, match="inconsistent arrays"):
    zeroshot.load_requests(tmp_path / "edited.npz")
  with pytest.raises(ValueError, match="lacks the tasks or max_length"):
    zeroshot.load_requests(zeroshot.save_requests(tmp_path / "m.npz", pairs, {"tasks": ["piqa"]}))
  # a request the file has no score for: named, not a silent zero
  replay = zeroshot.ScoreReplay(zeroshot.load_requests(good, need_scores=True))
  assert replay.score_pairs([([1, 2], [5, 6])]) == [(-2.0, False)]
  with pytest.raises(ValueError, match="no score for a request"):
    replay.score_pairs([([1, 2], [7])])
  assert cli.main(["score-requests", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "o.npz")]) == 2
  err = capsys.readouterr().err
  assert "--requests" in err and "missing.npz: no such file" in err
