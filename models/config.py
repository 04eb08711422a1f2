"""Model configuration for the LLaMA family (LLaMA-1/2/3, SmolLM2, ...)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
  """LLaMA-3 style frequency-dependent RoPE scaling ("rope_type": "llama3")."""

  factor: float = 8.0  # how much the context was stretched
  low_freq_factor: float = 1.0  # wavelengths above original/low_freq_factor are divided by factor
  high_freq_factor: float = 4.0  # wavelengths below original/high_freq_factor are left alone
  original_max_position_embeddings: int = 8192  # context length the model was pre-trained at


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
  """Architecture of a LLaMA-family decoder. Frozen: derive variants with dataclasses.replace."""

  vocab_size: int
  hidden_size: int  # model width D
  intermediate_size: int  # FFN width F
  num_layers: int
  num_heads: int  # query heads
  num_kv_heads: int  # key/value heads (grouped-query attention when < num_heads)
  head_dim: int | None = None  # defaults to hidden_size // num_heads
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = False  # lm_head reuses the embedding matrix
  max_position_embeddings: int = 4096
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2
  pad_token_id: int | None = None

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
      if getattr(self, name) <= 0:
        raise ValueError(f"LlamaConfig.{name} must be positive, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"{self.num_heads=} must be a multiple of {self.num_kv_heads=}")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(f"{self.hidden_size=} is not divisible by {self.num_heads=}; give head_dim explicitly")
    if self.resolved_head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.resolved_head_dim}")

  @functools.cached_property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

  @functools.cached_property
  def q_size(self) -> int:
    return self.num_heads * self.resolved_head_dim

  @functools.cached_property
  def kv_size(self) -> int:
    return self.num_kv_heads * self.resolved_head_dim

  @functools.cached_property
  def eos_token_ids(self) -> tuple[int, ...]:
    if self.eos_token_id is None:
      return ()
    if isinstance(self.eos_token_id, int):
      return (self.eos_token_id,)
    return tuple(self.eos_token_id)

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
    """Builds a config from a Hugging Face `config.json` dict of a LLaMA-architecture model."""
    archs = d.get("architectures") or []
    model_type = d.get("model_type")
    if model_type not in (None, "llama") or any(a not in ("LlamaForCausalLM", "LlamaModel") for a in archs):
      raise ValueError(
          f"unsupported architecture: model_type={model_type!r}, architectures={archs!r}; "
          "only LLaMA-family checkpoints (LlamaForCausalLM) are supported"
      )
    try:
      scaling = d.get("rope_scaling")
      rope_scaling = None
      if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ("llama3", "default"):
          raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: 'llama3')")
        if kind == "llama3":
          rope_scaling = RopeScaling(
              factor=float(scaling["factor"]),
              low_freq_factor=float(scaling["low_freq_factor"]),
              high_freq_factor=float(scaling["high_freq_factor"]),
              original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
          )
      eos = d.get("eos_token_id", 2)
      if isinstance(eos, list):
        eos = tuple(eos)
      return cls(
          vocab_size=int(d["vocab_size"]),
          hidden_size=int(d["hidden_size"]),
          intermediate_size=int(d["intermediate_size"]),
          num_layers=int(d["num_hidden_layers"]),
          num_heads=int(d["num_attention_heads"]),
          num_kv_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
          head_dim=d.get("head_dim"),
          rope_theta=float(d.get("rope_theta", 10000.0)),
          rope_scaling=rope_scaling,
          rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
          tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
          max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
          bos_token_id=d.get("bos_token_id"),
          eos_token_id=eos,
          pad_token_id=d.get("pad_token_id"),
      )
    except KeyError as e:
      raise ValueError(f"config.json is missing required field {e.args[0]!r}") from None


def smollm2_135m() -> LlamaConfig:
  """SmolLM2-135M(-Instruct): the built-in default model."""
  return LlamaConfig(
      vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
      num_kv_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
      max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=2,
  )


def llama2_7b() -> LlamaConfig:
  return LlamaConfig(
      vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
      num_kv_heads=32, rms_norm_eps=1e-5, max_position_embeddings=4096,
  )


def llama2_13b() -> LlamaConfig:
  return LlamaConfig(
      vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
      num_kv_heads=40, rms_norm_eps=1e-5, max_position_embeddings=4096,
  )


def llama2_70b() -> LlamaConfig:
  return LlamaConfig(
      vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
      num_kv_heads=8, rms_norm_eps=1e-5, max_position_embeddings=4096,
  )


def llama3_8b() -> LlamaConfig:
  return LlamaConfig(
      vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
      num_kv_heads=8, rope_theta=500000.0, rope_scaling=RopeScaling(), rms_norm_eps=1e-5,
      max_position_embeddings=131072, bos_token_id=128000, eos_token_id=(128001, 128008, 128009),
  )


PRESETS = {
    "smollm2-135m": smollm2_135m,
    "llama2-7b": llama2_7b,
    "llama2-13b": llama2_13b,
    "llama2-70b": llama2_70b,
    "llama3-8b": llama3_8b,
}
