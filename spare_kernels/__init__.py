"""spare_kernels: fused masked sparse-LoRA and saliency kernels for concept unlearning in diffusion UNets."""
__version__ = "0.1.0"

from .backends import backend_info, set_backend, use_backend
from .masks import Mask, topk_masks
from .ops import STATS, masked_lora_conv2d, masked_lora_linear, saliency_conv2d, saliency_linear

__all__ = [
    "Mask", "STATS", "backend_info", "masked_lora_conv2d", "masked_lora_linear", "saliency_conv2d",
    "saliency_linear", "set_backend", "topk_masks", "use_backend",
]
