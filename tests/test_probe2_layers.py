"""Second probe, the fused layers: merges across dtype/device moves, tied weights, factor dtypes at
add_adapter, even-kernel 'same' convs under target_modules="all", empty Linear layers."""
import warnings

import pytest
import torch
from torch import nn

import spare_kernels as sk
from spare_kernels.adapters import fingerprint, read_adapter
from spare_kernels.nn import MaskedLoRAConv2d, MaskedLoRALinear, check_untied, iter_patched

pytest.importorskip("peft")
from peft.tuners.lora.layer import Conv2d as PeftConv2d  # noqa: E402
from peft.tuners.lora.layer import Linear as PeftLinear  # noqa: E402



def small(seed=0):
    """Two Linears and a conv, every one patched with a random (non-zero) adapter, one masked."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Unflatten(1, (2, 2, 2)), nn.Conv2d(2, 3, 3, padding=1))
    sk.patch_unet(m, target_modules="all", init="random", rank=3, masks={"1.weight": torch.rand(8, 8) > 0.5})
    return m


def base_weights(m):
    return {n: layer.get_base_layer().weight.detach().clone() for n, layer in iter_patched(m)}


# ------------------------------------------------------------------ 1. merge records follow the module
def test_merge_then_half_then_unmerge():
    m = small()
    w0 = base_weights(m)
    sk.merge_adapter(m)
    m.half()
    sk.unmerge_adapter(m)
    for n, layer in iter_patched(m):
        assert not layer.merged_adapters
        assert torch.equal(layer.weight, w0[n].half()), n   # the original values, converted
    m(torch.randn(2, 8).half())                                 # and it runs


def test_merge_then_double_then_unpatch_unet():
    m = small()
    w0 = base_weights(m)
    sk.merge_adapter(m)
    m.double()
    sk.unpatch_unet(m)
    assert not list(iter_patched(m))
    for n, w in w0.items():
        assert torch.equal(m.get_submodule(n).weight, w.double()), n


def test_merge_then_double_then_save_adapter(tmp_path):
    m = small()
    w0 = base_weights(m)
    sk.merge_adapter(m)
    m.double()
    meta, _ = read_adapter(sk.save_adapter(m, tmp_path / "a.safetensors"))
    for n, w in w0.items():
        assert meta["modules"][n]["fingerprint"] == fingerprint(w.double()), n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_merge_then_to_cuda_then_unmerge():
    m = small()
    w0 = base_weights(m)
    sk.merge_adapter(m)
    m.to("cuda")
    sk.unmerge_adapter(m)
    for n, layer in iter_patched(m):
        assert not layer.merged_adapters and torch.equal(layer.weight.cpu(), w0[n]), n


def test_unmerge_checks_every_record_before_restoring():
    """A layer whose base weight was replaced after merging (another shape) is refused before any of its
    merges is undone: the books stay as the weights."""
    torch.manual_seed(0)
    layer = MaskedLoRALinear(nn.Linear(8, 6))
    layer.add_adapter("a", 2, init="random")
    layer.add_adapter("b", 2, init="random")
    layer.merge()
    merged = layer.weight.detach().clone()
    layer.base_layer.weight = nn.Parameter(torch.zeros(6, 4))
    with pytest.raises(RuntimeError, match=r"unmerge: adapter 'a': the base weight is now \(6, 4\)"):
        layer.unmerge()
    assert layer.merged_adapters == ["a", "b"] and set(layer._merge_backup) == {"a", "b"}
    layer.base_layer.weight = nn.Parameter(merged)
    layer.unmerge()
    assert not layer.merged_adapters


def test_unmerge_adapter_checks_every_layer_first():
    m = small()
    sk.merge_adapter(m)
    m[1].base_layer.weight = nn.Parameter(torch.zeros(8, 4))
    with pytest.raises(RuntimeError, match="replaced after merging"):
        sk.unmerge_adapter(m)
    assert all(layer.merged_adapters == ["default"] for _, layer in iter_patched(m))   # none undone


# ------------------------------------------------------------------ 2. tied weights
def tied():
    torch.manual_seed(0)
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.weight = a.weight
    m = nn.Sequential(a, b)
    sk.patch_unet(m, target_modules="all", init="random", rank=3)
    return m


def test_tied_weights_merge_is_refused():
    """Merging into a weight two patched layers share would give both layers both deltas: refused
    (cheap and correct; a tied weight cannot hold two different merged weights)."""
    m = tied()
    w0 = m[0].weight.detach().clone()
    layers = [(n, layer) for n, layer in iter_patched(m)]
    with pytest.raises(ValueError, match=r"merge_adapter: layer '0': its base weight is shared with "
                                         r"'1\.base_layer\.weight' \(tied weights\)"):
        check_untied(m, layers)
    # peft's per-layer API: the second layer's merge is refused, the first undoes bit-exactly
    m[0].merge()
    with pytest.raises(ValueError, match="tied weights"):
        m[1].merge()
    assert not m[1].merged_adapters
    m[0].unmerge()
    assert torch.equal(m[0].weight, w0) and m[1].weight is m[0].weight
    m[1].merge()          # one layer at a time is fine
    m[1].unmerge()
    assert torch.equal(m[0].weight, w0)


def test_tied_weights_merge_adapter_refused_before_any_change():
    m = tied()
    w0 = m[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"layer '0'.*'1\.base_layer\.weight' \(tied weights\)"):
        sk.merge_adapter(m)
    assert not m[0].merged_adapters and not m[1].merged_adapters and torch.equal(m[0].weight, w0)


def test_untied_layers_pass_check_untied():
    m = small()
    check_untied(m, list(iter_patched(m)))


# ------------------------------------------------------------------ 3. factor dtypes at add_adapter
def test_add_adapter_refuses_mixed_factor_dtypes():
    layer = MaskedLoRALinear(nn.Linear(8, 6))
    with pytest.raises(TypeError, match=r"lora_A/lora_B: expected one dtype for both factors, got lora_A "
                                        r"torch\.float32 and lora_B torch\.float16"):
        layer.add_adapter("x", 2, lora_A=torch.randn(2, 8), lora_B=torch.randn(6, 2).half())
    with pytest.raises(TypeError, match=r"lora_B: expected a floating-point tensor, got torch\.int64"):
        layer.add_adapter("x", 2, lora_A=torch.randn(2, 8), lora_B=torch.zeros(6, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="expected both factors or neither, got only lora_A"):
        layer.add_adapter("x", 2, lora_A=torch.randn(2, 8))
    with pytest.raises(ValueError, match="lora_B: a Parameter is used as it is: expected it on the weight's device"):
        layer.add_adapter("x", 2, lora_A=torch.randn(2, 8), lora_B=nn.Parameter(torch.zeros(6, 2, device="meta")))
    with pytest.raises(TypeError, match="dtype: expected a floating-point dtype"):
        layer.add_adapter("x", 2, dtype=torch.int32)
    assert not layer.lora_A and not layer.masks and not layer.active_adapters   # nothing added
    layer.add_adapter("x", 2, lora_A=torch.randn(2, 8).half(), lora_B=torch.randn(6, 2).half())
    assert layer(torch.randn(3, 8)).shape == (3, 6)   # one dtype (other than the base's) runs


# ------------------------------------------------------------------ 4. even kernels with padding='same'
def test_patch_all_even_kernel_same_conv():
    """peft's own lora.Conv2d computes it (A takes the base's 'same' padding): the layer stays peft's,
    with a warning naming it, and its forward runs and is peft's; masks and the fused class refuse it."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 4, padding="same"))
    conv = m[0]
    with pytest.warns(UserWarning, match=r"0: its base layer has padding='same' with the even kernel \(4, 4\)"):
        sk.patch_unet(m, target_modules="all", init="random")
    assert type(m[0]) is PeftConv2d
    x = torch.randn(2, 3, 9, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch's note on the zero-padded copy 'same' makes
        y = m(x)
        s = m[0].scaling["default"]
        ref = conv(x) + m[0].lora_B["default"](m[0].lora_A["default"](x)) * s
    assert y.shape == (2, 4, 9, 8)
    torch.testing.assert_close(y, ref)
    with pytest.raises(ValueError, match=r"padding='same' with the even kernel \(4, 4\)"):
        MaskedLoRAConv2d(nn.Conv2d(3, 4, 4, padding="same"))
    with pytest.raises(ValueError, match="which takes no mask"):
        sk.patch_unet(nn.Sequential(nn.Conv2d(3, 4, 4, padding="same")), target_modules="all",
                      masks={"0.weight": torch.ones(4, 3, 4, 4, dtype=torch.bool)})


# ------------------------------------------------------------------ 5. a Linear with in_features=0
def test_linear_in_features_zero():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch: "Initializing zero-element tensors is a no-op"
        m = nn.Sequential(nn.Linear(0, 4), nn.Linear(4, 4))
        empty = nn.Linear(0, 4)
        conv = nn.Conv2d(0, 4, 3)
    with pytest.raises(ValueError, match=r"base_layer: in_features=0 \(an empty weight\) is not supported"):
        MaskedLoRALinear(empty)
    with pytest.raises(ValueError, match=r"base_layer: in_channels=0 \(an empty weight\)"):
        MaskedLoRAConv2d(conv)
    with pytest.warns(UserWarning, match=r"0: its base layer has in_features=0 \(an empty weight\)"):
        sk.patch_unet(m, target_modules="all", init="random")
    assert type(m[0]) is PeftLinear and isinstance(m[1], MaskedLoRALinear)
    x = torch.randn(3, 0)
    torch.testing.assert_close(m[0](x), m[0].get_base_layer()(x))   # the base's output, an empty delta
    assert m(x).shape == (3, 4)


# ------------------------------------------------------------------ review fixes
def views_of_one_buffer(spans):
    """Two Linear(8, 8) whose weights and biases are views of one flat buffer, at ``spans`` (element
    offsets of a.weight, a.bias, b.weight, b.bias), as FSDP's flat parameters (use_orig_params) make."""
    torch.manual_seed(0)
    flat = torch.randn(max(spans) + 64)
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    for mod, (w, bias) in ((a, spans[:2]), (b, spans[2:])):
        mod.weight = nn.Parameter(flat[w:w + 64].view(8, 8))
        mod.bias = nn.Parameter(flat[bias:bias + 8])
    m = nn.Sequential(a, b)
    sk.patch_unet(m, target_modules="all", init="random", rank=3, masks={"1.weight": torch.rand(8, 8) > 0.5})
    return m, flat


def test_disjoint_views_of_one_buffer_merge_and_unmerge_bit_exactly():
    m, flat = views_of_one_buffer((0, 64, 72, 136))
    flat0 = flat.clone()
    x = torch.randn(5, 8)
    y = m(x)
    check_untied(m, list(iter_patched(m)))
    sk.merge_adapter(m)
    assert all(layer.merged_adapters == ["default"] for _, layer in iter_patched(m))
    torch.testing.assert_close(m(x), y)
    sk.unmerge_adapter(m)
    assert torch.equal(flat, flat0)   # every byte of the buffer as it was


@pytest.mark.parametrize("spans", [(0, 64, 32, 136), (0, 64, 72, 60)], ids=["weights", "bias_into_weight"])
def test_overlapping_views_of_one_buffer_merge_refused(spans):
    m, flat = views_of_one_buffer(spans)
    flat0 = flat.clone()
    with pytest.raises(ValueError, match=r"merge_adapter: layer '0': its base (weight|bias) is shared with "
                                         r"'1\.base_layer\.(weight|bias)' \(overlapping views of one storage\)"):
        sk.merge_adapter(m)
    assert torch.equal(flat, flat0) and not any(layer.merged_adapters for _, layer in iter_patched(m))


def test_module_moves_and_conversions_do_not_recheck_masks(monkeypatch):
    """Masks and merge records follow .half()/.to() as they are (checked when made): no padding-bit check
    (a device read per padded element mask) on the way."""
    import spare_kernels.masks as masks_mod
    torch.manual_seed(0)
    layer = MaskedLoRALinear(nn.Linear(10, 6))   # 10 columns: element masks with padding bits
    layer.add_adapter("a", 2, init="random", mask=torch.rand(6, 10) > 0.5)
    layer.add_adapter("b", 2, init="random", mask=torch.rand(6, 10) > 0.5, active=False)
    layer.merge(adapter_names=["b"])
    before = {k: v.to_dense() for k, v in layer.masks.items()}
    w0 = layer.unmerged_weight()

    def refuse(*a, **k):
        raise AssertionError("a mask was checked again")
    monkeypatch.setattr(masks_mod, "_check_padding", refuse)
    layer.half().float()
    assert {k: v.to_dense() for k, v in layer.masks.items()}.keys() == before.keys()
    assert all(torch.equal(layer.masks[k].to_dense(), before[k]) for k in before)
    layer.unmerge()
    assert torch.equal(layer.weight, w0.half().float())


def test_merged_model_deleted_leaves_no_registry_entry():
    import gc
    import weakref

    from spare_kernels.nn import lora
    gc.collect()
    n0 = len(lora._MERGED_INTO)
    m = small()
    sk.merge_adapter(m)
    assert len(lora._MERGED_INTO) == n0 + 3
    w = weakref.ref(m[0].weight)
    del m
    gc.collect()
    assert w() is None and len(lora._MERGED_INTO) == n0


def test_merge_registry_follows_a_replaced_parameter():
    """With torch's overwrite-on-conversion, .half() gives the base layer a new Parameter: the merge
    record's registry entry moves to it (the old one goes with the old Parameter)."""
    from spare_kernels.nn import lora
    m = small()
    sk.merge_adapter(m)
    old = m[0].weight
    prev = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        m.half()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(prev)
    assert m[0].weight is not old
    assert lora._MERGED_INTO[m[0].weight]() is m[0]
    sk.unmerge_adapter(m)
    assert m[0].weight not in lora._MERGED_INTO


def test_adopt_failure_leaves_peft_layer_as_it_was(monkeypatch):
    from spare_kernels.nn import adopt, lora
    from peft import LoraConfig
    layer = PeftLinear(nn.Linear(8, 6), "x", config=LoraConfig(r=2, lora_alpha=2), r=2, lora_alpha=2)
    keys = set(layer.__dict__)

    def boom(self):
        self.__dict__["_merge_backup"] = {}   # part-way through
        raise RuntimeError("CUDA out of memory")
    monkeypatch.setattr(lora._Fused, "_init_fused", boom)
    with pytest.raises(RuntimeError, match="out of memory"):
        adopt(layer)
    assert type(layer) is PeftLinear and set(layer.__dict__) == keys
    monkeypatch.undo()
    assert isinstance(adopt(layer), MaskedLoRALinear)


def test_check_unmerge_all_and_unpatch_check_every_layer_first():
    from spare_kernels.nn.lora import check_unmerge_all
    m = small()
    sk.merge_adapter(m)
    m[1].base_layer.weight = nn.Parameter(torch.zeros(8, 4))
    layers = list(iter_patched(m))
    with pytest.raises(RuntimeError, match=r"^fn: layer '1': unmerge: adapter 'default': the base weight is now"):
        check_unmerge_all(layers, "fn", "default")
    with pytest.raises(RuntimeError, match=r"^fn: layer '1': unmerge:"):
        check_unmerge_all(layers, "fn")
    check_unmerge_all(layers, "fn", "other")   # nothing of 'other' to undo: nothing to check
    with pytest.raises(RuntimeError, match=r"^unpatch: layer '1': unmerge:"):
        sk.unpatch(m)
    assert all(layer.merged_adapters == ["default"] for _, layer in iter_patched(m))   # none undone
