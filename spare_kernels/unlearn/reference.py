"""SPARE's own code path (the authors' ``vision-unlearning`` package), as the baseline runs it.

- :class:`SpareRefLayer`: the masked adapter materialised as a dense weight and applied by a second
  full GEMM / conv, ``base(x) + F.linear(x, (B@A)*scale*M)``, ``M`` a dense uint8 mask buffer cast
  to the delta's dtype at use (as SPARE's code keeps it).
- :func:`full_grad_saliency`: ``unet.requires_grad_(True)``; per batch forward, ``unet.zero_grad()``,
  backward, ``saliency[name] += param.grad.abs()`` for every parameter
  (``vision_unlearning/utils/parameter_attribution.py``).
- :func:`kth_threshold_masks`: ``torch.cat`` of every score, ``kthvalue`` for the cutoff, ``>=``.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


class SpareRefLayer(nn.Module):
    """``base(x) + F.linear(x, (B@A)*scale*M)`` (conv: ``F.conv2d`` with the base geometry).

    ``mask``: 0/1 entries of the weight's shape (bool, integer or float), stored as a uint8 buffer and
    cast to the delta's dtype in the forward, as SPARE's code does. A float buffer would promote a
    bf16 delta (autocast) to fp32: weight-sized fp32 passes SPARE does not pay. Masks are 0/1, so in
    fp32 the result is the float buffer's, bit for bit."""

    def __init__(self, base: nn.Module, rank: int, mask: torch.Tensor, scale: float = 1.0,
                 init: str = "zeros", generator: torch.Generator | None = None):
        super().__init__()
        self.base = base.requires_grad_(False)
        w = base.weight
        fan_in = w[0].numel()
        a_shape = (rank,) + tuple(w.shape[1:])
        g = generator or torch.Generator().manual_seed(0)
        like = dict(device=w.device, dtype=w.dtype)   # drawn on the CPU: the same init on every device
        self.lora_A = nn.Parameter((torch.randn(a_shape, generator=g) / fan_in ** 0.5).to(**like))
        B = torch.randn(w.shape[0], rank, generator=g) if init == "random" else torch.zeros(w.shape[0], rank)
        self.lora_B = nn.Parameter(B.to(**like))
        if mask.is_floating_point() and not ((mask == 0) | (mask == 1)).all():
            raise ValueError("SpareRefLayer: mask: expected 0/1 entries (a uint8 buffer holds it), got other values")
        self.register_buffer("mask", mask.reshape(w.shape).to(device=w.device, dtype=torch.uint8))
        self.scale = scale
        self.enabled = True

    def forward(self, x):
        if not self.enabled:
            return self.base(x)
        w = self.base.weight
        delta = (self.lora_B @ self.lora_A.reshape(self.lora_A.shape[0], -1)).view(w.shape) * self.scale
        delta = delta * self.mask.to(delta.dtype)
        if isinstance(self.base, nn.Linear):
            return self.base(x) + F.linear(x, delta)
        c = self.base
        return c(x) + F.conv2d(x, delta, None, c.stride, c.padding, c.dilation, c.groups)


def patch_spare_ref(unet: nn.Module, masks: dict, rank: int = 4, scale: float = 1.0, init: str = "zeros",
                    seed: int = 0) -> nn.Module:
    """Swap each Linear/Conv2d whose ``<name>.weight`` is in ``masks`` (dense bool/float tensors or
    ``Mask``) for a :class:`SpareRefLayer`; other keys (norms, biases) are ignored."""
    from ..masks import Mask

    unet.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for key, m in masks.items():
        if not key.endswith(".weight"):
            continue
        name = key[: -len(".weight")]
        mod = unet.get_submodule(name)
        if type(mod) not in (nn.Linear, nn.Conv2d):
            continue
        parent, _, child = name.rpartition(".")
        dense = m.to_dense() if isinstance(m, Mask) else m
        setattr(unet.get_submodule(parent) if parent else unet, child,
                SpareRefLayer(mod, rank, dense, scale, init, g))
    return unet


@contextlib.contextmanager
def spare_ref_disabled(unet: nn.Module):
    """The teacher: every SpareRefLayer runs its base layer only."""
    layers = [m for m in unet.modules() if isinstance(m, SpareRefLayer)]
    for m in layers:
        m.enabled = False
    try:
        yield unet
    finally:
        for m in layers:
            m.enabled = True


def full_grad_saliency(unet: nn.Module, batches, loss_fn, progress=None, sync=None) -> dict:
    """SPARE's saliency loop over ``batches`` (``loss_fn(unet, batch) -> loss``): every parameter gets a
    ``.grad``; ``{name: Σ_batches |grad|}`` for every parameter. ``sync(grads)``, if given, sums each
    batch's gradients over the ranks in place before the ``|·|``."""
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    unet.requires_grad_(True)
    sal = {n: torch.zeros_like(p) for n, p in unet.named_parameters()}
    try:
        for batch in batches:
            loss = loss_fn(unet, batch)
            unet.zero_grad()
            loss.backward()
            if sync is not None:
                for p in unet.parameters():
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                sync([p.grad for p in unet.parameters()])
            with torch.no_grad():
                for n, p in unet.named_parameters():
                    if p.grad is not None:
                        sal[n] += p.grad.abs()
            if progress is not None:
                progress.update(1)
    finally:
        unet.zero_grad()
        for n, p in unet.named_parameters():
            p.requires_grad_(flags[n])
    return sal


def kth_threshold_masks(scores: dict, density: float) -> dict:
    """SPARE's threshold: ``cutoff = kthvalue(cat(all scores), N - k + 1)``; ``mask = score >= cutoff``."""
    all_vals = torch.cat([v.flatten() for v in scores.values()])
    k = int(len(all_vals) * density)
    cutoff = torch.kthvalue(all_vals, len(all_vals) - k + 1).values.item()
    return {n: v >= cutoff for n, v in scores.items()}
