"""Adapters of a patched UNet: save, load, merge, unmerge, remove, scale, stack and toggle."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import warnings
from typing import Iterable, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .masks import GRANULARITIES, Mask
from .nn.dispatch import is_lora_layer
from .nn.lora import (MaskedLoRAConv2d, _Fused, check_base, check_unmerge_all, check_untied, delete_quietly,
                      factor_shapes, thread_disabled, why_not_fused, wrap)
from .ops import _checks as chk
from .patch import check_unet, mark_peft_loaded, record, set_module
from .utils.io import atomic_path, file_path

FORMAT = "spare_kernels.adapter/1"
_SAMPLES = 4096


def _samples(weight: torch.Tensor) -> torch.Tensor:
    flat = weight.detach().reshape(-1)
    return flat[::max(1, flat.numel() // _SAMPLES)][:_SAMPLES].cpu()


def _hash(shape, dtype, samples: torch.Tensor) -> str:
    h = hashlib.sha256(f"{tuple(shape)}|{dtype}".encode())
    h.update(samples.float().numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint(weight: torch.Tensor) -> str:
    """Cheap identity of a base weight: shape, dtype and 4096 evenly strided values (sha256, 16 hex)."""
    return _hash(weight.shape, weight.dtype, _samples(weight))


# A base saved in one float dtype and loaded in another is the same base when its values agree once
# both are rounded to the lower precision of the two. The file keeps, next to the exact fingerprint,
# those of the sampled values rounded to each lower-precision dtype (the dtype in the hash is the
# rounding's): a model in one of them is compared there, a model of higher precision is rounded to
# the file's own dtype and compared with the exact one.
_PRECISION = {torch.float64: 3, torch.float32: 2, torch.float16: 1, torch.bfloat16: 1}
_DTYPES = {str(d): d for d in _PRECISION}   # a file's "dtype" field: one of these names


def _fingerprints(weight: torch.Tensor) -> dict[str, str]:
    """``{dtype name: fingerprint of the samples rounded to it}`` for every float dtype of lower
    precision than ``weight``'s (``{}`` for a half-precision or non-float weight)."""
    s, p = _samples(weight), _PRECISION.get(weight.dtype, 0)
    return {str(d): _hash(weight.shape, d, s.to(d)) for d, q in _PRECISION.items() if q < p}


def _same_base(weight: torch.Tensor, info: dict) -> bool:
    """Whether ``weight`` is the base the module ``info`` was saved from, whatever the two dtypes."""
    here = fingerprint(weight)
    if here == info["fingerprint"]:
        return True
    lower = info.get("fingerprints") or {}
    if str(weight.dtype) in lower:                          # the file's base rounded to this model's dtype
        return here == lower[str(weight.dtype)]
    # Rounding the model to the file's dtype compares only where that is the lower precision: fp16 and
    # bf16 each keep bits the other drops, so a different fp16 model can round onto a bf16 file's values.
    saved = _DTYPES.get(info.get("dtype"))
    if saved is not None and _PRECISION[saved] < _PRECISION.get(weight.dtype, 0):
        return _hash(weight.shape, saved, _samples(weight).to(saved)) == info["fingerprint"]
    return False


def _base_weight(m: nn.Module) -> torch.Tensor:
    """The weight a fingerprint is of: a patched layer's with its merges undone."""
    return m.unmerged_weight() if isinstance(m, _Fused) else m.weight


def _layers(unet, adapter_name=None) -> list[tuple[str, nn.Module]]:
    """Every peft LoRA layer (fused or peft's own) carrying ``adapter_name`` (``None``: every one)."""
    check_unet(unet)
    out = [(n, m) for n, m in unet.named_modules()
           if is_lora_layer(m) and (adapter_name is None or adapter_name in m.lora_A)]
    if adapter_name is not None and not out:
        raise ValueError(f"adapter_name: no adapter {adapter_name!r} in the unet; it has {adapter_names(unet)}")
    return out


def _refuse_merged(layers, name: str, what: str) -> None:
    merged = [n for n, m in layers if name in m.merged_adapters]
    if merged:
        raise RuntimeError(f"adapter {name!r} is merged (in {merged[:3]}); unmerge it before {what}")


def _fused_only(layers, op: str, hint: str) -> None:
    """Refuse, naming the layer, an operation that needs the fused layers' bookkeeping."""
    stock = [(n, m) for n, m in layers if not isinstance(m, _Fused)]
    if stock:
        n, m = stock[0]
        raise ValueError(f"{op}: layer {n!r} runs peft's own LoRA code ({why_not_fused(m)}); {hint}")


def adapter_names(unet) -> list[str]:
    names: list[str] = []
    for _, m in _layers(unet):
        names += [n for n in m.lora_A if n not in names]
    return names


# ----------------------------------------------------------------------------------- save / load
def save_adapter(unet: nn.Module, path: Union[str, bytes, os.PathLike],
                 adapter_name: Optional[str] = "default") -> str:
    """Write one adapter to ``path`` (safetensors): A, B, bit-packed masks, scale, targets and a
    fingerprint of each base weight. Written to a temporary file in the same folder, then renamed:
    a crash never leaves a half-written adapter at ``path``. Returns the path as a str.

    ``adapter_name=None``: the unet's only adapter (a ``ValueError`` listing them if it has several)."""
    path = file_path(path)   # a folder is refused before any work
    if adapter_name is None:
        names = adapter_names(unet)
        if len(names) != 1:
            raise ValueError(f"adapter_name: None means the unet's only adapter, but it has {len(names)}: "
                             f"{names}; name the one to save")
        adapter_name = names[0]
    _check_name(adapter_name)
    layers = _layers(unet, adapter_name)
    _fused_only(layers, "save_adapter", "save this adapter with peft's get_peft_model_state_dict / save_lora_weights")
    tensors, modules = {}, {}
    for name, m in layers:
        tensors[f"{name}.lora_A"] = m.lora_A[adapter_name].weight.detach().cpu().contiguous()
        tensors[f"{name}.lora_B"] = m.lora_B[adapter_name].weight.detach().cpu().contiguous()
        mask = m.masks.get(adapter_name)
        if mask is not None:
            tensors[f"{name}.mask"] = mask.data.cpu().contiguous()
        modules[name] = {
            "kind": "conv2d" if isinstance(m, MaskedLoRAConv2d) else "linear",
            "weight_shape": list(m.weight.shape),
            "rank": int(m.lora_A[adapter_name].weight.shape[0]),
            "scale": m.scaling[adapter_name],
            "mask": None if mask is None else {"granularity": mask.granularity, "block": mask.block},
            "active": adapter_name in m.active_adapters,
        }
        base = m.unmerged_weight()                              # the base's, whatever is merged now
        modules[name].update(fingerprint=fingerprint(base), fingerprints=_fingerprints(base), dtype=str(base.dtype))
    meta = {"format": FORMAT, "adapter_name": adapter_name, "modules": json.dumps(modules)}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return path


_FIELDS = ("kind", "weight_shape", "rank", "scale", "mask", "fingerprint")   # "active" may be absent


def _check_name(name, what="adapter_name"):
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"{what}: expected a non-empty string without '.', got {name!r}")
    return name


def _complaint(where: str):
    """``bad(field, expected, got)``: a ValueError saying so after ``where`` (the file, the module);
    ``expected=None``: ``got`` says it all."""
    def bad(field, expected, got):
        what = got if expected is None else f"expected {expected}, got {got}"
        return ValueError(f"{where}: {field}: {what}")
    return bad


def _check_module(info, bad) -> None:
    """The metadata of one module."""
    if not isinstance(info, dict):
        raise bad("settings", "a JSON object", repr(info)[:80])
    for k in _FIELDS:
        if k not in info:
            raise bad(k, "a value", "none (the key is missing)")
    if info["kind"] not in ("linear", "conv2d"):
        raise bad("kind", "'linear' or 'conv2d'", repr(info["kind"]))
    shape = info["weight_shape"]
    dims = 2 if info["kind"] == "linear" else 4
    if (not isinstance(shape, list) or len(shape) != dims
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise bad("weight_shape", f"a list of {dims} positive ints", repr(shape))
    rank = info["rank"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise bad("rank", "a positive int", repr(rank))
    try:
        chk.scale("", info["scale"])
    except (TypeError, ValueError):
        raise bad("scale", "a finite real number",
                  f"{type(info['scale']).__name__} {info['scale']!r}") from None
    mask = info["mask"]
    if mask is not None and (not isinstance(mask, dict) or "granularity" not in mask):
        raise bad("mask", "null or an object with 'granularity' (and 'block')", repr(mask))
    if mask is not None and mask["granularity"] not in GRANULARITIES:
        raise bad("mask", f"a granularity in {GRANULARITIES}", repr(mask["granularity"]))
    if info["fingerprint"] is not None and not isinstance(info["fingerprint"], str):
        raise bad("fingerprint", "null or a string", repr(info["fingerprint"]))
    if not isinstance(info.get("active", True), bool):
        raise bad("active", "true or false", repr(info["active"]))
    lower = info.get("fingerprints", {})   # optional (files before it)
    if not isinstance(lower, dict) or not all(isinstance(v, str) for v in lower.values()):
        raise bad("fingerprints", "an object of dtype name -> string", repr(lower)[:80])
    if "dtype" in info and (not isinstance(info["dtype"], str) or info["dtype"] not in _DTYPES):   # optional
        raise bad("dtype", f"one of {sorted(_DTYPES)}", repr(info["dtype"])[:80])


def _read(path, op: str) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """``(path as a str, validated metadata, tensors)`` of an adapter file."""
    path = file_path(path, f"{op}: path", "an adapter file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{op}: path: no adapter file at {path!r}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types on a foreign or truncated file
        raise ValueError(f"path: {path!r} is not a readable safetensors adapter ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"path: {path!r} is not a spare_kernels adapter (format {meta.get('format')!r}, "
                         f"expected {FORMAT!r})")
    bad = _complaint(f"{op}: {path!r}")
    for k in ("adapter_name", "modules"):
        if k not in meta:
            raise bad(k, "a metadata entry", "none (the key is missing)")
    try:
        _check_name(meta["adapter_name"])
    except ValueError:
        raise bad("adapter_name", "a non-empty string without '.'", repr(meta["adapter_name"])) from None
    try:
        modules = json.loads(meta["modules"])
    except ValueError as e:
        raise bad("modules", "a JSON object", f"invalid JSON ({e})") from None
    if not isinstance(modules, dict) or not modules:
        raise bad("modules", "a non-empty JSON object of module name -> settings", repr(modules)[:80])
    for mod, info in modules.items():
        _check_module(info, _complaint(f"{op}: {path!r}: module {mod!r}"))
    meta["modules"] = modules
    return path, meta, tensors


def read_adapter(path: Union[str, bytes, os.PathLike]) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(metadata with parsed 'modules', tensors)`` of an adapter file; the metadata is validated
    (a ``ValueError`` names the file, the module and the field), the tensors by :func:`load_adapter`."""
    return _read(path, "read_adapter")[1:]


def _plan_module(mod, info, base, tensors, bad) -> dict:
    """``add_adapter``'s arguments for one module, every one checked against ``base``'s geometry."""
    a_shape, b_shape = factor_shapes(base, info["rank"])
    factors = {}
    for key, shape in (("lora_A", a_shape), ("lora_B", b_shape)):
        t = tensors.get(f"{mod}.{key}")
        if t is None:
            raise bad(key, f"a tensor of shape {shape}", "none in the file")
        if tuple(t.shape) != shape:
            raise bad(key, f"shape {shape} (rank {info['rank']})", tuple(t.shape))
        factors[key] = t
    A, B = factors["lora_A"], factors["lora_B"]
    if A.dtype not in chk.FLOAT_DTYPES:
        raise bad("lora_A", "a floating-point tensor", A.dtype)
    if B.dtype != A.dtype:
        raise bad("lora_B", f"lora_A's dtype {A.dtype}", B.dtype)
    mask = None
    if info["mask"] is not None:
        t = tensors.get(f"{mod}.mask")
        if t is None:
            raise bad("mask", f"the tensor of its {info['mask']['granularity']!r} mask", "none in the file")
        try:
            mask = Mask(info["mask"]["granularity"], info["weight_shape"], t, info["mask"].get("block") or (32, 32))
        except (TypeError, ValueError) as e:   # Mask's own message names what is wrong (granularity, data, block)
            raise bad("mask", None, e) from None
    return dict(rank=info["rank"], scale=info["scale"], mask=mask, lora_A=A, lora_B=B,
                active=info.get("active", True))


def load_adapter(unet: nn.Module, path, adapter_name: Optional[str] = None, strict: bool = True) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` into ``unet`` (patching the layers it names).

    Checks every target exists with the saved weight shape, that every module's factors, mask, scale
    and rank are whole and fit its layer (always), and that the base weights carry the saved
    fingerprints (``strict=False`` turns a mismatch into a warning); a base in another float dtype
    than the saved one matches where the values agree once rounded to the lower precision of the two
    (fp32 <-> bf16 / fp16 / fp64; fp16 and bf16 cannot be compared with each other). Nothing changes
    until every check has passed, and a failure while applying undoes what was applied. Tensors in the
    file that no module uses are ignored with a warning. ``adapter_name`` renames the adapter on load.
    ``path``: a str, bytes or os.PathLike."""
    check_unet(unet)
    if adapter_name is not None:
        _check_name(adapter_name)
    path, meta, tensors = _read(path, "load_adapter")
    name = adapter_name if adapter_name is not None else meta["adapter_name"]
    modules = dict(unet.named_modules())
    # Names inside an adapted layer (its base_layer, peft's lora_A.<name>) are not targets.
    owners = [n for n, m in modules.items() if is_lora_layer(m)]
    missing, wrong, foreign, clash, dtypes = [], [], [], [], set()
    for mod, info in meta["modules"].items():
        m = modules.get(mod)
        base = getattr(m, "base_layer", m)
        owner = next((o for o in owners if mod.startswith(o + ".")), None)
        if owner is not None:
            raise ValueError(f"load_adapter: {path!r}: module {mod!r}: expected a layer of the unet, got a "
                             f"part of the adapted layer {owner!r}")
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            missing.append(mod)
        elif list(base.weight.shape) != info["weight_shape"]:
            wrong.append(f"{mod}: file {tuple(info['weight_shape'])} vs unet {tuple(base.weight.shape)}")
    if missing or wrong:
        raise ValueError(f"load_adapter: {path!r} does not fit this unet: missing modules {missing[:5]}, "
                         f"shape mismatches {wrong[:5]}")
    plan = {}
    for mod, info in meta["modules"].items():
        m = modules[mod]
        where = f"load_adapter: {path!r}: module {mod!r}"
        if is_lora_layer(m) and not isinstance(m, _Fused):
            raise ValueError(f"{where}: is peft's own LoRA layer; patch_unet(unet) first to make it a fused one")
        if not isinstance(m, _Fused):
            try:
                check_base(m)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{where}: {e}") from None
        plan[mod] = _plan_module(mod, info, getattr(m, "base_layer", m), tensors, _complaint(where))
        if isinstance(m, _Fused) and name in m.lora_A:
            clash.append(mod)
        elif info["fingerprint"] and not _same_base(w := _base_weight(m), info):
            foreign.append(mod)
            if info.get("dtype", str(w.dtype)) != str(w.dtype):
                dtypes.add((info["dtype"], str(w.dtype)))
    if clash:
        raise ValueError(f"adapter_name: {name!r} already exists on {clash[:3]}...; remove_adapter() it or "
                         "pass another adapter_name")
    if foreign:
        msg = (f"load_adapter: base weights differ from those the adapter was trained on "
               f"(fingerprint mismatch) in {len(foreign)} module(s), e.g. {foreign[:3]}")
        if dtypes:
            saved, here = sorted(dtypes)[0]
            p = [_PRECISION.get(_DTYPES.get(d), 0) for d in (saved, here)]
            msg += (f" (saved from {saved} weights, the unet's are {here}: "
                    + ("the values differ even once rounded to the lower precision of the two)" if p[0] != p[1]
                       else "neither dtype is a rounding of the other, so copies of one model in the two "
                            "cannot be told from different models; an adapter saved from float32 weights "
                            "loads into either)"))
        if strict:
            raise ValueError(msg + "; pass strict=False to load anyway")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    used = {f"{mod}.{k}" for mod, p in plan.items() for k in ("lora_A", "lora_B", "mask")
            if k != "mask" or p["mask"] is not None}
    extra = sorted(set(tensors) - used)
    if extra:   # as peft warns of unexpected keys: likely a file edited or written by another tool
        warnings.warn(f"load_adapter: {path!r} holds {len(extra)} tensor(s) no module of the adapter uses, "
                      f"ignored: {extra[:5]}{'...' if len(extra) > 5 else ''}", UserWarning, stacklevel=2)
    _apply(unet, modules, plan, name)
    return unet


def _register(unet, name, plan) -> None:
    """The adapter in ``unet.peft_config`` as peft would describe it, so peft's and diffusers' adapter
    API (get_peft_model_state_dict, set_adapters, save_lora_weights...) sees it."""
    cfg = _lora_config({mod: p["rank"] for mod, p in plan.items()},
                       {mod: p["scale"] * p["rank"] for mod, p in plan.items()})
    if not isinstance(getattr(unet, "peft_config", None), dict):
        unet.peft_config = {}
    unet.peft_config[name] = cfg
    mark_peft_loaded(unet)


def _lora_config(ranks: dict, alphas: dict):
    """A LoraConfig naming exactly these modules, with their ranks and alphas: the most common as
    ``r`` / ``lora_alpha``, the others in ``rank_pattern`` / ``alpha_pattern`` (exact-name patterns)."""
    from peft import LoraConfig

    def common(d):
        vals = list(d.values())
        return max(set(vals), key=vals.count)
    r, alpha = common(ranks), common(alphas)
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=sorted(ranks), init_lora_weights=False,
                      rank_pattern={re.escape(m): k for m, k in ranks.items() if k != r},
                      alpha_pattern={re.escape(m): a for m, a in alphas.items() if a != alpha})


def _apply(unet, modules, plan, name) -> None:
    """Add the planned adapter everywhere; if anything still fails (out of memory, say), put back
    every layer as it was before raising."""
    rec = record(unet)
    had = dict(getattr(unet, "peft_config", None) or {}) if isinstance(getattr(unet, "peft_config", None), dict) \
        else None
    done = []   # (module name, layer, (base module, its requires_grad flags) if wrapped here)
    try:
        for mod, p in plan.items():
            layer = modules[mod]
            if isinstance(layer, _Fused):
                done.append((mod, layer, None))
            else:
                base = layer
                flags = [q.requires_grad for q in base.parameters()]
                layer = wrap(base)                   # freezes the base layer
                done.append((mod, layer, (base, flags)))
                set_module(unet, mod, layer)
            dev = layer.weight.device
            layer.add_adapter(name, p["rank"], p["scale"], mask=p["mask"], lora_A=p["lora_A"].to(dev),
                              lora_B=p["lora_B"].to(dev), active=p["active"])
        _register(unet, name, plan)
    except BaseException:
        for mod, layer, wrapped in reversed(done):
            if name in layer.lora_A:
                layer.remove_adapter(name)
            if wrapped is not None:
                base, flags = wrapped
                set_module(unet, mod, base)
                for q, f in zip(base.parameters(), flags):
                    q.requires_grad_(f)
        if had is None:
            unet.__dict__.pop("peft_config", None)
        else:
            unet.peft_config = had
        raise
    rec["wrapped"].update(mod for mod, _, w in done if w is not None)
    rec["added"].append(name)


def export_lora(unet: nn.Module, adapter_name: str = "default") -> tuple[dict[str, torch.Tensor], dict]:
    """The adapter as a plain LoRA that any peft/diffusers loader reproduces, masks included:
    ``(state_dict, metadata)`` in ``get_peft_model_state_dict``'s format, for
    ``StableDiffusionPipeline.save_lora_weights(dir, unet_lora_layers=state_dict,
    unet_lora_adapter_metadata=metadata)``.

    peft's own state dict of a masked adapter holds the unmasked ``B``, ``A``: a loader that knows no
    masks would run ``B·A`` everywhere, a different adapter. Here a masked layer's delta
    ``s·M⊙(B·A)`` is factored exactly instead (SVD: ``B' = U·S``, ``A' = Vᵀ``, rank ``min(out, in·kh·kw)``,
    fp32; the file grows to about the dense delta's size), an unmasked one keeps its rank with the
    scale folded into ``B``; every layer's ``lora_alpha`` equals its rank (scale 1). Fused merges are
    read as unmerged."""
    layers = _layers(unet, adapter_name)
    _fused_only(layers, "export_lora", "its adapter is already peft's plain LoRA: get_peft_model_state_dict has it")
    sd, ranks = {}, {}
    for name, m in layers:
        mask = m.masks.get(adapter_name)
        if mask is None:
            A = m.lora_A[adapter_name].weight.detach().float()
            B = m.lora_B[adapter_name].weight.detach().float() * m.scaling[adapter_name]
        else:
            d = m.delta_weight(adapter_name).detach().float()
            U, S, Vh = torch.linalg.svd(d.reshape(d.shape[0], -1), full_matrices=False)
            k = S.shape[0]
            A = Vh.reshape(k, *d.shape[1:])
            B = (U * S).reshape(d.shape[0], k, *([1, 1] if d.dim() == 4 else []))
        ranks[name] = A.shape[0]
        sd[f"{name}.lora_A.weight"] = A.cpu().contiguous()
        sd[f"{name}.lora_B.weight"] = B.cpu().contiguous()
    meta = _lora_config(ranks, ranks).to_dict()   # lora_alpha = r: scale 1
    for k in ("target_modules",):   # sets are not JSON
        meta[k] = sorted(meta[k])
    return sd, meta


# ----------------------------------------------------------------------------------- run-time control
def merge_adapter(unet: nn.Module, adapter_name: str = "default") -> None:
    """Fold ``adapter_name`` into the base weights (bit-exactly reversible by :func:`unmerge_adapter`)."""
    layers = _layers(unet, adapter_name)
    done = [n for n, m in layers if adapter_name in m.merged_adapters]
    if done:
        raise RuntimeError(f"adapter {adapter_name!r} is already merged (in {done[:3]})")
    check_untied(unet, layers, "merge_adapter")   # a tied weight would take two layers' deltas
    with warnings.catch_warnings():   # peft's "already ... merged, now additionally merging": stacking is asked for
        warnings.filterwarnings("ignore", message="Already following adapters were merged")
        for _, m in layers:
            m.merge(adapter_names=[adapter_name])


def unmerge_adapter(unet: nn.Module, adapter_name: Optional[str] = None) -> None:
    """Restore the base weights bit-exactly (``None``: undo every merge; a name: that adapter's merge
    and any made after it). A layer that runs peft's own code unmerges as peft does (it subtracts the
    delta again), and only all its merges at once."""
    layers = _layers(unet, adapter_name)
    partial = [n for n, m in layers if not isinstance(m, _Fused) and adapter_name is not None
               and adapter_name in m.merged_adapters and m.merged_adapters[0] != adapter_name]
    if partial:
        raise RuntimeError(f"unmerge_adapter: layer {partial[0]!r} runs peft's own LoRA code, which can only undo "
                           f"all its merges; call unmerge_adapter(unet) to undo every merge")
    check_unmerge_all(layers, "unmerge_adapter", adapter_name)   # every layer's records fit before the first is restored
    for _, m in layers:
        if adapter_name in m.merged_adapters or (adapter_name is None and m.merged_adapters):
            m.unmerge(adapter_name) if isinstance(m, _Fused) else m.unmerge()


def remove_adapter(unet: nn.Module, adapter_name: str) -> None:
    """Take the adapter off every layer (refused while merged) and out of ``unet.peft_config``."""
    layers = _layers(unet, adapter_name)
    _refuse_merged(layers, adapter_name, "removing it")
    for _, m in layers:
        delete_quietly(m, adapter_name)
    cfg = getattr(unet, "peft_config", None)
    if isinstance(cfg, dict):
        cfg.pop(adapter_name, None)


def set_adapter_scale(unet: nn.Module, adapter_name: str, scale: float) -> None:
    """Set the adapter's multiplier ``s`` in ``W + s·M⊙(B·A)`` (patch_unet sets ``alpha / rank``)."""
    chk.scale("set_adapter_scale", scale)
    layers = _layers(unet, adapter_name)
    _refuse_merged(layers, adapter_name, "changing its scale")
    for _, m in layers:
        m.scaling[adapter_name] = float(scale)


def set_active_adapters(unet: nn.Module, adapter_names_: Union[str, Iterable[str]]) -> None:
    """Exactly these adapters are on (in this order, where a layer carries them); the rest are off."""
    if isinstance(adapter_names_, str):
        names = [adapter_names_]
    elif isinstance(adapter_names_, (list, tuple)) and all(isinstance(n, str) for n in adapter_names_):
        names = list(adapter_names_)
    else:
        raise TypeError(f"adapter_names: expected a name or a list of names, got {adapter_names_!r}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:   # peft's forward would add such an adapter's delta once per mention
        raise ValueError(f"adapter_names: {twice[0]!r} given more than once in {names}; name each adapter once")
    known = adapter_names(unet)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"adapter_names: {unknown} not in the unet; it has {known}")
    for _, m in _layers(unet):   # peft's set_adapter would also change requires_grad; this does not
        m._active_adapter = [n for n in names if n in m.lora_A]


def enable_adapter(unet: nn.Module, adapter_name: str, enabled: bool = True) -> None:
    """Switch one adapter on or off, leaving the others as they are."""
    for _, m in _layers(unet, adapter_name):
        act = list(m.active_adapters)
        if enabled and adapter_name not in act:
            m._active_adapter = act + [adapter_name]
        elif not enabled and adapter_name in act:
            m._active_adapter = [a for a in act if a != adapter_name]


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
        _fused_only(layers, "disable_adapters(this_thread=True)",
                    "only the fused layers read the per-thread switch: use this_thread=False")
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
    prev = [m._disable_adapters for _, m in layers]
    for _, m in layers:   # peft's enable_adapters(False) would also freeze the adapters; this does not
        m._disable_adapters = True
    try:
        yield unet
    finally:
        for (_, m), p in zip(layers, prev):
            m._disable_adapters = p
