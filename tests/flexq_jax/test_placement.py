"""Per-layer backend placement (flexq_jax.placement, place "auto"; tuning tables) and generation through every backend.

CPU: the choice logic against synthetic and committed tuning tables, the report's record of it,
and greedy generation through the jnp paths and the Pallas kernels in interpret mode.
GPU (marker `gpu`): the same generation through the compiled Pallas kernels, BMMA and "auto".
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evaluation import e2e_bench
from evaluation import cli
from flexq_jax import placement, tuning
from flexq_jax.placement import place
from flexq_jax.qconfig import QuantConfig
from flexq_jax.qlinear import QuantizedLinear
from flexq_jax.quantize import quantize
from models import generate as gen
from models import config as model_configs
from models import llama
from tests.helpers import has_gpu


def _layer(n=4096, k=4096, a_bits=6, w_bits=6, group=128):
  return QuantizedLinear(packed=None, scales=None, in_features=k, out_features=n, w_bits=w_bits, a_bits=a_bits,
                         group_size=group)


TABLE = {"card": "x", "entries": [
    {"n": 4096, "k": 4096, "m": 1, "a_bits": 6, "us": {"pallas": 10.0, "bmma": 8.0}},
    {"n": 4096, "k": 4096, "m": 64, "a_bits": 6, "us": {"pallas": 20.0, "bmma": 30.0}},
    {"n": 28672, "k": 8192, "m": 1, "a_bits": 6, "us": {"pallas": 50.0, "bmma": 60.0}},
]}


def test_choose_reads_the_nearest_table_entry():
  assert placement.choose(_layer(), 1, card="x", table=TABLE)[0] == "bmma"
  assert placement.choose(_layer(), 32, card="x", table=TABLE)[0] == "pallas"  # nearest M is 64 (log scale)
  backend, why = placement.choose(_layer(n=11008, k=4096), 1, card="x", table=TABLE)
  assert backend == "bmma" and "4096x4096" in why  # 11008x4096 is nearer 4096x4096 than 28672x8192
  assert placement.choose(_layer(n=28672, k=8192), 1, card="x", table=TABLE)[0] == "pallas"


def test_choose_keeps_the_preferred_backend_on_a_near_tie():
  near = {"card": "x", "entries": [{"n": 4096, "k": 4096, "m": 8, "a_bits": 6, "us": {"pallas": 10.3, "bmma": 10.0}}]}
  backend, why = placement.choose(_layer(), 8, card="x", table=near)
  assert backend == "pallas" and "bmma 10.0 us" in why  # 3% is within the margin
  near["entries"][0]["us"]["pallas"] = 10.6  # 6% slower: BMMA's
  assert placement.choose(_layer(), 8, card="x", table=near)[0] == "bmma"


def test_choose_falls_back_and_respects_what_can_run():
  assert placement.choose(_layer(), 1, card="cpu")[0] == "reference"
  assert placement.choose(_layer(), 1, card="unknown-gpu", table=None)[0] == "pallas"
  # N not a multiple of 16: Pallas cannot run it, BMMA can
  assert placement.choose(_layer(n=200), 1, card="x", table=TABLE)[0] == "bmma"
  # 8-bit weights: only the Pallas kernel; per-channel groups: no GPU kernel
  assert placement.choose(_layer(w_bits=8), 1, card="x", table=TABLE)[0] == "pallas"
  backend, why = placement.choose(_layer(group=None), 1, card="x", table=TABLE)
  assert backend == "reference" and "group 128" in why


@pytest.mark.parametrize("card", ["h200", "h100"])
def test_committed_tables_are_well_formed(card):
  table = tuning.load_table(card)
  assert table is not None and table["card"] == card
  for e in table["entries"]:
    assert {"n", "k", "m", "a_bits", "us"} <= set(e) and e["us"]
    assert all(v > 0 for v in e["us"].values())
  assert tuning.load_table("no-such-card") is None


def test_table_from_bench(tmp_path):
  run = {"card": "h200", "device": "NVIDIA H200", "date": "2026-11-27", "cases": [
      {"n": 64, "k": 128, "m": 1, "a_bits": 6, "ours_us": 3.0, "bmma_us": float("nan")},
      {"n": 64, "k": 128, "m": 1, "a_bits": 8, "ours_us": 4.0, "bmma_us": 2.5}]}
  later = dict(run, cases=[{"n": 64, "k": 128, "m": 1, "a_bits": 6, "ours_us": 2.0, "bmma_us": 5.0}])
  paths = [tmp_path / "a.json", tmp_path / "b.json"]
  for p, r in zip(paths, (run, later)):
    p.write_text(json.dumps(r))
  table = tuning.table_from_bench(paths)
  by_bits = {e["a_bits"]: e["us"] for e in table["entries"]}
  assert by_bits == {6: {"pallas": 2.0, "bmma": 5.0}, 8: {"pallas": 4.0, "bmma": 2.5}}
  tuning.main(["--from", *map(str, paths), "--out", str(tmp_path / "t.json")])
  assert json.loads((tmp_path / "t.json").read_text())["entries"] == table["entries"]
  other = tmp_path / "c.json"
  other.write_text(json.dumps(dict(run, card="h100")))
  with pytest.raises(ValueError, match="different cards"):
    tuning.table_from_bench([paths[0], other])


# ---- a tiny quantized model, generated through every backend ---------------------------------------

@pytest.fixture(scope="module")
def tiny():
  cfg = e2e_bench.tiny_config()
  params = llama.init_params(cfg, jax.random.key(0), scale=0.05)
  calib = np.asarray(jax.random.randint(jax.random.key(1), (2, 32), 0, cfg.vocab_size))
  qparams, report = quantize(params, calib, QuantConfig(weight_method="rtn", a8_selection="down_proj",
                                                        smooth_alpha=None), model_config=cfg)
  return cfg, qparams, report


def test_quantize_leaves_placement_to_place(tiny):
  _, qparams, report = tiny
  assert set(placement.backends_of(qparams).values()) == {"reference"}
  assert {l.layout for l in jax.tree.leaves(qparams, is_leaf=lambda a: isinstance(a, QuantizedLinear))
          if isinstance(l, QuantizedLinear)} == {"bitplanes"}
  assert "backends" not in report.summary()


def test_place_auto_records_each_layers_backend(tiny):
  _, qparams, _ = tiny
  placed, record = place(qparams, "auto", dtype=jnp.bfloat16)
  on_gpu = jax.default_backend() == "gpu"
  assert all(l.backend == ("pallas" if on_gpu else "reference") and l.why for l in record.layers)
  assert placement.backends_of(placed) == {l.path: l.backend for l in record.layers}
  assert len(record.layers) == 14 and "backends: 14 x" in record.summary()
  assert json.loads(record.to_json())["layers"][0]["backend"] == record.layers[0].backend


def test_place_auto_on_cpu_is_the_reference(tiny):
  if jax.default_backend() == "gpu":
    pytest.skip("the CPU choice")
  _, qparams, _ = tiny
  placed = place(place(qparams, "pallas")[0], "auto")[0]
  assert set(placement.backends_of(placed).values()) == {"reference"}


def _generate(cfg, params, new_tokens=6):
  prompts = [[5, 17, 99, 3, 250], [7, 8]]
  tokens, mask = gen.pad_prompts(prompts, 0, "left")
  out = gen.generate(params, cfg, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(0),
                     max_new_tokens=new_tokens)
  return np.asarray(out.tokens), np.asarray(out.prompt_logits)


_GPU = [pytest.mark.gpu, pytest.mark.skipif(not has_gpu(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("backend", [
    "dequant",
    "dequant+fused",
    pytest.param("pallas", marks=[pytest.mark.slow] if not has_gpu() else [pytest.mark.gpu]),  # CPU: interpret mode
    pytest.param("bmma", marks=_GPU),
    pytest.param("auto", marks=_GPU),
    pytest.param("pallas+fused", marks=_GPU),
    pytest.param("bmma+fused", marks=_GPU),
    pytest.param("pallas+fused+swiglu", marks=_GPU),
    pytest.param("pallas+fused+gemv", marks=_GPU),
])
def test_greedy_generation_matches_the_reference(tiny, backend, monkeypatch):
  """Same greedy tokens through `backend` (+fused: q/k/v and gate/up fused after placement; +swiglu: and
  down_proj's input quantized by the SwiGLU kernel, "fuse_swiglu_quant"; +gemv: the 2-row decode steps on the
  CUDA GEMV with the norms, SwiGLU and residual adds folded in, "cuda_gemv_fuse") as through the jnp reference,
  unfused; prompt logits within 1e-2 of their scale (the contract leaves fp32 summation order free, and an
  activation whose quotient sits within that rounding of a half step may land one step apart downstream)."""
  if backend.endswith("+swiglu"):
    monkeypatch.setenv(tuning.EXTRA_ENV, '{"fuse_swiglu_quant": true}')
    backend = backend.removesuffix("+swiglu")
  if backend.endswith("+gemv"):  # the decode steps (2 rows) on the CUDA GEMV with every fold (cuda.gemv.gemv_fused)
    monkeypatch.setenv(tuning.EXTRA_ENV, '{"cuda_gemv_xq_max_m": 2, "cuda_gemv_fuse": ["norm", "swiglu", "residual"]}')
    backend = backend.removesuffix("+gemv")
  cfg, qparams, _ = tiny
  # bf16 activations (what the BMMA kernel takes): the norms and embeddings in bf16
  qparams = jax.tree.map(lambda a: a if isinstance(a, QuantizedLinear) else a.astype(jnp.bfloat16), qparams,
                         is_leaf=lambda a: isinstance(a, QuantizedLinear))
  ref_tokens, ref_logits = _generate(cfg, place(qparams, "reference")[0])
  backend, _, fused = backend.partition("+")
  placed, _ = place(qparams, backend, dtype=jnp.bfloat16)
  if fused:
    placed = llama.fuse_projections(placed)
    assert llama.fused_count(placed) == {"qkv_proj": cfg.num_layers, "gate_up_proj": cfg.num_layers}
  if backend != "auto":
    assert set(placement.backends_of(placed).values()) == {backend}
  tokens, logits = _generate(cfg, placed)
  np.testing.assert_array_equal(tokens, ref_tokens)
  scale = float(np.max(np.abs(ref_logits)))
  assert float(np.max(np.abs(logits - ref_logits))) <= 1e-2 * scale


def test_e2e_bench_runs_tiny_on_cpu(tmp_path):
  """The benchmark's whole path (random stacked weights of every method, prefill, decode loop,
  files) on the tiny model; on CPU the quantized methods run the reference."""
  cfg = e2e_bench.tiny_config()
  for method in ("bf16", "w8a8-xla"):
    params = e2e_bench.random_params(cfg, method)
    row = e2e_bench.measure("tiny", method, cfg, params, 2, 8, 4, log=lambda s: None)
    assert row.decode_tok_s > 0 and row.prefill_ms > 0 and row.linear_weight_bytes > 0
  bf = e2e_bench.linear_bytes(e2e_bench.random_params(cfg, "bf16"))
  w6 = e2e_bench.linear_bytes(e2e_bench.random_params(cfg, "flexq"))
  assert w6 / bf == pytest.approx(6.125 / 16, rel=1e-6)  # 6 bits + one fp16 scale per 128 weights
  assert cli.main(["bench", "--models", "tiny", "--methods", "bf16,w8a8-xla", "--batches", "1", "--prompts", "8",
                   "--new-tokens", "2", "--profile", "--out-dir", str(tmp_path)]) == 0
  md = next(tmp_path.glob("*.md")).read_text()
  assert "| tiny | w8a8-xla | 1 | 8 | 2 |" in md
  assert "Decode step profile" in md  # no GPU kernels on CPU: the rows are there, empty


def test_e2e_markdown_ratios_failures_and_profile():
  rows = [e2e_bench.Row("m", "bf16", 1, 8, 4, decode_tok_s=100.0, linear_weight_bytes=1600),
          e2e_bench.Row("m", "flexq", 1, 8, 4, decode_tok_s=150.0, linear_weight_bytes=613),
          e2e_bench.Row("m", "w8a8-xla", 1, 8, 4, error="RESOURCE_EXHAUSTED: out of memory")]
  prof = dict(model="m", method="flexq", batch=1, prompt=8, steps=4, wall_us_per_step=100.0,
              device_busy_us_per_step=80.0,
              kernels={e2e_bench._category("w6a_gemv"): dict(us=60.0, launches=7),
                       e2e_bench._category("loop_add_fusion"): dict(us=20.0, launches=9)})
  md = e2e_bench.markdown(rows, "x", "X", "2026-11-27", [prof])
  flexq_row = next(line for line in md.splitlines() if line.startswith("| m | flexq |"))
  assert "| 1.50 |" in flexq_row and "| 0.383 |" in flexq_row
  assert "m w8a8-xla B=1 P=8: RESOURCE_EXHAUSTED" in md
  assert "pallas GEMM/GEMV 60 / 7; other XLA kernels 20 / 9" in md
  assert e2e_bench._category("sm90_xmma_gemm_bf16") == "cuBLAS GEMM"
  assert e2e_bench._category("flexq::bmma_decode_kernel") == "BMMA (CUDA)"
  assert e2e_bench._category("void flexq::gemv_pallas6_xq_kernel<6, 8>(...)") == "CUDA GEMV"


def test_rms_norm_fused_for_the_small_mosaic_gemm_where_the_table_says(tiny, monkeypatch):
  """The routing of "fuse_norm_quant_small" (CPU; the kernels themselves are GPU tests: the norm's act_t
  output in tests/pallas_kernels/test_w6a_matmul.py, the GEMM on it in test_w6a_gemm_mgpu_small.py).
  Where the pallas backend would run the small-M Mosaic GEMM with its [G, 2, M] operand, norm_input
  hands the layer norm_quantize(act_t=True)'s q_x and act for the layer's own small tiling, and
  `qa @ layer` runs gemm_quantized on them; without the key, or without quant_t, nothing is fused."""
  from flexq_jax import backends
  from pallas_kernels import w6a_gemm_mgpu_small as ms
  cfg, qparams, _ = tiny
  layer = llama.fuse_projections(place(qparams, "pallas", dtype=jnp.float32)[0])["layers"][0]
  qkv, norm = layer["qkv_proj"], layer["input_layernorm"]
  h = jnp.asarray(np.random.default_rng(2).standard_normal((2, 8, cfg.hidden_size)), jnp.float32)
  table = {"mosaic_small_split": True, "mosaic_small_ragged": True, "mosaic_small_sw_f16": True,
           "mosaic_small_quant_t": True, "fuse_norm_quant_small": True}
  monkeypatch.setattr(backends, "_card_table", lambda device=None: table)
  monkeypatch.setattr(backends.PALLAS, "kernel_for", lambda *a, **kw: ("mosaic_small", "this test"))
  monkeypatch.setattr(ms, "num_sms", lambda: 132)
  calls = []

  def fake_gemm(qx, act, packed, scales, *, m, out_dtype, config):
    calls.append((qx.shape, act.shape, m, config))
    return jnp.zeros((m, packed.shape[0] * 16), out_dtype)

  monkeypatch.setattr(ms, "gemm_quantized", fake_gemm)
  qa = qkv.norm_input(h, norm, cfg.rms_norm_eps)
  small = backends._small_config(16, qkv)
  assert isinstance(qa, backends.QuantizedActivation) and qa.config == small and qa.sx is None and qa.xsum is None
  mp, groups = small.tile_t, qkv.packed.shape[1]
  assert qa.qx.shape == (mp, groups * 128) and qa.act.shape == (groups, 2, mp)
  plain_q, plain_act = backends.w6a_matmul.quantize_activations_t(
      llama.rms_norm(h, norm, cfg.rms_norm_eps).reshape(16, -1), a_bits=qkv.a_bits, block_m=mp, interpret=True)
  steps = np.abs(np.asarray(qa.qx, np.int32) - np.asarray(plain_q, np.int32))
  assert steps.max() <= 1 and steps.mean() < 0.01  # the norm's own bound in fp32
  y = qa @ qkv
  assert y.shape == (2, 8, qkv.out_features) and calls == [((mp, groups * 128), (groups, 2, mp), 16, small)]
  with pytest.raises(ValueError, match="made for another layer"):
    qa @ layer["down_proj"]
  table["mosaic_small_quant_t"] = False
  assert qkv.norm_input(h, norm, cfg.rms_norm_eps) is None
  table["mosaic_small_quant_t"], table["fuse_norm_quant_small"] = True, False
  assert qkv.norm_input(h, norm, cfg.rms_norm_eps) is None


def test_swiglu_fused_into_the_down_proj_quantizer_where_the_table_says(tiny, monkeypatch):
  """The routing of "fuse_swiglu_quant" (CPU, interpret mode). Where the pallas backend runs the Triton
  GEMMs, swiglu_input hands down_proj the quantizer's outputs for silu(gate) * up read from the fused
  gate/up output, equal to quantizing the product (fp32), and `qa @ down_proj` equals `(silu(gate) * up)
  @ down_proj`; where it runs the small-M Mosaic GEMM, q_x and act for the layer's own small tiling. No
  key, no quant_t, a K that is not half the columns: nothing is fused, and the model runs the plain product."""
  from flexq_jax import backends
  from pallas_kernels import w6a_gemm_mgpu_small as ms
  cfg, qparams, _ = tiny
  layer = llama.fuse_projections(place(qparams, "pallas", dtype=jnp.float32)[0])["layers"][0]
  down = layer["down_proj"]
  gate_up = jnp.asarray(np.random.default_rng(3).standard_normal((2, 8, 2 * down.in_features)) * 2, jnp.float32)
  plain = llama.swiglu_input(gate_up, None)
  np.testing.assert_array_equal(plain, jax.nn.silu(gate_up[..., :down.in_features]) * gate_up[..., down.in_features:])
  table = {"fuse_swiglu_quant": True, "mosaic_small_split": True, "mosaic_small_ragged": True,
           "mosaic_small_quant_t": True}
  monkeypatch.setattr(backends, "_card_table", lambda device=None: table)
  qa = llama.swiglu_input(gate_up, down)
  assert isinstance(qa, backends.QuantizedActivation) and qa.act is None and qa.lead == (2, 8)
  want = backends.w6a_matmul.quantize_activations(plain.reshape(16, -1), a_bits=down.a_bits, config=qa.config,
                                                  interpret=True)
  for got, ref in zip((qa.qx, qa.sx, qa.xsum), want):
    np.testing.assert_array_equal(got, ref)
  np.testing.assert_array_equal(qa @ down, plain @ down)
  assert down.swiglu_input(gate_up[..., 1:]) is None  # not [.., 2K]
  # the small-M Mosaic GEMM's operand
  monkeypatch.setattr(backends.PALLAS, "kernel_for", lambda *a, **kw: ("mosaic_small", "this test"))
  monkeypatch.setattr(ms, "num_sms", lambda: 132)
  qa = down.swiglu_input(gate_up)
  small = backends._small_config(16, down)
  assert qa.config == small and qa.sx is None and qa.act.shape == (down.packed.shape[1], 2, small.tile_t)
  plain_q, plain_act = backends.w6a_matmul.quantize_activations_t(plain.reshape(16, -1), a_bits=down.a_bits,
                                                                  block_m=small.tile_t, interpret=True)
  np.testing.assert_array_equal(qa.qx, plain_q)
  np.testing.assert_array_equal(qa.act, plain_act)
  table["mosaic_small_quant_t"] = False
  assert down.swiglu_input(gate_up) is None
  table["mosaic_small_quant_t"], table["fuse_swiglu_quant"] = True, False
  assert down.swiglu_input(gate_up) is None


def test_the_forward_with_the_swiglu_producer_equals_the_plain_one(tiny, monkeypatch):
  """The whole model (fp32, pallas in interpret mode, gate/up fused) with "fuse_swiglu_quant" on: every
  layer's down_proj reads the SwiGLU quantizer's output (one call a layer), and the logits equal the
  unfused program's (in fp32 the kernel's product is the model's, bit for bit)."""
  from flexq_jax import backends
  cfg, qparams, _ = tiny
  placed = llama.fuse_projections(place(qparams, "pallas", dtype=jnp.float32)[0])
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)))
  run = lambda p: np.asarray(jax.jit(lambda p: llama.forward(p, cfg, tokens)[0])(p), np.float32)
  monkeypatch.delenv(tuning.EXTRA_ENV, raising=False)
  plain = run(placed)
  monkeypatch.setenv(tuning.EXTRA_ENV, '{"fuse_swiglu_quant": true}')
  calls = []
  kernel = backends.w6a_matmul.quantize_activations
  monkeypatch.setattr(backends.w6a_matmul, "quantize_activations",
                      lambda *a, **kw: calls.append(kw.get("swiglu")) or kernel(*a, **kw))
  fused = run(placed)
  assert calls.count(True) == cfg.num_layers
  np.testing.assert_array_equal(fused, plain)


@pytest.fixture(scope="module")
def tiny128():
  """The tiny model with 128-wide heads (a head is one quantization group: attention's output can be
  quantized by the decode kernel's merge)."""
  cfg = model_configs.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
                                  num_heads=2, num_kv_heads=2, max_position_embeddings=2048)
  params = llama.init_params(cfg, jax.random.key(0), scale=0.05)
  calib = np.asarray(jax.random.randint(jax.random.key(1), (2, 32), 0, cfg.vocab_size))
  qparams, _ = quantize(params, calib, QuantConfig(weight_method="rtn", a8_selection="down_proj", smooth_alpha=None),
                        model_config=cfg)
  return cfg, qparams


def test_attention_output_quantized_for_o_proj_where_the_table_says(tiny128, monkeypatch):
  """The routing of "fuse_attention_quant" (CPU, the decode kernel in interpret mode): where the Triton GEMMs
  run, attention_input hands o_proj the merge kernel's q_x, s_x and sum(q_x), equal to quantizing the float
  attention output, and `qa @ o_proj` equals the float path's; where the small-M Mosaic GEMM runs, its q_x and
  [G, 2, M] operand for the layer's tiling. No key, several query tokens, or no kernel: the float output."""
  from flexq_jax import backends
  from pallas_kernels import w6a_gemm_mgpu_small as ms
  cfg, qparams = tiny128
  o_proj = place(qparams, "pallas", dtype=jnp.float32)[0]["layers"][0]["o_proj"]
  ks = jax.random.split(jax.random.key(4), 3)
  q = jax.random.normal(ks[0], (3, 1, 2, 128))
  k, v = jax.random.normal(ks[1], (3, 40, 2, 128)), jax.random.normal(ks[2], (3, 40, 2, 128))
  visible = (jnp.arange(40)[None, :] < jnp.asarray([40, 33, 9])[:, None])[:, None, :]
  monkeypatch.setenv(llama.DECODE_ATTENTION_ENV, "pallas")
  table = {}
  monkeypatch.setattr(backends, "_card_table", lambda device=None: table)
  plain = llama.attention(q, k, v, visible).reshape(3, 1, 256)
  np.testing.assert_array_equal(llama.attention_input(q, k, v, visible, o_proj), plain)  # no key
  table["fuse_attention_quant"] = True
  qa = llama.attention_input(q, k, v, visible, o_proj)
  assert isinstance(qa, backends.QuantizedActivation) and qa.lead == (3, 1) and qa.act is None
  want = backends.w6a_matmul.quantize_activations(plain.reshape(3, 256), a_bits=o_proj.a_bits,
                                                  config=backends.w6a_matmul.quantizer_config(qa.config, 6),
                                                  interpret=True)
  for got, ref in zip((qa.qx, qa.sx, qa.xsum), want):
    np.testing.assert_array_equal(got, ref)
  np.testing.assert_array_equal(qa @ o_proj, plain @ o_proj)
  q2 = jnp.concatenate([q, q], axis=1)  # two query tokens (a prefill chunk): the einsums, unquantized
  assert isinstance(llama.attention_input(q2, k, v, jnp.concatenate([visible] * 2, axis=1), o_proj), jax.Array)
  monkeypatch.setenv(llama.DECODE_ATTENTION_ENV, "xla")
  assert isinstance(llama.attention_input(q, k, v, visible, o_proj), jax.Array)
  monkeypatch.setenv(llama.DECODE_ATTENTION_ENV, "pallas")
  # the small-M Mosaic GEMM's operand
  monkeypatch.setattr(backends.PALLAS, "kernel_for", lambda *a, **kw: ("mosaic_small", "this test"))
  monkeypatch.setattr(ms, "num_sms", lambda: 132)
  table.update(mosaic_small_split=True, mosaic_small_ragged=True, mosaic_small_quant_t=True)
  qa = llama.attention_input(q, k, v, visible, o_proj)
  small = backends._small_config(3, o_proj)
  assert qa.config == small and qa.sx is None and qa.act.shape == (2, 2, small.tile_t)
  want_q, want_act = backends.w6a_matmul.quantize_activations_t(plain.reshape(3, 256), a_bits=o_proj.a_bits,
                                                                block_m=small.tile_t, interpret=True)
  np.testing.assert_array_equal(qa.qx, want_q)
  np.testing.assert_array_equal(qa.act, want_act)
  with pytest.raises(ValueError, match="unknown producer"):
    backends.input_quantization(o_proj, 3, jnp.float32, "rope")


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a CUDA GPU")
def test_gpu_greedy_generation_with_the_fused_producers_matches_the_reference(tiny128, monkeypatch):
  """Issue 14's exactness check through the SwiGLU and attention-output producers on the GPU ("fuse_swiglu_quant"
  and "fuse_attention_quant" on, q/k/v and gate/up fused, 128-wide heads): the reference's greedy tokens, prompt
  logits within 1e-2 of their scale."""
  cfg, qparams = tiny128
  qparams = jax.tree.map(lambda a: a if isinstance(a, QuantizedLinear) else a.astype(jnp.bfloat16), qparams,
                         is_leaf=lambda a: isinstance(a, QuantizedLinear))
  ref_tokens, ref_logits = _generate(cfg, place(qparams, "reference")[0])
  monkeypatch.setenv(tuning.EXTRA_ENV, '{"fuse_swiglu_quant": true, "fuse_attention_quant": true}')
  jax.clear_caches()
  tokens, logits = _generate(cfg, llama.fuse_projections(place(qparams, "pallas", dtype=jnp.bfloat16)[0]))
  jax.clear_caches()
  np.testing.assert_array_equal(tokens, ref_tokens)
  assert float(np.max(np.abs(logits - ref_logits))) <= 1e-2 * float(np.max(np.abs(ref_logits)))


def test_e2e_resident_weights_drop_the_others_on_out_of_memory():
  made = []

  def make(method):  # Resident sizes the weights with jax.eval_shape first: count real makes only
    if not isinstance(jnp.zeros(()), jax.core.Tracer):
      made.append(method)
    return {"w": jnp.full((4,), len(made), jnp.float32)}

  res = e2e_bench.Resident(make)
  assert float(res.run("a", lambda w: w["w"][0])) == 1
  assert float(res.run("b", lambda w: w["w"][0])) == 2 and made == ["a", "b"]  # kept while they fit
  calls = []

  def oom_once(w):
    calls.append(1)
    if len(calls) == 1:
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 400.00MiB")
    return float(w["w"][0])

  assert res.run("b", oom_once) == 2 and len(calls) == 2
  assert res.run("a", lambda w: float(w["w"][0])) == 3 and made == ["a", "b", "a"]  # "a" was dropped, remade
  with pytest.raises(ValueError, match="not memory"):  # other errors are not retried
    res.run("a", lambda w: (_ for _ in ()).throw(ValueError("not memory")))


def test_e2e_merge_of_saved_runs(tmp_path):
  def run(name, rows):
    path = tmp_path / name
    path.write_text(json.dumps(dict(card="h200", device="NVIDIA H200", date="2026-11-27", rows=rows)))
    return str(path)

  row = lambda model, method, tok, error="": dataclasses.asdict(
      e2e_bench.Row(model, method, 1, 128, 256, decode_tok_s=tok, linear_weight_bytes=100, error=error))
  a = run("a.json", [row("llama2-13b", "bf16", 10.0), row("llama2-13b", "flexq", 15.0)])
  b = run("b.json", [row("llama2-7b", "flexq", 30.0), row("llama2-7b", "bf16", 20.0),
                     row("llama2-13b", "flexq", float("nan"), error="RESOURCE_EXHAUSTED")])
  assert e2e_bench.main(["--merge", a, b, "--tag", "all", "--out-dir", str(tmp_path)]) == 0
  merged = json.loads((tmp_path / "h200-2026-11-27-e2e-all.json").read_text())
  got = [(r["model"], r["method"], r["decode_tok_s"]) for r in merged["rows"]]
  # 7B before 13B, bf16 first; the later failed 13B flexq row does not replace the measured one
  assert got == [("llama2-7b", "bf16", 20.0), ("llama2-7b", "flexq", 30.0), ("llama2-13b", "bf16", 10.0),
                 ("llama2-13b", "flexq", 15.0)]
  md = (tmp_path / "h200-2026-11-27-e2e-all.md").read_text()
  assert "| llama2-7b | flexq | 1 | 128 | 256 |" in md and "1.50 |" in md and "Merged from: a.json, b.json" in md
  other = tmp_path / "d.json"
  other.write_text(json.dumps(dict(card="h100", device="H100", date="2026-11-27", rows=[])))
  with pytest.raises(SystemExit, match="different cards"):
    e2e_bench.main(["--merge", a, str(other), "--tag", "x", "--out-dir", str(tmp_path)])


def test_rms_norm_fused_with_the_quantizer_where_the_table_says(tiny, monkeypatch):
  """Issue 14's producer fusion on the pallas backend (CPU: interpret mode): with the card table's
  "fuse_norm_quant" on, the fused q/k/v and gate/up GEMMs read q_x that one kernel made from the
  residual stream (w6a_norm_quantize in the program, no rms_norm output in between). In fp32 the
  logits equal the unfused program's; in bf16 each layer's output equals the unfused one on the
  same stored residual (in a whole bf16 program XLA may keep the residual add feeding a norm in
  fp32, which the kernel, reading the stored bf16 residual, does not: results/kernels/NOTES.md).
  Off (every committed table today) or on another backend, nothing changes."""
  from flexq_jax import backends
  cfg, qparams, _ = tiny
  placed = llama.fuse_projections(place(qparams, "pallas", dtype=jnp.float32)[0])
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)))
  run = lambda p: jax.jit(lambda p: llama.forward(p, cfg, tokens)[0])(p)
  program = lambda p: str(jax.make_jaxpr(lambda p: llama.forward(p, cfg, tokens)[0])(p))
  monkeypatch.delenv(tuning.EXTRA_ENV, raising=False)
  assert "w6a_norm_quantize" not in program(placed)
  plain = np.asarray(run(placed), np.float32)
  monkeypatch.setenv(tuning.EXTRA_ENV, '{"fuse_norm_quant": true}')
  calls = []
  kernel = backends.w6a_matmul.norm_quantize
  monkeypatch.setattr(backends.w6a_matmul, "norm_quantize", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
  assert "w6a_norm_quantize" in program(placed)
  assert len(calls) == 2 * cfg.num_layers  # the input and post-attention norms of every layer
  fused = np.asarray(run(placed), np.float32)
  assert np.isfinite(fused).all()
  np.testing.assert_allclose(fused, plain, rtol=0, atol=1e-5 * float(np.max(np.abs(plain))))
  reference = llama.fuse_projections(place(qparams, "reference")[0])
  assert "w6a_norm_quantize" not in program(reference)
  # bf16, one layer on a stored residual: the fused input and the unfused one give the same outputs
  bf = jax.tree.map(lambda a: a if isinstance(a, QuantizedLinear) else a.astype(jnp.bfloat16), placed,
                    is_leaf=lambda a: isinstance(a, QuantizedLinear))
  layer = bf["layers"][0]
  h = jnp.asarray(np.random.default_rng(1).standard_normal((2, 12, cfg.hidden_size)), jnp.bfloat16)
  for name, norm in (("qkv_proj", "input_layernorm"), ("gate_up_proj", "post_attention_layernorm")):
    qa = layer[name].norm_input(h, layer[norm], cfg.rms_norm_eps)
    assert isinstance(qa, backends.QuantizedActivation) and qa.lead == (2, 12)
    np.testing.assert_array_equal(np.asarray(qa @ layer[name], np.float32),
                                  np.asarray(llama.rms_norm(h, layer[norm], cfg.rms_norm_eps) @ layer[name], np.float32))
  with pytest.raises(ValueError, match="made for another layer"):
    qa @ layer["down_proj"]  # K = intermediate size, not the hidden size these were made for
