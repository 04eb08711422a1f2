"""What quantize() does: QuantConfig, and the per-layer rules and budget it implies."""

from __future__ import annotations

import dataclasses
import re

from flexq_jax import formats

WEIGHT_METHODS = ("rtn", "gptq")
WEIGHT_CLIPPINGS = ("none", "learned", "mse", "full_range")
A8_SELECTIONS = ("sensitivity", "measured", "down_proj", "none")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
  """What quantize() does. Frozen: make variants with dataclasses.replace."""

  w_bits: int = 6  # weight bits (every linear layer)
  group_size: int | None = 128  # K-group for weights and activations; None = per channel / token
  a_bits: int = 6  # activation bits of ordinary layers (16 = keep activations float)
  sensitive_a_bits: int = 8  # activation bits of the layers the selection marks sensitive
  a8_selection: str = "sensitivity"  # "sensitivity" (our analysis), "down_proj" (paper rule), "none"
  a8_budget: int | float | None = None  # A8 layers: a count, a fraction, or None = 1 in 7 (FlexQ's)
  # The model the sensitivity analysis differentiates: "high" (every layer at sensitive_a_bits; the
  # score is the loss change of moving one layer down) or "low" (every layer at a_bits, as most of
  # the deployed model is; the score is the change of moving one layer up). "low" chose A8 layers
  # 0.30 points better than "high" and 0.52 better than the down_proj rule (SmolLM2, 8 x 2048
  # Wikipedia tokens, default method: results/raw/sensitivity-from-2026-12-01.md).
  sensitivity_from: str = "low"
  # The A8 budget chosen in this many passes (sensitivity_from="low" only): each pass runs the layers
  # already chosen at sensitive_a_bits and re-scores the rest, so the choice sees how switches interact.
  # 1 by default: 3 rounds screened worse than one pass (+1.95% / +1.82% vs +1.72% / +1.27% on 2 x 2048
  # tokens of each text; results/raw/screens-2026-12-02.md).
  sensitivity_rounds: int = 1
  # a8_selection="measured": the sensitivity analysis names measure_candidates layers (None = twice
  # the budget), each is measured switched alone to sensitive_a_bits (KL divergence from the float
  # model on the first measure_rows calibration rows), and the budget goes to the largest gains.
  # Not the default: on the rotated SmolLM2 (8 x 2048 tokens) +1.90% / +1.96% held-out against the
  # down_proj rule's +2.00% / +1.83%, for minutes of measuring (results/raw/a8-measured-2026-12-01.md).
  measure_candidates: int | None = None
  measure_rows: int = 2
  # (regex on the layer path "layers/<i>/<proj>", activation bits); first match wins and
  # overrides the selection. Rules that match nothing are listed in the report.
  rules: tuple[tuple[str, int], ...] = ()
  weight_method: str = "gptq"  # "rtn" (round to nearest) or "gptq" (error compensation)
  # GPTQ diagonal damping (fraction of mean diag(H)). 0.1, not GPTQ's usual 0.01: with 8 x 512
  # calibration tokens 0.01 overfits the calibration text (SmolLM2-135M, rotation, W6A16 on 2 x 2048
  # tokens: +0.84% / +1.11% held-out at 0.01, +0.69 / +0.54 at 0.03, +0.61 / +0.50 at 0.1, +0.63 /
  # +0.51 at 0.3, +1.08 / +0.64 at 1.0; results/raw/gptq-damping-2026-12-01.md), and it broke
  # the chat answers (the main job's "capital of France" sample).
  gptq_damp: float = 0.1
  gptq_act_order: bool = True  # GPTQ visits the most active input channels first
  # GPTQ's statistics of block i taken on the hidden states of blocks 0..i-1 already quantized
  # (sequential calibration) instead of the float model's (False: one float pass for all layers)
  gptq_sequential: bool = False
  # After GPTQ, refit each row's group scales to its codes by least squares under GPTQ's damped objective
  # (gptq.refit_scales: a G x G system a row; the codes stay; GPTQ only, round to nearest keeps max|w| / qmax).
  # On: W6A16 on SmolLM2-135M, 8 x 2048 tokens,
  # three calibration draws, evaluation part / held-out: +0.71/+0.49 -> +0.67/+0.45, +0.78/+0.82 -> +0.75/+0.77,
  # +0.81/+1.02 -> +0.70/+0.95 (results/raw/screens-2026-12-02.md, "Scales refit to GPTQ's codes").
  # Off by default all the same: the default row with it was +1.65% / +1.87% (table +1.80% / +1.57%), and the
  # main job's quantized model answered the France question wrongly again ("L'Étoile, la Marseur, ...";
  # results/raw/make-run-2026-12-02-refit.log), as with GPTQ damping 0.01.
  gptq_refit_scales: bool = False
  # "learned": per-group clipping of the weight scales learned on the calibration statistics
  # (OmniQuant's LWC, flexq_jax/clipping.py) before rounding or GPTQ; "mse": a grid search per group
  # for the clipping factor with the least rounding error weighted by diag(H) (unweighted under RTN
  # without smoothing, which collects no statistics) (clipping.mse_clipping;
  # W6A16 +0.91% / +1.20% vs none's +0.61% / +0.50% on 2 x 2048 tokens, results/raw/screens-2026-12-02.md);
  # "full_range": max(max(w) / qmax, -min(w) / -qmin), both ends of the signed range (clipping.full_range_scales;
  # W6A16 +0.92% / +0.93% vs none's +0.71% / +0.49% on the table's 8 windows, results/raw/screens-2026-12-02.md);
  # "none": max|w| / qmax.
  # Off by default: on the rotated SmolLM2 it took W6A16 from +0.94% to +0.69% on Wikipedia but
  # from +0.88% to +1.06% on held-out news (results/raw/weight-clipping-2026-12-01.md).
  weight_clipping: str = "none"
  clipping_steps: int = 100  # Adam steps per layer of the learned clipping
  clipping_lr: float = 1e-2  # Adam learning rate on the clipping logits
  smooth_alpha: float | None = 0.5  # SmoothQuant migration strength; None = no smoothing
  layout: str = "bitplanes"  # packed weight layout (flexq_jax.formats)

  def __post_init__(self):
    if not (isinstance(self.gptq_damp, (int, float)) and 0 < self.gptq_damp < float("inf")):
      raise ValueError(f"gptq_damp must be a positive finite number, got {self.gptq_damp!r}")
    if not isinstance(self.gptq_sequential, bool):
      raise ValueError(f"gptq_sequential must be True or False, got {self.gptq_sequential!r}")
    if not isinstance(self.gptq_refit_scales, bool):
      raise ValueError(f"gptq_refit_scales must be True or False, got {self.gptq_refit_scales!r}")
    if not 2 <= self.w_bits <= 8:
      raise ValueError(f"w_bits must be in [2, 8], got {self.w_bits}")
    for name in ("a_bits", "sensitive_a_bits"):
      v = getattr(self, name)
      if not (2 <= v <= 8 or v == 16):
        raise ValueError(f"{name} must be in [2, 8] or 16 (float), got {v}")
    if self.weight_method not in WEIGHT_METHODS:
      raise ValueError(f"weight_method must be one of {WEIGHT_METHODS}, got {self.weight_method!r}")
    mc = self.measure_candidates
    if mc is not None and (isinstance(mc, bool) or not isinstance(mc, int) or mc < 1):
      raise ValueError(f"measure_candidates must be an integer >= 1 or None, got {mc!r}")
    if isinstance(self.measure_rows, bool) or not isinstance(self.measure_rows, int) or self.measure_rows < 1:
      raise ValueError(f"measure_rows must be an integer >= 1, got {self.measure_rows!r}")
    if self.weight_clipping not in WEIGHT_CLIPPINGS:
      raise ValueError(f"weight_clipping must be one of {WEIGHT_CLIPPINGS}, got {self.weight_clipping!r}")
    if isinstance(self.clipping_steps, bool) or not isinstance(self.clipping_steps, int) or self.clipping_steps < 1:
      raise ValueError(f"clipping_steps must be an integer >= 1, got {self.clipping_steps!r}")
    if not (isinstance(self.clipping_lr, (int, float)) and 0 < self.clipping_lr < float("inf")):
      raise ValueError(f"clipping_lr must be a positive finite number, got {self.clipping_lr!r}")
    if self.sensitivity_from not in ("high", "low"):
      raise ValueError(f"sensitivity_from must be 'high' or 'low', got {self.sensitivity_from!r}")
    r = self.sensitivity_rounds
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
      raise ValueError(f"sensitivity_rounds must be an integer >= 1, got {r!r}")
    if r > 1 and self.sensitivity_from != "low":
      raise ValueError("sensitivity_rounds > 1 needs sensitivity_from='low' (rounds switch layers up from a_bits)")
    if self.a8_selection not in A8_SELECTIONS:
      raise ValueError(f"a8_selection must be one of {A8_SELECTIONS}, got {self.a8_selection!r}")
    if self.layout not in formats.LAYOUTS:
      raise ValueError(f"layout must be one of {formats.LAYOUTS}, got {self.layout!r}")
    if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
      raise ValueError(f"smooth_alpha must be in [0, 1], got {self.smooth_alpha}")
    b = self.a8_budget
    if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not b >= 0 or b != b
                          or (isinstance(b, float) and b >= 1 and b != int(b))):
      raise ValueError(f"a8_budget must be a count >= 0, a fraction in [0, 1), or None; got {b!r}")
    for pattern, bits in self.rules:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"rule {pattern!r} is not a valid regular expression: {e}") from None
      if not (2 <= bits <= 8 or bits == 16):
        raise ValueError(f"rule {pattern!r}: activation bits must be in [2, 8] or 16, got {bits}")

  def a8_count(self, n_layers: int, per_block: int) -> int:
    """How many of n_layers keep sensitive_a_bits (a8_budget; default one per block of per_block)."""
    b = self.a8_budget
    if b is None:
      return round(n_layers / per_block)
    if isinstance(b, float) and b < 1:
      return round(b * n_layers)
    return int(b)

  def rule_for(self, path: str) -> tuple[str, int] | None:
    """The first rule whose regex matches `path`, or None."""
    for pattern, bits in self.rules:
      if re.search(pattern, path):
        return pattern, bits
    return None

  def unmatched_rules(self, paths) -> list[str]:
    """The rules' regexes that match none of `paths`."""
    return [p for p, _ in self.rules if not any(re.search(p, path) for path in paths)]

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["rules"] = [list(r) for r in self.rules]
    return d
