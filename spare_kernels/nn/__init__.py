"""The fused layers: peft LoRA layers (``lora.Linear`` / ``lora.Conv2d`` subclassed) over the ops."""
from .dispatch import fused_lora_enabled, is_lora_layer, use_fused_lora, why_not_fused
from .lora import MaskedLoRAConv2d, MaskedLoRALinear, adopt, check_untied, iter_patched, release, wrap

__all__ = ["MaskedLoRALinear", "MaskedLoRAConv2d", "adopt", "check_untied", "fused_lora_enabled", "is_lora_layer",
           "iter_patched", "release", "use_fused_lora", "why_not_fused", "wrap"]
