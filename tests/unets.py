"""Tiny diffusers UNets built from configs (no downloads), shared by the tests."""
import torch

TINY = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)


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
