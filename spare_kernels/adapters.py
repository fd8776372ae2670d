"""Adapters of a patched UNet: save, load, merge, unmerge, remove, scale, stack and toggle."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from typing import Iterable, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .masks import Mask
from .nn.lora import MaskedLoRAConv2d, _MaskedLoRALayer, iter_patched, thread_disabled, wrap
from .ops import _checks as chk
from .patch import _set_module, check_unet
from .utils.io import atomic_path

FORMAT = "spare_kernels.adapter/1"
_SAMPLES = 4096


def fingerprint(weight: torch.Tensor) -> str:
    """Cheap identity of a base weight: shape, dtype and 4096 evenly strided values (sha256, 16 hex)."""
    flat = weight.detach().reshape(-1)
    step = max(1, flat.numel() // _SAMPLES)
    h = hashlib.sha256(f"{tuple(weight.shape)}|{weight.dtype}".encode())
    h.update(flat[::step][:_SAMPLES].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _base_weight(m: nn.Module) -> torch.Tensor:
    """The weight a fingerprint is of: a patched layer's with its merges undone."""
    return m.unmerged_weight() if isinstance(m, _MaskedLoRALayer) else m.weight


def _layers(unet, adapter_name=None) -> list[tuple[str, _MaskedLoRALayer]]:
    check_unet(unet)
    out = [(n, m) for n, m in iter_patched(unet) if adapter_name is None or adapter_name in m.lora_A]
    if adapter_name is not None and not out:
        raise ValueError(f"adapter_name: no adapter {adapter_name!r} in the unet; it has {adapter_names(unet)}")
    return out


def adapter_names(unet) -> list[str]:
    names: list[str] = []
    for _, m in iter_patched(unet):
        names += [n for n in m.lora_A if n not in names]
    return names


# ----------------------------------------------------------------------------------- save / load
def save_adapter(unet: nn.Module, path: Union[str, os.PathLike], adapter_name: str = "default") -> str:
    """Write one adapter to ``path`` (safetensors): A, B, bit-packed masks, scale, targets and a
    fingerprint of each base weight. Written to a temporary file in the same folder, then renamed:
    a crash never leaves a half-written adapter at ``path``."""
    layers = _layers(unet, adapter_name)
    tensors, modules = {}, {}
    for name, m in layers:
        tensors[f"{name}.lora_A"] = m.lora_A[adapter_name].weight.detach().cpu().contiguous()
        tensors[f"{name}.lora_B"] = m.lora_B[adapter_name].weight.detach().cpu().contiguous()
        mask = m.masks[adapter_name]
        if mask is not None:
            tensors[f"{name}.mask"] = mask.data.cpu().contiguous()
        modules[name] = {
            "kind": "conv2d" if isinstance(m, MaskedLoRAConv2d) else "linear",
            "weight_shape": list(m.weight.shape),
            "rank": int(m.lora_A[adapter_name].weight.shape[0]),
            "scale": m.scaling[adapter_name],
            "mask": None if mask is None else {"granularity": mask.granularity, "block": mask.block},
            "fingerprint": fingerprint(m.unmerged_weight()),   # the base's, whatever is merged now
            "active": adapter_name in m.active_adapters,
        }
    meta = {"format": FORMAT, "adapter_name": adapter_name, "modules": json.dumps(modules)}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return os.fspath(path)


def read_adapter(path: Union[str, os.PathLike]) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(metadata with parsed 'modules', tensors)`` of an adapter file, validated."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no adapter file at {path!r}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types on a foreign or truncated file
        raise ValueError(f"path: {path!r} is not a readable safetensors adapter ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"path: {path!r} is not a spare_kernels adapter (format {meta.get('format')!r}, "
                         f"expected {FORMAT!r})")
    meta["modules"] = json.loads(meta["modules"])
    return meta, tensors


def load_adapter(unet: nn.Module, path, adapter_name: Optional[str] = None, strict: bool = True) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` into ``unet`` (patching the layers it names).

    Checks every target exists with the saved weight shape (always) and that the base weights carry
    the saved fingerprints (``strict=False`` turns a mismatch into a warning). Nothing changes until
    every check has passed. ``adapter_name`` renames the adapter on load."""
    check_unet(unet)
    meta, tensors = read_adapter(path)
    name = adapter_name or meta["adapter_name"]
    modules = dict(unet.named_modules())
    missing, wrong, foreign, clash = [], [], [], []
    for mod, info in meta["modules"].items():
        m = modules.get(mod)
        base = getattr(m, "base_layer", m)
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            missing.append(mod)
            continue
        if list(base.weight.shape) != info["weight_shape"]:
            wrong.append(f"{mod}: file {tuple(info['weight_shape'])} vs unet {tuple(base.weight.shape)}")
        elif info["fingerprint"] and fingerprint(_base_weight(m)) != info["fingerprint"]:
            foreign.append(mod)
        if isinstance(m, _MaskedLoRALayer) and name in m.lora_A:
            clash.append(mod)
    if missing or wrong:
        raise ValueError(f"load_adapter: {path!r} does not fit this unet: missing modules {missing[:5]}, "
                         f"shape mismatches {wrong[:5]}")
    if clash:
        raise ValueError(f"adapter_name: {name!r} already exists on {clash[:3]}...; remove_adapter() it or "
                         "pass another adapter_name")
    if foreign:
        msg = (f"load_adapter: base weights differ from those the adapter was trained on "
               f"(fingerprint mismatch) in {len(foreign)} module(s), e.g. {foreign[:3]}")
        if strict:
            raise ValueError(msg + "; pass strict=False to load anyway")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    for mod, info in meta["modules"].items():
        m = modules[mod]
        if not isinstance(m, _MaskedLoRALayer):
            if hasattr(m, "lora_A"):
                raise ValueError(f"load_adapter: {mod} carries peft LoRA layers; patch_unet(unet) first")
            m = wrap(m)
            _set_module(unet, mod, m)
        dev = m.weight.device
        A = tensors[f"{mod}.lora_A"].to(dev)
        B = tensors[f"{mod}.lora_B"].to(dev)
        mask = None
        if info["mask"] is not None:
            mask = Mask(info["mask"]["granularity"], info["weight_shape"], tensors[f"{mod}.mask"].to(dev),
                        tuple(info["mask"]["block"] or (32, 32)))
        m.add_adapter(name, info["rank"], info["scale"], mask=mask, lora_A=A, lora_B=B,
                      active=info.get("active", True))
    return unet


# ----------------------------------------------------------------------------------- run-time control
def merge_adapter(unet: nn.Module, adapter_name: str = "default") -> None:
    """Fold ``adapter_name`` into the base weights (bit-exactly reversible by :func:`unmerge_adapter`)."""
    for _, m in _layers(unet, adapter_name):
        m.merge(adapter_name)


def unmerge_adapter(unet: nn.Module, adapter_name: Optional[str] = None) -> None:
    """Restore the base weights bit-exactly (``None``: undo every merge)."""
    for _, m in _layers(unet, adapter_name):
        if adapter_name is None or adapter_name in m.merged_adapters:
            m.unmerge(adapter_name)


def remove_adapter(unet: nn.Module, adapter_name: str) -> None:
    for _, m in _layers(unet, adapter_name):
        m.remove_adapter(adapter_name)


def set_adapter_scale(unet: nn.Module, adapter_name: str, scale: float) -> None:
    """Set the adapter's multiplier ``s`` in ``W + s·M⊙(B·A)`` (patch_unet sets ``alpha / rank``)."""
    chk.scale("set_adapter_scale", scale)
    for _, m in _layers(unet, adapter_name):
        m.set_scale(adapter_name, scale)


def set_active_adapters(unet: nn.Module, adapter_names_: Union[str, Iterable[str]]) -> None:
    """Exactly these adapters are on (in this order, where a layer carries them); the rest are off."""
    names = [adapter_names_] if isinstance(adapter_names_, str) else list(adapter_names_)
    known = adapter_names(unet)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"adapter_names: {unknown} not in the unet; it has {known}")
    for _, m in _layers(unet):
        m.active_adapters = [n for n in names if n in m.lora_A]


def enable_adapter(unet: nn.Module, adapter_name: str, enabled: bool = True) -> None:
    """Switch one adapter on or off, leaving the others as they are."""
    for _, m in _layers(unet, adapter_name):
        if enabled and adapter_name not in m.active_adapters:
            m.active_adapters.append(adapter_name)
        elif not enabled and adapter_name in m.active_adapters:
            m.active_adapters.remove(adapter_name)


@contextlib.contextmanager
def disable_adapters(unet: nn.Module, this_thread: bool = False):
    """Every adapter off inside the block (the frozen teacher of self-distillation): no weight is copied.

    ``this_thread=True``: off for forwards run by the calling thread only, so a teacher forward in a
    worker thread can overlap the student's forward of the same modules in another thread."""
    layers = _layers(unet)
    merged = [n for n, m in layers if m.merged_adapters]
    if merged:
        raise RuntimeError(f"disable_adapters: adapters are merged in {merged[:3]}; unmerge_adapter() first")
    if this_thread:
        off = thread_disabled()
        for _, m in layers:
            off[id(m)] = off.get(id(m), 0) + 1
        try:
            yield unet
        finally:
            for _, m in layers:
                off[id(m)] -= 1
                if not off[id(m)]:
                    del off[id(m)]
        return
    prev = [m.adapters_disabled for _, m in layers]
    for _, m in layers:
        m.adapters_disabled = True
    try:
        yield unet
    finally:
        for (_, m), p in zip(layers, prev):
            m.adapters_disabled = p
