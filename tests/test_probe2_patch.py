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


# --------------------------------------------------------------------- finding 3: threads
def test_collector_two_threads_backward_lose_no_update():
    """Two threads running backward through one collector add exactly what the same passes add one after
    the other (integer-valued data: every sum is exact in fp32, whatever its order)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024)).requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-2, 3, p.shape))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(-2, 3, (4, 1024), generator=g).float(), torch.randint(-2, 3, (4, 1024), generator=g).float())
            for _ in range(60)]

    def passes(part):
        for x, c in part:
            (model(x) * c).sum().backward()
    with SaliencyCollector(model) as seq:
        passes(data)
    with SaliencyCollector(model) as par:
        threads = [threading.Thread(target=passes, args=(data[i::2],)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    want, got = seq.scores(), par.scores()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), f"{k}: {int((got[k] != want[k]).sum())} entries differ"
    assert par.num_updates == seq.num_updates == 120


# --------------------------------------------------------------------- finding 4: inference mode
class _Cached(nn.Module):
    """A model whose layer runs on a tensor it keeps, made under inference_mode."""
    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(6, 5), nn.Linear(5, 3)
        with torch.inference_mode():
            self.cache = torch.randn(2, 6)

    def forward(self, x):
        return self.out(self.lin(self.cache) * x)


def test_collector_inference_mode_inputs():
    """Latents and text embeddings made under torch.inference_mode() give the scores of ordinary ones (they
    are copied into the graph), as does a layer input the model keeps from inference mode."""
    from unets import run, tiny_inputs
    unet = tiny_unet().requires_grad_(False)

    def scores(inputs):
        with SaliencyCollector(unet) as col:
            run(unet, inputs).pow(2).mean().backward()
        return col.scores()
    want = scores(tiny_inputs())
    with torch.inference_mode():
        frozen = tiny_inputs()
    assert all(t.is_inference() for t in frozen)
    got = scores(frozen)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    model = _Cached().requires_grad_(False)
    x = torch.randn(2, 5)
    with SaliencyCollector(model) as col:
        model(x).sum().backward()
    twin = _Cached()   # the same model on an ordinary copy of the cache, unfrozen: its .grad
    twin.load_state_dict(model.state_dict())
    twin.cache = model.cache.clone()
    twin(x).sum().backward()
    torch.testing.assert_close(col.scores()["lin.weight"], twin.lin.weight.grad.abs())
    torch.testing.assert_close(col.scores()["out.weight"], twin.out.weight.grad.abs())


# --------------------------------------------------------------------- finding 5: meta tensors
@pytest.mark.parametrize("granularity", ["element", "row"])
def test_topk_masks_meta_tensor_refused(granularity):
    scores = {"a.weight": torch.rand(8, 8), "b.weight": torch.empty(4, 4, device="meta")}
    with pytest.raises(ValueError, match=r"scores\['b.weight'\].*meta") as e:
        sk.topk_masks(scores, 0.5, granularity=granularity)
    assert "cpu or cuda" in str(e.value)


# --------------------------------------------------------------------- review fixes
def test_patch_unet_adopt_failure_inside_init_fused_rolls_back(monkeypatch):
    """adopt failing after the layer's class changed (in _init_fused, at the 11th layer): that layer is
    peft's own again too, and the model as it was."""
    from spare_kernels.nn import lora
    unet = tiny_unet()
    unet.add_adapter(LoraConfig(r=4, target_modules=PEFT_TARGETS))
    before = snapshot(unet)
    keys = {n: set(m.__dict__) for n, m in unet.named_modules()}
    calls = fail_on_call(monkeypatch, lora._Fused, "_init_fused")
    with pytest.raises(RuntimeError, match="out of memory"):
        sk.patch_unet(unet)
    assert calls[0] == 11
    monkeypatch.undo()
    assert_same(before, snapshot(unet))
    assert not list(iter_patched(unet))
    assert {n: set(m.__dict__) for n, m in unet.named_modules()} == keys


@pytest.mark.parametrize("granularity", ["element", "block", "row", "module"])
def test_topk_masks_output_not_rechecked(monkeypatch, granularity):
    """top-k's masks are consistent by construction: no padding-bit check (a device read) per mask."""
    import spare_kernels.masks as masks_mod

    def refuse(*a, **k):
        raise AssertionError("a top-k mask was checked again")
    monkeypatch.setattr(masks_mod, "_check_padding", refuse)
    torch.manual_seed(0)
    scores = {"a.weight": torch.rand(12, 10), "b.weight": torch.rand(6, 3, 3, 3)}
    out = sk.topk_masks(scores, 0.5, granularity=granularity, block=(4, 4))
    for n, t in scores.items():
        assert out[n].shape == t.shape and out[n].granularity == granularity
        assert out[n].block == ((4, 4) if granularity == "block" else None)
    if granularity == "element":
        assert sum(mk.count for mk in out.values()) == round(0.5 * (120 + 162))
