"""What a denoiser is trained to predict, read from its pipeline's scheduler: the noising, the
regression target, the training timestep draw and the timestep value the model is given.

Timesteps are integer indices ``t`` in ``[0, T)`` for every objective, larger = noisier, so the recipe's
samplers, the concept-critical probe and the checkpoints need not know the objective:

- :class:`DDPMObjective` (SD-1.x/2.x, SDXL, PixArt): ``x_t = √ᾱ_t·x0 + √(1-ᾱ_t)·ε``; the target is ``ε``
  (``epsilon``), ``√ᾱ_t·ε - √(1-ᾱ_t)·x0`` (``v_prediction``, SD-2.x 768) or ``x0`` (``sample``); the
  model gets ``t``; training draws ``t`` uniformly.
- :class:`FlowObjective` (SD3/SD3.5, Flux, Sana, MiniCanvas-DiT): rectified flow, ``σ_t`` the
  scheduler's shifted sigma of index ``t``, ``x_t = (1-σ)·x0 + σ·ε``, target the velocity ``ε - x0``;
  the model gets ``σ·1000`` (Flux's pipeline divides by 1000 again: its :class:`Denoiser` does). The
  draw is SD3's logit-normal (``u = sigmoid(N(0,1))``) or uniform, then the scheduler's shift: static
  (``shift``, SD3's 3.0) or Flux's resolution-dependent one (``use_dynamic_shifting``: ``μ`` linear in the
  image token count between ``base_shift`` at ``base_image_seq_len`` and ``max_shift`` at
  ``max_image_seq_len``, ``σ' = e^μ / (e^μ + 1/σ - 1)``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

DRAWS = ("uniform", "logit_normal")


class Objective:
    kind = ""
    T = 1000

    def noised(self, x0: torch.Tensor, t: torch.Tensor, gen: torch.Generator):
        """-> ``(x_t, target)`` for samples ``x0`` at indices ``t``, noise drawn from ``gen`` (a CPU
        generator: the same draws whatever device the samples live on)."""
        noise = torch.randn(x0.shape, generator=gen).to(x0.device)
        return self.mix(x0, noise, t), self.target(x0, noise, t)

    def draw(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """``n`` training timestep indices from the model's own training distribution."""
        return torch.randint(0, self.T, (n,), generator=gen)

    def describe(self) -> dict:
        return {"kind": self.kind, "num_train_timesteps": self.T}


class DDPMObjective(Objective):
    def __init__(self, scheduler):
        pt = getattr(scheduler.config, "prediction_type", "epsilon")
        if pt not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"scheduler: prediction_type {pt!r} is not one of epsilon, v_prediction, sample")
        self.scheduler, self.kind, self.T = scheduler, pt, int(scheduler.config.num_train_timesteps)

    def mix(self, x0, noise, t):
        return self.scheduler.add_noise(x0, noise, t)

    def target(self, x0, noise, t):
        if self.kind == "epsilon":
            return noise
        if self.kind == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, t)
        return x0

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        return t


class FlowObjective(Objective):
    kind = "flow"

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, mu: Optional[float] = None,
                 draw: str = "logit_normal"):
        if draw not in DRAWS:
            raise ValueError(f"draw: expected one of {', '.join(DRAWS)}, got {draw!r}")
        self.T, self.shift, self.mu, self.draw_kind = int(num_train_timesteps), float(shift), mu, draw
        s = torch.arange(1, self.T + 1, dtype=torch.float64) / self.T      # index t -> (t+1)/T, t = T-1 is pure noise
        if mu is not None:
            s = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
        else:
            s = self.shift * s / (1 + (self.shift - 1) * s)
        self.sigmas = s.float()

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigmas[t.cpu()]

    def mix(self, x0, noise, t):
        s = self.sigma(t).to(x0.device, x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        return (1 - s) * x0 + s * noise

    def target(self, x0, noise, t):
        return noise - x0

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma(t) * 1000

    def draw(self, n: int, gen: torch.Generator) -> torch.Tensor:
        if self.draw_kind == "uniform":
            return super().draw(n, gen)
        u = torch.sigmoid(torch.randn(n, generator=gen))
        return (u * self.T).long().clamp_(0, self.T - 1)

    def describe(self) -> dict:
        return {**super().describe(), "shift": self.shift, "mu": self.mu, "draw": self.draw_kind}


def flux_mu(image_seq_len: int, config) -> float:
    """Flux's resolution-dependent shift exponent for ``image_seq_len`` packed image tokens."""
    get = (lambda k, d: config.get(k, d)) if isinstance(config, dict) else (lambda k, d: getattr(config, k, d))
    lo, hi = get("base_image_seq_len", 256), get("max_image_seq_len", 4096)
    b0, b1 = get("base_shift", 0.5), get("max_shift", 1.15)
    m = (b1 - b0) / (hi - lo)
    return image_seq_len * m + (b0 - m * lo)


def objective_for(scheduler, image_seq_len: Optional[int] = None, draw: Optional[str] = None) -> Objective:
    """The objective of a pipeline's scheduler: flow matching for ``FlowMatch*`` schedulers and for
    schedulers configured with ``prediction_type="flow_prediction"`` (Sana's DPM-Solver), else DDPM with
    the scheduler's betas and prediction type. ``image_seq_len``: the image token count, for schedulers
    with Flux's dynamic shifting (required there). ``draw``: override the training draw (default:
    uniform under dynamic shifting, as Flux's sampling shift already moves σ; logit-normal otherwise, as
    SD3 trains)."""
    cfg = scheduler.config
    name = type(scheduler).__name__
    flow = name.startswith("FlowMatch") or getattr(cfg, "prediction_type", None) == "flow_prediction"
    if not flow:
        from diffusers import DDPMScheduler

        if name != "DDPMScheduler":   # DDIM / DPM-Solver / Euler configs: the same betas, DDPM's add_noise
            scheduler = DDPMScheduler.from_config(cfg)
        return DDPMObjective(scheduler)
    T = int(getattr(cfg, "num_train_timesteps", 1000))
    if getattr(cfg, "use_dynamic_shifting", False):
        if image_seq_len is None:
            raise ValueError("image_seq_len: the scheduler shifts by resolution (use_dynamic_shifting); give the "
                             "number of image tokens")
        return FlowObjective(T, mu=flux_mu(image_seq_len, cfg), draw=draw or "uniform")
    shift = getattr(cfg, "shift", None) or getattr(cfg, "flow_shift", None) or 1.0
    return FlowObjective(T, shift=float(shift), draw=draw or "logit_normal")


__all__ = ["DDPMObjective", "DRAWS", "FlowObjective", "Objective", "flux_mu", "objective_for"]
