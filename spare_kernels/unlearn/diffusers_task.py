"""A :class:`~spare_kernels.unlearn.task.Task` from a local diffusers Stable Diffusion directory.

Forget samples are VAE latents of the user's images, or (data-free, as PECKER) the model's own
generations for the forget prompts; retain samples are always the model's own generations for the
retain prompts (self-distillation only needs ``x_t`` where the teacher is to be kept).
"""
from __future__ import annotations

import contextlib
import glob
import json
import os

import torch

from .task import Task

_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def check_model_dir(path: str) -> None:
    """ValueError unless ``path`` is a diffusers pipeline directory with a UNet2DConditionModel."""
    if not os.path.isdir(path):
        raise ValueError(f"model: not a directory: {path!r}")
    cfg = os.path.join(path, "unet", "config.json")
    if not os.path.isfile(cfg):
        raise ValueError(f"model: {path!r} is not a diffusers pipeline directory (no unet/config.json)")
    try:
        with open(cfg) as f:
            cls = json.load(f).get("_class_name")
    except (OSError, ValueError) as e:
        raise ValueError(f"model: {cfg!r} is not a readable diffusers config ({e})") from None
    if cls != "UNet2DConditionModel":
        raise ValueError(f"model: {path!r}: unet/config.json describes a {cls!r}, expected a diffusers "
                         "UNet2DConditionModel")
    for sub in ("vae", "text_encoder", "tokenizer", "scheduler"):
        if not os.path.isdir(os.path.join(path, sub)):
            raise ValueError(f"model: {path!r} has no {sub}/ (a full Stable Diffusion pipeline directory is needed)")


_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def _failing_component(path: str):
    """``(subfolder, exception)`` of the first component that does not load on its own, or None: only
    called after the pipeline failed to load, to say which part of the folder is broken."""
    import importlib
    try:
        with open(os.path.join(path, "model_index.json")) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        return "model_index.json", e
    for sub in _COMPONENTS:
        lib, cls = (index.get(sub) or [None, None])[:2]
        if not (isinstance(lib, str) and isinstance(cls, str)):
            return "model_index.json", ValueError(f"no [library, class] entry for {sub!r}")
        try:
            getattr(importlib.import_module(lib), cls).from_pretrained(os.path.join(path, sub))
        except Exception as e:   # whatever the class raises: this component does not load
            return f"{sub}/", e
    return None


@contextlib.contextmanager
def _no_progress_bars():
    """diffusers' and transformers' loading bars off (their global switches), restored after."""
    import diffusers.utils.logging as dl
    import transformers.utils.logging as tl
    was = [(m, m.is_progress_bar_enabled()) for m in (dl, tl)]
    for m, _ in was:
        m.disable_progress_bar()
    try:
        yield
    finally:
        for m, on in was:
            if on:
                m.enable_progress_bar()


def load_pipeline(model_dir: str, progress: bool = True):
    """The StableDiffusionPipeline of a local directory (on the CPU), or ValueError naming the directory
    and what failed: a folder that passes :func:`check_model_dir` but misses files (an interrupted
    download) fails here, before anything is written or generated."""
    from diffusers import StableDiffusionPipeline

    check_model_dir(model_dir)
    with contextlib.nullcontext() if progress else _no_progress_bars():
        try:
            pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None,
                                                           requires_safety_checker=False)
        except Exception as e:   # OSError, ValueError, RuntimeError, ... depending on the component's library
            part, err = _failing_component(model_dir) or ("the pipeline", e)
            raise ValueError(f"model: {model_dir!r}: {part} does not load ({type(err).__name__}: "
                             f"{str(err).strip() or 'no message'})") from e
    # transformers builds a tokenizer with no vocabulary (every word unknown) when its vocabulary file
    # is missing; every prompt would then encode alike.
    n_tok, n_emb = len(pipe.tokenizer), pipe.text_encoder.config.vocab_size
    if n_tok < n_emb:
        raise ValueError(f"model: {model_dir!r}: tokenizer/ holds {n_tok} tokens where text_encoder/ embeds "
                         f"{n_emb} (a missing or incomplete vocabulary file?)")
    return pipe


def image_files(folder: str) -> list:
    return sorted(f for f in glob.glob(os.path.join(folder, "*")) if f.lower().endswith(_IMAGE_EXT))


def _load_images(folder: str, size: int) -> torch.Tensor:
    from PIL import Image

    files = image_files(folder)
    if not files:
        raise ValueError(f"forget images: no {'/'.join(_IMAGE_EXT)} files in {folder!r} (empty forget set)")
    out = []
    for f in files:
        im = Image.open(f).convert("RGB")
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size))
        t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3)
        out.append(t.permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(out)


def diffusers_task(model_dir, forget_prompts, surrogate_prompt, retain_prompts, images_dir=None,
                   n_generate: int = 4, seed: int = 0, resolution=None, steps: int = 20, device="cpu",
                   progress: bool = True, pipe=None):
    """``(unet, task)`` for the SPARE recipe on a local Stable Diffusion pipeline directory, the UNet
    and the task's tensors on ``device`` (generation and encoding run there too; random draws come
    from CPU generators, so a seed gives the same samples on any device up to its arithmetic).
    ``pipe``: the directory's pipeline, already loaded by :func:`load_pipeline` (default: load it)."""
    from diffusers import DDPMScheduler

    if pipe is None:
        pipe = load_pipeline(model_dir, progress)
    pipe.set_progress_bar_config(disable=not progress)
    say = print if progress else (lambda *a, **k: None)
    pipe.to(device)
    unet = pipe.unet.requires_grad_(False).eval()
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    size = resolution or unet.config.sample_size * vae_scale

    @torch.no_grad()
    def encode(prompts):
        ids = pipe.tokenizer(list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return pipe.text_encoder(ids.to(pipe.device))[0]

    @torch.no_grad()
    def generate(prompts, s, what):
        flat = [p for p in prompts for _ in range(n_generate)]
        say(f"generating {len(flat)} {what} images ({steps} steps, {size}x{size}) on {pipe.device}", flush=True)
        g = torch.Generator().manual_seed(s)
        lat = pipe(flat, num_inference_steps=steps, height=size, width=size, generator=g, output_type="latent").images
        return lat, flat

    if images_dir is not None:
        imgs = _load_images(images_dir, size)
        with torch.no_grad():
            x_f = pipe.vae.encode(imgs.to(pipe.device)).latent_dist.sample(torch.Generator().manual_seed(seed))
        x_f = x_f * pipe.vae.config.scaling_factor
        f_flat = [forget_prompts[i % len(forget_prompts)] for i in range(x_f.shape[0])]
    else:
        x_f, f_flat = generate(forget_prompts, seed, "forget")
    x_r, r_flat = generate(retain_prompts, seed + 1, "retain")
    task = Task(x_forget=x_f, c_forget=encode(f_flat), c_surrogate=encode([surrogate_prompt] * len(f_flat)),
                x_retain=x_r, c_retain=encode(r_flat), c_null=encode([""]),
                scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
                target=", ".join(forget_prompts), surrogate=surrogate_prompt,
                info={"model": os.path.abspath(model_dir), "data_free": images_dir is None})
    return unet, task
