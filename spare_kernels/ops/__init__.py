"""The ops, each defined once (schema, fake, autograd, per-device implementation)."""
from .masked_lora import masked_lora_conv2d, masked_lora_linear
from .saliency import STATS, saliency_conv2d, saliency_linear

__all__ = ["masked_lora_linear", "masked_lora_conv2d", "saliency_linear", "saliency_conv2d", "STATS"]
