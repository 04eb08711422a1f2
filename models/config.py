"""Model configuration for the LLaMA family (LLaMA-1/2/3, SmolLM2, ...)."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any

from models import hadamard


def _is_int(value) -> bool:
  # numbers.Integral admits numpy integers; bool is an int subclass but never a size.
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
  """LLaMA-3 style frequency-dependent RoPE scaling ("rope_type": "llama3")."""

  factor: float = 8.0  # how much the context was stretched
  low_freq_factor: float = 1.0  # wavelengths above original/low_freq_factor are divided by factor
  high_freq_factor: float = 4.0  # wavelengths below original/high_freq_factor are left alone
  original_max_position_embeddings: int = 8192  # context length the model was pre-trained at

  def __post_init__(self):
    for name in ("factor", "low_freq_factor", "high_freq_factor"):
      if not _is_number(getattr(self, name)) or getattr(self, name) <= 0:
        raise ValueError(f"RopeScaling.{name} must be a positive number, got {getattr(self, name)!r}")
    if not _is_int(self.original_max_position_embeddings) or self.original_max_position_embeddings <= 0:
      raise ValueError(
          f"RopeScaling.original_max_position_embeddings must be a positive integer, "
          f"got {self.original_max_position_embeddings!r}"
      )
    # The interpolation band divides by their difference (models.llama's RoPE frequencies).
    if self.high_freq_factor <= self.low_freq_factor:
      raise ValueError(
          f"RopeScaling.high_freq_factor ({self.high_freq_factor}) must exceed low_freq_factor "
          f"({self.low_freq_factor})"
      )


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
  # down_proj's input goes through an orthogonal Hadamard transform in the forward (QuaRot's online
  # transform, models/hadamard.py); set by flexq_jax/rotation.py, which folds its transpose into
  # down_proj so the float model is unchanged.
  down_proj_hadamard: bool = False

  def __post_init__(self):
    # Every size must be a true positive integer: a string, float or bool here (e.g. from a hand
    # edited config) would otherwise surface as a shape error deep inside JAX, or not at all.
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "max_position_embeddings"):
      value = getattr(self, name)
      if not _is_int(value) or value <= 0:
        raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
    if self.head_dim is not None and (not _is_int(self.head_dim) or self.head_dim <= 0):
      raise ValueError(f"LlamaConfig.head_dim must be a positive integer or None, got {self.head_dim!r}")
    for name in ("rope_theta", "rms_norm_eps"):
      value = getattr(self, name)
      if not _is_number(value) or value <= 0:
        raise ValueError(f"LlamaConfig.{name} must be a positive finite number, got {value!r}")
    if not isinstance(self.tie_word_embeddings, bool):
      raise ValueError(f"LlamaConfig.tie_word_embeddings must be a bool, got {self.tie_word_embeddings!r}")
    if not isinstance(self.down_proj_hadamard, bool):
      raise ValueError(f"LlamaConfig.down_proj_hadamard must be a bool, got {self.down_proj_hadamard!r}")
    if self.down_proj_hadamard and not hadamard.has_order(self.intermediate_size):
      raise ValueError(f"LlamaConfig.down_proj_hadamard: no Hadamard transform of order intermediate_size "
                       f"{self.intermediate_size} (orders 2^a * 12^b * 20^c only)")
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
      raise ValueError(f"LlamaConfig.rope_scaling must be a RopeScaling or None, got {self.rope_scaling!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(
          f"hidden_size ({self.hidden_size}) is not divisible by num_heads ({self.num_heads}); give head_dim explicitly"
      )
    if self.resolved_head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.resolved_head_dim}")
    # Special ids index the embedding: one outside it would be clamped or wrapped, not refused.
    eos = self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)
    for name, ids in (("bos_token_id", (self.bos_token_id,)), ("eos_token_id", eos), ("pad_token_id", (self.pad_token_id,))):
      for i in ids:
        if i is not None and (not _is_int(i) or not 0 <= i < self.vocab_size):
          raise ValueError(
              f"LlamaConfig.{name} must be None or a token id in [0, {self.vocab_size}), got {getattr(self, name)!r}"
          )

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
  def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "LlamaConfig":
    """Builds a config from a Hugging Face `config.json` dict of a LLaMA-architecture model.

    Args:
      d: the parsed config.json.
      source: the file, for error messages.

    Raises:
      ValueError: not a JSON object, an unsupported architecture, or a field that is missing, of
        the wrong type or out of range (the message names `source` and the field).
    """
    if not isinstance(d, dict):
      raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")

    def get(key: str, check: str, default=_REQUIRED):
      value = d.get(key)
      if value is None:  # an explicit null counts as absent
        if default is _REQUIRED:
          raise ValueError(f"{source}: config.json is missing required field {key!r} (absent or null)")
        return default
      if not _FIELD_CHECKS[check](value):
        raise ValueError(f"{source}: field {key!r} must be {check}, got {value!r}")
      return value

    archs = get("architectures", "a list of strings", [])
    model_type = get("model_type", "a string", None)
    if model_type not in (None, "llama") or any(a not in ("LlamaForCausalLM", "LlamaModel") for a in archs):
      raise ValueError(
          f"{source}: unsupported architecture: model_type={model_type!r}, architectures={archs!r}; "
          "only LLaMA-family checkpoints (LlamaForCausalLM) are supported"
      )
    scaling = get("rope_scaling", "an object", None)
    rope_scaling = None
    if scaling:
      kind = scaling.get("rope_type", scaling.get("type"))
      if kind not in ("llama3", "default"):
        raise ValueError(f"{source}: unsupported rope_scaling type {kind!r} (supported: 'llama3')")
      if kind == "llama3":
        values = {}
        for key, check in (("factor", "a number"), ("low_freq_factor", "a number"),
                           ("high_freq_factor", "a number"), ("original_max_position_embeddings", "an integer")):
          if not _FIELD_CHECKS[check](scaling.get(key)):
            raise ValueError(f"{source}: field 'rope_scaling.{key}' must be {check}, got {scaling.get(key)!r}")
          values[key] = scaling[key]
        try:
          rope_scaling = RopeScaling(**values)
        except ValueError as e:
          raise ValueError(f"{source}: rope_scaling: {e}") from None
    eos = d.get("eos_token_id", 2)
    if isinstance(eos, list):
      if not all(_is_int(i) for i in eos):
        raise ValueError(f"{source}: field 'eos_token_id' must be an integer or a list of integers, got {eos!r}")
      eos = tuple(eos)
    elif eos is not None and not _is_int(eos):
      raise ValueError(f"{source}: field 'eos_token_id' must be an integer or a list of integers, got {eos!r}")
    heads = get("num_attention_heads", "a positive integer")
    if _is_int(d.get("pad_token_id")) and d["pad_token_id"] < 0:
      d = {**d, "pad_token_id": None}  # older LLaMA configs write -1 for "no padding token"
    kwargs = dict(
        vocab_size=get("vocab_size", "a positive integer"),
        hidden_size=get("hidden_size", "a positive integer"),
        intermediate_size=get("intermediate_size", "a positive integer"),
        num_layers=get("num_hidden_layers", "a positive integer"),
        num_heads=heads,
        num_kv_heads=get("num_key_value_heads", "a positive integer", heads),
        head_dim=get("head_dim", "a positive integer", None),
        rope_theta=float(get("rope_theta", "a positive number", 10000.0)),
        rope_scaling=rope_scaling,
        rms_norm_eps=float(get("rms_norm_eps", "a positive number", 1e-6)),
        tie_word_embeddings=get("tie_word_embeddings", "true or false", False),
        max_position_embeddings=get("max_position_embeddings", "a positive integer", 4096),
        bos_token_id=get("bos_token_id", "a token id (non-negative integer)", None),
        eos_token_id=eos,
        pad_token_id=get("pad_token_id", "a token id (non-negative integer)", None),
    )
    try:
      return cls(**kwargs)
    except ValueError as e:  # relations between fields (divisibility, ids inside the vocabulary)
      raise ValueError(f"{source}: {e}") from None


_REQUIRED = object()
_FIELD_CHECKS = {
    "a positive integer": lambda v: _is_int(v) and v > 0,
    "an integer": _is_int,
    "a token id (non-negative integer)": lambda v: _is_int(v) and v >= 0,
    "a positive number": lambda v: _is_number(v) and v > 0,
    "a number": _is_number,
    "a string": lambda v: isinstance(v, str),
    "a list of strings": lambda v: isinstance(v, list) and all(isinstance(a, str) for a in v),
    "an object": lambda v: isinstance(v, dict),
    "true or false": lambda v: isinstance(v, bool),
}


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
