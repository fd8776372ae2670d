"""A :class:`~spare_kernels.unlearn.task.Task` from a local diffusers pipeline directory: Stable
Diffusion 1.x/2.x, SDXL, SD3/SD3.5, Flux, PixArt-alpha/-Sigma or Sana, recognised by the pipeline class
its ``model_index.json`` names.

Forget samples are VAE latents of the user's images, or (data-free, as PECKER) the model's own
generations for the forget prompts; retain samples are always the model's own generations for the
retain prompts (self-distillation only needs ``x_t`` where the teacher is to be kept). Samples are in
the space the denoiser is trained in: the pipeline's latents (``output_type="latent"``: scaled, and
for SD3/Flux shifted, ``(z - shift_factor) * scaling_factor``; Flux's unpacked from its 2x2 tokens to
``(N, C, h, w)``). Conditions come from the pipeline's own ``encode_prompt`` with the settings its
``__call__`` uses by default (sequence lengths, Sana's instruction prefix), packed one tensor per
sample by the family's :class:`~spare_kernels.unlearn.denoiser.Denoiser`.
"""
from __future__ import annotations

import contextlib
import glob
import inspect
import json
import math
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from .denoiser import Denoiser
from .objective import objective_for
from .task import Task

# The forget images a folder gives (any letter case): the one list the loader, its check and the CLI's help use.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class _Kind:
    family: str                    # the Denoiser family
    label: str                     # what a user calls it
    denoisers: Tuple[str, ...]     # the model class names model_index.json may give the denoiser
    required: Tuple[str, ...]      # components the recipe uses
    optional: Tuple[str, ...] = ()  # used when present; the pipeline runs without them (given as None)


_SD_TEXT = ("vae", "text_encoder", "tokenizer", "scheduler")
# model_index.json's ``_class_name`` -> how the recipe reads the folder.
PIPELINES: Dict[str, _Kind] = {
    "StableDiffusionPipeline": _Kind("unet", "Stable Diffusion 1.x/2.x", ("UNet2DConditionModel",),
                                     ("unet",) + _SD_TEXT),
    "StableDiffusionXLPipeline": _Kind("sdxl", "SDXL", ("UNet2DConditionModel",),
                                       ("unet",) + _SD_TEXT + ("text_encoder_2", "tokenizer_2")),
    # SD3's T5 is optional: without it the pipeline puts zeros where its embeddings would be.
    "StableDiffusion3Pipeline": _Kind("sd3", "SD3/SD3.5", ("SD3Transformer2DModel",),
                                      ("transformer",) + _SD_TEXT + ("text_encoder_2", "tokenizer_2"),
                                      ("text_encoder_3", "tokenizer_3")),
    "FluxPipeline": _Kind("flux", "Flux", ("FluxTransformer2DModel",),
                          ("transformer",) + _SD_TEXT + ("text_encoder_2", "tokenizer_2")),
    # Transformer2DModel: older PixArt-alpha folders; diffusers maps it to PixArtTransformer2DModel.
    "PixArtAlphaPipeline": _Kind("pixart", "PixArt-alpha", ("PixArtTransformer2DModel", "Transformer2DModel"),
                                 ("transformer",) + _SD_TEXT),
    "PixArtSigmaPipeline": _Kind("pixart", "PixArt-Sigma", ("PixArtTransformer2DModel", "Transformer2DModel"),
                                 ("transformer",) + _SD_TEXT),
    "SanaPipeline": _Kind("sana", "Sana", ("SanaTransformer2DModel",), ("transformer",) + _SD_TEXT),
}


def supported() -> str:
    return ", ".join(f"{c} ({k.label})" for c, k in PIPELINES.items())


@dataclass(frozen=True)
class Layout:
    """What :func:`check_model_dir` found in a pipeline directory, before anything is loaded."""
    path: str
    pipeline: str                          # the pipeline class name
    family: str
    used: Dict[str, str]                   # component -> its class, as model_index.json names it
    absent: Tuple[str, ...] = ()           # optional components not in the folder (loaded as None)
    ignored: Tuple[str, ...] = ()          # components in the folder the recipe does not use (loaded as None)
    multiple: int = 8                      # image sizes must be multiples of this (_size_multiple)
    note: str = ""

    @property
    def denoiser(self) -> str:
        return "unet" if "unet" in self.used else "transformer"

    def describe(self) -> str:
        kind = PIPELINES[self.pipeline]
        lines = [f"model: {self.path} is a {self.pipeline} ({kind.label}: {self.used[self.denoiser]}, "
                 f"family {self.family}){self.note}",
                 f"  uses:    {', '.join(self.used)}"]
        if self.absent:
            why = " (optional: the T5 embeddings are zeros, as the pipeline runs without T5)" \
                if "text_encoder_3" in self.absent else " (optional)"
            lines.append(f"  absent:  {', '.join(self.absent)}{why}")
        if self.ignored:
            lines.append(f"  ignored: {', '.join(self.ignored)} (not used for unlearning)")
        return "\n".join(lines)


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            out = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"model: {what} is not a readable diffusers config ({e})") from None
    if not isinstance(out, dict):
        raise ValueError(f"model: {what} is not a readable diffusers config (not a JSON object)")
    return out


def _entry(index: dict, name: str):
    """``(library, class)`` of a model_index.json component, or None where it is missing or null."""
    v = index.get(name)
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, str) for x in v):
        return tuple(v)
    return None


# What each pipeline's check_inputs demands of height and width besides the latent grid's own multiple
# (the VAE factor times the patch): SD, SDXL and PixArt 8 px, Sana 32 px.
_PIPELINE_MULTIPLE = {"unet": 8, "sdxl": 8, "pixart": 8, "sana": 32}


def _size_multiple(family: str, vae_factor: int, patch: int) -> int:
    """Flux packs 2x2 latents into tokens whatever its patch_size says."""
    return math.lcm(_PIPELINE_MULTIPLE.get(family, 1), vae_factor * (2 if family == "flux" else patch))


def _config(path: str, sub: str) -> dict:
    """``sub/config.json`` of a pipeline folder, or {} where it is missing or unreadable."""
    try:
        with open(os.path.join(path, sub, "config.json")) as f:
            out = json.load(f)
        return out if isinstance(out, dict) else {}
    except (OSError, ValueError):
        return {}


def _vae_factor(path: str) -> int:
    """The VAE's downsampling factor from its config (8 where it does not say)."""
    vae = _config(path, "vae")
    blocks = vae.get("block_out_channels") or vae.get("encoder_block_out_channels")
    return 2 ** (len(blocks) - 1) if isinstance(blocks, list) and blocks else 8


def _multiple(path: str, family: str, denoiser: str) -> int:
    """:func:`_size_multiple` from the folder's configs (a VAE factor of 8 where they do not say)."""
    return _size_multiple(family, _vae_factor(path), int(_config(path, denoiser).get("patch_size") or 1))


def check_model_dir(path: str) -> Layout:
    """The :class:`Layout` of a local diffusers pipeline directory, or ValueError naming what is wrong:
    not a directory, no ``model_index.json``, a pipeline class not supported (the error lists those
    that are), a component the recipe needs missing from the index or the folder."""
    if not os.path.isdir(path):
        raise ValueError(f"model: not a directory: {path!r}")
    index_path = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_path):
        return _legacy_layout(path)
    index = _read_json(index_path, repr(index_path))
    cls = index.get("_class_name")
    if cls not in PIPELINES:
        raise ValueError(f"model: {path!r}: model_index.json names the pipeline class {cls!r}, not one this "
                         f"command reads; supported: {supported()}")
    kind = PIPELINES[cls]
    used, absent = {}, []
    for name in kind.required:
        e = _entry(index, name)
        if e is None:
            raise ValueError(f"model: {path!r}: model_index.json lists no {name} (a {cls} needs one)")
        if not os.path.isdir(os.path.join(path, name)):
            raise ValueError(f"model: {path!r} has no {name}/ (the {cls}'s {e[1]}: an incomplete download?)")
        used[name] = e[1]
    present = [n for n in kind.optional if _entry(index, n) and os.path.isdir(os.path.join(path, n))]
    if present and len(present) < len(kind.optional):   # a text encoder without its tokenizer, or the reverse
        miss = [n for n in kind.optional if n not in present]
        raise ValueError(f"model: {path!r} has {', '.join(present)} but no {', '.join(miss)}/ (give both or neither)")
    for n in kind.optional:
        if n in present:
            used[n] = _entry(index, n)[1]
        else:
            absent.append(n)
    denoiser = "unet" if "unet" in used else "transformer"
    if used[denoiser] not in kind.denoisers:
        raise ValueError(f"model: {path!r}: model_index.json gives the {cls} a {used[denoiser]!r} {denoiser}, "
                         f"expected {' or '.join(kind.denoisers)}")
    ignored = tuple(n for n in index if not n.startswith("_") and n not in used and n not in absent
                    and _entry(index, n) is not None)
    return Layout(path, cls, kind.family, used, tuple(absent), ignored, _multiple(path, kind.family, denoiser))


def _legacy_layout(path: str) -> Layout:
    """A folder with no model_index.json but a Stable Diffusion layout: recognised here as before (its
    loading fails on the missing index, naming it)."""
    cfg = os.path.join(path, "unet", "config.json")
    if not os.path.isfile(cfg):
        raise ValueError(f"model: {path!r} is not a diffusers pipeline directory (no model_index.json)")
    cls = _read_json(cfg, repr(cfg)).get("_class_name")
    if cls != "UNet2DConditionModel":
        raise ValueError(f"model: {path!r}: unet/config.json describes a {cls!r}, expected a diffusers "
                         "UNet2DConditionModel")
    for sub in _SD_TEXT:
        if not os.path.isdir(os.path.join(path, sub)):
            raise ValueError(f"model: {path!r} has no {sub}/ (a full Stable Diffusion pipeline directory is needed)")
    return Layout(path, "StableDiffusionPipeline", "unet", {"unet": cls, **{s: "?" for s in _SD_TEXT}},
                  multiple=_multiple(path, "unet", "unet"), note=" (no model_index.json)")


# ------------------------------------------------------------------------------ memory, up front
def _with_class_defaults(cfg: dict) -> dict:
    """A denoiser's config.json with its class's defaults where it says nothing (what from_pretrained
    builds)."""
    import diffusers
    cls = getattr(diffusers, str(cfg.get("_class_name")), None)
    if cls is None:
        return dict(cfg)
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty} | cfg


def _per_level(v, n):
    """A UNet config value given once or per level, as a list of ``n``."""
    return list(v) if isinstance(v, (list, tuple)) else [v] * n


def activation_bytes(family: str, cfg: dict, latent: int, batch: int, bytes_per_value: int) -> int:
    """A lower bound of the activations one training forward of the denoiser (``cfg``: its config)
    keeps for the backward, at a ``latent`` x ``latent`` grid for ``batch`` samples, counting only
    tensors of the grid's size times the width: on a UNet six per ResNet (norm, SiLU and convolution
    inputs) and sixteen per attention layer (norms, projections, q/k/v, the feed-forward), on a
    transformer twelve of tokens x hidden size per block. Measured on small models the real peak is
    2-3x this; it grows with the pixels, which is what refuses a size far past the memory at hand."""
    area = float(latent) * latent
    if family in ("unet", "sdxl"):
        chans = list(cfg.get("block_out_channels") or ())
        n = len(chans)
        layers = _per_level(cfg.get("layers_per_block", 2), n)
        depth = _per_level(cfg.get("transformer_layers_per_block", 1), n)
        down, up = list(cfg.get("down_block_types") or ()), list(cfg.get("up_block_types") or ())[::-1]
        per = 0.0
        for i, (c, lpb) in enumerate(zip(chans, layers)):
            # a level: its down ResNets and one more on the way up, at a quarter of the grid above's;
            # attention after each ResNet of a cross-attention block
            attn = lpb * ("CrossAttn" in str(down[i:i + 1])) + (lpb + 1) * ("CrossAttn" in str(up[i:i + 1]))
            d = depth[i] if isinstance(depth[i], int) else 1
            per += c * area / 4 ** i * (6 * (2 * lpb + 1) + 16 * attn * d)
    else:
        patch = 2 if family == "flux" else int(cfg.get("patch_size") or 1)   # Flux packs 2x2 latents
        tokens = area / (patch * patch)
        hidden = int(cfg.get("num_attention_heads") or 0) * int(cfg.get("attention_head_dim") or 0)
        blocks = int(cfg.get("num_layers") or 0) + int(cfg.get("num_single_layers") or 0)
        per = 12 * tokens * hidden * blocks
    return int(per * batch * bytes_per_value)


def _weight_bytes(path: str, subs) -> int:
    """The size on disk of the weights of the components ``subs``: in each folder the smallest set
    (safetensors or bin, each variant apart) of those from_pretrained may pick."""
    total = 0
    for sub in subs:
        groups: Dict[tuple, int] = {}
        d = os.path.join(path, sub)
        for name in (os.listdir(d) if os.path.isdir(d) else ()):
            stem, ext = os.path.splitext(name)
            if ext not in (".safetensors", ".bin", ".pt", ".pth", ".ckpt"):
                continue
            variant = stem.rsplit(".", 1)[1] if "." in stem else None
            key = (ext == ".safetensors", variant)
            groups[key] = groups.get(key, 0) + os.path.getsize(os.path.join(d, name))
        total += min(groups.values(), default=0)
    return total


def step_memory(layout: Layout, size: Optional[int], batch: int, bytes_per_value: int = 4) -> Optional[dict]:
    """What one training step on the pipeline folder of ``layout`` needs at least, from its configs
    and before anything is loaded: ``{"size", "latent", "activations", "weights", "total"}`` in bytes
    (``size``: the image size, None for the pipeline's default; -> None where the configs do not
    tell it)."""
    cfg = _with_class_defaults(_config(layout.path, layout.denoiser))
    factor = _vae_factor(layout.path)
    if size is None:   # the pipeline's default: its denoiser's sample size (Flux's pipeline: 128) x the VAE factor
        sample = 128 if layout.family == "flux" else cfg.get("sample_size")
        if not isinstance(sample, int):
            return None
        size = sample * factor
    latent = size // factor
    act = activation_bytes(layout.family, cfg, latent, batch, bytes_per_value)
    weights = _weight_bytes(layout.path, layout.used)
    return {"size": size, "latent": latent, "activations": act, "weights": weights, "total": act + weights}


def _failing_component(path: str, layout: Layout):
    """``(subfolder, exception)`` of the first used component that does not load on its own, or None:
    only called after the pipeline failed to load, to say which part of the folder is broken."""
    import importlib
    try:
        with open(os.path.join(path, "model_index.json")) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        return "model_index.json", e
    for sub in layout.used:
        lib, cls = _entry(index, sub) or (None, None)
        if lib is None:
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


# (tokenizer, text encoder) pairs a pipeline may hold
_TEXT_PAIRS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"), ("tokenizer_3", "text_encoder_3"))


def load_pipeline(model_dir: str, progress: bool = True):
    """The pipeline of a local directory (on the CPU), its family's class with the components the
    recipe does not use (safety checker, feature extractor, image encoder) and the optional ones the
    folder lacks (SD3's T5) given as None; ``progress``: say first what was recognised (one block) and
    show the loading bars. ValueError naming the directory and what failed: a folder that passes
    :func:`check_model_dir` but misses files (an interrupted download) fails here, before anything is
    written or generated."""
    import diffusers

    layout = check_model_dir(model_dir)
    if progress:
        print(layout.describe(), flush=True)
    cls = getattr(diffusers, layout.pipeline)
    params = inspect.signature(cls.__init__).parameters
    none = {n: None for n in layout.absent + layout.ignored if n in params}
    if "requires_safety_checker" in params:
        none["requires_safety_checker"] = False
    with contextlib.nullcontext() if progress else _no_progress_bars():
        try:
            pipe = cls.from_pretrained(model_dir, **none)
        except Exception as e:   # OSError, ValueError, RuntimeError, ... depending on the component's library
            part, err = _failing_component(model_dir, layout) or ("the pipeline", e)
            raise ValueError(f"model: {model_dir!r}: {part} does not load ({type(err).__name__}: "
                             f"{str(err).strip() or 'no message'})") from e
    # transformers builds a tokenizer with no vocabulary (every word unknown) when its vocabulary file
    # is missing; every prompt would then encode alike. Text encoders may pad their tables a little
    # (T5's 32100 tokens embed 32128 rows): more than 1% short is a broken tokenizer.
    for tn, en in _TEXT_PAIRS:
        tok, enc = getattr(pipe, tn, None), getattr(pipe, en, None)
        if tok is None or enc is None:
            continue
        n_tok, n_emb = len(tok), enc.get_input_embeddings().num_embeddings
        if n_tok < n_emb - n_emb // 100:
            raise ValueError(f"model: {model_dir!r}: {tn}/ holds {n_tok} tokens where {en}/ embeds {n_emb} "
                             "(a missing or incomplete vocabulary file?)")
    return pipe


def image_files(folder: str) -> list:
    return sorted(f for f in glob.glob(os.path.join(folder, "*")) if f.lower().endswith(IMAGE_EXTENSIONS))


def _forget_files(folder: str, what: str) -> list:
    """:func:`image_files`, refused where there are none: the one check (and message) of an empty
    forget folder, for the CLI's early check and the loader alike."""
    files = image_files(folder)
    if not files:
        raise ValueError(f"{what}: forget set: empty: no {'/'.join(IMAGE_EXTENSIONS)} files in {folder!r}")
    return files


def _open_rgb(path: str, what: str = "forget images"):
    """The image at ``path``, decoded whole, as RGB; ValueError naming the file where it does not decode."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:   # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise ValueError(f"{what}: {path!r} is not a readable image ({type(e).__name__}: "
                         f"{str(e).strip() or 'no message'})") from None


def check_images(folder: str, what: str = "forget images") -> int:
    """Decode every image file of ``folder`` (what :func:`diffusers_task` will load), before anything
    is loaded or written: ValueError naming the first that does not decode, or the folder where it holds
    none. -> how many there are.

    :func:`diffusers_task` decodes them again when it loads them: keeping the decoded images from this
    check (before the pipeline loads; a jobs sweep checks every job's up front) until then would hold
    them all in memory through the loading, or through a whole sweep."""
    files = _forget_files(folder, what)
    for f in files:
        _open_rgb(f, what)
    return len(files)


def _load_images(folder: str, size: int) -> torch.Tensor:
    out = []
    for f in _forget_files(folder, "forget images"):
        im = _open_rgb(f)
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size))
        t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3)
        out.append(t.permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(out)


def pipeline_family(pipe) -> str:
    """The Denoiser family of a loaded pipeline, by its class (or a base class) name."""
    for c in type(pipe).__mro__:
        if c.__name__ in PIPELINES:
            return PIPELINES[c.__name__].family
    raise ValueError(f"pipe: a {type(pipe).__name__} is not one of the supported pipelines: {supported()}")


def _call_default(pipe, name):
    """The default of ``name`` in the pipeline's ``__call__`` (what a plain generation uses)."""
    p = inspect.signature(type(pipe).__call__).parameters.get(name)
    return None if p is None or p.default is inspect.Parameter.empty else p.default


def _clean_caption(pipe) -> bool:
    """PixArt's default caption cleaning, where its libraries are present (the pipeline turns it off,
    with a warning per call, where they are not)."""
    from diffusers.utils import is_bs4_available, is_ftfy_available
    return bool(_call_default(pipe, "clean_caption")) and is_bs4_available() and is_ftfy_available()


@torch.no_grad()
def encode_parts(pipe, family: str, prompts, null: bool = False, size: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """The named condition parts (``seq``, ``pooled``, ``time_ids``, ``mask``) of ``prompts`` by the
    pipeline's own ``encode_prompt``, without classifier-free guidance. ``null``: the pipeline's
    unconditional branch instead (the negative output of ``encode_prompt`` for one prompt): the empty
    prompt's encoding, zeros where SDXL's ``force_zeros_for_empty_prompt`` says so, and Sana's empty
    prompt without the instruction prefix, as the pipelines guide. ``size``: the image size (SDXL's
    size conditions)."""
    dev = pipe._execution_device
    prompts = [""] if null else list(prompts)
    cfg = null and family != "flux"   # Flux has no unconditional branch: the empty prompt itself
    msl = _call_default(pipe, "max_sequence_length")
    if family == "unet":
        pos, neg = pipe.encode_prompt(prompts, dev, 1, cfg)
        return {"seq": neg if cfg else pos}
    if family == "sdxl":
        pe, ne, pp, npp = pipe.encode_prompt(prompts, device=dev, num_images_per_prompt=1, do_classifier_free_guidance=cfg)
        seq, pooled = (ne, npp) if cfg else (pe, pp)
        proj = int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
        hw = (size, size)
        ids = pipe._get_add_time_ids(hw, (0, 0), hw, dtype=seq.dtype, text_encoder_projection_dim=proj)
        return {"seq": seq, "pooled": pooled, "time_ids": ids.to(dev).expand(seq.shape[0], -1)}
    if family == "sd3":
        pe, ne, pp, npp = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=dev,
                                             num_images_per_prompt=1, do_classifier_free_guidance=cfg,
                                             max_sequence_length=msl)
        return {"seq": ne, "pooled": npp} if cfg else {"seq": pe, "pooled": pp}
    if family == "flux":
        pe, pp, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=dev, num_images_per_prompt=1,
                                       max_sequence_length=msl)
        return {"seq": pe, "pooled": pp}
    kw = {"complex_human_instruction": _call_default(pipe, "complex_human_instruction")} if family == "sana" else {}
    pe, pm, ne, nm = pipe.encode_prompt(prompts, do_classifier_free_guidance=cfg, negative_prompt="",
                                        num_images_per_prompt=1, device=dev, clean_caption=_clean_caption(pipe),
                                        max_sequence_length=msl, **kw)
    seq, mask = (ne, nm) if cfg else (pe, pm)
    return {"seq": seq, "mask": mask.to(seq.dtype)}


_ORDER = {"unet": ("seq",), "sdxl": ("seq", "pooled", "time_ids"), "sd3": ("seq", "pooled"),
          "flux": ("seq", "pooled"), "pixart": ("seq", "mask"), "sana": ("seq", "mask")}


def family_denoiser(pipe, family: str, parts: Dict[str, torch.Tensor]) -> Denoiser:
    """The family's Denoiser, its condition fields sized from one encoding's ``parts``; Flux's
    distilled guidance is the pipeline's default ``guidance_scale`` where the transformer embeds it."""
    if family == "unet":
        return Denoiser("unet", vae_scale=pipe.vae_scale_factor)
    fields = [(n, tuple(parts[n].shape[1:])) for n in _ORDER[family]]
    guidance = None
    if family == "flux" and getattr(pipe.transformer.config, "guidance_embeds", False):
        guidance = float(_call_default(pipe, "guidance_scale"))
    return Denoiser(family, fields, guidance=guidance, vae_scale=pipe.vae_scale_factor)


def denoiser_model(pipe):
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def default_size(pipe) -> int:
    """The pipeline's default image size (its ``__call__``'s): the sample size times the VAE factor."""
    base = getattr(pipe, "default_sample_size", None) or denoiser_model(pipe).config.sample_size
    return int(base) * pipe.vae_scale_factor


def size_multiple(pipe, family: str) -> int:
    """The pixel multiple the pipeline's image sizes need (its checks, the latent grid, the patches)."""
    return _size_multiple(family, pipe.vae_scale_factor, int(getattr(denoiser_model(pipe).config, "patch_size", None) or 1))


@torch.no_grad()
def vae_latents(pipe, family: str, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Model-space latents of pixels in [-1, 1]: a sample of the VAE's posterior (AutoencoderDC: its
    deterministic latent), mapped as the pipeline's decoding maps back in reverse:
    ``(z - shift_factor) * scaling_factor`` (no shift where the config has none), or for SDXL with
    ``latents_mean``/``latents_std`` in its VAE config ``(z - mean) * scaling_factor / std``."""
    vae = pipe.vae
    enc = vae.encode(images.to(pipe._execution_device, vae.dtype))
    z = enc.latent_dist.sample(gen) if hasattr(enc, "latent_dist") else enc.latent
    cfg = vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if family == "sdxl" and mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        mean = torch.tensor(mean, dtype=z.dtype, device=z.device).view(shape)
        std = torch.tensor(std, dtype=z.dtype, device=z.device).view(shape)
        return (z - mean) * cfg.scaling_factor / std
    return (z - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor


@torch.no_grad()
def generated_latents(pipe, family: str, prompts, size: int, steps: int, gen: torch.Generator) -> torch.Tensor:
    """The pipeline's generations for ``prompts`` as model-space latents ``(N, C, h, w)``."""
    kw = {}
    if family in ("pixart", "sana"):   # the exact size asked for, not the nearest of the model's aspect-ratio bins
        kw = {"use_resolution_binning": False, "clean_caption": _clean_caption(pipe)}
    lat = pipe(list(prompts), num_inference_steps=steps, height=size, width=size, generator=gen,
               output_type="latent", **kw).images
    if family == "flux":   # packed 2x2 tokens (N, hw/4, 4C)
        lat = pipe._unpack_latents(lat, size, size, pipe.vae_scale_factor)
    return lat


def diffusers_task(model_dir, forget_prompts, surrogate_prompt, retain_prompts, images_dir=None,
                   n_generate: int = 4, seed: int = 0, resolution=None, steps: int = 20, device="cpu",
                   progress: bool = True, pipe=None):
    """``(model, task)`` for the SPARE recipe on a local pipeline directory of any supported family
    (``model``: the pipeline's UNet or transformer), the model and the task's tensors on ``device``
    (generation and encoding run there too; random draws come from CPU generators, so a seed gives the
    same samples on any device up to its arithmetic). ``pipe``: the directory's pipeline, already
    loaded by :func:`load_pipeline` (default: load it). ``resolution``: the image size (default the
    pipeline's); ``steps``: inference steps of the generations."""
    if pipe is None:
        pipe = load_pipeline(model_dir, progress)
    family = pipeline_family(pipe)
    pipe.set_progress_bar_config(disable=not progress)
    say = print if progress else (lambda *a, **k: None)
    pipe.to(device)
    model = denoiser_model(pipe).requires_grad_(False).eval()
    size = resolution or default_size(pipe)
    m = size_multiple(pipe, family)
    if size % m:
        raise ValueError(f"resolution: the {type(pipe).__name__} needs a multiple of {m}, got {size}")

    parts_cache: Dict[str, Dict[str, torch.Tensor]] = {}

    def parts_of(prompts):
        new = [p for p in dict.fromkeys(prompts) if p not in parts_cache]
        if new:
            got = encode_parts(pipe, family, new, size=size)
            for i, p in enumerate(new):
                parts_cache[p] = {k: v[i:i + 1] for k, v in got.items()}
        return {k: torch.cat([parts_cache[p][k] for p in prompts]) for k in parts_cache[prompts[0]]}

    null = encode_parts(pipe, family, [], null=True, size=size)
    den = family_denoiser(pipe, family, null)

    def encode(prompts):
        return den.pack(**parts_of(list(prompts)))

    def generate(prompts, s, what):
        flat = [p for p in prompts for _ in range(n_generate)]
        say(f"generating {len(flat)} {what} images ({steps} steps, {size}x{size}) on {pipe.device}", flush=True)
        return generated_latents(pipe, family, flat, size, steps, torch.Generator().manual_seed(s)), flat

    if images_dir is not None:
        x_f = vae_latents(pipe, family, _load_images(images_dir, size), torch.Generator().manual_seed(seed))
        f_flat = [forget_prompts[i % len(forget_prompts)] for i in range(x_f.shape[0])]
    else:
        x_f, f_flat = generate(forget_prompts, seed, "forget")
    x_r, r_flat = generate(retain_prompts, seed + 1, "retain")
    h, w = x_f.shape[-2:]
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)   # a fresh one: generation set its steps
    task = Task(x_forget=x_f, c_forget=encode(f_flat), c_surrogate=encode([surrogate_prompt] * len(f_flat)),
                x_retain=x_r, c_retain=encode(r_flat), c_null=den.pack(**null), scheduler=scheduler,
                target=", ".join(forget_prompts), surrogate=surrogate_prompt,
                info={"model": os.path.abspath(model_dir), "data_free": images_dir is None,
                      "pipeline": type(pipe).__name__, "family": family, "resolution": size},
                objective=objective_for(scheduler, image_seq_len=(h // 2) * (w // 2)), denoiser=den)
    return model, task


__all__ = ["IMAGE_EXTENSIONS", "Layout", "PIPELINES", "activation_bytes", "check_images", "check_model_dir",
           "default_size", "denoiser_model", "diffusers_task", "encode_parts", "family_denoiser", "generated_latents",
           "image_files", "load_pipeline", "pipeline_family", "size_multiple", "step_memory", "supported",
           "vae_latents"]
