"""Every distinct Linear and Conv2d call shape of a diffusers UNet, read off a meta-device forward."""
from __future__ import annotations

import torch
from torch import nn

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
TINY = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
            norm_num_groups=8)
CONFIGS = {"sd15": SD15, "tiny": TINY}


def build_unet(config: str = "sd15", device="cpu", seed: int = 0):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    with torch.device(device):
        return UNet2DConditionModel(**CONFIGS[config]).eval()


def unet_inputs(config: str, batch: int, latent: int, device="cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ctx = CONFIGS[config]["cross_attention_dim"]
    x = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    e = torch.randn(batch, 77 if config == "sd15" else 7, ctx, generator=g).to(device)
    return x, t, e


def layer_shapes(config: str = "sd15", batch: int = 1, latent: int = 32) -> list[dict]:
    """Distinct call shapes: ``{"kind": "linear", "n", "in", "out", "count", "names"}`` or
    ``{"kind": "conv2d", "x": (N, C, H, W), "weight": ..., "stride", "padding", "count", "names"}``."""
    unet = build_unet(config, device="meta")
    seen: dict[tuple, dict] = {}

    def hook(name):
        def fn(mod, args, out):
            x = args[0]
            if isinstance(mod, nn.Linear):
                n = x.numel() // x.shape[-1]
                key = ("linear", n, mod.in_features, mod.out_features)
                rec = dict(kind="linear", n=n, **{"in": mod.in_features, "out": mod.out_features})
            else:
                key = ("conv2d", tuple(x.shape), tuple(mod.weight.shape), mod.stride, mod.padding)
                rec = dict(kind="conv2d", x=tuple(x.shape), weight=tuple(mod.weight.shape), stride=mod.stride,
                           padding=mod.padding, dilation=mod.dilation, groups=mod.groups)
            r = seen.setdefault(key, {**rec, "count": 0, "names": []})
            r["count"] += 1
            r["names"].append(name)
        return fn

    for name, m in unet.named_modules():
        if type(m) in (nn.Linear, nn.Conv2d):
            m.register_forward_hook(hook(name))
    with torch.no_grad():
        unet(*unet_inputs(config, batch, latent, device="meta"))
    return list(seen.values())


if __name__ == "__main__":
    for r in layer_shapes():
        print({k: v for k, v in r.items() if k != "names"})


def describe(spec) -> str:
    """A layer spec (``layer_shapes``) as a table label."""
    if spec["kind"] == "linear":
        return f"linear {spec['n']}x{spec['in']}->{spec['out']}"
    n, c, h, w = spec["x"]
    o, _, kh, kw = spec["weight"]
    s = spec["stride"][0]
    return f"conv {n}x{c}x{h}x{w} {kh}x{kw}->{o}" + (f" s{s}" if s != 1 else "")
