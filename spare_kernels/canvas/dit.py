"""MiniCanvas-DiT: the embedded benchmark's transformer denoiser, a tiny diffusers
``SD3Transformer2DModel`` (MMDiT: joint attention over image and text tokens, adaLN-zero modulation)
in pixel space, trained with rectified flow on the same images and the same frozen text encoder as
the UNet. Weights ship in ``weights/dit.safetensors`` + ``weights/dit.json``.

Objective (SD3's): ``x_t = (1 - σ)·x0 + σ·ε``, the model predicts the velocity ``ε - x0``; it is
given ``timestep = σ·1000``. Its pooled text input (SD3's CLIP pooled embedding) is the mean of the
prompt's token states: the MiniCanvas encoder has no pooled output of its own.
"""
from __future__ import annotations

import json
import os

import torch

from ..utils.io import atomic_path, write_json
from .text import DIM, MAX_LEN, TextEncoder

# Patch size 2 on 32x32 pixels: 256 image tokens + 8 text tokens per block. 4 blocks of 4 heads x 32
# channels, 2.27 M parameters (the UNet: 0.98 M). One training step, batch 32, one thread, measured
# here: 0.61 s under bf16 autocast (0.77 s fp32); 3 blocks x 3 heads (0.95 M) 0.34 s, 6 x 4 (3.5 M)
# 0.94 s. The largest that trains in about an hour on one core.
DIT_CONFIG = dict(
    sample_size=32,
    patch_size=2,
    in_channels=3,
    out_channels=3,
    num_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=DIM,
    caption_projection_dim=128,
    pooled_projection_dim=DIM,
    pos_embed_max_size=16,
)

# SD3's scheduler class and its logit-normal training draw. shift 1, not SD3's 3: that shift moves
# training towards high noise for 4096-token 1024² latents; these are 256 tokens of 32x32 pixels
# (Flux's resolution rule would give exp(0.5) = 1.65 at 256 tokens).
FLOW_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0)


def build_dit(config: dict | None = None):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**dict(config or DIT_CONFIG))


def flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER_CONFIG)


def is_dit(model) -> bool:
    return type(model).__name__ == "SD3Transformer2DModel"


def pooled(cond: torch.Tensor) -> torch.Tensor:
    """The DiT's pooled text input for encoder states ``cond`` (B, MAX_LEN, DIM): the token mean."""
    return cond.mean(1)


def predict(dit, x, sigma_t, cond):
    """The DiT's velocity for ``x`` (B, 3, 32, 32) at ``sigma_t`` (B,) = σ·1000, prompts ``cond``."""
    return dit(hidden_states=x, encoder_hidden_states=cond, pooled_projections=pooled(cond),
               timestep=sigma_t).sample


def load_dit(path=None, device="cpu"):
    """The trained DiT from ``path`` (a folder with dit.safetensors + dit.json; default: the shipped
    weights). A fresh module each call, in eval mode, fp32, on ``device``."""
    from safetensors.torch import load_file

    from .model import _weights_dir

    path = _weights_dir(path)
    meta = load_dit_meta(path)
    dit = build_dit(meta["dit_config"])
    dit.load_state_dict(load_file(os.path.join(path, "dit.safetensors")))
    return dit.to(device).eval()


def load_dit_meta(path=None) -> dict:
    from .model import _weights_dir

    f = os.path.join(_weights_dir(path), "dit.json")
    if not os.path.isfile(f):
        raise ValueError(f"path: {os.path.dirname(f)!r} holds no MiniCanvas-DiT weights (no dit.json)")
    with open(f) as fh:
        return json.load(fh)


def save_dit(dit, path, text_encoder: TextEncoder | None = None, extra: dict | None = None):
    """Write dit.safetensors, dit.json and text.safetensors into folder ``path`` (atomically)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    sd = {k: v.detach().float().contiguous().cpu() for k, v in dit.state_dict().items()}
    with atomic_path(os.path.join(path, "dit.safetensors")) as tmp:
        save_file(sd, tmp)
    te = text_encoder or TextEncoder()
    with atomic_path(os.path.join(path, "text.safetensors")) as tmp:
        save_file({k: v.contiguous() for k, v in te.state_dict().items()}, tmp)
    cfg = {k: dit.config[k] for k in DIT_CONFIG}
    write_json(os.path.join(path, "dit.json"),
               {"dit_config": cfg, "scheduler_config": FLOW_SCHEDULER_CONFIG, **(extra or {})})


@torch.no_grad()
def sample_flow(dit, cond_all, null, x_all, steps, guidance, batch_size, bar=None):
    """Euler over the flow scheduler's ``steps`` sigmas with classifier-free guidance -> [0, 1] images."""
    p = next(dit.parameters())
    device, dtype = p.device, p.dtype
    sched = flow_scheduler()
    sched.set_timesteps(steps)
    cfg = float(guidance) != 1.0
    out = []
    for i in range(0, cond_all.shape[0], batch_size):
        cond = cond_all[i:i + batch_size].to(device, dtype)
        x = x_all[i:i + batch_size].to(device, dtype)
        b = x.shape[0]
        ctx = torch.cat([null.to(device, dtype).expand(b, -1, -1), cond]) if cfg else cond
        sigmas = sched.sigmas.to(device, torch.float32)
        for k in range(steps):
            xin = torch.cat([x, x]) if cfg else x
            t = (sigmas[k] * 1000).expand(xin.shape[0]).to(dtype)
            v = predict(dit, xin, t, ctx)
            if cfg:
                vu, vc = v.chunk(2)
                v = vu + guidance * (vc - vu)
            x = x + (sigmas[k + 1] - sigmas[k]).to(dtype) * v
            if bar is not None:
                bar.update(1)
        out.append(((x.float().cpu() + 1) / 2).clamp(0, 1))
    return torch.cat(out)


__all__ = ["DIT_CONFIG", "FLOW_SCHEDULER_CONFIG", "MAX_LEN", "build_dit", "flow_scheduler", "is_dit", "load_dit",
           "load_dit_meta", "pooled", "predict", "sample_flow", "save_dit"]
