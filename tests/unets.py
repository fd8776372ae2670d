"""Tiny diffusers UNets built from configs (no downloads), shared by the tests."""
import torch

from benchmarks.shapes import TINY  # one tiny config for tests and benchmarks


def tiny_unet(seed=0, dtype=torch.float32, **over):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**TINY, **over}).to(dtype).eval()


def tiny_inputs(batch=2, dtype=torch.float32, seed=1, tokens=7):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g).to(dtype), torch.tensor([10, 500] * (batch // 2) + [7] * (batch % 2)),
            torch.randn(batch, tokens, 32, generator=g).to(dtype))


def run(unet, inputs):
    x, t, e = inputs
    return unet(x, t, encoder_hidden_states=e).sample
