"""peft's side of the fused layers: a switch that makes every LoRA layer peft builds from now on a
fused one where the op computes it (:func:`use_fused_lora`)."""
from __future__ import annotations

import threading
import warnings

from peft.tuners.lora import layer as peft_lora
from peft.tuners.lora.model import LoraModel
from torch import nn

from .lora import adopt, why_not_fused


def is_lora_layer(m: nn.Module) -> bool:
    """peft's LoRA layers (``lora.Linear``, ``lora.Conv2d``, bnb's, ...), fused or not."""
    return isinstance(m, peft_lora.LoraLayer)


class _Switch(threading.local):
    on = False


_STATE = _Switch()
_ORIG = {}
_LOCK = threading.Lock()   # two first calls at once must not take each other's wrapper for peft's function


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
    with _LOCK:
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
