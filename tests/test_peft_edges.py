"""The edges of the peft-native layers: what must not be silently different from peft, and what must
not be left half-changed (layers peft keeps for itself, merges across dtype moves, hooks and wrapped
forwards, failed patches, unpatching around the user's own adapters)."""
import copy

import pytest
import torch
from torch import nn

import spare_kernels as sk
from spare_kernels.nn import MaskedLoRAConv2d, MaskedLoRALinear, iter_patched

pytest.importorskip("peft")
from peft import LoraConfig, inject_adapter_in_model  # noqa: E402
from peft.tuners.lora.layer import Conv2d as PeftConv2d  # noqa: E402
from peft.tuners.lora.layer import Linear as PeftLinear  # noqa: E402
from peft.tuners.lora.layer import LoraLayer  # noqa: E402


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * max(1.0, b.abs().max().item()))


def two_convs():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.Conv2d(4, 4, 1))


def test_library_calls_cover_layers_that_keep_peft_code():
    """A reflect-padded conv stays peft's own layer: sk.disable_adapters, enable_adapter, merge/unmerge and
    remove_adapter reach it too; the calls that need the fused layers refuse it by name."""
    m = two_convs()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        y0 = m(x)
    with pytest.warns(UserWarning, match="padding_mode='reflect'"):
        sk.patch_unet(m, target_modules="all", init="random", rank=2)
    assert type(m[0]) is PeftConv2d and isinstance(m[1], MaskedLoRAConv2d)
    with torch.no_grad():
        y = m(x)
        assert (y - y0).abs().max() > 1e-3
        with sk.disable_adapters(m):
            assert torch.equal(m(x), y0)
        sk.enable_adapter(m, "default", False)
        assert torch.equal(m(x), y0)
        sk.enable_adapter(m, "default", True)
        close(m(x), y)
        sk.merge_adapter(m, "default")
        assert m[0].merged_adapters == m[1].merged_adapters == ["default"]
        sk.unmerge_adapter(m)   # (merged, peft's reflect-padded layer is another function than live: not compared)
        assert not m[0].merged_adapters and not m[1].merged_adapters
        close(m(x), y)
    with pytest.raises(ValueError, match=r"this_thread=True\): layer '0' runs peft's own LoRA code"):
        with sk.disable_adapters(m, this_thread=True):
            pass
    with pytest.raises(ValueError, match=r"save_adapter: layer '0' runs peft's own LoRA code \(its base layer has "
                                         r"padding_mode='reflect'"):
        sk.save_adapter(m, "/nonexistent/x.safetensors")
    with pytest.raises(ValueError, match="export_lora: layer '0'"):
        sk.export_lora(m)
    sk.remove_adapter(m, "default")
    assert not m[0].lora_A and not m[1].lora_A and "default" not in m.peft_config


def test_unmerge_after_moving_a_merged_model_to_another_dtype():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 6))
    sk.patch_unet(m, target_modules="all", init="random", masks={"0.weight": torch.rand(6, 8) > 0.5})
    w0 = m[0].weight.detach().clone()
    m[0].merge()
    m.to(torch.bfloat16)
    assert m[0].masks["default"].data.dtype == torch.uint8
    m[0].unmerge()
    assert not m[0].merged_adapters and torch.equal(m[0].weight, w0.bfloat16())
    m[0].merge()
    m.to(torch.float64)
    assert torch.equal(m[0].unmerged_weight(), w0.bfloat16().double())
    sk.unpatch_unet(m)
    assert torch.equal(m[0].weight, w0.bfloat16().double())


def _pair(seed=0, **cfg):
    torch.manual_seed(seed)
    base = nn.Linear(10, 6)
    out = []
    for cls in (PeftLinear, MaskedLoRALinear):
        torch.manual_seed(seed + 1)
        out.append(cls(copy.deepcopy(base), "default",
                       config=LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, **cfg}),
                       r=4, lora_alpha=8))
    return out


@pytest.mark.parametrize("where", ["base", "lora_A", "lora_B"])
@pytest.mark.parametrize("kind", ["forward_hook", "wrapped_forward", "backward_hook"])
def test_whatever_observes_a_module_call_peft_makes_is_kept(where, kind):
    """Hooks of every kind, and a forward replaced on the instance (accelerate's and diffusers' hook
    wrappers), on the base layer or on an adapter factor: they see the same calls as under peft."""
    outs = []
    x0 = torch.randn(3, 10)
    for layer in _pair():
        mod = {"base": layer.base_layer, "lora_A": layer.lora_A["default"], "lora_B": layer.lora_B["default"]}[where]
        calls = []
        if kind == "forward_hook":
            mod.register_forward_hook(lambda m, i, o: calls.append(1) or o * 1.5)
        elif kind == "backward_hook":
            mod.register_full_backward_hook(lambda m, gi, go: calls.append(1))
        else:
            orig = mod.forward
            mod.forward = lambda *a, _f=orig, **k: (calls.append(1), _f(*a, **k) * 1.5)[1]
        x = x0.clone().requires_grad_()
        y = layer(x)
        y.square().sum().backward()
        outs.append((y.detach(), x.grad, len(calls)))
    (ys, gs, cs), (yf, gf, cf) = outs
    close(yf, ys)
    close(gf, gs)
    assert cs == cf == 1


def test_stacked_unmasked_adapters_as_peft_and_the_masked_one_through_the_op():
    stock, fused = _pair()
    for layer in (stock, fused):
        torch.manual_seed(5)
        layer.update_layer("b", 2, lora_alpha=2, config=LoraConfig(r=2, init_lora_weights=False))
        layer.set_adapter(["default", "b"])
    x = torch.randn(3, 10)
    with torch.no_grad():
        close(fused(x), stock(x))
        fused.set_mask("b", torch.rand(6, 10) > 0.5)
        want = stock.base_layer(x) + x @ (fused.delta_weight("default") + fused.delta_weight("b")).t()
        close(fused(x), want)


def test_mixed_batch_while_disabled_is_peft_base_output():
    stock, fused = _pair()
    fused.set_mask("default", torch.rand(6, 10) > 0.5)
    for layer in (stock, fused):
        layer.enable_adapters(False)
    x = torch.randn(2, 10)
    with torch.no_grad():
        assert torch.equal(fused(x, adapter_names=["default", "__base__"]),
                           stock(x, adapter_names=["default", "__base__"]))


def test_patching_a_peft_model_keeps_its_flags():
    """Keep mode touches no requires_grad: DoRA's magnitude and a layer the user unfroze still train."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 4))
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["0", "2"], use_dora=True), m)
    m[1].weight.requires_grad_(True)
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    with pytest.warns(UserWarning, match="keep peft's own"):
        sk.patch_unet(m)
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags


def test_a_failing_patch_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Conv2d(4, 4, 3, groups=2))
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"]), m)
    m[1].weight.requires_grad_(True)
    before = ({n: type(x) for n, x in m.named_modules()}, {n: p.requires_grad for n, p in m.named_parameters()},
              list(m.peft_config))
    with pytest.raises(ValueError, match="divisible by groups"):   # peft's own refusal, mid-way
        sk.patch_unet(m, adapter_name="new", target_modules="all", rank=3)
    assert ({n: type(x) for n, x in m.named_modules()}, {n: p.requires_grad for n, p in m.named_parameters()},
            list(m.peft_config)) == before
    assert "_spare_kernels_patch" not in m.__dict__
    # masks set, then a failing second call: the first masks stay
    sk.patch_unet(m, masks={"0.weight": torch.rand(4, 4) > 0.5})
    first = m[0].masks["default"]
    m[0].merge()
    with pytest.raises(ValueError, match="merged"):
        sk.patch_unet(m, masks={"0.weight": torch.ones(4, 4, dtype=torch.bool)})
    assert m[0].masks["default"] is first


def test_unpatch_keeps_the_users_adapters_and_unwraps_what_it_emptied(tmp_path):
    torch.manual_seed(0)
    src = sk.patch_unet(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), target_modules="all", init="random")
    path = sk.save_adapter(src, tmp_path / "a.safetensors")
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    m.load_state_dict({k.replace(".base_layer", ""): v for k, v in src.state_dict().items() if "lora_" not in k})
    plain = list(m)
    sk.load_adapter(m, path)                          # the library wraps both layers
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"]), m, "user")   # the user's own adapter on one
    sk.unpatch_unet(m)
    assert type(m[0]) is PeftLinear and list(m[0].lora_A) == ["user"] and list(m.peft_config) == ["user"]
    assert m[1] is plain[1]
    # the library's adapter deleted by the user first: its layers still go back to plain
    u = sk.patch_unet(nn.Sequential(nn.Linear(4, 4)), target_modules="all")
    layer = u[0].base_layer
    u[0].delete_adapter("default")
    sk.unpatch_unet(u)
    assert u[0] is layer and not hasattr(u, "peft_config")


def test_targets_are_exact_names_not_suffixes():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    x = torch.randn(2, 4)
    with torch.no_grad():
        y0 = m(x)
        sk.patch_unet(m, target_modules=lambda n, mod: n == "0")
        assert [n for n, x_ in m.named_modules() if isinstance(x_, LoraLayer)] == ["0"]
        assert torch.equal(m(x), y0)
    sk.unpatch_unet(m)
    assert not any(isinstance(x_, LoraLayer) for x_ in m.modules())


def test_even_kernel_same_padding_stays_peft():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(4, 6, 2, padding="same"), nn.Conv2d(6, 6, 3, padding="same"))
    with pytest.warns(UserWarning, match="padding='same' with the even kernel"):
        sk.patch_unet(m, target_modules="all", init="random")
    assert type(m[0]) is PeftConv2d and isinstance(m[1], MaskedLoRAConv2d)
    assert m(torch.randn(1, 4, 5, 5)).shape == (1, 6, 5, 5)


def test_remove_adapter_keeps_the_others_flags_and_says_nothing(recwarn):
    m = sk.patch_unet(nn.Sequential(nn.Linear(4, 4)), target_modules="all", adapter_name="a")
    sk.patch_unet(m, target_modules="all", adapter_name="b")
    m[0].lora_A["a"].weight.requires_grad_(False)
    sk.set_active_adapters(m, ["b"])
    sk.remove_adapter(m, "b")
    assert not m[0].lora_A["a"].weight.requires_grad and m[0].active_adapters == []
    assert not [w for w in recwarn if "active" in str(w.message)]
    assert list(iter_patched(m))
