"""MiniCanvas: an embedded, offline benchmark of concept unlearning (UnlearnCanvas, arXiv 2402.11846,
in miniature) that runs on a laptop CPU.

6 styles x 6 objects of procedural 32x32 images, a small pixel-space diffusers ``UNet2DConditionModel``
conditioned through cross-attention on a tiny frozen text encoder, a style/object classifier, and the
UnlearnCanvas metrics (UA, IRA, CRA, retain fidelity, surrogate hit rate). Weights ship in
``spare_kernels/canvas/weights``; nothing is downloaded or trained on import.

    from spare_kernels import canvas
    unet = canvas.load_model()          # canvas.load_dit(): MiniCanvas-DiT, an SD3Transformer2DModel
    imgs = canvas.sample(unet, canvas.prompts(style="dots"), seed=0)     # (6, 3, 32, 32) in [0, 1]
    canvas.evaluate(unet, target="style:dots", surrogate="pastel")

Images are float in [0, 1] everywhere in this API (``dataset``, ``sample``, the classifier); the UNet
itself works in [-1, 1] (``x * 2 - 1``) with ``noise_scheduler()`` (DDPM, epsilon prediction).
"""
from __future__ import annotations

from .classifier import Classifier, load_classifier
from .data import OBJECTS, STYLES, Batch, dataset, render, save_grid
from .dit import load_dit
from .metrics import all_prompts, evaluate, parse_target, psnr
from .model import (DEFAULT_GUIDANCE, DEFAULT_STEPS, SCHEDULER_CONFIG, UNET_CONFIG, WEIGHTS_DIR, build_unet,
                    ddim_scheduler, encode, load_model, noise_for, noise_scheduler, sample)
from .text import MAX_LEN, VOCAB, TextEncoder, tokenize


def prompts(style: str | None = None, object: str | None = None) -> list:  # noqa: A002
    """The prompts "a {object} in {style} style" (style-major order), optionally only those naming
    ``style`` and/or ``object``."""
    from .data import _check_name, prompt

    _check_name(style, STYLES, "style")
    _check_name(object, OBJECTS, "object")
    return [prompt(s, o) for s in STYLES for o in OBJECTS
            if (style is None or s == style) and (object is None or o == object)]


def make_images(n: int, seed: int = 0, split: str = "train", style: str | None = None,
                object: str | None = None):  # noqa: A002
    """Just the images of ``dataset(...)``: (n, 3, 32, 32) float in [0, 1] (e.g. forget images)."""
    return dataset(n, seed=seed, split=split, style=style, object=object).images


__all__ = [
    "Batch", "Classifier", "DEFAULT_GUIDANCE", "DEFAULT_STEPS", "MAX_LEN", "OBJECTS", "SCHEDULER_CONFIG",
    "STYLES", "TextEncoder", "UNET_CONFIG", "VOCAB", "WEIGHTS_DIR", "all_prompts", "build_unet",
    "dataset", "ddim_scheduler", "encode", "evaluate", "load_classifier", "load_dit", "load_model", "make_images",
    "noise_for", "noise_scheduler", "parse_target", "prompts", "psnr", "render", "sample", "save_grid",
    "tokenize",
]
