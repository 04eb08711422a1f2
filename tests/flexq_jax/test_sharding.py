"""Tensor parallelism (flexq_jax/sharding.py): the sharded model against the single-device one.

CPU: the tests need 8 devices; the default suite runs in one process with one CPU device, so
`test_on_fake_cpu_devices` re-runs this file in a child process started with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the same -m marker expression), and the
tests themselves run where 8 devices are visible (the child, or a run started with that flag).
GPU (marker `gpu`): the same comparisons on every visible GPU (needs 2 or more), through the
backend "auto" places per shard.

What equality means (flexq_jax/DESIGN.md, "Tensor parallelism"): a column-parallel layer's output
is the same numbers as the unsplit layer's (asserted bit for bit); a row-parallel layer adds tp
fp32 partial sums in another order than one device's fp32 sum, so it agrees to fp32 rounding; the
logits agree to a tight tolerance and the greedy tokens are identical.
"""

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from evaluation import e2e_bench
from flexq_jax import checkpoint, formats, numerics, placement, sharding
from flexq_jax.qlinear import QuantizedLinear
from models import generate as gen
from models import llama
from models.config import LlamaConfig

DEVICES = 8
ROOT = Path(__file__).resolve().parents[2]
on_cpu_devices = pytest.mark.skipif(
    jax.default_backend() != "cpu" or jax.device_count() < DEVICES,
    reason=f"needs {DEVICES} CPU devices (test_on_fake_cpu_devices runs these in a child process)")
on_gpus = pytest.mark.skipif(jax.default_backend() != "gpu" or jax.device_count() < 2, reason="needs 2+ GPUs")

# 8 query heads of 128 (o_proj: one whole group a head), 2 KV heads (split on 2 shards, replicated
# on 4 and 8), F = 640 = 5 groups: uneven on 2 (6 = 3 + 3), 4 and 8 shards (8 groups, 3 of zeros).
CFG = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=640, num_layers=2, num_heads=8, num_kv_heads=2,
                  head_dim=128, max_position_embeddings=128)


def test_on_fake_cpu_devices(request):
  if jax.device_count() >= DEVICES or jax.default_backend() != "cpu":
    pytest.skip("this process has the devices (or is not on CPU): the tests run directly")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}").strip())
  marks = request.config.getoption("markexpr") or "not slow and not gpu"
  r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marks, __file__],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
  assert r.returncode == 0, f"child run failed:\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
  summary = r.stdout.strip().splitlines()[-1]
  skipped = re.search(r"(\d+) skipped", summary)
  assert " passed" in summary and skipped and skipped[1] == "1", f"the child ran no tests or skipped some:\n{r.stdout[-3000:]}"


@functools.partial(jax.jit, static_argnames=("layout",))
def _rtn(w, layout):
  qq, s = numerics.quantize_weight(w.astype(jnp.float32).T, 6, 128)
  return formats.pack(qq, 6, layout, w.shape[0]), s


def quantized(params, layout="bitplanes", backend="reference"):
  """Every projection as a W6 (A8 on down_proj, FlexQ's rule) group-128 RTN QuantizedLinear."""
  def q(w, name):
    k, n = w.shape
    packed, s = _rtn(w, layout)
    return QuantizedLinear(packed=packed, scales=s, in_features=k, out_features=n, w_bits=6,
                           a_bits=8 if name == "down_proj" else 6, group_size=128, layout=layout, backend=backend)
  return {**params, "layers": [{n: q(w, n) if n in llama.PROJECTIONS else w for n, w in layer.items()}
                               for layer in params["layers"]]}


@functools.cache
def model(cfg=CFG, seed=0):
  return quantized(llama.init_params(cfg, jax.random.key(seed), scale=0.05))


@functools.cache
def single_device_run():
  """(logits, greedy GenerateOutput) of the quantized model on one device (the reference backend)."""
  params, toks = model(), tokens()
  logits = jax.jit(lambda p, t: llama.forward(p, CFG, t)[0])(params, toks)
  out = gen.generate(params, CFG, toks, jnp.ones(toks.shape, bool), jax.random.key(0), max_new_tokens=4,
                     cache_dtype=jnp.float32)
  return logits, out


def tokens(cfg=CFG, batch=2, length=6, seed=1):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, cfg.vocab_size, jnp.int32)


def assert_close(a, b, rel=2e-5):
  a, b = np.asarray(a), np.asarray(b)
  np.testing.assert_allclose(a, b, rtol=0, atol=rel * float(np.abs(b).max()))


# ------------------------------------------------------------------------------ bad input first


@on_cpu_devices
def test_bad_tp_is_refused_naming_the_option():
  with pytest.raises(ValueError, match=r"--tp 16 .* needs 16 devices, 8 cpu"):
    sharding.make_mesh(16)
  with pytest.raises(ValueError, match=r"--tp 3 .* must divide the model's 8 attention heads"):
    sharding.make_plan(CFG, sharding.make_mesh(3))
  odd_kv = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_layers=1, num_heads=12,
                       num_kv_heads=3, head_dim=128)
  with pytest.raises(ValueError, match=r"--tp 2 .* 3 KV heads"):
    sharding.make_plan(odd_kv, sharding.make_mesh(2))
  small_heads = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=256, num_layers=1, num_heads=4,
                            num_kv_heads=2)  # head_dim 64: 1 head a shard on 4 shards = half a group
  with pytest.raises(ValueError, match=r"--tp 4 .* straddle"):
    sharding.make_plan(small_heads, sharding.make_mesh(4))
  with pytest.raises(ValueError, match="unstack_layers"):
    sharding.shard(llama.stack_layers(llama.init_params(CFG, jax.random.key(0))), CFG, sharding.make_mesh(2))


# ------------------------------------------------------------------------------ the split


@on_cpu_devices
def test_plan_pads_uneven_groups_and_replicates_kv_heads():
  for tp, f_pad, kv_local, repeat in ((2, 768, 1, 1), (4, 1024, 1, 2), (8, 1024, 1, 4)):
    plan = sharding.make_plan(CFG, sharding.make_mesh(tp))
    assert (plan.padded_intermediate, plan.local_config.num_kv_heads, plan.kv_repeat) == (f_pad, kv_local, repeat)
    assert plan.local_config.num_heads == 8 // tp and plan.local_config.intermediate_size == f_pad // tp
    assert plan.vocab_sharded and plan.cache_kv_heads == max(2, tp)


@on_cpu_devices
def test_sharded_arrays_hold_each_shards_slice_only(tmp_path):
  """4 shards: the arrays are sharded as the specs say, every device holds only its slice, and a
  checkpoint loads to the same arrays as sharding in memory."""
  params = model()
  mesh = sharding.make_mesh(4)
  sp, plan = sharding.shard(params, CFG, mesh)
  checkpoint.save(tmp_path / "ckpt", params, CFG)
  lp, lplan, _ = sharding.load(tmp_path / "ckpt", mesh)
  assert lplan == plan
  for a, b in zip(jax.tree.leaves(sp), jax.tree.leaves(lp)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding.spec == b.sharding.spec
  layer, ref = lp["layers"][0], params["layers"][0]
  hd = CFG.resolved_head_dim
  # k_proj: 2 KV heads on 4 shards, shard s holds KV head s // 2 (its query heads' group).
  k = layer["k_proj"]
  assert k.packed.sharding.spec == P(None, "tp", None) and k.scales.sharding.spec == P("tp", None)
  assert k.out_features == hd and k.in_features == CFG.hidden_size  # a shard's static fields
  full_q = np.asarray(ref["k_proj"].logical_weight())
  for shard in k.packed.addressable_shards:
    s = shard.index[1].start // hd
    assert shard.data.shape == (6, hd, CFG.hidden_size // 32)
    got = formats.unpack(shard.data, 6, "bitplanes", CFG.hidden_size)
    np.testing.assert_array_equal(np.asarray(got), full_q[(s // 2) * hd:(s // 2 + 1) * hd])
  # down_proj: K = 640 padded to 1024, 256 (2 groups) a shard; shard 2's second group and shard 3 all zero.
  d = layer["down_proj"]
  assert d.packed.sharding.spec == P(None, None, "tp") and d.scales.sharding.spec == P(None, "tp")
  assert d.in_features == 256 and d.packed.shape == (6, CFG.hidden_size, 1024 // 32)
  scales = {sh.index[1].start // 2: np.asarray(sh.data) for sh in d.scales.addressable_shards}
  assert all(v.shape == (CFG.hidden_size, 2) for v in scales.values())
  np.testing.assert_array_equal(np.concatenate([scales[i] for i in range(4)], 1)[:, :5], np.asarray(ref["down_proj"].scales))
  assert not scales[2][:, 1].any() and not scales[3].any()
  # Replicated: the embedding whole on every device; the lm_head split by vocabulary.
  assert lp["embed_tokens"].sharding.spec == P() and lp["lm_head"].sharding.spec == P(None, "tp")
  per_device = sharding.device_bytes(lp)
  assert len(per_device) == 4 and max(per_device.values()) < sum(
      x.nbytes for x in jax.tree.leaves(params)), "a device holds the whole model"


# ------------------------------------------------------------------------------ numbers


@on_cpu_devices
def test_column_parallel_is_bit_equal_row_parallel_within_fp32_rounding():
  params = model()
  plan = sharding.make_plan(CFG, sharding.make_mesh(4))
  layer = params["layers"][0]
  x = jax.random.normal(jax.random.key(3), (5, CFG.hidden_size), jnp.float32)
  a = jax.random.normal(jax.random.key(4), (5, CFG.intermediate_size), jnp.float32)
  gate = sharding.put_leaf("gate_proj", layer["gate_proj"], plan)
  down = sharding.put_leaf("down_proj", layer["down_proj"], plan)
  col = jax.jit(jax.shard_map(lambda w, x: x @ w, mesh=plan.mesh, in_specs=(sharding.leaf_spec("gate_proj", gate, plan), P()),
                      out_specs=P(None, "tp")))(gate, x)
  np.testing.assert_array_equal(np.asarray(col)[:, :CFG.intermediate_size],
                                np.asarray(jax.jit(lambda x, w: x @ w)(x, layer["gate_proj"])))
  assert not np.asarray(col)[:, CFG.intermediate_size:].any()  # the padding rows give exact zeros
  a_pad = jnp.pad(a, ((0, 0), (0, plan.padded_intermediate - CFG.intermediate_size)))
  row = jax.jit(jax.shard_map(lambda w, a: llama.row_parallel_linear(a, w, "tp"), mesh=plan.mesh,
                              in_specs=(sharding.leaf_spec("down_proj", down, plan), P(None, "tp")),
                              out_specs=P()))(down, a_pad)
  assert_close(row, jax.jit(lambda a, w: a @ w)(a, layer["down_proj"]), rel=1e-6)


@on_cpu_devices
@pytest.mark.parametrize("tp", [pytest.param(2, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow), 8])
def test_logits_and_greedy_tokens_equal_one_device(tp):
  """8 shards by default (KV heads replicated 4 times, 5 groups of F padded to 8); 2 and 4 are slow."""
  params = model()
  toks = tokens()
  mask = jnp.ones(toks.shape, bool)
  ref_logits, ref = single_device_run()
  sp, plan = sharding.shard(params, CFG, sharding.make_mesh(tp))
  sp = sharding.fuse(sp, plan)  # fused per shard: [q_s | k_s | v_s], [gate_s | up_s]
  assert "qkv_proj" in sp["layers"][0] and "gate_up_proj" in sp["layers"][0]
  logits = jax.jit(lambda p, t: sharding.forward(p, plan, t)[0])(sp, toks)
  assert logits.shape == ref_logits.shape
  assert_close(logits, ref_logits)
  out = sharding.generate(sp, plan, toks, mask, jax.random.key(0), max_new_tokens=4, cache_dtype=jnp.float32)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
  assert_close(out.prompt_logits, ref.prompt_logits)


@on_cpu_devices
def test_padded_prompts_and_float_model_on_mesh():
  """Mixed-length (left-padded) prompts through the KV cache, and a float (unquantized) model."""
  params = llama.init_params(CFG, jax.random.key(5), scale=0.05)
  toks, mask = gen.pad_prompts([[5, 6, 7, 8, 9], [11, 12], [3, 4, 5]], 0, "left")
  ref = gen.generate(params, CFG, toks, mask, jax.random.key(0), max_new_tokens=4, cache_dtype=jnp.float32)
  sp, plan = sharding.shard(params, CFG, sharding.make_mesh(4))
  out = sharding.generate(sp, plan, toks, mask, jax.random.key(0), max_new_tokens=4, cache_dtype=jnp.float32)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
  assert_close(out.prompt_logits, ref.prompt_logits)


@on_cpu_devices
def test_place_per_shard_records_shard_shapes():
  sp, plan = sharding.shard(model(), CFG, sharding.make_mesh(2))
  placed, record = sharding.place(sp, plan, "auto")
  assert record.counts() == {"reference": 2 * 7}  # CPU: the reference, chosen at each shard's shape
  down = placed["layers"][1]["down_proj"]
  assert (down.in_features, down.out_features) == (384, CFG.hidden_size)  # 3 of the 6 padded groups
  # An explicit layout change happens per shard and stays exact: pallas6 packed, run by the reference.
  repacked, _ = sharding.place(sp, plan, "dequant")
  toks = tokens()
  a = jax.jit(lambda p, t: sharding.forward(p, plan, t)[0])(sp, toks)
  b = jax.jit(lambda p, t: sharding.forward(p, plan, t)[0])(repacked, toks)
  assert_close(b, a, rel=1e-4)


@on_cpu_devices
def test_auto_placement_asks_the_tuning_table_at_shard_shapes(monkeypatch):
  asked = set()

  def choose(layer, m=1, **kw):
    asked.add((layer.out_features, layer.in_features))
    return "reference", "recorded"
  monkeypatch.setattr(placement, "choose", choose)
  sp, plan = sharding.shard(model(), CFG, sharding.make_mesh(4))
  _, record = sharding.place(sp, plan, "auto")
  # (N, K) a shard: q 2 heads x 128 and gate/up 1024 / 4 -> (256, 128); k, v one (replicated) KV head
  # -> (128, 128); o_proj 2 heads and down_proj 1024 / 4 in -> (128, 256). One device: (1024, 128),
  # (256, 128), (640, 128), (128, 1024), (128, 640).
  assert asked == {(256, 128), (128, 128), (128, 256)}, asked
  assert {l.why for l in record.layers} == {"recorded"}


@on_cpu_devices
@pytest.mark.slow
def test_pallas_kernels_run_per_shard():
  """The Pallas kernels (interpret mode on CPU) inside shard_map, 2 shards: the reference's logits."""
  sp, plan = sharding.shard(model(), CFG, sharding.make_mesh(2))
  placed, record = sharding.place(sp, plan, "pallas")
  assert record.counts() == {"pallas": 14} and placed["layers"][0]["q_proj"].layout == "pallas6"
  toks = tokens(batch=1, length=3)
  a = jax.jit(lambda p, t: sharding.forward(p, plan, t)[0])(sp, toks)
  b = jax.jit(lambda p, t: sharding.forward(p, plan, t)[0])(sharding.fuse(placed, plan), toks)
  assert_close(b, a)


@on_cpu_devices
def test_bench_refuses_a_bad_tp_before_any_work(tmp_path):
  with pytest.raises(SystemExit, match=r"--tp 16 .* needs 16 devices"):
    e2e_bench.main(["--models", "tiny", "--tp", "1,16", "--out-dir", str(tmp_path)])
  with pytest.raises(SystemExit, match=r"--tp 4 .* straddle"):  # tiny: head_dim 64, 4 heads
    e2e_bench.main(["--models", "tiny", "--tp", "4", "--out-dir", str(tmp_path)])
  assert not list(tmp_path.iterdir())


@on_cpu_devices
@pytest.mark.slow
def test_bench_runs_tensor_parallel_rows(tmp_path):
  assert e2e_bench.main(["--models", "tiny", "--tp", "2", "--batches", "1", "--prompts", "8", "--new-tokens", "2",
                         "--methods", "flexq", "--out-dir", str(tmp_path), "--tag", "tp"]) == 0
  md = next(tmp_path.glob("*-e2e-tp.md")).read_text()
  rows = [line.split("|") for line in md.splitlines() if line.startswith("| tiny | flexq |")]
  assert "Failed" not in md and len(rows) == 1 and rows[0][6].strip() == "2", md  # the TP column
  assert all(float(r[9]) > 0 for r in rows), md  # tok/s measured in every row


# ------------------------------------------------------------------------------ GPUs


@pytest.mark.gpu
@on_gpus
def test_gpu_mesh_generates_the_single_gpu_tokens():
  """Every visible GPU (a power of 2 up to 8): the "auto"-placed sharded model (Pallas kernels per
  shard) against the same on one GPU, bf16 activations."""
  tp = min(8, 1 << (jax.device_count().bit_length() - 1))
  cfg = LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2816, num_layers=2, num_heads=8,
                    num_kv_heads=4, head_dim=128, max_position_embeddings=256)
  params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), llama.init_params(cfg, jax.random.key(0), scale=0.05))
  qp = quantized(params)
  single, _ = placement.place(qp, "auto")
  single = llama.fuse_projections(single)
  toks = tokens(cfg, batch=4, length=16)
  mask = jnp.ones(toks.shape, bool)
  ref = gen.generate(single, cfg, toks, mask, jax.random.key(0), max_new_tokens=8)
  sp, plan = sharding.shard(qp, cfg, sharding.make_mesh(tp))
  sp, record = sharding.place(sp, plan, "auto")
  assert set(record.counts()) <= {"pallas", "bmma"}, record.summary()
  sp = sharding.fuse(sp, plan)
  out = sharding.generate(sp, plan, toks, mask, jax.random.key(0), max_new_tokens=8)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
  assert_close(out.prompt_logits, ref.prompt_logits, rel=2e-2)  # bf16 activations: partial sums rounded once more
