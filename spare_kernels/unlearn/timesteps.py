"""Concept-critical timesteps: where does the prediction depend on the concept?

:func:`probe` measures, per timestep bin, ``‖ε(x_t, c_forget) − ε(x_t, c_surrogate)‖²`` with the frozen
model on noised forget samples; :class:`TimestepSampler` draws training timesteps from that curve mixed
with uniform (``mix`` = weight of the curve; 0 is pure uniform, the ablation).
"""
from __future__ import annotations

import torch


@torch.no_grad()
def probe(unet, task, bins: int = 10, per_bin: int = 8, seed: int = 0) -> dict:
    """``{"edges": [...], "score": [...]}``: the mean squared prediction gap of each of ``bins`` equal
    timestep bins over ``per_bin`` forget samples (one random timestep each inside the bin)."""
    if bins < 1 or per_bin < 1:
        raise ValueError(f"bins / per_bin: expected >= 1, got {bins} / {per_bin}")
    g = torch.Generator().manual_seed(seed)
    T = task.num_train_timesteps
    edges = [round(i * T / bins) for i in range(bins + 1)]
    idx = torch.randint(task.x_forget.shape[0], (bins * per_bin,), generator=g)
    t = torch.cat([torch.randint(edges[b], max(edges[b] + 1, edges[b + 1]), (per_bin,), generator=g)
                   for b in range(bins)])
    xt, _ = task.noised(task.x_forget[idx], t, g)
    c = torch.cat([task.c_forget[idx], task.c_surrogate[idx]])
    pred = task.predict(unet, torch.cat([xt, xt]), torch.cat([t, t]), c)
    ef, es = pred.chunk(2)
    gap = (ef.float() - es.float()).pow(2).flatten(1).mean(1).cpu()
    score = gap.view(bins, per_bin).mean(1)
    return {"edges": edges, "score": score.tolist()}


class TimestepSampler:
    """Draws timesteps: with probability ``mix`` a bin by the probe curve, else from ``base(n, generator)``
    (the model's own training draw; default uniform over [0, T), DDPM's)."""

    def __init__(self, num_train_timesteps: int, curve: dict | None = None, mix: float = 0.5, base=None):
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"mix: expected a weight in [0, 1], got {mix}")
        self.T = int(num_train_timesteps)
        self.mix = float(mix) if curve is not None else 0.0
        self.edges = torch.tensor(curve["edges"]) if curve is not None else None
        self.base = base
        if curve is not None:
            s = torch.tensor(curve["score"], dtype=torch.float64).clamp_min(0)
            self.p = s / s.sum() if s.sum() > 0 else torch.full_like(s, 1 / len(s))

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        t = torch.randint(0, self.T, (n,), generator=generator) if self.base is None else self.base(n, generator)
        if self.mix > 0:
            use = torch.rand(n, generator=generator) < self.mix
            b = torch.multinomial(self.p, n, replacement=True, generator=generator)
            lo, hi = self.edges[b], self.edges[b + 1]
            tc = lo + (torch.rand(n, generator=generator) * (hi - lo).clamp_min(1)).long()
            t = torch.where(use, tc.clamp(max=self.T - 1), t)
        return t

    def density(self) -> list:
        """Probability mass per probe bin (uniform part included), for the plot."""
        if self.edges is None:
            return []
        w = (self.edges[1:] - self.edges[:-1]).double() / self.T
        return ((1 - self.mix) * w + self.mix * self.p).tolist()
