"""torch.compile of a patched diffusers UNet: the patched layers cause no graph break, and compiled
forward + backward match eager (outputs and adapter gradients), with dense adapters and element masks.

The unpatched tiny UNet already compiles with fullgraph=True in diffusers 0.42, so fullgraph=True
on the patched UNet is the direct check (any break raises). The whole UNet is compiled with the
``aot_eager`` backend (Dynamo + AOTAutograd: traces the ops' fake and autograd formulas, forward and
backward, without Inductor's minutes of C++ codegen on CPU); one BasicTransformerBlock with patched
layers goes through the default Inductor backend."""
import pytest
import torch
from torch import nn

import spare_kernels as sk
from spare_kernels.nn import MaskedLoRAConv2d, iter_patched
from unets import run, tiny_inputs, tiny_unet


def element_masks(module, pred=lambda name: True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"{n}.weight": sk.Mask.from_dense(torch.rand(m.weight.shape, generator=g) > 0.5)
            for n, m in module.named_modules() if type(m) in (nn.Linear, nn.Conv2d) and pred(n)}


def adapter_grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}


def eager_and_compiled(module, call, backend):
    """(eager output, eager adapter grads, compiled output, compiled adapter grads, compiled callable)."""
    y = call(module)
    y.square().mean().backward()
    g = adapter_grads(module)
    module.zero_grad(set_to_none=True)
    compiled = torch.compile(module, fullgraph=True, backend=backend)   # raises on any graph break
    yc = call(compiled)
    yc.square().mean().backward()
    return y, g, yc, adapter_grads(module), compiled


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("kind", ["dense", "element"])
def test_patched_unet_fullgraph_forward_backward_matches_eager(kind):
    torch._dynamo.reset()
    unet = tiny_unet()
    masks = element_masks(unet) if kind == "element" else None
    sk.patch_unet(unet, masks=masks, init="random", target_modules="all")   # every Linear and Conv2d
    layers = dict(iter_patched(unet))
    assert any(isinstance(m, MaskedLoRAConv2d) for m in layers.values())
    assert all((m.masks["default"] is not None) == (kind == "element") for m in layers.values())
    inp = tiny_inputs()
    y, g, yc, gc, compiled = eager_and_compiled(unet, lambda m: run(m, inp), "aot_eager")
    close(yc, y)
    assert g.keys() == gc.keys() and len(g) == 2 * len(layers)
    for k in g:
        close(gc[k], g[k])
    with torch._dynamo.config.patch(error_on_recompile=True):
        close(run(compiled, inp), y)                                     # a second call reuses the graph


def test_patched_transformer_block_inductor_fullgraph():
    from diffusers.models.attention import BasicTransformerBlock
    torch._dynamo.reset()
    torch.manual_seed(0)
    blk = BasicTransformerBlock(32, 4, 8, cross_attention_dim=32).eval()
    masks = element_masks(blk, pred=lambda n: n.startswith(("attn1", "ff")))     # attn2 keeps dense adapters
    sk.patch_unet(blk, masks=masks, init="random", target_modules="all")
    kinds = {n: m.masks["default"] is not None for n, m in iter_patched(blk)}
    assert any(kinds.values()) and not all(kinds.values())
    x, e = torch.randn(2, 16, 32), torch.randn(2, 7, 32)
    y, g, yc, gc, _ = eager_and_compiled(blk, lambda m: m(x, encoder_hidden_states=e), "inductor")
    close(yc, y)
    assert g.keys() == gc.keys() and len(g) == 2 * len(kinds)
    for k in g:
        close(gc[k], g[k])
