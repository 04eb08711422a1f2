"""What quantize() did: one LayerReport per linear layer, and the QuantReport of a model."""

from __future__ import annotations

import dataclasses
import json


@dataclasses.dataclass
class LayerReport:
  path: str
  in_features: int
  out_features: int
  w_bits: int
  a_bits: int
  why: str  # what set a_bits: "rule <regex>", "sensitivity", "measured", "down_proj rule", "default"
  sensitivity: float | None  # Fisher estimate of the A8 -> A6 loss increase (nats over the batch)
  float_bytes: int  # bf16 bytes of the float kernel
  packed_bytes: int  # packed weights + scales


@dataclasses.dataclass
class QuantReport:
  config: dict
  layers: list[LayerReport]
  unmatched_rules: list[str]
  seconds: dict[str, float]

  @property
  def sensitivity_map(self) -> dict[str, int]:
    """{layer path: activation bits}."""
    return {l.path: l.a_bits for l in self.layers}

  @property
  def linear_bf16_bytes(self) -> int:
    return sum(l.float_bytes for l in self.layers)

  @property
  def linear_packed_bytes(self) -> int:
    return sum(l.packed_bytes for l in self.layers)

  def to_json(self) -> str:
    return json.dumps({
        "config": self.config,
        "layers": [dataclasses.asdict(l) for l in self.layers],
        "unmatched_rules": self.unmatched_rules,
        "seconds": self.seconds,
        "linear_bf16_bytes": self.linear_bf16_bytes,
        "linear_packed_bytes": self.linear_packed_bytes,
    }, indent=1)

  def summary(self) -> str:
    n = len(self.layers)
    by_bits: dict[int, int] = {}
    for l in self.layers:
      by_bits[l.a_bits] = by_bits.get(l.a_bits, 0) + 1
    mix = ", ".join(f"{c} x W{self.config['w_bits']}A{b if b < 16 else 16}" for b, c in sorted(by_bits.items()))
    ratio = self.linear_packed_bytes / max(1, self.linear_bf16_bytes)
    lines = [
        f"quantized {n} linear layers: {mix}",
        f"linear weights: {self.linear_bf16_bytes / 2**20:.1f} MiB bf16 -> {self.linear_packed_bytes / 2**20:.1f} MiB "
        f"({ratio:.4f} of bf16 = {16 * ratio:.3f} bits/weight)",
        f"weight method: {self.config['weight_method']}, A8 selection: {self.config['a8_selection']}"
        + (f", smoothing alpha {self.config['smooth_alpha']}" if self.config.get("smooth_alpha") is not None else ""),
        "time: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items()),
    ]
    if self.config.get("lm_head"):
      lines.append(f"lm_head: {self.config['lm_head']} (a quantized copy; not counted above)")
    sens = [l for l in self.layers if l.a_bits != self.config["a_bits"]]
    if sens:
      lines.append("high-precision-activation layers: " + ", ".join(l.path for l in sens))
    if self.unmatched_rules:
      lines.append("rules that matched no layer: " + ", ".join(self.unmatched_rules))
    return "\n".join(lines)
