"""``patch_unet`` / ``unpatch_unet``: swap a diffusers UNet's layers for fused masked-LoRA modules."""
from __future__ import annotations

import difflib
import math
from typing import Optional

import torch
from torch import nn

from .masks import Mask, as_mask
from .nn.lora import INITS, _MaskedLoRALayer, check_base, iter_patched, wrap
from .targets import ATTENTION_TARGETS, PRESETS, Targets, target_predicate  # noqa: F401 (re-exported)

_FLAGS = "_spare_kernels_requires_grad"


def _is_peft_lora(m: nn.Module) -> bool:
    return (hasattr(m, "base_layer") and isinstance(getattr(m, "lora_A", None), nn.ModuleDict)
            and hasattr(m, "scaling") and not isinstance(m, _MaskedLoRALayer))


def check_unet(unet) -> nn.Module:
    if not isinstance(unet, nn.Module):
        hint = "; pass pipe.unet" if hasattr(unet, "unet") else ""
        raise TypeError(f"unet: expected a torch.nn.Module such as diffusers' UNet2DConditionModel, "
                        f"got {type(unet).__name__}{hint}")
    return unet


def _candidates(unet: nn.Module) -> dict[str, nn.Module]:
    """Adaptable layers by qualified name: plain Linear/Conv2d, peft LoRA layers, our patched layers
    (never the base layer inside a wrapper)."""
    out, inside = {}, []
    for name, m in unet.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, _MaskedLoRALayer) or _is_peft_lora(m):
            out[name] = m
            inside.append(name)
        elif type(m) in (nn.Linear, nn.Conv2d):
            out[name] = m
    return out


def _nearest(words, names, n=5):
    hits = []
    for w in words:
        hits += difflib.get_close_matches(w, names, n=n, cutoff=0.3)
    return sorted(set(hits))[:n] or names[:n]


def _from_peft(m: nn.Module) -> _MaskedLoRALayer:
    """A peft LoRA layer as a fused module carrying the very same A/B parameters."""
    if getattr(m, "merged", False) or getattr(m, "merged_adapters", []):
        raise ValueError("unet: a peft LoRA layer has merged adapters; unmerge them before patching")
    base = m.base_layer
    new = wrap(base)
    for name in m.lora_A:
        drop = m.lora_dropout[name] if name in getattr(m, "lora_dropout", {}) else None
        if drop is not None and not isinstance(drop, nn.Identity) and getattr(drop, "p", 0) > 0:
            raise ValueError(f"unet: peft adapter {name!r} uses lora_dropout={drop.p}; the fused op has no input "
                             "dropout (use lora_dropout=0)")
        if getattr(m, "use_dora", {}).get(name) or getattr(m, "lora_bias", {}).get(name):
            raise ValueError(f"unet: peft adapter {name!r} uses DoRA or lora_bias, which the fused op does not model")
        A, B = m.lora_A[name].weight, m.lora_B[name].weight
        if isinstance(base, nn.Conv2d) and (m.lora_B[name].groups != 1 or tuple(A.shape[1:2]) !=
                                            (base.in_channels // base.groups,)):
            raise ValueError(f"unet: peft conv adapter {name!r} on a grouped conv has a different layout")
        new.add_adapter(name, A.shape[0], m.scaling[name], lora_A=A, lora_B=B,
                        active=name in m.active_adapters)
    new.adapters_disabled = bool(getattr(m, "disable_adapters", False))
    new.set_original(m)
    return new


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _normalise_masks(masks, carriers: dict[str, torch.Tensor], adapter_name: str) -> dict[str, Mask]:
    """``carriers``: module name -> weight of every module that will carry ``adapter_name``. Every mask
    becomes a ``Mask`` on its weight's device here, before the UNet is changed: a bad one (wrong dtype,
    shape, a meta tensor) is refused with nothing swapped or frozen."""
    if masks is None:
        return {}
    if not isinstance(masks, dict):
        raise TypeError(f"masks: expected a dict of parameter name -> Mask/bool tensor, got {type(masks).__name__}")
    out, bad = {}, []
    for key, m in masks.items():
        if not isinstance(key, str):
            raise TypeError(f"masks: expected parameter names (str) as keys, got {key!r}")
        mod = key[:-len(".weight")] if key.endswith(".weight") else None
        if mod is not None and mod.endswith(".base_layer"):
            mod = mod[:-len(".base_layer")]
        if mod not in carriers:
            bad.append(key)
            continue
        w = carriers[mod]
        out[mod] = as_mask(m, w.shape, w.device, name=f"masks[{key!r}]")
    if bad:
        names = [f"{n}.weight" for n in carriers]
        raise ValueError(f"masks: {len(bad)} key(s) name no weight of a module that carries adapter "
                         f"{adapter_name!r}: {bad[:5]}; nearest targeted: {_nearest(bad[:3], names)}. "
                         "Widen target_modules (e.g. 'all') or drop those keys.")
    return out


def patch_unet(unet: nn.Module, masks: Optional[dict] = None, rank: int = 4, alpha: Optional[float] = None,
               target_modules: Targets = None, init: str = "gaussian", adapter_name: str = "default",
               adapter_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Swap the targeted layers of ``unet`` for fused masked-LoRA modules, in place; returns ``unet``.

    - ``target_modules``: ``None``/``"attention"`` = to_q, to_k, to_v, to_out.0 (as SPARE); ``"all"`` =
      every Linear and Conv2d; a list of names, a regex, or ``callable(name, module)``.
    - ``masks``: parameter name (``unet.named_parameters()`` style, ``...weight``, with or without
      ``.base_layer``, as ``topk_masks`` returns) -> ``Mask`` or bool tensor. **A targeted module
      with no entry gets a dense (unmasked) adapter.** A key matching no adapted weight is an error.
    - scale = ``alpha / rank`` (``alpha=None``: 1.0). ``init``: ``gaussian`` (B = 0, so the output is
      unchanged until trained), ``kaiming`` (peft's default), ``random`` (non-zero, for benchmarks).
    - Like peft, every non-adapter parameter is frozen (``unpatch_unet`` restores the flags).
    - Adapters are ``adapter_dtype`` (fp32 by default, also under a bf16/fp16 base).
    - Existing peft LoRA layers (``unet.add_adapter(LoraConfig(...))``) become fused modules carrying
      the same parameter objects. If ``adapter_name`` already exists in the UNet (from peft or an
      earlier patch), no new adapter is created; ``masks`` then apply to that adapter.
    """
    check_unet(unet)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: expected a positive int, got {rank!r}")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or not math.isfinite(alpha) or alpha <= 0):
        raise ValueError(f"alpha: expected a positive finite number or None, got {alpha!r}")
    if init not in INITS:
        raise ValueError(f"init: expected one of {INITS}, got {init!r}")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name: expected a non-empty string without '.', got {adapter_name!r}")
    if adapter_dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise TypeError(f"adapter_dtype: expected a floating dtype, got {adapter_dtype!r}")
    pred = target_predicate(target_modules)
    cands = _candidates(unet)
    if not cands:
        raise ValueError(f"unet: expected a UNet-like module with nn.Linear/nn.Conv2d layers, "
                         f"found none in {type(unet).__name__}")
    exists = any(adapter_name in m.lora_A for m in cands.values() if hasattr(m, "lora_A"))
    targeted = {n: m for n, m in cands.items() if pred(n, getattr(m, "base_layer", m))}
    if not exists and not targeted:
        words = [target_modules] if isinstance(target_modules, str) else list(target_modules or ATTENTION_TARGETS) \
            if not callable(target_modules) else ["<callable>"]
        raise ValueError(f"target_modules: {target_modules!r} matched no nn.Linear/nn.Conv2d of the unet; "
                         f"nearest module names: {_nearest([str(w) for w in words], list(cands))}")
    # What to swap: every peft layer (it must keep working), and the targets when a new adapter is added.
    todo = {n: m for n, m in cands.items() if _is_peft_lora(m)}
    if not exists:
        todo.update(targeted)
    carriers = {n: getattr(m, "base_layer", m).weight for n, m in (cands if exists else targeted).items()
                if not exists or adapter_name in getattr(m, "lora_A", {})}
    mask_map = _normalise_masks(masks, carriers, adapter_name)   # all checks pass before anything changes
    for m in todo.values():   # a layer wrap() would refuse (e.g. a conv with padding_mode='reflect')
        if not isinstance(m, _MaskedLoRALayer) and not _is_peft_lora(m):
            check_base(m)
    converted = {n: _from_peft(m) for n, m in todo.items() if _is_peft_lora(m)}
    # Like peft: only adapters train. The flags are restored by unpatch_unet.
    if not hasattr(unet, _FLAGS):
        object.__setattr__(unet, _FLAGS, {n: p.requires_grad for n, p in unet.named_parameters()})
    for n, p in unet.named_parameters():
        if ".lora_A." not in n and ".lora_B." not in n:
            p.requires_grad_(False)
    scale = (alpha if alpha is not None else rank) / rank
    layers = {}
    for name, m in todo.items():
        new = converted.get(name) or (m if isinstance(m, _MaskedLoRALayer) else wrap(m))
        if not exists and name in targeted:
            new.add_adapter(adapter_name, rank, scale, init=init, dtype=adapter_dtype)
        if new is not m:
            _set_module(unet, name, new)
        layers[name] = new
    for name, m in mask_map.items():
        (layers.get(name) or cands[name]).set_mask(adapter_name, m)
    return unet


def unpatch_unet(unet: nn.Module) -> nn.Module:
    """Put the original module objects back (peft layers included), unmerging first; in place."""
    check_unet(unet)
    for name, m in list(iter_patched(unet)):
        m.unmerge()
        _set_module(unet, name, m._original)
    flags = unet.__dict__.pop(_FLAGS, None)
    if flags is not None:
        for n, p in unet.named_parameters():
            if n in flags:
                p.requires_grad_(flags[n])
    return unet
