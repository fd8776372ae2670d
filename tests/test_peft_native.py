"""Patched models are peft models: every peft / diffusers adapter call that diffusers' LoRA training scripts
and SPARE's loop make behaves on a patched UNet as on the stock peft UNet (outputs to float rounding,
state dicts, errors), in both ways of getting the fused layers: ``sk.patch_unet(unet)`` after
``unet.add_adapter(...)``, and ``sk.use_fused_lora()`` before it.

Two pipelines are built from the same seeds (tiny configs, offline); one stays stock. Each step runs the
same call on both and compares what a user could see."""
import importlib.util
import pathlib
import warnings

import pytest
import torch
from torch import nn

import spare_kernels as sk
from spare_kernels.nn import MaskedLoRAConv2d, MaskedLoRALinear, iter_patched

pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402
from peft.tuners.lora.layer import LoraLayer  # noqa: E402
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("example_toggle", ROOT / "python" / "toggle_adapter_pipeline.py")
ex = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ex)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in"]   # Linear and Conv2d (3x3 and 1x1)
FLOWS = ["patch_unet", "use_fused_lora"]


def lora_config(**kw):
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": TARGETS, **kw})


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizer")


def make_pair(tok_dir, flow, **cfg):
    """(stock, fused) pipelines with the same adapter 'default' (same init draws)."""
    pipes = []
    for fused in (False, True):
        p = ex.build_pipeline(tok_dir)
        torch.manual_seed(7)
        if fused and flow == "use_fused_lora":
            with sk.use_fused_lora():
                p.unet.add_adapter(lora_config(**cfg))
        else:
            p.unet.add_adapter(lora_config(**cfg))
        if fused and flow == "patch_unet":
            sk.patch_unet(p.unet)
        pipes.append(p)
    assert not list(iter_patched(pipes[0].unet)) and len(list(iter_patched(pipes[1].unet))) == \
        sum(isinstance(m, LoraLayer) for m in pipes[1].unet.modules())
    return pipes


def inputs(batch=2):
    g = torch.Generator().manual_seed(11)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([10, 700][:batch]), torch.randn(batch, 7, 32, generator=g)


def out(unet, x=None):
    x, t, e = x or inputs()
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=e).sample


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item()))


def both(stock, fused, call):
    """``call(pipe)`` on each; the same result or the same error (type and message)."""
    res = []
    for p in (stock, fused):
        try:
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                r = ("ok", call(p))
            res.append((r, sorted({str(x.message) for x in w if "spare_kernels" not in str(x.filename)})))
        except Exception as e:  # noqa: BLE001 (compared, not swallowed)
            res.append((("raised", type(e).__name__, str(e)), []))
    (rs, ws), (rf, wf) = res
    assert rs[0] == rf[0], (rs, rf)
    if rs[0] == "raised":
        assert rs == rf
    assert ws == wf, (ws, wf)   # peft's and diffusers' own warnings, the same
    return rs[1] if rs[0] == "ok" else None


def lora_layers(unet):
    return [m for m in unet.modules() if isinstance(m, LoraLayer)]


def state(unet):
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def assert_same_model(stock, fused, exact=False):
    """What a user sees of the two UNets: outputs, state dicts, active adapters, trainable flags."""
    su, fu = stock.unet, fused.unet
    close(out(fu), out(su))
    ss, fs = state(su), state(fu)
    assert ss.keys() == fs.keys()
    for k in ss:
        (torch.testing.assert_close if not exact else lambda a, b: torch.equal(a, b) or pytest.fail(k))(fs[k], ss[k])
    assert {n: p.requires_grad for n, p in su.named_parameters()} == {n: p.requires_grad for n, p in fu.named_parameters()}
    has = getattr(su, "_hf_peft_config_loaded", False)
    assert has == getattr(fu, "_hf_peft_config_loaded", False)
    if has:
        assert su.active_adapters() == fu.active_adapters()
        assert su.peft_config.keys() == fu.peft_config.keys()
        for a in su.peft_config:
            s, f = get_peft_model_state_dict(su, adapter_name=a), get_peft_model_state_dict(fu, adapter_name=a)
            assert s.keys() == f.keys() and all(torch.equal(s[k], f[k]) for k in s)


@pytest.mark.parametrize("flow", FLOWS)
def test_toggles_scales_fuse_delete_unload_match_stock(tok_dir, flow, backend):
    stock, fused = make_pair(tok_dir, flow)
    base = ex.build_pipeline(tok_dir).unet
    y_base = out(base)
    assert (out(fused.unet) - y_base).abs().max() > 1e-3   # the adapter is on and matters
    assert_same_model(stock, fused, exact=True)
    steps = [
        ("unet.disable_adapters", lambda p: p.unet.disable_adapters(), "base"),
        ("unet.enable_adapters", lambda p: p.unet.enable_adapters(), None),
        ("unet.set_adapters 0.0", lambda p: p.unet.set_adapters(["default"], [0.0]), "base"),
        ("unet.set_adapters 0.5", lambda p: p.unet.set_adapters(["default"], [0.5]), None),
        ("pipe.set_adapters 1.0", lambda p: p.set_adapters(["default"], [1.0]), None),
        ("pipe.disable_lora", lambda p: p.disable_lora(), "base"),
        ("pipe.enable_lora", lambda p: p.enable_lora(), None),
        ("unet.disable_lora", lambda p: p.unet.disable_lora(), "base"),
        ("unet.enable_lora", lambda p: p.unet.enable_lora(), None),
        ("pipe.fuse_lora 0.7", lambda p: p.fuse_lora(lora_scale=0.7), None),
        ("pipe.unfuse_lora", lambda p: p.unfuse_lora(), None),
        ("unet.fuse_lora safe", lambda p: p.unet.fuse_lora(safe_fusing=True), None),
        ("disable while fused", lambda p: p.unet.disable_adapters(), "base"),   # peft unmerges, then runs the base
        ("enable", lambda p: p.unet.enable_adapters(), None),
        ("unet.set_adapters missing", lambda p: p.unet.set_adapters(["nope"]), None),
        ("unet.set_adapter", lambda p: p.unet.set_adapter("default"), None),
        ("layer scale_layer", lambda p: [m.scale_layer(0.25) for m in lora_layers(p.unet)], None),
        ("layer unscale_layer", lambda p: [m.unscale_layer() for m in lora_layers(p.unet)], None),
        ("layer set_scale", lambda p: [m.set_scale("default", 2.0) for m in lora_layers(p.unet)], None),
        ("layer merge/unmerge", lambda p: [m.merge(adapter_names=["default"]) for m in lora_layers(p.unet)], None),
        ("layer unmerge", lambda p: [m.unmerge() for m in lora_layers(p.unet)], None),
        ("layer enable_adapters(False)", lambda p: [m.enable_adapters(False) for m in lora_layers(p.unet)], "base"),
        ("layer enable_adapters(True)", lambda p: [m.enable_adapters(True) for m in lora_layers(p.unet)], None),
        ("pipe.delete_adapters", lambda p: p.delete_adapters("default"), "base"),
    ]
    for what, call, expect in steps:
        both(stock, fused, call)
        assert_same_model(stock, fused)
        if expect == "base":
            close(out(fused.unet), y_base)
    # the fused layers' unmerge is bit-exact; peft's subtracts the delta again
    for flow_pipe in (stock, fused):
        flow_pipe.unload_lora_weights()
    assert_same_model(stock, fused)
    assert not any(isinstance(m, LoraLayer) for m in fused.unet.modules())
    both(stock, fused, lambda p: p.unet.disable_adapters())   # both: "No adapter loaded"


@pytest.mark.parametrize("flow", FLOWS)
def test_unfuse_restores_the_weights_bit_exactly(tok_dir, flow):
    stock, fused = make_pair(tok_dir, flow)
    w0 = state(fused.unet)
    for _ in range(3):
        for p in (stock, fused):
            p.unet.fuse_lora()
        assert_same_model(stock, fused, exact=True)   # the fused weights: stock's, bit for bit
        for p in (stock, fused):
            p.unet.unfuse_lora()
    assert all(torch.equal(v, w0[k]) for k, v in state(fused.unet).items())
    assert_same_model(stock, fused)


@pytest.mark.parametrize("flow", FLOWS)
def test_unload_lora_and_delete_adapters_on_the_unet(tok_dir, flow):
    stock, fused = make_pair(tok_dir, flow)
    both(stock, fused, lambda p: p.unet.delete_adapters("default"))
    assert_same_model(stock, fused)
    stock, fused = make_pair(tok_dir, flow)
    both(stock, fused, lambda p: p.unet.unload_lora())
    assert_same_model(stock, fused)
    assert not hasattr(fused.unet, "peft_config")


@pytest.mark.parametrize("flow", FLOWS)
def test_state_dicts_save_load_and_resume(tok_dir, flow, tmp_path, backend):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
    stock, fused = make_pair(tok_dir, flow)
    dirs = {}
    for tag, p in (("stock", stock), ("fused", fused)):
        sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(p.unet))
        assert sd   # the text-to-image script's first checkpoint needs it
        StableDiffusionPipeline.save_lora_weights(tmp_path / tag, unet_lora_layers=sd, safe_serialization=True)
        dirs[tag] = tmp_path / tag
    (ss, sa), (fs, fa) = (StableDiffusionPipeline.lora_state_dict(dirs[t]) for t in ("stock", "fused"))
    assert ss.keys() == fs.keys() and sa == fa and all(torch.equal(ss[k], fs[k]) for k in ss)
    # resume as the scripts' load_model_hook does, after the adapter moved on
    g = torch.Generator().manual_seed(5)
    moved = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in ss.items()}
    unet_sd = convert_unet_state_dict_to_peft({k.replace("unet.", ""): v for k, v in moved.items()
                                               if k.startswith("unet.")})
    res = both(stock, fused, lambda p: set_peft_model_state_dict(p.unet, unet_sd, adapter_name="default"))
    assert not getattr(res, "unexpected_keys", [])
    assert_same_model(stock, fused)
    assert (out(fused.unet) - out(make_pair(tok_dir, flow)[1].unet)).abs().max() > 1e-3   # it really loaded
    # a stock pipeline loads what the patched one saved; an already patched one loads a second adapter
    loaded = []
    for tag in ("stock", "fused"):
        fresh = ex.build_pipeline(tok_dir)
        fresh.load_lora_weights(dirs[tag])   # (without metadata diffusers takes lora_alpha = r, either way)
        loaded.append(out(fresh.unet))
    assert torch.equal(*loaded)
    both(stock, fused, lambda p: p.load_lora_weights(dirs["stock"], adapter_name="second"))
    assert any(isinstance(m, (MaskedLoRALinear, MaskedLoRAConv2d)) and "second" in m.lora_A for m in fused.unet.modules())
    both(stock, fused, lambda p: p.set_adapters(["default", "second"], [1.0, 0.5]))
    assert_same_model(stock, fused)
    both(stock, fused, lambda p: p.load_lora_weights(dirs["stock"], adapter_name="second"))   # "already in use"
    both(stock, fused, lambda p: p.unet.add_adapter(lora_config(), "default"))                # "already exists"
    assert_same_model(stock, fused)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cast_training_params_under_a_low_precision_base(tok_dir, dtype):
    from diffusers.training_utils import cast_training_params
    stock, fused = make_pair(tok_dir, "patch_unet")
    for p in (stock, fused):
        p.unet.to(dtype)
        cast_training_params(p.unet, dtype=torch.float32)
    for (ns, ps), (nf, pf) in zip(stock.unet.named_parameters(), fused.unet.named_parameters()):
        assert ns == nf and ps.dtype == pf.dtype and ps.requires_grad == pf.requires_grad
    x, t, e = inputs()
    ys, yf = (out(p.unet, (x.to(dtype), t, e.to(dtype))) for p in (stock, fused))
    assert ys.dtype == yf.dtype == dtype
    torch.testing.assert_close(yf.float(), ys.float(), rtol=0.05, atol=0.05 * ys.abs().max().item())


def test_loading_first_then_patching_adds_no_adapter(tok_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    stock, _ = make_pair(tok_dir, "patch_unet")
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(stock.unet))
    p = ex.build_pipeline(tok_dir)
    p.load_lora_weights(tmp_path)                  # diffusers names it default_0
    names = list(p.unet.peft_config)
    y = out(p.unet)
    sk.patch_unet(p.unet)
    assert list(p.unet.peft_config) == names == ["default_0"]
    assert {a for _, m in iter_patched(p.unet) for a in m.lora_A} == {"default_0"}
    close(out(p.unet), y)
    with pytest.raises(ValueError, match="rank: 8 requested, but adapter 'default_0' has r=4"):
        sk.patch_unet(p.unet, rank=8)
    with pytest.raises(ValueError, match="target_modules"):
        sk.patch_unet(p.unet, target_modules="all")
    sk.patch_unet(p.unet, rank=4, target_modules=TARGETS)   # what is there: fine
    sk.patch_unet(p.unet, adapter_name="mine", rank=2)        # a new name: a new adapter, stacked
    assert "mine" in p.unet.peft_config and sk.adapter_names(p.unet) == ["default_0", "mine"]


def test_teacher_from_disable_adapters_spare_loop(tok_dir):
    """SPARE's step: student forward, ``disable_adapters()`` + no_grad teacher forward on the surrogate
    prompt, ``enable_adapters()``, MSE, backward, Adam; forget then retain half. Same losses."""
    losses = {}
    for tag, p in zip(("stock", "fused"), make_pair(tok_dir, "patch_unet", init_lora_weights="gaussian")):
        unet = p.unet
        params = [q for q in unet.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        g = torch.Generator().manual_seed(0)
        ls = []
        for step in range(4):
            x = torch.randn(2, 4, 8, 8, generator=g)
            t = torch.randint(0, 1000, (2,), generator=g)
            c_forget, c_over, c_retain = (torch.randn(2, 7, 32, generator=g) for _ in range(3))
            for c_student, c_teacher in ((c_forget, c_over), (c_retain, c_retain)):
                new = unet(x, t, c_student, return_dict=False)[0]
                unet.disable_adapters()
                with torch.no_grad():
                    old = unet(x, t, c_teacher, return_dict=False)[0]
                unet.enable_adapters()
                loss = nn.functional.mse_loss(new.float(), old.float())
                loss.backward()
                ls.append(loss.item())
            opt.step()
            opt.zero_grad()
        losses[tag] = ls
    assert losses["stock"][2] > 0 and losses["stock"][3] > 0   # the retain loss is not 0 from step 2
    torch.testing.assert_close(torch.tensor(losses["fused"]), torch.tensor(losses["stock"]), rtol=1e-5, atol=1e-9)


def stock_vs_fused(prepare):
    """``prepare(unet) -> layer name`` on a plain UNet, then ``add_adapter``, stock or patched: the same
    output (the named layer fused)."""
    ys = {}
    for tag in ("stock", "fused"):
        torch.manual_seed(0)
        unet = ex.build_unet()
        name = prepare(unet)
        torch.manual_seed(1)
        unet.add_adapter(lora_config())
        if tag == "fused":
            sk.patch_unet(unet)
            assert isinstance(unet.get_submodule(name), MaskedLoRALinear)
        ys[tag] = out(unet)
    close(ys["fused"], ys["stock"])


def test_hooks_on_the_original_layer_keep_firing_and_editing():
    """A forward hook registered on a plain layer before ``add_adapter`` runs on the base layer's own
    call under peft; the fused layer keeps that (the op is not used while such a hook exists)."""
    calls = []

    def hook(unet):
        name = next(n for n, m in unet.named_modules() if n.endswith("attn1.to_q"))
        unet.get_submodule(name).register_forward_hook(lambda m, i, o: calls.append(1) or o * 0.5)
        return name
    stock_vs_fused(hook)
    assert len(calls) == 2


def test_linear_subclasses_are_adapted_as_peft_adapts_them():
    class MyLinear(nn.Linear):   # its own forward: the base layer is called as itself
        def forward(self, x):
            return super().forward(x) + 1.0

    def swap(unet):
        name = next(n for n, m in unet.named_modules() if n.endswith("attn2.to_k"))
        old = unet.get_submodule(name)
        new = MyLinear(old.in_features, old.out_features, bias=old.bias is not None)
        new.load_state_dict(old.state_dict())
        parent, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent), child, new)
        return name
    stock_vs_fused(swap)
    sub = nn.Sequential()
    sub.add_module("to_q", MyLinear(4, 3))
    sk.patch_unet(sub, init="random")   # the library's own flow adapts it too
    assert isinstance(sub.to_q, MaskedLoRALinear)
    x = torch.randn(2, 4)
    with torch.no_grad():
        close(sub(x), sub.to_q.base_layer(x) + x @ sub.to_q.delta_weight("default").t())


def test_layers_expose_the_base_geometry():
    unet = sk.patch_unet(ex.build_unet(), target_modules="all")
    n_lin = n_conv = 0
    for _, m in iter_patched(unet):
        b = m.get_base_layer()
        assert m.weight is b.weight and m.bias is b.bias
        if isinstance(m, MaskedLoRAConv2d):
            n_conv += 1
            for a in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                      "padding_mode"):
                assert getattr(m, a) == getattr(b, a), a
            assert (m.in_features, m.out_features) == (b.in_channels, b.out_channels)
        else:
            n_lin += 1
            assert (m.in_features, m.out_features) == (b.in_features, b.out_features)
        assert isinstance(m, LoraLayer) and not isinstance(m, (nn.Linear, nn.Conv2d))   # as peft's own layers
    assert n_lin and n_conv


@pytest.mark.parametrize("flow", FLOWS)
def test_lora_dropout_trains_as_peft_does(tok_dir, flow):
    """lora_dropout > 0 (dreambooth's --lora_dropout): dropout on the adapter branch only, the same random
    draws as peft in train mode; the fused op again in eval mode."""
    stock, fused = make_pair(tok_dir, flow, lora_dropout=0.3)
    for mode in ("train", "eval"):
        ys = []
        for p in (stock, fused):
            getattr(p.unet, mode)()
            torch.manual_seed(3)
            ys.append(out(p.unet))
        close(ys[1], ys[0])
    stock.unet.train()
    torch.manual_seed(3)
    assert not torch.allclose(out(stock.unet), ys[0])   # dropout did something in train mode


def test_use_fused_lora_switch_and_what_it_leaves_to_peft(tok_dir):
    assert not sk.nn.fused_lora_enabled()
    with sk.use_fused_lora():
        assert sk.nn.fused_lora_enabled()
        unet = ex.build_unet()
        with pytest.warns(UserWarning, match="keeps peft's own .* LoRA variants"):
            unet.add_adapter(LoraConfig(r=4, target_modules=["to_q"], use_dora=True))   # DoRA: peft's own
        unet.add_adapter(LoraConfig(r=4, target_modules=["to_k"]), "plain")
    assert not sk.nn.fused_lora_enabled()
    kinds = {n.rsplit(".", 1)[-1]: type(m).__name__ for n, m in unet.named_modules() if isinstance(m, LoraLayer)}
    assert kinds == {"to_q": "Linear", "to_k": "MaskedLoRALinear"}
    sk.use_fused_lora()
    try:
        assert sk.nn.fused_lora_enabled()
    finally:
        sk.use_fused_lora(False)
    with pytest.raises(TypeError, match="enabled"):
        sk.use_fused_lora("yes")


# ---------------------------------------------------------------------------------------------- masks
def test_masks_ride_along_disable_set_adapters_and_export(tok_dir, tmp_path, backend):
    """A masked adapter: disable_adapters / set_adapters respect the mask; peft's state dict is the raw
    factors (a mask-less loader would run B·A, another adapter); export_lora gives a plain LoRA a stock
    pipeline reproduces; save_adapter keeps the mask."""
    from diffusers import StableDiffusionPipeline
    _, fused = make_pair(tok_dir, "patch_unet")
    unet = fused.unet
    y_dense = out(unet)
    g = torch.Generator().manual_seed(0)
    masks = {f"{n}.weight": torch.rand(m.weight.shape, generator=g) > 0.5 for n, m in iter_patched(unet)}
    sk.patch_unet(unet, masks=masks)
    y_masked = out(unet)
    assert (y_masked - y_dense).abs().max() > 1e-3
    deltas = {n: m.delta_weight("default") for n, m in iter_patched(unet)}   # s·M⊙(B·A)

    def merged_by_hand(factor):   # the masked delta merged into a stock copy
        ref = ex.build_pipeline(tok_dir).unet
        with torch.no_grad():
            for n, d in deltas.items():
                ref.get_submodule(n).weight += factor * d
        return out(ref)

    close(y_masked, merged_by_hand(1.0))
    unet.disable_adapters()
    close(out(unet), merged_by_hand(0.0))
    unet.enable_adapters()
    unet.set_adapters(["default"], [0.5])
    close(out(unet), merged_by_hand(0.5))
    unet.set_adapters(["default"], [1.0])
    raw = get_peft_model_state_dict(unet)
    assert all(torch.equal(raw[f"{n}.lora_A.weight"], m.lora_A["default"].weight) for n, m in iter_patched(unet))
    sd, meta = sk.export_lora(unet)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=sd, unet_lora_adapter_metadata=meta)
    stock = ex.build_pipeline(tok_dir)
    stock.load_lora_weights(tmp_path)
    assert not list(iter_patched(stock.unet))
    close(out(stock.unet), y_masked)
    path = sk.save_adapter(unet, tmp_path / "masked.safetensors")
    again = ex.build_pipeline(tok_dir).unet
    sk.load_adapter(again, path)
    close(out(again), y_masked)
    assert "default" in again.peft_config and get_peft_model_state_dict(again).keys() == raw.keys()


def test_spare_style_masks_over_every_parameter_are_filtered(tok_dir):
    """SPARE's code thresholds a saliency dict over every parameter (uint8 masks, biases and norms
    included): the adapted layers' entries are used, the rest counted in a warning."""
    unet = ex.build_unet()
    params = dict(unet.named_parameters())
    masks = {k: (torch.rand(v.shape) > 0.5).to(torch.uint8) for k, v in params.items()}
    adapted = [k for k in params if k.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight"))]
    ignored = [k for k in params if k not in adapted]
    on = sum(int(masks[k].count_nonzero()) for k in ignored)
    with pytest.warns(UserWarning, match=f"masks: {len(ignored)} of {len(masks)} entries .* select {on} entries"):
        sk.patch_unet(unet, masks=masks)
    assert sum(m.masks["default"] is not None for _, m in iter_patched(unet)) == len(adapted)
    with pytest.raises(ValueError, match="name no parameter"):
        sk.patch_unet(unet, masks={"down_blocks.9.nothing.weight": masks[adapted[0]]})
    # SPARE's own order: saliency on the plain UNet, then add_adapter, then the masks
    peft_unet = ex.build_unet()
    peft_unet.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with pytest.warns(UserWarning, match=f"masks: {len(ignored)} of {len(masks)} entries .* select {on} entries"):
        sk.patch_unet(peft_unet, masks=masks)
    assert sum(m.masks["default"] is not None for _, m in iter_patched(peft_unet)) == len(adapted)
    for n, m in iter_patched(peft_unet):
        assert torch.equal(m.masks["default"].to_dense(), masks[f"{n}.weight"].bool())


def test_get_peft_model_on_any_module_under_use_fused_lora():
    from peft import get_peft_model

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 5))
    x = torch.randn(3, 12)
    cfg = dict(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False)
    torch.manual_seed(1)
    stock = get_peft_model(mlp(), LoraConfig(**cfg))
    with sk.use_fused_lora():
        torch.manual_seed(1)
        fused = get_peft_model(mlp(), LoraConfig(**cfg))
    assert len(list(iter_patched(fused))) == 2 and not list(iter_patched(stock))
    close(fused(x), stock(x))
    with stock.disable_adapter(), fused.disable_adapter():
        assert torch.equal(fused(x), stock(x))
    merged_s, merged_f = stock.merge_and_unload(), fused.merge_and_unload()
    assert type(merged_f[0]) is nn.Linear
    close(merged_f(x), merged_s(x))


def test_hooks_registered_after_patching_fire_as_under_peft(tok_dir):
    stock, fused = make_pair(tok_dir, "patch_unet")
    seen = {}
    for tag, p in (("stock", stock), ("fused", fused)):
        name, layer = next((n, m) for n, m in p.unet.named_modules() if n.endswith("attn2.to_v"))
        calls = []
        h1 = layer.base_layer.register_forward_hook(lambda m, i, o: calls.append("base") or o + 0.25)
        h2 = layer.register_forward_hook(lambda m, i, o: calls.append("layer"))
        seen[tag] = (out(p.unet), calls)
        h1.remove(), h2.remove()
    close(seen["fused"][0], seen["stock"][0])
    assert seen["fused"][1] == seen["stock"][1] and "base" in seen["stock"][1]
    close(out(fused.unet), out(stock.unet))   # and the fused op again once the hook is gone


def test_mixed_batch_adapter_names_as_peft_and_refused_when_masked():
    """peft's ``adapter_names=`` (one adapter per sample): as stock for unmasked adapters; a masked
    adapter in the batch is refused by name (peft's mixed-batch code applies no mask)."""
    torch.manual_seed(0)
    base = nn.Linear(10, 6)
    layers = []
    for fused in (False, True):
        torch.manual_seed(1)
        layer = peft_linear(base, fused)
        layer.update_layer("b", 2, lora_alpha=2, config=LoraConfig(r=2, init_lora_weights=False))
        layers.append(layer)
    x = torch.randn(4, 10)
    names = ["default", "b", "__base__", "b"]
    with torch.no_grad():
        close(layers[1](x, adapter_names=names), layers[0](x, adapter_names=names))
        layers[1].set_mask("b", torch.rand(6, 10) > 0.5)
        with pytest.raises(ValueError, match=r"adapter_names: mixed-batch inference with masked adapters \['b'\]"):
            layers[1](x, adapter_names=names)
        layers[1](x, adapter_names=["default", "__base__", "default", "default"])   # no masked one: fine


def peft_linear(base, fused):
    from peft.tuners.lora.layer import Linear
    cls = MaskedLoRALinear if fused else Linear
    return cls(base, "default", config=LoraConfig(r=4, lora_alpha=8, init_lora_weights=False), r=4, lora_alpha=8)


def test_a_variant_adapter_on_a_masked_fused_layer_runs_peft_code():
    """DoRA loaded into a fused layer that holds a mask: the layer stays fused (the mask stays), the DoRA
    adapter runs peft's own code, as on peft's layer, and merges and unmerges (bit-exactly) as well.
    Without a mask the layer simply becomes peft's own class again."""
    import copy
    torch.manual_seed(0)
    base = nn.Linear(10, 6)
    layers = []
    for fused in (False, True):
        torch.manual_seed(1)
        layers.append(peft_linear(copy.deepcopy(base), fused))
    stock, fused = layers
    fused.set_mask("default", torch.rand(6, 10) > 0.5)
    for layer in layers:
        torch.manual_seed(2)
        layer.update_layer("dora", 2, lora_alpha=2, config=LoraConfig(r=2, use_dora=True, init_lora_weights=False))
        layer.set_adapter("dora")
    assert isinstance(fused, MaskedLoRALinear) and fused.masks["default"] is not None
    with pytest.raises(ValueError, match="'dora' is a LoRA variant"):
        fused.set_mask("dora", torch.ones(6, 10, dtype=torch.bool))
    x = torch.randn(4, 10)
    with torch.no_grad():
        close(fused(x), stock(x))
        w0 = fused.weight.clone()
        for layer in layers:
            layer.merge()
        torch.testing.assert_close(fused.weight, stock.weight)
        close(fused(x), stock(x))
        fused.unmerge()
        assert torch.equal(fused.weight, w0) and not fused._caches
        fused.set_adapter(["dora", "default"])   # DoRA through peft's code on the base, then the masked delta
        y = fused(x)
        fused.set_adapter(["dora"])
        close(y, fused(x) + x @ fused.delta_weight("default").t())
    plain = peft_linear(nn.Linear(10, 6), True)
    with pytest.warns(UserWarning, match="LoRA variant"):
        plain.update_layer("dora", 2, lora_alpha=2, config=LoraConfig(r=2, use_dora=True))
    assert type(plain).__name__ == "Linear" and "dora" in plain.lora_variant   # peft's own layer now
