"""An SD-1.5-shaped UNet (random weights from SD-1.5's config): patch every Linear and Conv2d with 50%
element masks, take one training step, unpatch: the state dict is bit-exact as before.

Slow (about 0.9 G parameters, several GB of RAM): run with ``pytest -m slow`` / ``make test-slow``."""
import time

import pytest
import torch
from torch import nn

import spare_kernels as sk
from spare_kernels.nn import MaskedLoRAConv2d, MaskedLoRALinear, iter_patched

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


@pytest.mark.slow
def test_sd15_all_targets_element50_train_step_unpatch_bit_exact():
    from diffusers import UNet2DConditionModel
    t0 = time.perf_counter()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15).eval()
    assert 850e6 < sum(p.numel() for p in unet.parameters()) < 870e6          # SD-1.5's 859.5 M
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    layers = {n: m.weight.shape for n, m in unet.named_modules() if type(m) in (nn.Linear, nn.Conv2d)}
    masks = {}
    for i, (n, shape) in enumerate(layers.items()):   # top 50% of random scores, one weight at a time
        scores = torch.rand(shape, generator=torch.Generator().manual_seed(i))
        masks.update(sk.topk_masks({f"{n}.weight": scores}, density=0.5))
    sk.patch_unet(unet, masks=masks, target_modules="all", rank=4, init="gaussian")
    patched = dict(iter_patched(unet))
    assert patched.keys() == layers.keys()
    assert {type(m) for m in patched.values()} == {MaskedLoRALinear, MaskedLoRAConv2d}
    assert all(abs(m.masks["default"].density - 0.5) < 1e-3 for m in patched.values())
    with torch.no_grad():   # B = 0 from the gaussian init; small non-zero B so that every factor gets a gradient
        for m in patched.values():
            m.lora_B["default"].weight.normal_(std=1e-3, generator=torch.Generator().manual_seed(2))
    adapters = [p for p in unet.parameters() if p.requires_grad]
    assert len(adapters) == 2 * len(layers)
    start = [p.detach().clone() for p in adapters]
    opt = torch.optim.Adam(adapters, lr=1e-3)       # no weight decay: a factor moves only by its gradient
    g = torch.Generator().manual_seed(1)
    x, noise, ehs = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 4, 32, 32, generator=g), \
        torch.randn(1, 77, 768, generator=g)
    loss = nn.functional.mse_loss(unet(x, torch.tensor([500]), encoder_hidden_states=ehs).sample, noise)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in unet.parameters() if not p.requires_grad)   # base stays frozen
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in adapters)
    opt.step()
    assert sum(not torch.equal(p, s) for p, s in zip(adapters, start)) == len(adapters)   # every factor moved
    sk.unpatch_unet(unet)
    assert not list(iter_patched(unet))
    after = unet.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) and after[k].dtype == before[k].dtype for k in before)
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == flags
    print(f"sd15 patch/step/unpatch: {len(layers)} layers, loss {loss.item():.4f}, {time.perf_counter() - t0:.1f} s")
