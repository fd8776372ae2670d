"""``patch`` / ``unpatch`` (``patch_unet`` / ``unpatch_unet``, their first names): make a denoiser's LoRA
layers the fused ones, adding an adapter through peft where it has none. Presets of ``target_modules``
resolve for the model's family (:func:`spare_kernels.targets.family_of`), under either name.

A patched model is, to peft and diffusers, a peft model (``peft_config``, ``lora.Linear`` layers,
peft's state-dict keys) whose LoRA layers run the fused kernels: see :mod:`spare_kernels.nn.lora`.
"""
from __future__ import annotations

import difflib
import math
import re
import sys
import warnings
from typing import Optional

import torch
from torch import nn

from .masks import Mask, as_mask
from .nn.dispatch import is_lora_layer, use_fused_lora, why_not_fused
from .nn.lora import (INITS, _Fused, adopt, check_unmerge_all, delete_quietly, draw_factors, iter_patched, release,
                      unfusable_reason)
from .targets import ATTENTION_TARGETS, PRESETS, Targets, family_of, preset_entries, target_predicate  # noqa: F401

_RECORD = "_spare_kernels_patch"   # what this library did to a model, for unpatch


def check_unet(unet, arg: str = "unet") -> nn.Module:
    """``unet`` if it is a module, else a TypeError naming ``arg`` (and the pipeline's denoiser)."""
    if not isinstance(unet, nn.Module):
        hint = ("; pass pipe.unet" if hasattr(unet, "unet") else "; pass pipe.transformer"
                if hasattr(unet, "transformer") else "")
        raise TypeError(f"{arg}: expected a torch.nn.Module such as diffusers' UNet2DConditionModel or a "
                        f"transformer denoiser (SD3Transformer2DModel, FluxTransformer2DModel, ...), "
                        f"got {type(unet).__name__}{hint}")
    return unet


def record(unet: nn.Module) -> dict:
    """What patch / load_adapter changed, kept on the model: the parameters' ``requires_grad`` flags
    before, the layers created on plain modules, the adapters added, whether a peft config existed."""
    rec = unet.__dict__.get(_RECORD)
    if rec is None:
        rec = unet.__dict__[_RECORD] = {
            "flags": {n: p.requires_grad for n, p in unet.named_parameters()}, "wrapped": set(), "added": [],
            "had_config": hasattr(unet, "peft_config"),
            "hf_loaded": unet.__dict__.get("_hf_peft_config_loaded", None)}
    return rec


def mark_peft_loaded(unet: nn.Module) -> None:
    """What diffusers' ``add_adapter`` sets on its models: their adapter API is live."""
    if hasattr(type(unet), "_hf_peft_config_loaded"):
        unet._hf_peft_config_loaded = True


def candidates(unet: nn.Module) -> dict[str, nn.Module]:
    """Adaptable layers by qualified name: peft LoRA layers (fused or not; never what is inside them)
    and ``nn.Linear`` / ``nn.Conv2d`` (subclasses included, as peft adapts them)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    out, inside = {}, set()
    for name, m in unet.named_modules():
        if id(m) in inside:
            continue
        if isinstance(m, BaseTunerLayer):
            inside.update(id(s) for s in m.modules() if s is not m)
            if is_lora_layer(m):
                out[name] = m
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            out[name] = m
    return out


def _base(m: nn.Module) -> nn.Module:
    return m.get_base_layer() if hasattr(m, "get_base_layer") else m


def _nearest(words, names, n=5):
    hits = []
    for w in words:
        hits += difflib.get_close_matches(w, names, n=n, cutoff=0.3)
    return sorted(set(hits))[:n] or names[:n]


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _strip(name: str) -> str:
    return name.replace(".base_layer.", ".")


def normalise_masks(masks, unet: nn.Module, carriers: dict[str, torch.Tensor], adapter_name: str) -> dict[str, Mask]:
    """``carriers``: module name -> weight of every module that will carry ``adapter_name``. Every mask
    becomes a ``Mask`` on its weight's device here, before the model is changed: a bad one (wrong dtype,
    shape, a meta tensor) is refused with nothing swapped or frozen. Entries for other parameters of the
    model (a saliency mask over every parameter, as SPARE's code makes it) are dropped with a warning
    that counts them; a key naming no parameter at all is an error."""
    if masks is None:
        return {}
    if not isinstance(masks, dict):
        raise TypeError(f"masks: expected a dict of parameter name -> Mask/bool tensor, got {type(masks).__name__}")
    params = {_strip(n) for n, _ in unet.named_parameters()}
    out, unknown, ignored, ignored_on = {}, [], 0, 0
    for key, m in masks.items():
        if not isinstance(key, str):
            raise TypeError(f"masks: expected parameter names (str) as keys, got {key!r}")
        mod = key[:-len(".weight")] if key.endswith(".weight") else None
        if mod is not None and mod.endswith(".base_layer"):
            mod = mod[:-len(".base_layer")]
        if mod in carriers:
            w = carriers[mod]
            out[mod] = as_mask(m, w.shape, w.device, name=f"masks[{key!r}]")
        elif _strip(key) in params:
            ignored += 1
            if isinstance(m, Mask):
                ignored_on += int(round(m.density * math.prod(m.shape)))
            elif isinstance(m, torch.Tensor):
                ignored_on += int(m.count_nonzero())
        else:
            unknown.append(key)
    if unknown:
        names = [f"{n}.weight" for n in carriers]
        raise ValueError(f"masks: {len(unknown)} key(s) name no parameter of the model: {unknown[:5]}; nearest "
                         f"adapted weights: {_nearest(unknown[:3], names)}")
    if ignored:
        warnings.warn(f"masks: {ignored} of {len(masks)} entries name parameters outside the layers that carry "
                      f"adapter {adapter_name!r} (biases, norms, layers not targeted) and are ignored; they select "
                      f"{ignored_on} entries. Widen target_modules to adapt more of those layers.", UserWarning,
                      stacklevel=4)
    return out


def _check_args(rank, alpha, init, adapter_name, adapter_dtype):
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank: expected a positive int, got {rank!r}")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or not math.isfinite(alpha) or alpha <= 0):
        raise ValueError(f"alpha: expected a positive finite number or None, got {alpha!r}")
    if init is not None and init not in INITS:
        raise ValueError(f"init: expected one of {INITS}, got {init!r}")
    if adapter_name is not None and (not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name):
        raise ValueError(f"adapter_name: expected a non-empty string without '.', got {adapter_name!r}")
    if adapter_dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise TypeError(f"adapter_dtype: expected a floating dtype, got {adapter_dtype!r}")


def _existing(cands) -> list[str]:
    names: list[str] = []
    for m in cands.values():
        if is_lora_layer(m):
            names += [a for a in m.lora_A if a not in names]
    return names


def _check_keep(cands, names, rank, alpha, init, target_modules, pred):
    """patch_unet keeps existing adapters as they are: a request that would change them is refused."""
    hint = "; pass a new adapter_name to add an adapter with these settings, or leave the argument out"
    if init is not None:
        raise ValueError(f"init: {init!r} applies to a new adapter only; adapter(s) {names} exist{hint}")
    carrying = {n for n, m in cands.items() if is_lora_layer(m) and any(a in m.lora_A for a in names)}
    for n in sorted(carrying):
        m = cands[n]
        for a in names:
            if a not in m.lora_A:
                continue
            if rank is not None and m.r[a] != rank:
                raise ValueError(f"rank: {rank} requested, but adapter {a!r} has r={m.r[a]} (at {n!r}){hint}")
            if alpha is not None and not math.isclose(float(m.lora_alpha[a]), float(alpha)):
                raise ValueError(f"alpha: {alpha} requested, but adapter {a!r} has lora_alpha={m.lora_alpha[a]} "
                                 f"(at {n!r}){hint}")
    if target_modules is not None:
        asked = {n for n, m in cands.items() if pred(n, _base(m))}
        if asked != carrying:
            more, less = sorted(asked - carrying), sorted(carrying - asked)
            raise ValueError(f"target_modules: {target_modules!r} names other layers than adapter(s) {names} are on "
                             f"({len(more)} not adapted, e.g. {more[:3]}; {len(less)} adapted but not named, e.g. "
                             f"{less[:3]}){hint}")


def _plan_adopt(cands, masked, arg="unet") -> dict[str, str]:
    """The peft LoRA layers that must keep peft's own code, with the reason; raises where that cannot
    be (a mask asked for on one, merged adapters)."""
    stay = {}
    for n, m in cands.items():
        if is_lora_layer(m) and not isinstance(m, _Fused):
            if m.merged_adapters:
                raise ValueError(f"{arg}: peft LoRA layer {n!r} has merged adapters {m.merged_adapters}; unmerge them "
                                 f"({arg}.unfuse_lora() / unmerge_adapter()) before patching")
            why = why_not_fused(m)
            if why is not None:
                stay[n] = why
        elif not is_lora_layer(m) and n in masked and unfusable_reason(m) is not None:
            stay[n] = f"its base layer has {unfusable_reason(m)}"
    bad = [n for n in masked if n in stay]
    if bad:
        raise ValueError(f"masks: layer {bad[0]!r} would keep peft's own LoRA code, which takes no mask: "
                         f"{stay[bad[0]]}")
    return {n: w for n, w in stay.items() if is_lora_layer(cands[n])}


def _adopt_all(cands, stay, done: list) -> None:
    """Every peft LoRA layer the op can run becomes fused (appended to ``done`` as it is, so that a failure
    at the n-th layer leaves the caller the n-1 to release); the others keep peft's code."""
    for n, m in cands.items():
        if is_lora_layer(m) and not isinstance(m, _Fused) and n not in stay:
            done.append(adopt(m))


def _say_unfused(stay: dict, what: str, fn: str = "patch_unet") -> None:
    if stay:
        ex = "; ".join(f"{n}: {w}" for n, w in list(stay.items())[:3])
        warnings.warn(f"{fn}: {len(stay)} {what} keep peft's own (unfused) LoRA code: {ex}", UserWarning,
                      stacklevel=4)


def _add(unet, cands, targeted, adapter_name, rank, alpha, init, adapter_dtype, rec, fn="patch_unet"):
    """Add ``adapter_name`` on exactly ``targeted`` through peft (fused where the op computes it), with
    this library's init and dtype; other adapters stay active with their flags. The caller undoes it if
    anything fails."""
    from peft import LoraConfig, inject_adapter_in_model
    lora_alpha = alpha if alpha is not None else rank
    # A regex peft full-matches: a list would also match every module whose name ends in ".<entry>".
    spec = "(?:" + "|".join(re.escape(n) for n in sorted(targeted)) + ")"
    cfg = LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=spec, init_lora_weights=False)
    before = {n: (list(m.active_adapters), [(p, p.requires_grad) for p in m.parameters()])
              for n, m in cands.items() if is_lora_layer(m)}
    rec["added"].append(adapter_name)
    try:
        with torch.random.fork_rng(devices=[]), use_fused_lora(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            inject_adapter_in_model(cfg, unet, adapter_name)
    finally:   # (also a failed injection: what peft wrapped before failing is unwrapped by the caller)
        rec["wrapped"].update(n for n in targeted
                              if not is_lora_layer(cands[n]) and unet.get_submodule(n) is not cands[n])
    mark_peft_loaded(unet)
    layers = {}
    for n in cands:   # in module order: the same random stream as the 0.1 layers
        if n not in targeted:
            continue
        m = unet.get_submodule(n)
        A, B = draw_factors(m.lora_A[adapter_name].weight.shape, m.lora_B[adapter_name].weight.shape, init, rank,
                            adapter_dtype)   # (peft's layout: a grouped conv that stays peft's has a wider A)
        dev = _base(m).weight.device
        m.lora_A[adapter_name].weight = nn.Parameter(A.to(dev))
        m.lora_B[adapter_name].weight = nn.Parameter(B.to(dev))
        m.scaling[adapter_name] = lora_alpha / rank
        layers[n] = m
    extra = [n for n, m in unet.named_modules() if is_lora_layer(m) and adapter_name in m.lora_A and n not in layers]
    if extra:
        raise RuntimeError(f"{fn}: peft adapted modules that were not targeted: {extra[:3]}")
    for n, (act, flags) in before.items():   # peft's set_adapter made the new one the only active adapter
        m = unet.get_submodule(n)
        for p, f in flags:
            p.requires_grad_(f)
        m._active_adapter = act + ([adapter_name] if adapter_name in m.lora_A else [])
    for n, m in layers.items():
        if n not in before:
            m._active_adapter = [adapter_name]
    _say_unfused({n: why_not_fused(m) for n, m in layers.items() if not isinstance(m, _Fused)}, "targeted layer(s)", fn)
    return layers


def _remove_added(unet, adapter_name, rec) -> None:
    """Take ``adapter_name`` off every layer and out of the peft config, then :func:`_tidy`."""
    for n, m in list(unet.named_modules()):
        if is_lora_layer(m) and adapter_name in m.lora_A:
            delete_quietly(m, adapter_name)
    cfg = getattr(unet, "peft_config", None)
    if isinstance(cfg, dict):
        cfg.pop(adapter_name, None)
    if adapter_name in rec["added"]:
        rec["added"].remove(adapter_name)
    _tidy(unet, rec)


def _tidy(unet, rec) -> None:
    """Layers this library wrapped that hold no adapter any more (whoever removed it) become their plain
    module again; an empty peft config the model did not have before goes."""
    for n in sorted(rec["wrapped"]):
        m = unet.get_submodule(n)
        if is_lora_layer(m) and not m.lora_A:
            set_module(unet, n, m.get_base_layer())
            rec["wrapped"].discard(n)
    cfg = getattr(unet, "peft_config", None)
    if isinstance(cfg, dict) and not cfg and not rec["had_config"]:
        del unet.peft_config
        if rec["hf_loaded"] is None:
            unet.__dict__.pop("_hf_peft_config_loaded", None)
        else:
            unet._hf_peft_config_loaded = rec["hf_loaded"]


def _drop_config(unet, adapter_name) -> None:
    """``adapter_name`` out of ``unet.peft_config`` once no layer carries it."""
    cfg = getattr(unet, "peft_config", None)
    if isinstance(cfg, dict) and adapter_name in cfg and not any(
            is_lora_layer(m) and adapter_name in m.lora_A for m in unet.modules()):
        cfg.pop(adapter_name)


def patch(model: nn.Module, masks: Optional[dict] = None, rank: Optional[int] = None,
          alpha: Optional[float] = None, target_modules: Targets = None, init: Optional[str] = None,
          adapter_name: Optional[str] = None, adapter_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Make ``model``'s LoRA layers the fused ones, in place; returns ``model``. ``model``: a diffusers
    denoiser (UNet2DConditionModel, SD3/Flux/PixArt/Sana transformer) or any module with Linear/Conv2d
    layers; ``spare_kernels.patch(model)`` calls this function.

    - **A peft model** (``unet.add_adapter(LoraConfig(...))``, ``load_lora_weights``): every peft
      ``lora.Linear`` / ``lora.Conv2d`` becomes the fused class in place (same object, parameters, hooks
      and state dict); the adapters stay as they are. ``rank``/``alpha``/``target_modules``/``init``,
      if given, must describe them (else a ``ValueError``: they cannot be honoured without changing the
      user's adapter); a new ``adapter_name`` adds a new adapter instead.
    - **A plain model**, or a new ``adapter_name``: adds the adapter (``"default"`` when none is named)
      through peft (``model.peft_config[adapter_name]``; the layers are peft layers) on ``target_modules``:
      the presets ``None``/``"attention"`` (every attention projection; on a UNet to_q, to_k, to_v,
      to_out.0 as SPARE), ``"attention+mlp"`` and ``"all"`` (on a UNet every Linear and Conv2d; on a
      transformer all but the modulation layers), resolved for the model's family (see
      :mod:`spare_kernels.targets`); a list of names, a regex, or ``callable(name, module)``. ``rank`` 4
      by default, scale = ``alpha / rank`` (``alpha=None``: 1.0). ``init`` (default ``gaussian``):
      ``gaussian`` (B = 0, the output is unchanged until trained), ``kaiming`` (peft's default),
      ``random`` (non-zero, for benchmarks). Adapters are ``adapter_dtype`` (fp32 by default, also
      under a bf16/fp16 base); the other adapters stay active (stacked).
    - ``masks``: parameter name (``model.named_parameters()`` style, with or without ``.base_layer``, as
      ``topk_masks`` returns) -> ``Mask`` or bool/uint8 tensor, for the adapter named (or the model's only
      one). **A layer with no entry gets a dense (unmasked) adapter.** Entries for other parameters of
      the model (SPARE's masks cover every parameter) are ignored with a warning that counts them; a
      key naming no parameter is an error.
    - Adding an adapter freezes every other parameter, as peft's ``add_adapter`` does; a peft model's own
      adapters keep the flags they have (``unpatch`` restores the flags from before).
    Every check runs before anything changes; a failure on the way (peft's own refusals) undoes it all.
    """
    return _patch(model, masks, rank, alpha, target_modules, init, adapter_name, adapter_dtype, "model", "patch")


def patch_unet(unet: nn.Module, masks: Optional[dict] = None, rank: Optional[int] = None,
               alpha: Optional[float] = None, target_modules: Targets = None, init: Optional[str] = None,
               adapter_name: Optional[str] = None, adapter_dtype: torch.dtype = torch.float32) -> nn.Module:
    """:func:`patch` under its first name (messages name ``unet``). Presets resolve for the model's family
    here too: on a UNet (or any other model) exactly as before, on a transformer as :func:`patch`."""
    return _patch(unet, masks, rank, alpha, target_modules, init, adapter_name, adapter_dtype, "unet", "patch_unet")


def _patch(unet, masks, rank, alpha, target_modules, init, adapter_name, adapter_dtype, arg, fn):
    """patch / patch_unet; ``arg`` and ``fn`` name the argument and the function in messages."""
    check_unet(unet, arg)
    _check_args(rank, alpha, init, adapter_name, adapter_dtype)
    family = family_of(unet)
    pred = target_predicate(target_modules, family=family)
    cands = candidates(unet)
    if not cands:
        raise ValueError(f"{arg}: expected a denoiser (UNet-like or transformer) with nn.Linear/nn.Conv2d layers, "
                         f"found none in {type(unet).__name__}")
    existing = _existing(cands)
    if adapter_name is None and existing:
        keep = existing
    elif adapter_name is not None and adapter_name in existing:
        keep = [adapter_name]
    else:
        keep = None
    name = adapter_name or "default"
    if keep is not None:
        _check_keep(cands, keep, rank, alpha, init, target_modules, pred)
        if masks is not None and len(keep) > 1:
            raise ValueError(f"adapter_name: masks apply to one adapter, and the {arg} has {keep}; name it")
        name = keep[0]
        carriers = {n: _base(m).weight for n, m in cands.items() if is_lora_layer(m) and name in m.lora_A}
        targeted = {}
    else:
        targeted = {n: m for n, m in cands.items() if pred(n, _base(m))}
        if "" in targeted:   # peft wraps children only: the root would be wrapped inside itself
            raise ValueError(f"{arg}: the root module ({type(unet).__name__}) cannot be a target: patch a model "
                             f"that holds it, e.g. nn.Sequential(layer), or target its sub-layers")
        if not targeted:
            raise ValueError(f"target_modules: {target_modules!r} matched no nn.Linear/nn.Conv2d of the {arg} "
                             f"({family} family); nearest module names: "
                             f"{_nearest(_words(target_modules, family), list(cands))}")
        carriers = {n: _base(m).weight for n, m in targeted.items()}
    mask_map = normalise_masks(masks, unet, carriers, name)
    stay = _plan_adopt(cands, mask_map, arg)   # all checks pass before anything changes
    if keep is not None:
        merged = [n for n in mask_map if name in cands[n].merged_adapters]
        if merged:
            raise ValueError(f"masks: adapter {name!r} is merged in {merged[:3]}; unmerge it before setting masks")
    fresh = _RECORD not in unet.__dict__
    rec = record(unet)
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    old_masks = [(m, dict(m.masks)) for _, m in iter_patched(unet)]
    adopted = []
    try:
        _adopt_all(cands, stay, adopted)
        if keep is None:   # peft freezes every other parameter, as its add_adapter does
            layers = _add(unet, cands, targeted, name, rank or 4, alpha, init or "gaussian", adapter_dtype, rec, fn)
        else:              # the user's peft model: flags as they are
            layers = {n: unet.get_submodule(n) for n in carriers}
        for n, m in mask_map.items():
            layers[n].set_mask(name, m)
    except BaseException:
        if keep is None:
            _remove_added(unet, name, rec)
        for m in adopted:
            release(m)
        for m, mk in old_masks:
            m.masks.clear()
            m.masks.update(mk)
        for n, p in unet.named_parameters():
            if n in flags:
                p.requires_grad_(flags[n])
        if fresh:
            unet.__dict__.pop(_RECORD, None)
        raise
    _say_unfused(stay, "peft LoRA layer(s)", fn)
    return unet


def _words(target_modules, family) -> list[str]:
    """What a spec that matched nothing asked for, to find the nearest module names."""
    if target_modules is None or target_modules in PRESETS:
        try:
            return list(preset_entries(family, target_modules or "attention"))
        except ValueError:
            return [str(target_modules)]
    if isinstance(target_modules, str):
        return [target_modules]
    if callable(target_modules):
        return ["<callable>"]
    return [str(w) for w in target_modules]


def unpatch(model: nn.Module) -> nn.Module:
    """Undo what this library did, in place: every merge undone (bit-exactly), the adapters it added
    removed, the layers it created on plain modules replaced by those modules (the very objects), every
    other fused layer peft's own class again (same object), the ``requires_grad`` flags restored.
    Masks on adapters that stay (peft's, from before the patch) are dropped with a warning: peft's own
    layers compute the unmasked ``B·A``. ``unpatch_unet`` is its first name."""
    return _unpatch(model, "model", "unpatch")


def unpatch_unet(unet: nn.Module) -> nn.Module:
    """:func:`unpatch` under its first name (messages name ``unet``)."""
    return _unpatch(unet, "unet", "unpatch_unet")


def _unpatch(unet, arg, fn):
    check_unet(unet, arg)
    rec = unet.__dict__.get(_RECORD)
    fused = list(iter_patched(unet))
    check_unmerge_all(fused, fn)   # every merge record fits before the first is restored
    for _, m in fused:
        if m.merged_adapters:
            m.unmerge()
    if rec is not None:
        for a in list(rec["added"]):
            _remove_added(unet, a, rec)
        _tidy(unet, rec)
    dropped = set()
    wrapped = rec["wrapped"] if rec is not None else set()
    for n, m in list(iter_patched(unet)):
        for a in list(m._sk_adapters):   # added through this library's own add_adapter (load_adapter, modules)
            m.remove_adapter(a)
            _drop_config(unet, a)
        if not m.lora_A and (n in wrapped or m.__dict__.get("_sk_created")):
            set_module(unet, n, m.get_base_layer())   # the library built it on a plain layer: that layer again
            continue
        dropped.update(a for a, mk in m.masks.items() if mk is not None)
        release(m)
    if rec is not None:
        _tidy(unet, rec)
    if dropped:
        warnings.warn(f"{fn}: masks on adapter(s) {sorted(dropped)} are dropped: peft's own layers compute "
                      "the unmasked B·A (sk.save_adapter keeps them)", UserWarning, stacklevel=3)
    if rec is not None:
        unet.__dict__.pop(_RECORD)
        for n, p in unet.named_parameters():
            if n in rec["flags"]:
                p.requires_grad_(rec["flags"][n])
    return unet


# ``spare_kernels.patch`` is this module (an import of the submodule sets the package attribute to it, so
# the package cannot also export the function under the same name): calling the module calls the function,
# so ``spare_kernels.patch(model)`` is ``spare_kernels.patch.patch(model)``.
class _CallableModule(type(sys)):
    def __call__(self, *args, **kwargs):
        return patch(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
