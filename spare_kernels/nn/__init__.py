"""Thin nn modules over the ops."""
from .lora import MaskedLoRAConv2d, MaskedLoRALinear, iter_patched, wrap

__all__ = ["MaskedLoRALinear", "MaskedLoRAConv2d", "iter_patched", "wrap"]
