"""Procedural MiniCanvas images: 6 objects (shapes) x 6 styles (palette + texture family), 32x32 RGB.

Every image has a random position, size, rotation, palette jitter, texture phase/period and background
tone (+ mild noise), so a model has to learn distributions rather than templates. Rendering is
vectorised with torch on a 64x64 coordinate grid (2x supersampling), then average-pooled to 32x32.

Images are float32 in **[0, 1]**, shape (N, 3, 32, 32). The diffusion model works in [-1, 1]
(``x * 2 - 1``); the classifier takes [0, 1].

Determinism: ``dataset(n, seed, split)`` is a pure function of its arguments. The "train" and "test"
splits draw from disjoint generator streams (seed ``2 * k`` for train, ``2 * k + 1`` for test, then
mixed), so no test image is ever a training image; the fixed held-out split is ``split="test", seed=0``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

STYLES = ("stripes", "dots", "checker", "gradient", "grain", "pastel")
OBJECTS = ("circle", "square", "triangle", "cross", "star", "heart")
SIZE = 32
_SS = 2  # supersampling factor
SPLITS = ("train", "test")

# Per style: (hue A deg, sat A, val A), (hue B, sat B, val B); texture mixes A and B.
_PALETTES = {
    "stripes": ((2.0, 0.85, 0.88), (40.0, 0.15, 0.97)),     # red + cream stripes
    "dots": ((222.0, 0.85, 0.62), (200.0, 0.30, 1.00)),     # navy with light-blue dots
    "checker": ((125.0, 0.80, 0.75), (130.0, 0.70, 0.32)),  # green / dark-green checker
    "gradient": ((18.0, 0.95, 0.95), (55.0, 0.90, 1.00)),   # orange -> yellow gradient
    "grain": ((280.0, 0.85, 0.30), (285.0, 0.45, 0.95)),    # purple, heavy grain
    "pastel": ((175.0, 0.35, 0.95), (175.0, 0.35, 0.95)),   # flat pastel cyan
}


def prompt(style: str, object: str) -> str:  # noqa: A002 - the domain word
    return f"a {object} in {style} style"


def _check_name(value, names, arg):
    if value is None:
        return None
    if value not in names:
        raise ValueError(f"{arg}: unknown {arg} {value!r}; valid: {', '.join(names)}")
    return names.index(value)


def _hsv_to_rgb(h, s, v):
    """h in degrees, s, v in [0, 1]; tensors of the same shape -> (..., 3)."""
    h = (h % 360.0) / 60.0
    k = torch.stack([(5 + h) % 6, (3 + h) % 6, (1 + h) % 6], dim=-1)
    return v[..., None] - v[..., None] * s[..., None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _luma(rgb):
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def _shape_masks(u, v):
    """Inside-tests of the 6 shapes in unit local coordinates -> (6, N, H, W) bool."""
    r2 = u * u + v * v
    circle = r2 <= 0.85 ** 2
    square = torch.maximum(u.abs(), v.abs()) <= 0.75
    tri = torch.ones_like(circle)
    for k in range(3):
        a = math.pi / 2 + k * 2 * math.pi / 3
        tri &= (u * math.cos(a) + v * math.sin(a)) <= 0.53
    cross = ((u.abs() <= 0.3) & (v.abs() <= 0.95)) | ((v.abs() <= 0.3) & (u.abs() <= 0.95))
    # five-point star: fold the polar angle into [0, pi/5] and compare with the edge line
    ro, ri = 1.05, 0.45
    phi = torch.atan2(v, u) % (2 * math.pi / 5)
    phi = torch.minimum(phi, 2 * math.pi / 5 - phi)
    p1 = (ro, 0.0)
    p2 = (ri * math.cos(math.pi / 5), ri * math.sin(math.pi / 5))
    e = (p2[0] - p1[0], p2[1] - p1[1])
    num = p1[0] * e[1] - p1[1] * e[0]
    den = torch.cos(phi) * e[1] - torch.sin(phi) * e[0]
    star = r2.sqrt() <= num / den
    x, y = u * 1.2, -v * 1.2 + 0.12
    heart = (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
    return torch.stack([circle, square, tri, cross, star, heart])


def render(style_idx: torch.Tensor, object_idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Render one image per (style, object) index pair -> (N, 3, 32, 32) float in [0, 1]."""
    n = style_idx.numel()
    g = generator

    def rand(*shape):
        return torch.rand(*shape, generator=g)

    # --- geometry (all draws have fixed shapes: the stream does not depend on the labels) ---
    r = 7.0 + 4.0 * rand(n)                                  # half-size in pixels
    cx = r + 1.0 + rand(n) * (SIZE - 2 * r - 2.0)
    cy = r + 1.0 + rand(n) * (SIZE - 2 * r - 2.0)
    theta = rand(n) * 2 * math.pi
    # texture
    tex_angle = rand(n) * math.pi
    period = rand(n)                                         # mapped per style below
    phase_a = rand(n)
    phase_b = rand(n)
    grain = rand(n, SIZE, SIZE)
    # palette jitter
    dh = (rand(n) - 0.5) * 16.0
    sj = 0.9 + 0.2 * rand(n)
    vj = 0.9 + 0.12 * rand(n)
    # background
    bg_u = rand(n)
    tint = (rand(n, 3) - 0.5) * 0.08
    noise = torch.randn(n, 3, SIZE, SIZE, generator=g) * 0.02

    hi = SIZE * _SS
    coords = (torch.arange(hi, dtype=torch.float32) + 0.5) / _SS     # in 32-pixel units
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    xx, yy = xx[None], yy[None]
    dx, dy = xx - cx[:, None, None], yy - cy[:, None, None]
    c, s = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    rr = r[:, None, None]
    u = (c * dx + s * dy) / rr
    v = (-s * dx + c * dy) / rr
    masks = _shape_masks(u, v)                                        # (6, n, H, W)
    mask = masks[object_idx, torch.arange(n)].float()                 # (n, H, W)

    # --- texture mix in [0, 1] between colour A and colour B ---
    ca, sa = torch.cos(tex_angle)[:, None, None], torch.sin(tex_angle)[:, None, None]
    s1 = ca * dx + sa * dy
    s2 = -sa * dx + ca * dy
    mix = torch.zeros(n, hi, hi)
    for k, name in enumerate(STYLES):
        sel = style_idx == k
        if not bool(sel.any()):
            continue
        a1, a2 = s1[sel], s2[sel]
        p = period[sel][:, None, None]
        pa, pb = phase_a[sel][:, None, None], phase_b[sel][:, None, None]
        if name == "stripes":
            P = 4.5 + 1.5 * p
            m = (torch.sin(2 * math.pi * (a1 / P + pa)) > 0).float()
        elif name == "dots":
            P = 5.0 + 1.5 * p
            fu = torch.remainder(a1 / P + pa, 1.0) - 0.5
            fv = torch.remainder(a2 / P + pb, 1.0) - 0.5
            m = (fu * fu + fv * fv <= 0.3 ** 2).float()
        elif name == "checker":
            P = 3.0 + 1.0 * p
            m = torch.remainder(torch.floor(a1 / P + pa) + torch.floor(a2 / P + pb), 2.0)
        elif name == "gradient":
            m = torch.clamp(0.5 + a1 / (2.0 * rr[sel]), 0.0, 1.0)
        elif name == "grain":
            gr = grain[sel].repeat_interleave(_SS, 1).repeat_interleave(_SS, 2)
            m = gr
        else:  # pastel: flat
            m = torch.zeros_like(a1)
        mix[sel] = m

    pal = torch.tensor([[*_PALETTES[nm][0], *_PALETTES[nm][1]] for nm in STYLES])[style_idx]  # (n, 6)
    col_a = _hsv_to_rgb(pal[:, 0] + dh, (pal[:, 1] * sj).clamp(0, 1), (pal[:, 2] * vj).clamp(0, 1))
    col_b = _hsv_to_rgb(pal[:, 3] + dh, (pal[:, 4] * sj).clamp(0, 1), (pal[:, 5] * vj).clamp(0, 1))
    obj = col_a[:, :, None, None] * (1 - mix[:, None]) + col_b[:, :, None, None] * mix[:, None]

    # --- background: grey tone at least 0.3 away from the object's mean luminance ---
    lum = 0.5 * (_luma(col_a) + _luma(col_b))
    lo_len = (lum - 0.3 - 0.05).clamp(min=0)
    hi_len = (0.95 - (lum + 0.3)).clamp(min=0)
    t = bg_u * (lo_len + hi_len)
    bg = torch.where(t < lo_len, 0.05 + t, lum + 0.3 + (t - lo_len))
    bg_rgb = (bg[:, None] + tint).clamp(0, 1)

    img = obj * mask[:, None] + bg_rgb[:, :, None, None] * (1 - mask[:, None])
    img = F.avg_pool2d(img, _SS)
    return (img + noise).clamp(0.0, 1.0)


class Batch(NamedTuple):
    images: torch.Tensor      # (N, 3, 32, 32) float32 in [0, 1]
    styles: torch.Tensor      # (N,) int64 index into STYLES
    objects: torch.Tensor     # (N,) int64 index into OBJECTS
    prompts: list             # N strings "a {object} in {style} style"


def _generator(seed: int, split: str) -> torch.Generator:
    k = 2 * int(seed) + SPLITS.index(split)
    # splitmix-style mixing so neighbouring seeds give unrelated streams
    z = (k * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z ^= z >> 31
    return torch.Generator().manual_seed(z & 0x7FFFFFFFFFFFFFFF)


def dataset(n: int, seed: int = 0, split: str = "train", style: str | None = None,
            object: str | None = None) -> Batch:  # noqa: A002
    """``n`` procedural images with labels and prompts (images in [0, 1]).

    ``style`` / ``object`` fix that attribute (e.g. forget images of one concept); otherwise labels are
    drawn uniformly. With both unset and ``n`` a multiple of 36, every (style, object) pair appears
    equally often (in a seeded random order)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    si = _check_name(style, STYLES, "style")
    oi = _check_name(object, OBJECTS, "object")
    g = _generator(seed, split)
    pairs = torch.arange(n) % (len(STYLES) * len(OBJECTS))
    pairs = pairs[torch.randperm(n, generator=g)]
    styles = pairs // len(OBJECTS) if si is None else torch.full((n,), si, dtype=torch.long)
    objects = pairs % len(OBJECTS) if oi is None else torch.full((n,), oi, dtype=torch.long)
    images = render(styles, objects, g)
    prompts = [prompt(STYLES[a], OBJECTS[b]) for a, b in zip(styles.tolist(), objects.tolist())]
    return Batch(images, styles, objects, prompts)


def save_grid(images: torch.Tensor, path, nrow: int, scale: int = 3, pad: int = 2) -> str:
    """Save images (N, 3, H, W) in [0, 1] as a PNG grid with ``nrow`` images per row (upscaled
    ``scale`` x, nearest), atomically (temp file + os.replace)."""
    import os

    from PIL import Image

    from ..utils.io import atomic_path

    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected a (N, 3, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    if isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow: expected a positive int, got {nrow!r}")
    n, _, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    canvas = torch.ones(3, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, c = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[:, y:y + h, x:x + w] = images[i].detach().float().cpu().clamp(0, 1)
    arr = (canvas.permute(1, 2, 0) * 255).round().byte().numpy()
    img = Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return os.fspath(path)
