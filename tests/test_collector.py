"""SaliencyCollector against plain autograd on unfrozen copies (param.grad, per-sample loops)."""
import copy
import gc
import re
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spare_kernels as sk
from spare_kernels.saliency import SaliencyCollector


# --------------------------------------------------------------------------- models
class StandInLinear(nn.Module):
    """What spare_kernels.nn will look like to the collector: a patched wrapper holding base_layer."""
    _spare_kernels_patched = True

    def __init__(self, base, r=2):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features) * 0.3)
        self.lora_B = nn.Parameter(torch.randn(base.out_features, r) * 0.3)

    def forward(self, x):  # output != base output, so the wrapper's own output gradient is what counts
        return self.base_layer(x) + (x @ self.lora_A.T) @ self.lora_B.T


class StandInConv(nn.Module):
    _spare_kernels_patched = True

    def __init__(self, base, r=2):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Parameter(torch.randn(r, base.in_channels, *base.kernel_size) * 0.3)
        self.lora_B = nn.Parameter(torch.randn(base.out_channels, r, 1, 1) * 0.3)

    def forward(self, x):
        b = self.base_layer
        a = F.conv2d(x, self.lora_A, None, b.stride, b.padding, b.dilation)
        return F.conv2d(x, b.weight, b.bias, b.stride, b.padding, b.dilation, b.groups) + F.conv2d(a, self.lora_B)


class Toy(nn.Module):
    """MLP + conv: strided/dilated/grouped conv, 'same' padding, Linear on (B, T, C) and on (B, C)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=2)
        self.conv3 = nn.Conv2d(8, 8, 3, padding="same")
        self.proj = nn.Linear(8, 16)
        self.head = nn.Linear(16, 5)
        self.unused = nn.Linear(5, 5)

    def forward(self, img, cond):
        h = self.conv3(F.silu(self.conv2(F.silu(self.conv1(img)))))
        tok = self.proj(h.flatten(2).transpose(1, 2)) + cond[:, None, :]
        return self.head(F.gelu(tok).mean(1))


def toy_inputs(B=4):
    return (torch.randn(B, 3, 9, 9), torch.randn(B, 16)), torch.randn(B, 5)


def tiny_unet():
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)


def unet_inputs(B=3, float_t=False):
    t = torch.rand(B) * 999 if float_t else torch.randint(0, 1000, (B,))
    return (torch.randn(B, 4, 8, 8), t, torch.randn(B, 5, 32)), torch.randn(B, 4, 8, 8)


def run(model, inputs):
    out = model(*inputs)
    return out.sample if hasattr(out, "sample") else out


def loss_fn(out, target):
    # sum over samples, so the batch gradient is the sum of the per-sample gradients
    return ((out - target) ** 2).sum() * 0.1


def layer_weights(model):
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def frozen(model):
    m = copy.deepcopy(model)
    m.requires_grad_(False)
    return m


def batch_grads(model, inputs, target):
    m = copy.deepcopy(model).requires_grad_(True)
    loss_fn(run(m, inputs), target).backward()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def per_sample_grads(model, inputs, target):
    m = copy.deepcopy(model).requires_grad_(True)
    gs = []
    for i in range(target.shape[0]):
        m.zero_grad(set_to_none=True)
        loss_fn(run(m, tuple(t[i:i + 1] for t in inputs)), target[i:i + 1]).backward()
        gs.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    return {n: torch.stack([g[n] for g in gs]) for n in gs[0]}


def expected(g, stat):
    return {"grad_abs": g.sum(0).abs(), "signed": g.sum(0), "sample_abs": g.abs().sum(0),
            "sample_sq": (g ** 2).sum(0)}[stat]


def close(got, ref, what, rtol=1e-4):
    assert got.dtype == torch.float32 and got.shape == ref.shape, what
    torch.testing.assert_close(got, ref.float(), rtol=rtol, atol=1e-5 * max(ref.abs().max().item(), 1e-12),
                               msg=lambda m: f"{what}: {m}")


def collect(model, inputs, target, stat="grad_abs", **kw):
    with SaliencyCollector(model, stat, **kw) as col:
        loss_fn(run(model, inputs), target).backward()
    return col


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny tensors (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(1)
    return tiny_unet()


# --------------------------------------------------------------------------- statistics
def test_toy_stats_match_per_sample_definitions(backend):
    model = Toy()
    inputs, target = toy_inputs()
    fz = frozen(model)
    cols = [SaliencyCollector(fz, s).start() for s in sk.STATS]  # one backward feeds all four
    loss_fn(run(fz, inputs), target).backward()
    for c in cols:
        c.stop()
    g = per_sample_grads(model, inputs, target)
    for stat, col in zip(sk.STATS, cols):
        scores = col.scores()
        assert set(scores) == set(layer_weights(model)) - {"unused.weight"}
        for k, s in scores.items():
            close(s, expected(g[k], stat), f"{stat} {k}")


def test_toy_grad_abs_equals_param_grad_abs(backend):
    model = Toy()
    inputs, target = toy_inputs()
    scores = collect(frozen(model), inputs, target).scores()
    ref = batch_grads(model, inputs, target)
    for k in layer_weights(model):
        if k != "unused.weight":
            close(scores[k], ref[k].abs(), k)


def test_unet_gradient_checkpointing(unet):
    inputs, target = unet_inputs(B=2)
    fz = frozen(unet)
    fz.enable_gradient_checkpointing()
    col = collect(fz, inputs, target)
    assert col.num_updates == 83  # recomputed forwards do not count twice
    ref = batch_grads(unet, inputs, target)
    for k, s in col.scores().items():
        close(s, ref[k].abs(), k)


@pytest.mark.parametrize("float_t", [False, True], ids=["int_t", "float_t"])
def test_unet_grad_abs_equals_param_grad_abs(unet, float_t):
    inputs, target = unet_inputs(float_t=float_t)
    model = frozen(unet)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    col = collect(model, inputs, target)
    scores = col.scores()
    ref = batch_grads(unet, inputs, target)
    # every Linear and Conv2d weight, keyed and ordered like named_parameters
    names = [n for n, _ in model.named_parameters()]
    assert list(scores) == [n for n in names if n in set(layer_weights(model))]
    assert len(scores) == 83
    for k, s in scores.items():
        assert s.shape == dict(model.named_parameters())[k].shape
        close(s, ref[k].abs(), k)
    # frozen stays frozen, no .grad anywhere, inputs untouched, nothing held
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(not t.requires_grad and t.grad is None for t in inputs)
    assert col.num_pending == 0 and col.num_backwards == 1 and col.num_forwards == 1 and col.num_updates == 83
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_unet_sample_stats(unet):
    # three collectors at once on one model: also checks that they do not disturb each other
    stats = ("signed", "sample_abs", "sample_sq")
    inputs, target = unet_inputs(B=2)
    fz = frozen(unet)
    cols = [SaliencyCollector(fz, s).start() for s in stats]
    loss_fn(run(fz, inputs), target).backward()
    for c in cols:
        c.stop()
    g = per_sample_grads(unet, inputs, target)
    for stat, col in zip(stats, cols):
        scores = col.scores()
        assert len(scores) == 83 and col.num_updates == 83
        for k, s in scores.items():
            close(s, expected(g[k], stat), f"{stat} {k}")


def test_accumulates_over_backward_passes_and_reset():
    model = Toy()
    fz = frozen(model)
    batches = [toy_inputs(3) for _ in range(2)]
    col = SaliencyCollector(fz, "grad_abs").start()
    for inputs, target in batches:
        loss_fn(run(fz, inputs), target).backward()
    col.stop()
    assert col.num_backwards == 2 and col.num_forwards == 2
    refs = [batch_grads(model, i, t) for i, t in batches]
    scores = col.scores()
    for k, s in scores.items():
        close(s, refs[0][k].abs() + refs[1][k].abs(), k)
    kept = {k: v.clone() for k, v in scores.items()}
    col.reset()
    assert col.scores() == {} and col.num_backwards == col.num_updates == col.num_forwards == 0
    with col:  # reusable; buffers returned before reset() are not touched
        loss_fn(run(fz, batches[0][0]), batches[0][1]).backward()
    for k in kept:
        assert torch.equal(scores[k], kept[k])
        close(col.scores()[k], refs[0][k].abs(), k)


def test_inputs_are_aliased_not_copied():
    fz = frozen(Toy())
    (img, cond), target = toy_inputs()
    seen = []
    fz.conv1.register_forward_pre_hook(lambda m, args: seen.append((args[0].requires_grad, args[0].data_ptr())))
    with SaliencyCollector(fz):
        loss_fn(run(fz, (img, cond)), target).backward()
    run(fz, (img, cond))
    # while collecting the model sees a grad-requiring alias of the caller's storage; after, the tensor itself
    assert seen == [(True, img.data_ptr()), (False, img.data_ptr())]
    assert not img.requires_grad and img.grad is None and cond.grad is None


def test_all_targets_adds_zeros_for_layers_without_gradient():
    fz = frozen(Toy())
    inputs, target = toy_inputs()
    col = collect(fz, inputs, target)
    assert "unused.weight" not in col.scores()
    full = col.scores(all_targets=True)
    assert list(full) == layer_weights(fz)
    assert torch.count_nonzero(full["unused.weight"]) == 0 and full["unused.weight"].shape == (5, 5)


def test_layer_called_twice_contributes_per_call():
    lin = nn.Linear(6, 6)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x)))

    model = Twice()
    x, target = torch.randn(4, 6), torch.randn(4, 6)
    col = collect(frozen(model), (x,), target, "signed")
    assert col.num_updates == 2
    close(col.scores()["lin.weight"], batch_grads(model, (x,), target)["lin.weight"], "signed, two calls")


def test_no_grad_and_stopped_forwards_are_not_collected():
    fz = frozen(Toy())
    inputs, target = toy_inputs()
    col = SaliencyCollector(fz).start()
    with torch.no_grad():
        run(fz, inputs)
    assert col.num_pending == 0 and col.num_forwards == 0
    col.stop()
    assert not fz._forward_pre_hooks and all(not m._forward_hooks for m in fz.modules())
    out = run(fz, inputs)
    assert not out.requires_grad  # the model is back to plain frozen behaviour
    assert col.scores() == {}


def test_autocast_bf16():
    model = Toy()
    inputs, target = toy_inputs()
    fz = frozen(model)
    with SaliencyCollector(fz) as col, torch.autocast("cpu", dtype=torch.bfloat16):
        loss_fn(run(fz, inputs).float(), target).backward()
    m = copy.deepcopy(model).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_fn(run(m, inputs).float(), target).backward()
    for k, s in col.scores().items():
        ref = dict(m.named_parameters())[k].grad.abs()
        torch.testing.assert_close(s, ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())


# --------------------------------------------------------------------------- memory
class Chain(nn.Module):
    """Frozen Linear -> Linear -> Linear: autograd itself keeps no layer input, so only the collector could."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.l3(self.l2(self.l1(x)))


def _watch_inputs(model):
    refs = []
    for m in (model.l2, model.l3):  # their inputs are intermediates nobody else holds
        m.register_forward_hook(lambda mod, args, out: refs.append(weakref.ref(args[0])))
    return refs


def test_inputs_released_after_backward():
    model = frozen(Chain())
    refs = _watch_inputs(model)
    with SaliencyCollector(model) as col:
        out = model(torch.randn(4, 8))
        gc.collect()
        assert col.num_pending == 3 and all(r() is not None for r in refs)  # held until their backward
        loss = out.square().sum()
        loss.backward()
        gc.collect()
        assert col.num_pending == 0
        assert all(r() is None for r in refs)  # gone although `out` and `loss` are still alive
    assert out is not None and loss is not None


@pytest.mark.parametrize("how", ["stop", "exit", "reset", "graph_dropped"])
def test_inputs_released_without_backward(how):
    model = frozen(Chain())
    refs = _watch_inputs(model)
    col = SaliencyCollector(model)
    with col:
        out = model(torch.randn(4, 8))
        assert col.num_pending == 3
        if how == "stop":
            col.stop()
        elif how == "reset":
            col.reset()
        elif how == "graph_dropped":
            del out
    gc.collect()
    assert col.num_pending == 0 and all(r() is None for r in refs)
    if how != "graph_dropped":
        out.sum().backward()  # a late backward is ignored, not an error
        assert col.scores() == {}


def test_in_place_change_of_input_raises():
    model = frozen(Chain())
    x = torch.randn(4, 8)
    with SaliencyCollector(model):
        out = model(x)
        x.add_(1.0)
        with pytest.raises(RuntimeError, match="'l1' was modified in place"):
            out.sum().backward()


# --------------------------------------------------------------------------- validation and selection
def test_stat_validation():
    with pytest.raises(ValueError, match=r"stat: expected one of \('grad_abs', 'signed', 'sample_abs', 'sample_sq'\)"):
        SaliencyCollector(Toy(), "fisher")
    with pytest.raises(TypeError, match="module"):
        SaliencyCollector("unet")


def test_target_selection_unet(unet):
    every = SaliencyCollector(unet).names
    assert every == [n for n, _ in unet.named_parameters() if n in set(layer_weights(unet))]
    qk = SaliencyCollector(unet, target_modules=["to_q", "attn2.to_k"]).names
    assert qk and all(re.search(r"(\.to_q|attn2\.to_k)\.weight$", k) for k in qk)
    assert len(qk) == 3 * 4  # 4 transformer blocks: attn1.to_q, attn2.to_q, attn2.to_k
    rx = SaliencyCollector(unet, target_modules=r".*attn\d\.to_[qkv]").names
    assert len(rx) == 4 * 6 and all(re.search(r"attn\d\.to_[qkv]\.weight$", k) for k in rx)
    convs = SaliencyCollector(unet, target_modules=lambda n, m: isinstance(m, nn.Conv2d)).names
    assert convs and all(isinstance(unet.get_submodule(k[:-len(".weight")]), nn.Conv2d) for k in convs)
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in unet.modules())
    # exact-name entry
    assert SaliencyCollector(unet, target_modules=["conv_in"]).names == ["conv_in.weight"]


def test_target_selection_errors(unet):
    with pytest.raises(ValueError, match=r"matched no .*closest module names: .*'to_k'"):
        SaliencyCollector(unet, target_modules=["to_kk"])
    with pytest.raises(ValueError, match=r"re\.fullmatch.*closest module names: .*'to_q'"):
        SaliencyCollector(unet, target_modules="to_q")  # peft semantics: a regex on the whole name
    with pytest.raises(ValueError, match="matched no"):
        SaliencyCollector(unet, target_modules=lambda n, m: False)
    with pytest.raises(ValueError, match="matched no"):
        SaliencyCollector(unet, target_modules=["attn1"])  # not a Linear/Conv2d itself
    with pytest.raises(ValueError, match="invalid regex"):
        SaliencyCollector(unet, target_modules="to_[q")
    with pytest.raises(TypeError, match="target_modules"):
        SaliencyCollector(unet, target_modules=3)
    with pytest.warns(UserWarning, match=r"\['to_zz'\] matched no"):
        keys = SaliencyCollector(unet, target_modules=["to_q", "to_zz"]).names
    assert keys and all(k.endswith("to_q.weight") for k in keys)


def test_selection_collects_only_targets(unet):
    inputs, target = unet_inputs(B=2)
    scores = collect(frozen(unet), inputs, target, target_modules=["to_v", "conv_in"]).scores()
    ref = batch_grads(unet, inputs, target)
    assert set(scores) == {k for k in layer_weights(unet) if k.endswith("to_v.weight")} | {"conv_in.weight"}
    for k, s in scores.items():
        close(s, ref[k].abs(), k)


@pytest.mark.parametrize("conv,msg", [
    (nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), r"'bad': padding_mode='reflect'"),
    (nn.Conv2d(3, 4, 4, padding="same"), r"'same' would be asymmetric.*module 'bad'"),
])
def test_unsupported_conv_rejected_at_construction(conv, msg):
    model = nn.Sequential()
    model.add_module("ok", nn.Conv2d(3, 3, 3, padding="valid"))
    model.add_module("bad", conv)
    with pytest.raises(ValueError, match=msg):
        SaliencyCollector(model)
    assert SaliencyCollector(model, target_modules=["ok"]).names == ["ok.weight"]  # excluding it works


# --------------------------------------------------------------------------- wrapped layers
def test_patched_module_stand_in(backend):
    model = Toy()
    model.proj = StandInLinear(model.proj)
    model.conv2 = StandInConv(model.conv2)
    inputs, target = toy_inputs()
    fz = frozen(model)
    col = collect(fz, inputs, target, "grad_abs")
    scores = col.scores()
    assert "proj.base_layer.weight" in scores and "conv2.base_layer.weight" in scores
    assert not any("lora" in k for k in scores)
    assert col.num_updates == len(scores) == 5  # inner base_layer not hooked a second time
    ref = batch_grads(model, inputs, target)
    for k, s in scores.items():
        close(s, ref[k].abs(), k)
    # matched by the wrapper's name, like peft
    assert SaliencyCollector(fz, target_modules=["proj"]).names == ["proj.base_layer.weight"]
    assert SaliencyCollector(fz, target_modules=["proj.base_layer"]).names == ["proj.base_layer.weight"]


def test_peft_lora_unet(unet):
    pytest.importorskip("peft")
    from peft import LoraConfig

    model = copy.deepcopy(unet)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v", "conv1"],
                                 init_lora_weights=False))  # random B: wrapper output != base output
    inputs, target = unet_inputs(B=2)
    fz = frozen(model)
    col = collect(fz, inputs, target)
    scores = col.scores()
    assert len(scores) == 83 and not any("lora_" in k for k in scores)
    wrapped = [n for n, _ in unet.named_modules() if n.rsplit('.', 1)[-1] in ('to_q', 'to_v', 'conv1')]
    assert sorted(k for k in scores if k.endswith('base_layer.weight')) == sorted(f'{n}.base_layer.weight' for n in wrapped)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.base_layer.weight" in scores
    ref = batch_grads(model, inputs, target)
    for k, s in scores.items():
        close(s, ref[k].abs(), k)
    assert all(p.grad is None for p in fz.parameters())
    q = SaliencyCollector(fz, target_modules=["to_q"]).names
    assert len(q) == 8 and all(k.endswith("to_q.base_layer.weight") for k in q)
