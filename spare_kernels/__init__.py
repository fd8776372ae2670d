"""spare_kernels: fused masked sparse-LoRA and saliency kernels for concept unlearning in diffusion UNets."""
import importlib

from ._version import __version__

from .backends import backend_info, set_backend, use_backend
from .masks import Mask
from .topk import topk_masks
from .ops import STATS, masked_lora_conv2d, masked_lora_linear, saliency_conv2d, saliency_linear
from .saliency import SaliencyCollector

# The layers are peft's (importing peft takes ~3 s): loaded on first use, so the ops, masks, top-k and
# saliency stay a torch-only import.
_LAZY = {
    "nn": None,
    # the module, callable as its function patch(model, ...) (see spare_kernels/patch.py)
    "patch": None, "unpatch": "patch", "patch_unet": "patch", "unpatch_unet": "patch",
    **{n: "targets" for n in ("cross_attention_params", "family_of")},
    "use_fused_lora": "nn.dispatch",
    "warmup": None,   # the module, callable as its function warmup(model, ...) (see spare_kernels/warmup.py)
    **{n: "adapters" for n in ("adapter_names", "disable_adapters", "enable_adapter", "export_lora", "load_adapter",
                               "merge_adapter", "remove_adapter", "save_adapter", "set_active_adapters",
                               "set_adapter_scale", "unmerge_adapter")},
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'spare_kernels' has no attribute {name!r}")
    if _LAZY[name] is None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Mask", "STATS", "SaliencyCollector", "adapter_names", "backend_info", "cross_attention_params",
    "disable_adapters", "enable_adapter", "export_lora", "family_of", "load_adapter", "masked_lora_conv2d",
    "masked_lora_linear", "merge_adapter", "nn", "patch", "patch_unet", "remove_adapter", "saliency_conv2d",
    "saliency_linear", "save_adapter", "set_active_adapters", "set_adapter_scale", "set_backend", "topk_masks",
    "unmerge_adapter", "unpatch", "unpatch_unet", "use_backend", "use_fused_lora", "warmup",
]
