"""Second probe (issue 28): patch_unet's rollback and root module, the saliency collector under threads and
inference mode, top-k on meta tensors. One test per finding, named after it."""
import threading

import pytest
import torch
from peft import LoraConfig
from torch import nn

import spare_kernels as sk
import spare_kernels.nn.dispatch as dispatch
import spare_kernels.patch as patch_mod
from spare_kernels.nn import iter_patched
from spare_kernels.saliency import SaliencyCollector
from unets import tiny_unet

PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2"]


def snapshot(model):
    """Everything a failed patch must leave as it was."""
    return ({n: type(m) for n, m in model.named_modules()},
            {k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {k: v for k, v in model.__dict__.items() if not k.startswith("_") or "peft" in k or "spare" in k})


def assert_same(a, b):
    assert a[0] == b[0], [n for n in b[0] if a[0].get(n) != b[0][n]][:5]
    assert a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    assert a[2] == b[2]
    assert a[3].keys() == b[3].keys()


def fail_on_call(monkeypatch, owner, attr, n=11):
    """``owner.attr`` raises an out-of-memory RuntimeError on its ``n``-th call (as torch's OOM does)."""
    orig, calls = getattr(owner, attr), [0]

    def boom(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 MiB")
        return orig(*a, **k)
    monkeypatch.setattr(owner, attr, boom)
    return calls


# --------------------------------------------------------------------- finding 1: rollback
@pytest.mark.parametrize("where", ["draw_factors", "wrap", "adopt_peft"])
def test_patch_unet_failure_at_11th_layer_rolls_back(monkeypatch, where):
    """A failure at the 11th layer (an OOM in the factors' allocation, in peft's wrap, or in adopting a
    peft model's 11th layer) leaves the model bit-identical, and a retry adapts every layer."""
    unet = tiny_unet()
    if where == "adopt_peft":
        unet.add_adapter(LoraConfig(r=4, target_modules=PEFT_TARGETS))
    before = snapshot(unet)
    n_lora = sum(1 for m in unet.modules() if dispatch.is_lora_layer(m))
    if where == "draw_factors":
        calls = fail_on_call(monkeypatch, patch_mod, "draw_factors")
    elif where == "wrap":
        from peft.tuners.lora import layer as peft_lora
        calls = fail_on_call(monkeypatch, peft_lora.LoraLayer, "update_layer")
    else:
        calls = fail_on_call(monkeypatch, patch_mod, "adopt")
    with pytest.raises(RuntimeError, match="out of memory"):
        sk.patch_unet(unet, target_modules="all" if where != "adopt_peft" else None)
    assert calls[0] == 11
    monkeypatch.undo()
    assert_same(before, snapshot(unet))
    assert not list(iter_patched(unet))
    sk.patch_unet(unet, target_modules="all" if where != "adopt_peft" else None)
    n_all = sum(type(m) in (nn.Linear, nn.Conv2d) for m in tiny_unet().modules())
    assert len(list(iter_patched(unet))) == (n_lora if where == "adopt_peft" else n_all)


# --------------------------------------------------------------------- finding 2: the root module
@pytest.mark.parametrize("root", [nn.Linear(4, 4), nn.Conv2d(2, 3, 3)])
def test_patch_unet_root_module_refused(root):
    before = snapshot(root)
    with pytest.raises(ValueError, match="root") as e:
        sk.patch_unet(root, target_modules="all")
    assert "nn.Sequential" in str(e.value)
    assert_same(before, snapshot(root))
    assert not hasattr(root, "peft_config")
    root.state_dict()   # no recursion
    # a model that holds the layer is patched as usual
    held = nn.Sequential(root)
    sk.patch_unet(held, target_modules="all")
    assert [n for n, _ in iter_patched(held)] == ["0"]
