"""spare_kernels: fused masked sparse-LoRA and saliency kernels for concept unlearning in diffusion UNets."""
__version__ = "0.1.0"

from .backends import backend_info, set_backend, use_backend
from .masks import Mask
from .topk import topk_masks
from .ops import STATS, masked_lora_conv2d, masked_lora_linear, saliency_conv2d, saliency_linear
from . import nn  # noqa: E402  (spare_kernels.nn: the modules)
from .patch import patch_unet, unpatch_unet
from .saliency import SaliencyCollector
from .adapters import (adapter_names, disable_adapters, enable_adapter, load_adapter, merge_adapter,
                       remove_adapter, save_adapter, set_active_adapters, set_adapter_scale, unmerge_adapter)

__all__ = [
    "Mask", "STATS", "SaliencyCollector", "adapter_names", "backend_info", "disable_adapters", "enable_adapter", "load_adapter",
    "masked_lora_conv2d", "masked_lora_linear", "merge_adapter", "nn", "patch_unet", "remove_adapter",
    "saliency_conv2d", "saliency_linear", "save_adapter", "set_active_adapters", "set_adapter_scale",
    "set_backend", "topk_masks", "unmerge_adapter", "unpatch_unet", "use_backend",
]
