"""The backend registry (flexq_jax.backends): names, layouts, refusals with reasons, and `x @ layer`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexq_jax import backends, formats, numerics
from flexq_jax.placement import place
from flexq_jax.qlinear import QuantizedLinear


def _layer(n=64, k=256, w_bits=6, a_bits=6, group=128):
  return QuantizedLinear(packed=None, scales=None, in_features=k, out_features=n, w_bits=w_bits, a_bits=a_bits,
                         group_size=group)


class _Device:  # what can_run reads of a jax.Device
  def __init__(self, platform, compute_capability="9.0", device_kind="NVIDIA H200"):
    self.platform, self.compute_capability, self.device_kind = platform, compute_capability, device_kind


GPU, CPU = _Device("gpu"), _Device("cpu")


def test_registry_names_order_and_layouts():
  assert backends.names() == ("pallas", "bmma", "reference", "dequant")  # order of preference
  assert backends.get("pallas").layout_for(6) == "pallas6" and backends.get("pallas").layout_for(8) == "pallas8"
  assert backends.get("bmma").layout_for(6) == "bitplanes_g4" and backends.get("bmma").layout_for(8) is None
  assert backends.get("reference").layout_for(6) is None  # reads any layout
  for b in backends.REGISTRY:
    assert set(b.layouts.values()) <= set(formats.LAYOUTS) and b.doc
  assert [b.name for b in backends.REGISTRY if b.auto] == ["pallas", "bmma", "reference"]
  with pytest.raises(ValueError, match="unknown backend 'tpu-magic'; known: pallas, bmma, reference, dequant"):
    backends.get("tpu-magic")


def test_pallas_can_run():
  pallas = backends.get("pallas")
  assert pallas.can_run(_layer(a_bits=6), device=GPU) == (True, "")
  assert pallas.can_run(_layer(a_bits=8, w_bits=8), device=GPU)[0]
  assert pallas.can_run(_layer(a_bits=6, w_bits=8), device=GPU)[0]
  assert pallas.can_run(_layer(a_bits=8), jnp.float32, GPU)[0]  # any float activations
  ok, why = pallas.can_run(_layer(), device=CPU)
  assert not ok and "gpu" in why and "cpu" in why  # compiled only for GPUs (interpret mode is for tests)
  for layer, reason in [(_layer(a_bits=16), "a_bits=16"), (_layer(group=None), "group 128"),
                        (_layer(w_bits=4), "w_bits=4"), (_layer(n=200), "N a multiple of 16")]:
    ok, why = pallas.can_run(layer, device=GPU)
    assert not ok and reason in why


def test_bmma_can_run():
  bmma = backends.get("bmma")
  assert bmma.can_run(_layer(n=200), jnp.bfloat16, GPU) == (True, "")
  assert bmma.can_run(_layer(), None, None)[0]  # dtype and device unknown: not checked
  for args, reason in [((_layer(), jnp.float32, GPU), "bf16"), ((_layer(w_bits=8), None, GPU), "6-bit"),
                       ((_layer(a_bits=16), None, GPU), "a_bits=16"), ((_layer(), None, CPU), "not cpu"),
                       ((_layer(), None, _Device("gpu", "7.5", "T4")), "sm_80")]:
    ok, why = bmma.can_run(*args)
    assert not ok and reason in why, why


def test_reference_and_dequant_run_anything_anywhere():
  for name in ("reference", "dequant"):
    b = backends.get(name)
    for layer in (_layer(a_bits=16), _layer(group=None, w_bits=8, a_bits=8), _layer(n=200, w_bits=4)):
      assert b.can_run(layer, jnp.float32, CPU) == (True, "")


def test_matmul_refuses_what_its_backend_cannot_run():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((48, 200)), jnp.float32)
  q, s = numerics.quantize_weight(w, 6, 128)
  layer = QuantizedLinear(packed=formats.pack(q, 6, "bitplanes", 200), scales=s, in_features=200, out_features=48,
                          w_bits=6, a_bits=6, group_size=128)
  x = jnp.asarray(rng.standard_normal((3, 200)), jnp.float32)
  with pytest.raises(ValueError, match="reads layout 'bitplanes_g4', the layer is in 'bitplanes'.*flexq_jax.place"):
    x.astype(jnp.bfloat16) @ layer.replace(backend="bmma")
  with pytest.raises(ValueError, match="bf16"):
    x @ place({"l": layer}, "bmma")[0]["l"]
  with pytest.raises(ValueError, match="unknown backend 'gone'"):
    x @ layer.replace(backend="gone")
  # The same layer on the two CPU backends: the contract's numbers either way.
  ref = x @ layer
  np.testing.assert_allclose(x @ place(layer, "dequant")[0], ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
  assert (x[None] @ layer).shape == (1, 3, 48)


def test_place_records_why_a_layer_stays():
  layer = _layer(n=200).replace(packed=jnp.zeros((6, 200, 8), jnp.uint32), scales=jnp.zeros((200, 2), jnp.float16))
  placed, record = place({"a": layer}, "pallas")
  assert placed["a"] is layer and record.layers[0].backend == "reference"
  assert "pallas needs N a multiple of 16" in record.layers[0].why
  assert "a stays on reference: pallas needs N a multiple of 16" in record.summary()
  with pytest.raises(ValueError, match="unknown backend"):
    place({"a": layer}, "fastest")


def test_pallas_picks_its_kernel_by_m(monkeypatch):
  from flexq_jax import tuning
  pallas = backends.get("pallas")
  monkeypatch.setattr(tuning, "load_table", lambda card: {"entries": [], "mosaic_min_m": 512})
  assert pallas.kernel_for(4096, GPU) == ("mosaic", "M=4096 >= 512 (h200 table): the Mosaic GPU GEMM")
  assert pallas.kernel_for(512, GPU)[0] == "mosaic"
  kernel, why = pallas.kernel_for(511, GPU)
  assert kernel == "triton" and "M=511 < 512" in why
  kernel, why = pallas.kernel_for(4096, _Device("gpu", "8.0", "NVIDIA A100-SXM4-80GB"))
  assert kernel == "triton" and "needs sm_90" in why and "sm_80" in why
  assert pallas.kernel_for(4096, CPU)[0] == "triton"
  monkeypatch.setattr(tuning, "load_table", lambda card: None)
  kernel, why = pallas.kernel_for(4096, GPU)
  assert kernel == "triton" and "no mosaic_min_m" in why
  assert pallas.kernel_for(1, GPU)[0] == "triton"  # no table: the CUDA GEMV is never chosen


def test_cuda_gemv_only_where_a_table_turns_it_on(monkeypatch):
  from flexq_jax import tuning
  pallas = backends.get("pallas")
  monkeypatch.setattr(backends, "_has_nvcc", lambda: True)
  monkeypatch.setattr(tuning, "load_table", lambda card: {"entries": [], "mosaic_min_m": 512, "cuda_gemv_max_m": 4})
  assert pallas.kernel_for(1, GPU) == ("cuda_gemv", "M=1 <= 4 (h200 table): the CUDA GEMV")
  assert pallas.kernel_for(4, GPU, dtype=jnp.bfloat16)[0] == "cuda_gemv"
  assert pallas.kernel_for(5, GPU)[0] == "triton"
  assert pallas.kernel_for(1, GPU, w_bits=8)[0] == "triton"  # "pallas8": the kernel reads 6-bit weights only
  assert pallas.kernel_for(1, GPU, dtype=jnp.float16)[0] == "triton"  # it writes bf16 or fp32
  assert pallas.kernel_for(1, CPU)[0] == "triton"
  monkeypatch.setattr(tuning, "load_table", lambda card: {"entries": [], "cuda_gemv_xq_max_m": 2, "cuda_gemv_max_m": 8})
  assert pallas.kernel_for(2, GPU) == ("cuda_gemv_xq", "M=2 <= 2 (h200 table): the CUDA GEMV, quantizer inside")
  assert pallas.kernel_for(3, GPU)[0] == "cuda_gemv"
  # the small-M CUDA GEMM (mma.sync), where a table sets its window; the GEMV keeps the M it has
  monkeypatch.setattr(tuning, "load_table", lambda card: {"entries": [], "cuda_gemv_xq_max_m": 1, "cuda_small_min_m": 2,
                                                          "cuda_small_max_m": 100, "mosaic_small_max_m": 255})
  assert pallas.kernel_for(1, GPU)[0] == "cuda_gemv_xq"
  assert pallas.kernel_for(2, GPU) == ("cuda_small", "2 <= M=2 <= 64 (h200 table): the small-M CUDA GEMM (mma.sync)")
  assert [pallas.kernel_for(m, GPU)[0] for m in (64, 65)] == ["cuda_small", "mosaic_small"]  # it takes M <= 64
  assert pallas.kernel_for(16, GPU, w_bits=8)[0] == "triton"
  monkeypatch.setattr(backends, "_has_nvcc", lambda: False)  # compiled on first use: no nvcc, no CUDA GEMV
  assert pallas.kernel_for(1, GPU) == ("triton", "M=1: the h200 table picks the CUDA GEMV, but there is no nvcc "
                                                 "to build it")
  assert pallas.kernel_for(16, GPU)[0] == "triton"


def test_small_m_mosaic_kernel_only_where_a_table_turns_it_on(monkeypatch):
  from flexq_jax import tuning
  pallas = backends.get("pallas")
  monkeypatch.setattr(backends, "_has_nvcc", lambda: True)
  monkeypatch.setattr(tuning, "load_table", lambda card: {"entries": [], "mosaic_min_m": 256,
                                                          "cuda_gemv_xq_max_m": 1, "mosaic_small_max_m": 255})
  assert pallas.kernel_for(1, GPU)[0] == "cuda_gemv_xq"  # the GEMV first where both are on
  assert pallas.kernel_for(2, GPU) == ("mosaic_small", "1 <= M=2 <= 255 (h200 table): the small-M Mosaic GPU GEMM")
  assert pallas.kernel_for(255, GPU)[0] == "mosaic_small" and pallas.kernel_for(256, GPU)[0] == "mosaic"
  assert pallas.kernel_for(16, GPU, w_bits=8)[0] == "triton"  # it reads "pallas6" only
  kernel, why = pallas.kernel_for(16, _Device("gpu", "8.0", "NVIDIA A100-SXM4-80GB"))
  assert kernel == "triton" and "needs sm_90" in why
  # the h200 table's window: from M = 17, layers of N >= 8192 only (narrow layers leave SMs idle)
  monkeypatch.setattr(tuning, "load_table", lambda card: {"entries": [], "mosaic_min_m": 256, "mosaic_small_min_m": 17,
                                                          "mosaic_small_max_m": 255, "mosaic_small_min_n": 8192})
  assert pallas.kernel_for(32, GPU, n=12288) == (
      "mosaic_small", "17 <= M=32 <= 255, N=12288 >= 8192 (h200 table): the small-M Mosaic GPU GEMM")
  assert [pallas.kernel_for(m, GPU, n=n)[0] for m, n in ((16, 12288), (32, 4096), (32, None), (256, 12288))] == \
      ["triton", "triton", "triton", "mosaic"]


def test_small_m_skip_list_sends_a_shape_to_triton(monkeypatch):
  """A table's mosaic_small_skip ([N, K, max M]) keeps that layer shape on the Triton kernels up to its M."""
  from flexq_jax import tuning
  pallas = backends.get("pallas")
  monkeypatch.setattr(tuning, "load_table", lambda card: {
      "entries": [], "mosaic_min_m": 256, "mosaic_small_min_m": 16, "mosaic_small_max_m": 255,
      "mosaic_small_skip": [[4096, 11008, 16]]})
  kernel, why = pallas.kernel_for(16, GPU, n=4096, k=11008)
  assert kernel == "triton" and "mosaic_small_skip" in why
  assert pallas.kernel_for(17, GPU, n=4096, k=11008)[0] == "mosaic_small"
  assert pallas.kernel_for(16, GPU, n=4096, k=4096)[0] == "mosaic_small"
  assert pallas.kernel_for(16, GPU, n=4096)[0] == "mosaic_small"  # K unknown: no match


def test_small_m_split_only_where_a_table_sets_it(monkeypatch):
  """The small-M Mosaic GEMM splits K (fp32 partials, out_t epilogue) only where the table says so:
  4096 x 4096 at M = 32 has 32 CTA tiles, so 4 splits fill 128 of 132 SMs."""
  import types
  from flexq_jax import tuning
  layer = types.SimpleNamespace(out_features=4096, packed=jnp.zeros((256, 32, 3, 16, 32), jnp.uint8))
  monkeypatch.setattr(tuning, "load_table", lambda card: {"entries": []})
  assert backends._small_config(32, layer).split_k == 1
  monkeypatch.setattr(tuning, "load_table", lambda card: {"entries": [], "mosaic_small_split": True})
  cfg = backends._small_config(32, layer)
  assert (cfg.split_k, cfg.epilogue, cfg.tile_t) == (4, "out_t", 32)
  assert not cfg.sw_f16
  monkeypatch.setattr(tuning, "load_table", lambda card: {"entries": [], "mosaic_small_split": True,
                                                           "mosaic_small_sw_f16": True})
  cfg = backends._small_config(32, layer)
  assert (cfg.split_k, cfg.sw_f16, cfg.quant_t) == (4, True, False)  # the fp16 weight scales, only where a table says so
  monkeypatch.setattr(tuning, "load_table", lambda card: {"entries": [], "mosaic_small_quant_t": True})
  assert backends._small_config(32, layer).quant_t  # the fused-TMA operand from the quantizer
  # stream-K where the table says so and the model prefers it: LLaMA-2-7B's gate/up (172 tiles), not its o_proj
  gate_up = types.SimpleNamespace(out_features=22016, packed=jnp.zeros((1376, 32, 3, 16, 32), jnp.uint8))
  table = {"entries": [], "mosaic_small_split": True, "mosaic_small_ragged": True}
  monkeypatch.setattr(tuning, "load_table", lambda card: table)
  assert not backends._small_config(16, gate_up).stream_k
  table["mosaic_small_stream_k"] = True
  cfg = backends._small_config(16, gate_up)
  assert (cfg.stream_k, cfg.split_k, cfg.epilogue) == (True, 1, "out_t")
  assert not backends._small_config(16, layer).stream_k and backends._small_config(16, layer).split_k == 4


def test_tuning_extra_from_the_environment(monkeypatch):
  """$FLEXQ_TUNING_EXTRA merges settings over the committed table (a benchmark tries one)."""
  from flexq_jax import tuning
  pallas = backends.get("pallas")
  monkeypatch.setattr(backends, "_has_nvcc", lambda: True)
  monkeypatch.setenv(tuning.EXTRA_ENV, '{"cuda_gemv_xq_max_m": 2}')
  assert pallas.kernel_for(1, GPU)[0] == "cuda_gemv_xq"
  assert tuning.load_table("no-such-card") == {"entries": [], "cuda_gemv_xq_max_m": 2}
  monkeypatch.setenv(tuning.EXTRA_ENV, "{not json")
  with pytest.raises(ValueError, match="FLEXQ_TUNING_EXTRA is not JSON"):
    tuning.load_table("h200")
  monkeypatch.setenv(tuning.EXTRA_ENV, '{"cuda_gemv_max_m": -1}')
  with pytest.raises(ValueError, match="non-negative integers"):
    tuning.load_table("h200")
  monkeypatch.setenv(tuning.EXTRA_ENV, '{"mosaic_small_skip": [[4096, 11008]]}')
  with pytest.raises(ValueError, match=r"\[N, K, max M\] triples"):
    tuning.load_table("h200")
  monkeypatch.setenv(tuning.EXTRA_ENV, '{"mosaic_small_skip": [[4096, 11008, 16]], "mosaic_small_ragged": true}')
  assert tuning.load_table("h200")["mosaic_small_skip"] == [[4096, 11008, 16]]
  monkeypatch.delenv(tuning.EXTRA_ENV)  # the committed h200 table: the GEMV with its quantizer at M = 1 only
  assert pallas.kernel_for(1, GPU)[0] == "cuda_gemv_xq" and pallas.kernel_for(2, GPU)[0] == "triton"


def test_every_e2e_method_tuning_loads(monkeypatch):
  """Each e2e method's settings pass $FLEXQ_TUNING_EXTRA's checks over the committed tables (a method whose
  settings fail them would only show as a failed row on the GPU machine)."""
  from evaluation import e2e_bench
  from flexq_jax import tuning
  monkeypatch.delenv(tuning.EXTRA_ENV, raising=False)
  for method, settings in e2e_bench.METHOD_TUNING.items():
    with e2e_bench.method_tuning(method):
      for card in ("h200", "h100"):
        table = tuning.load_table(card)
        assert all(table[k] == v for k, v in settings.items()), (method, card)


def test_e2e_method_with_the_cuda_gemv_sets_and_restores_the_tuning(monkeypatch):
  from evaluation import e2e_bench
  from flexq_jax import tuning
  pallas = backends.get("pallas")
  monkeypatch.setattr(backends, "_has_nvcc", lambda: True)
  monkeypatch.delenv(tuning.EXTRA_ENV, raising=False)
  with e2e_bench.method_tuning("flexq-cuda-gemv"):
    assert pallas.kernel_for(2, GPU)[0] == "cuda_gemv_xq" and pallas.kernel_for(8, GPU)[0] == "cuda_gemv"
  assert tuning.EXTRA_ENV not in __import__("os").environ and pallas.kernel_for(8, GPU)[0] == "triton"
  with e2e_bench.method_tuning("flexq"):  # no settings: the committed table (the GEMV at M = 1 only)
    assert pallas.kernel_for(1, GPU)[0] == "cuda_gemv_xq" and pallas.kernel_for(2, GPU)[0] == "triton"


@pytest.mark.parametrize("backend", ["reference", "dequant"])
def test_jnp_backends_unpack_one_layer_at_a_time(backend):
  # Chains of layers in one program: XLA must not unpack every layer's weight up front (all of
  # them alive at once: 2.6 GB of temporaries in make run), only each when its input exists, so
  # the program's temporaries do not grow with depth (they grew 3x from 4 to 12 layers before).
  n = k = 512
  layers = []
  for i in range(12):
    w = jnp.asarray(np.random.default_rng(i).standard_normal((n, k)) * 2 / np.sqrt(k), jnp.float32)
    q, s = numerics.quantize_weight(w, 6, 128)
    layers.append(QuantizedLinear(packed=formats.pack(q, 6, "bitplanes", k), scales=s, in_features=k,
                                  out_features=n, w_bits=6, a_bits=6, group_size=128, backend=backend))

  def chain(layers, x):
    for layer in layers:
      x = jax.nn.relu(x @ layer)
    return x

  x = jnp.ones((64, k), jnp.float32)
  temp = {d: jax.jit(chain).lower(layers[:d], x).compile().memory_analysis().temp_size_in_bytes for d in (4, 12)}
  assert temp[12] < 1.5 * temp[4], temp
  ref, matmul = x, {"reference": numerics.reference_matmul, "dequant": numerics.dequant_matmul}[backend]
  for layer in layers:
    ref = jax.nn.relu(matmul(ref, layer.logical_weight(), layer.scales, a_bits=6))
  np.testing.assert_allclose(jax.jit(chain)(layers, x), ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
