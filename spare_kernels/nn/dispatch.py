"""peft's side of the fused layers: which peft LoRA layers can run fused, and a switch that makes every
LoRA layer peft builds from now on a fused one (:func:`use_fused_lora`)."""
from __future__ import annotations

import threading
import warnings
from typing import Optional

from peft.tuners.lora import layer as peft_lora
from peft.tuners.lora.model import LoraModel
from torch import nn

from .lora import _FUSED, adopt, unfusable_reason


def is_lora_layer(m: nn.Module) -> bool:
    """peft's LoRA layers (``lora.Linear``, ``lora.Conv2d``, bnb's, ...), fused or not."""
    return isinstance(m, peft_lora.LoraLayer)


def why_not_fused(layer: nn.Module) -> Optional[str]:
    """Why a peft LoRA layer must keep peft's own class (``None``: :func:`adopt` can take it)."""
    if type(layer) not in _FUSED:
        return f"peft builds it as {type(layer).__module__}.{type(layer).__name__}"
    if layer.base_layer is not layer.get_base_layer():
        return "its base layer is itself an adapter layer"
    why = unfusable_reason(layer.get_base_layer())
    if why is not None:
        return f"its base layer has {why}"
    variants = sorted(getattr(layer, "lora_variant", {}))
    if variants:
        return f"adapter(s) {variants} are LoRA variants (DoRA, ...) that peft computes with its own code"
    if any(getattr(layer, "lora_bias", {}).values()):
        return "an adapter has lora_bias=True"
    if layer.merged_adapters:
        return f"adapters {layer.merged_adapters} are merged (peft's merge keeps no copy to unmerge bit-exactly)"
    return None


class _Switch(threading.local):
    on = False


_STATE = _Switch()
_ORIG = {}


def _create_new_module(lora_config, adapter_name, target, **kwargs):
    # peft picks and builds its layer exactly as it would (custom modules, quantized bases, variants);
    # a plain lora.Linear / lora.Conv2d on a base the op computes becomes the fused class in place.
    new = _ORIG["fn"](lora_config, adapter_name, target, **kwargs)
    if _STATE.on:
        why = why_not_fused(new)
        if why is None:
            adopt(new)
        else:
            warnings.warn(f"use_fused_lora: a layer keeps peft's own (unfused) LoRA code: {why}", UserWarning,
                          stacklevel=2)
    return new


def _install() -> None:
    if "fn" not in _ORIG:
        _ORIG["fn"] = LoraModel._create_new_module
        LoraModel._create_new_module = staticmethod(_create_new_module)


class use_fused_lora:
    """Every LoRA layer peft builds while this is on runs the fused kernels: ``unet.add_adapter(config)``,
    ``pipe.load_lora_weights(...)``, ``inject_adapter_in_model``, ``get_peft_model``. The one line an
    existing peft/diffusers script needs::

        sk.use_fused_lora()                   # from here on (this thread)
        unet.add_adapter(unet_lora_config)

        with sk.use_fused_lora():             # or only inside the block
            pipe.load_lora_weights(path)

    The layers are peft's ``lora.Linear`` / ``lora.Conv2d`` subclassed (:class:`MaskedLoRALinear`,
    :class:`MaskedLoRAConv2d`): same parameters, state dicts and adapter API. Layers peft builds
    otherwise (quantized bases, DoRA and other variants, grouped or dilated convs, ``lora_bias``) stay
    peft's own. ``use_fused_lora(False)`` turns it off."""

    def __init__(self, enabled: bool = True):
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled: expected a bool, got {enabled!r}")
        _install()
        self._prev = _STATE.on
        _STATE.on = enabled

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _STATE.on = self._prev
        return False


def fused_lora_enabled() -> bool:
    return _STATE.on


__all__ = ["fused_lora_enabled", "is_lora_layer", "use_fused_lora", "why_not_fused"]
