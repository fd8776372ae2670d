"""How the recipe calls a denoiser of each family, so that the methods never need to know which.

A :class:`Denoiser` maps ``(model, x, timestep value, conditions)`` to the model's prediction in the
space of ``x``: it packs Flux's latents into tokens (and its position ids, its guidance input),
passes SD3's pooled text, SDXL's added conditions, PixArt/Sana's text masks, and keeps the first half
of a learned-variance output (PixArt). Conditions are **one tensor per sample** so the recipe can
index, concatenate and compare them as it does the UNet's text states: the UNet family's are its
encoder states ``(N, L, D)`` as they are; a family with several inputs packs them flat, ``(N, F)``,
in the order of :attr:`Denoiser.fields` (:meth:`Denoiser.pack` / :meth:`Denoiser.unpack`).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch

FAMILIES = ("unet", "sdxl", "sd3", "flux", "pixart", "sana")


class Denoiser:
    """``fields``: ``((name, per-sample shape), ...)`` of the packed conditions; ``pooled_from_seq``:
    the pooled text is the mean of the sequence (MiniCanvas-DiT, whose encoder has no pooled output);
    ``guidance``: Flux's distilled-guidance input (None: the model has none)."""

    def __init__(self, family: str, fields: Sequence[Tuple[str, tuple]] = (), pooled_from_seq: bool = False,
                 guidance: Optional[float] = None, vae_scale: int = 8):
        if family not in FAMILIES:
            raise ValueError(f"family: expected one of {', '.join(FAMILIES)}, got {family!r}")
        self.family, self.fields = family, tuple((n, tuple(s)) for n, s in fields)
        self.pooled_from_seq, self.guidance, self.vae_scale = pooled_from_seq, guidance, vae_scale

    # ------------------------------------------------------------------------------ conditions
    @property
    def flat(self) -> bool:
        return len(self.fields) > 1

    def pack(self, **parts: torch.Tensor) -> torch.Tensor:
        """The per-sample condition tensor from named parts (``seq``, ``pooled``, ``time_ids``, ``mask``)."""
        names = [n for n, _ in self.fields] or ["seq"]
        missing = [n for n in names if n not in parts]
        extra = [n for n in parts if n not in names]
        if missing or extra:
            raise ValueError(f"conditions: the {self.family} denoiser takes {names}, got {sorted(parts)}")
        if not self.flat:
            return parts[names[0]]
        n = parts[names[0]].shape[0]
        dtype = parts[names[0]].dtype
        return torch.cat([parts[k].reshape(n, -1).to(dtype) for k in names], 1)

    def unpack(self, c: torch.Tensor) -> Dict[str, torch.Tensor]:
        if not self.flat:
            return {(self.fields[0][0] if self.fields else "seq"): c}
        out, o = {}, 0
        for name, shape in self.fields:
            k = math.prod(shape)
            out[name] = c[:, o:o + k].reshape(c.shape[0], *shape)
            o += k
        if o != c.shape[1]:
            raise ValueError(f"conditions: expected {o} values per sample for {self.fields}, got {c.shape[1]}")
        return out

    # ------------------------------------------------------------------------------------- call
    def __call__(self, model, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The prediction for ``x`` (N, C, H, W) at timestep values ``t`` (the objective's
        ``model_timestep``: DDPM indices or σ·1000), conditions ``c``."""
        p = self.unpack(c)
        t = t.to(x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        f = self.family
        if f == "unet":
            return model(x, t, encoder_hidden_states=p["seq"]).sample
        if f == "sdxl":
            return model(x, t, encoder_hidden_states=p["seq"],
                         added_cond_kwargs={"text_embeds": p["pooled"], "time_ids": p["time_ids"]}).sample
        if f == "sd3":
            pooled = p["seq"].mean(1) if self.pooled_from_seq else p["pooled"]
            return model(hidden_states=x, timestep=t.to(x.dtype), encoder_hidden_states=p["seq"],
                         pooled_projections=pooled).sample
        if f == "flux":
            return self._flux(model, x, t, p)
        mask = p.get("mask")
        kw = {"encoder_attention_mask": mask} if mask is not None else {}
        if f == "pixart":
            kw["added_cond_kwargs"] = self._pixart_added(model, x)
        else:   # Sana's pipeline scales its timesteps by the model's timestep_scale (1.0 in today's configs)
            t = t * getattr(model.config, "timestep_scale", 1.0)
        out = model(x, encoder_hidden_states=p["seq"], timestep=t, **kw).sample
        if out.shape[1] == 2 * x.shape[1]:   # learned variance (PixArt): the first half is the prediction
            out = out[:, :x.shape[1]]
        return out

    def _pixart_added(self, model, x):
        if not getattr(model, "use_additional_conditions", False):
            return {"resolution": None, "aspect_ratio": None}
        n, _, h, w = x.shape
        res = torch.tensor([h * self.vae_scale, w * self.vae_scale], dtype=x.dtype, device=x.device).expand(n, 2)
        ar = torch.tensor([h / w], dtype=x.dtype, device=x.device).expand(n, 1)
        return {"resolution": res, "aspect_ratio": ar}

    def _flux(self, model, x, t, p):
        n, ch, h, w = x.shape
        tokens = x.view(n, ch, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), ch * 4)
        ids = torch.zeros(h // 2, w // 2, 3, device=x.device, dtype=x.dtype)
        ids[..., 1] += torch.arange(h // 2, device=x.device, dtype=x.dtype)[:, None]
        ids[..., 2] += torch.arange(w // 2, device=x.device, dtype=x.dtype)[None, :]
        seq = p["seq"]
        txt_ids = torch.zeros(seq.shape[1], 3, device=x.device, dtype=x.dtype)
        g = None
        if getattr(model.config, "guidance_embeds", False):
            g = torch.full((n,), float(self.guidance if self.guidance is not None else 1.0), device=x.device,
                           dtype=torch.float32)
        out = model(hidden_states=tokens, timestep=(t / 1000).to(x.dtype), guidance=g, encoder_hidden_states=seq,
                    pooled_projections=p["pooled"], txt_ids=txt_ids, img_ids=ids.reshape(-1, 3)).sample
        return out.view(n, h // 2, w // 2, ch, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, ch, h, w)

    def describe(self) -> dict:
        return {"family": self.family, "fields": [[n, list(s)] for n, s in self.fields],
                "pooled_from_seq": self.pooled_from_seq, "guidance": self.guidance}


UNET = Denoiser("unet")


def canvas_dit_denoiser() -> Denoiser:
    """MiniCanvas-DiT's: an SD3 MMDiT whose pooled text is the token mean of its encoder states."""
    return Denoiser("sd3", pooled_from_seq=True)


__all__ = ["Denoiser", "FAMILIES", "UNET", "canvas_dit_denoiser"]
