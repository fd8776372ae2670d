"""The recipe's settings: :class:`Config`, validated on construction, and the names it accepts."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

from ..masks import GRANULARITIES, SCOPES, _check_block
from ..nn.lora import INITS
from ..ops.saliency import STATS

METHODS = ("spare", "spare-reference", "lora", "salun", "esd")
PRECISIONS = ("fp32", "bf16")   # fp16 would need loss scaling
TIMESTEPS = ("critical", "uniform")
# Presets of the model's family (spare_kernels.targets): on a UNet "all" is every Linear and Conv2d and
# "attention" to_q/to_k/to_v/to_out.0 (SPARE's choice); on a transformer "attention" is every attention
# projection of both streams and "all" every Linear but the AdaLN modulation.
TARGETS = ("all", "attention", "attention+mlp")
_DEFAULT_LR = {"spare": 1e-2, "spare-reference": 1e-2, "lora": 1e-2, "salun": 3e-4, "esd": 3e-4}


def _real(v) -> bool:
    """A finite real number (an infinite lr or loss weight would only produce NaN later)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class Config:
    method: str = "spare"
    steps: int = 200
    batch_forget: int = 8
    batch_retain: int = 8
    lr: Optional[float] = None            # None: the method's default
    rank: int = 4
    init: str = "kaiming"                 # adapter init (peft's default; B = 0 so training starts at the base model)
    alpha: Optional[float] = None         # scale = alpha / rank (None: 1.0)
    density: float = 0.5                  # SPARE's per-weight default
    granularity: str = "element"
    scope: str = "global"
    block: tuple = (32, 32)
    saliency_stat: str = "grad_abs"
    saliency_batches: int = 4
    saliency_batch: int = 16
    w_forget: float = 1.0
    w_retain: float = 1.0
    timesteps: str = "critical"           # or "uniform" (the ablation)
    mix: float = 0.5                      # weight of the concept curve in the timestep mixture
    probe_bins: int = 10
    probe_per_bin: int = 8
    esd_eta: float = 1.0
    seed: int = 0
    checkpoint_every: int = 0             # 0: no checkpoints
    precision: str = "fp32"               # or "bf16": forwards under torch.autocast (weights, adapters fp32)
    targets: str = "all"                  # or "attention", "attention+mlp" (the family's presets); esd ignores it

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {self.method!r}")
        for k in ("steps", "batch_forget", "batch_retain", "rank", "saliency_batches", "saliency_batch",
                  "probe_bins", "probe_per_bin"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if k == "steps" else 1):
                raise ValueError(f"{k}: expected an int >= {0 if k == 'steps' else 1}, got {v!r}")
        if not (_real(self.density) and 0 < self.density <= 1):
            raise ValueError(f"density: expected a fraction in (0, 1], got {self.density!r}")
        for k, allowed in (("granularity", GRANULARITIES), ("scope", SCOPES), ("saliency_stat", STATS),
                           ("init", INITS), ("timesteps", TIMESTEPS), ("precision", PRECISIONS),
                           ("targets", TARGETS)):
            if getattr(self, k) not in allowed:
                raise ValueError(f"{k}: expected one of {', '.join(allowed)}, got {getattr(self, k)!r}")
        self.block = _check_block(self.block)   # a tuple: a CLI / JSON list compares equal to a checkpoint's
        if not (_real(self.mix) and 0 <= self.mix <= 1):
            raise ValueError(f"mix: expected a weight in [0, 1], got {self.mix!r}")
        for k in ("lr", "alpha"):
            v = getattr(self, k)
            if v is not None and not (_real(v) and v > 0):
                raise ValueError(f"{k}: expected a positive finite number (or None for the default), got {v!r}")
        for k in ("w_forget", "w_retain"):
            if not (_real(getattr(self, k)) and getattr(self, k) >= 0):
                raise ValueError(f"{k}: expected a finite weight >= 0, got {getattr(self, k)!r}")
        ce = self.checkpoint_every
        if isinstance(ce, bool) or not isinstance(ce, int) or ce < 0:
            raise ValueError(f"checkpoint_every: expected an int >= 0, got {ce!r}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else _DEFAULT_LR[self.method]
