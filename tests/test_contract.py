"""The op and patch contract under bad input (issue 15): checks before changes, every op through
torch.library.opcheck on every (backend, device) pair the registry runs here."""
import pytest
import torch
from torch import nn

import spare_kernels as sk
from spare_kernels import maskfmt as fmt
from spare_kernels.masks import Mask
from unets import tiny_unet


def snapshot(model: nn.Module):
    """Everything a failed call must leave as it was: module objects, values, flags."""
    return ({n: id(m) for n, m in model.named_modules()},
            {k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def assert_unchanged(model, snap):
    mods, state, flags = snap
    assert {n: id(m) for n, m in model.named_modules()} == mods
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def _bad_masks(unet, last):
    """Masks for every attention projection, all good but the last one."""
    names = [n for n, m in unet.named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    masks = {f"{n}.weight": torch.rand(unet.get_submodule(n).weight.shape) > 0.5 for n in names}
    masks[f"{names[-1]}.weight"] = last(unet.get_submodule(names[-1]).weight.shape)
    return masks


@pytest.mark.parametrize("last, err, match", [
    (lambda s: (torch.rand(s) > 0.5).float(), TypeError, "float32"),
    (lambda s: (torch.rand(s) > 0.5).long(), TypeError, "int64"),
    (lambda s: torch.ones(s, dtype=torch.bool, device="meta"), ValueError, "meta"),
    (lambda s: Mask("row", s, torch.ones(s[0], dtype=torch.bool, device="meta")), ValueError, "meta"),
    (lambda s: torch.ones(s[0], s[1] + 1, dtype=torch.bool), ValueError, "shape"),
], ids=["float", "int64", "meta-tensor", "meta-Mask", "shape"])
def test_patch_unet_refuses_a_bad_mask_before_changing_anything(last, err, match):
    unet = tiny_unet()
    masks = _bad_masks(unet, last)
    snap = snapshot(unet)
    with pytest.raises(err, match=match) as e:
        sk.patch_unet(unet, masks=masks)
    assert "masks[" in str(e.value)
    assert_unchanged(unet, snap)
    assert not any(isinstance(m, sk.nn.MaskedLoRALinear) for m in unet.modules())
    masks.popitem()
    sk.patch_unet(unet, masks=masks)      # the corrected call goes through
    assert sum(isinstance(m, sk.nn.MaskedLoRALinear) for m in unet.modules()) == len(masks) + 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_ops_refuse_a_non_finite_scale(bad):
    x, W, A, B = torch.randn(5, 8), torch.randn(4, 8), torch.randn(2, 8), torch.randn(4, 2)
    with pytest.raises(ValueError, match="masked_lora_linear: scale: expected a finite number"):
        sk.masked_lora_linear(x, W, None, A, B, scale=bad)
    with pytest.raises(ValueError, match="masked_lora_conv2d: scale: expected a finite number"):
        sk.masked_lora_conv2d(torch.randn(1, 2, 4, 4), torch.randn(3, 2, 1, 1), None, torch.randn(2, 2, 1, 1),
                              torch.randn(3, 2), scale=bad)


@pytest.mark.parametrize("kw, match", [
    (dict(stride=0), "stride"), (dict(dilation=0), "dilation"), (dict(padding=-1), "padding"),
    (dict(stride=(1, -2)), "stride")])
def test_saliency_conv2d_checks_its_geometry(kw, match):
    """stride=0 used to raise ZeroDivisionError inside the shape arithmetic."""
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(ValueError, match=f"saliency_conv2d: expected stride, dilation >= 1 and padding >= 0.*{match}"):
        sk.saliency_conv2d(x, torch.randn(2, 4, 6, 6), (4, 3, 3, 3), **kw)


# ---------------------------------------------------------------------------------------- opcheck
def _wire(kind, shape, device):
    rows = shape[0]
    cols = int(torch.tensor(shape[1:]).prod())
    g = torch.Generator().manual_seed(0)
    if kind == "none":
        return None, fmt.NONE, 0, 0
    if kind == "element":
        return fmt.pack_bits(torch.rand(rows, cols, generator=g) > 0.5).to(device), fmt.ELEMENT, 0, 0
    if kind == "block":
        return (torch.rand(-(-rows // 4), -(-cols // 8), generator=g) > 0.5).to(device), fmt.BLOCK, 4, 8
    return (torch.rand(rows, generator=g) > 0.5).to(device), fmt.ROW, 0, 0


def _opcheck(op, args):
    # test_aot_dispatch_dynamic compiles; keep it (it is what torch.compile relies on)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("kind", ["none", "element", "block", "row"])
def test_opcheck_linear(backend_device, kind):
    _, dev = backend_device
    x, W, b, A, B = (torch.randn(s, device=dev) for s in ((7, 12), (10, 12), (10,), (3, 12), (10, 3)))
    wire = _wire(kind, W.shape, dev)
    ops = torch.ops.spare_kernels
    _opcheck(ops.masked_lora_linear.default, (x.requires_grad_(), W, b, A.requires_grad_(), B.requires_grad_(),
                                              *wire, 0.7))
    dy = torch.randn(7, 10, device=dev)
    for need in ((True, True, True), (False, True, False)):
        _opcheck(ops.masked_lora_linear_backward.default, (dy, x.detach(), W, A.detach(), B.detach(), *wire, 0.7, *need))


@pytest.mark.parametrize("kind", ["none", "element", "block", "row"])
def test_opcheck_conv2d(backend_device, kind):
    _, dev = backend_device
    x, W, b, A, B = (torch.randn(s, device=dev) for s in ((2, 4, 7, 7), (6, 2, 3, 3), (6,), (3, 2, 3, 3), (6, 3)))
    wire = _wire(kind, W.shape, dev)
    geo = ([2, 1], [1, 0], [1, 2], 2)
    ops = torch.ops.spare_kernels
    _opcheck(ops.masked_lora_conv2d.default, (x.requires_grad_(), W, b, A.requires_grad_(), B.requires_grad_(),
                                              *wire, 0.7, *geo))
    y = ops.masked_lora_conv2d(x.detach(), W, b, A.detach(), B.detach(), *wire, 0.7, *geo)
    for need in ((True, True, True), (True, False, True)):
        _opcheck(ops.masked_lora_conv2d_backward.default, (torch.randn_like(y), x.detach(), W, A.detach(), B.detach(),
                                                           *wire, 0.7, *geo, *need))


@pytest.mark.parametrize("stat", sk.STATS)
def test_opcheck_saliency(backend_device, stat):
    _, dev = backend_device
    ops = torch.ops.spare_kernels
    x, dy = torch.randn(3, 5, 12, device=dev), torch.randn(3, 5, 10, device=dev)
    _opcheck(ops.saliency_linear.default, (torch.zeros(10, 12, device=dev), x, dy, stat))
    xc, dyc = torch.randn(2, 4, 6, 6, device=dev), torch.randn(2, 6, 3, 6, device=dev)
    _opcheck(ops.saliency_conv2d.default, (torch.zeros(6, 2, 3, 3, device=dev), xc, dyc, stat, [2, 1], [1, 1],
                                           [1, 1], 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unmerge_restores_negative_zeros(dtype):
    """A merged masked (or B = 0) adapter adds +0.0 to -0.0 entries: equal values, other bits. The merge
    keeps every entry whose bits change, so unmerge and unpatch are bit-exact, and the fingerprint of a
    file saved while merged is the unmerged base's."""
    unet = tiny_unet(dtype=dtype)
    with torch.no_grad():
        for p in unet.parameters():
            p.view(-1)[::5] = -0.0
    snap = snapshot(unet)
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[dtype]
    sk.patch_unet(unet, target_modules="all")          # gaussian init: B = 0, the delta is +0.0 everywhere
    sk.merge_adapter(unet)
    sk.unmerge_adapter(unet)
    for n, m in sk.nn.iter_patched(unet):
        assert torch.equal(m.weight.view(bits), snap[1][f"{n}.weight"].view(bits)), n
    sk.merge_adapter(unet)
    sk.unpatch_unet(unet)
    now = unet.state_dict()
    assert all(torch.equal(now[k].view(bits) if now[k].is_floating_point() else now[k],
                           v.view(bits) if v.is_floating_point() else v) for k, v in snap[1].items())


def test_a_layer_the_op_cannot_run_keeps_peft_code_and_refuses_a_mask_before_changing_anything():
    """A reflect-padded conv: peft adapts it with its own layer (zero-padded A), which the fused op does not
    compute; it stays peft's, with a warning naming it, and a mask asked for on it is refused up front."""
    unet = tiny_unet()
    name, conv = [(n, m) for n, m in unet.named_modules() if isinstance(m, nn.Conv2d)][2]
    conv.padding_mode = "reflect"
    snap = snapshot(unet)
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        sk.patch_unet(unet, target_modules="all", masks={f"{name}.weight": torch.ones_like(conv.weight, dtype=torch.bool)})
    assert_unchanged(unet, snap)
    assert not hasattr(unet, "_spare_kernels_patch") and not hasattr(unet, "peft_config")
    with pytest.warns(UserWarning, match=f"1 targeted layer.*{name}: its base layer has padding_mode='reflect'"):
        sk.patch_unet(unet, target_modules="all")
    from peft.tuners.lora.layer import Conv2d
    assert type(unet.get_submodule(name)) is Conv2d
    n_layers = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in tiny_unet().modules())
    assert len(list(sk.nn.iter_patched(unet))) == n_layers - 1


@pytest.mark.parametrize("call, err, match", [
    (lambda u: sk.patch_unet(u, masks={0: torch.ones(1, dtype=torch.bool)}), TypeError, "masks: expected parameter names"),
    (lambda u: sk.set_active_adapters(u, 5), TypeError, "adapter_names: expected a name or a list"),
    (lambda u: sk.set_active_adapters(u, None), TypeError, "adapter_names: expected a name or a list"),
    (lambda u: sk.load_adapter(u, 5), TypeError, "path: expected a str or os.PathLike"),
    (lambda u: sk.nn.MaskedLoRALinear(nn.Linear(4, 3)).add_adapter("a.b", 1), ValueError, "adapter_name: expected"),
], ids=["mask-key", "active-int", "active-none", "load-path", "dotted-name"])
def test_bad_arguments_are_named(call, err, match):
    unet = tiny_unet()
    snap = snapshot(unet)
    with pytest.raises(err, match=match):
        call(unet)
    assert_unchanged(unet, snap)


def test_adapter_dtypes_a_backend_lacks_run_the_reference():
    """fp16 adapters under fp32 / bf16 activations: the C++ kernels take fp32 / bf16 adapters only, so the
    registry picks by adapter dtype too (they used to raise 'lora_A must be float32 or bfloat16')."""
    from spare_kernels.backends import registry
    for act in (torch.float32, torch.bfloat16):
        x, W = torch.randn(3, 24).to(act), torch.randn(10, 24).to(act)
        A, B = torch.randn(4, 24).half(), torch.randn(10, 4).half()
        m = Mask.from_dense(torch.rand(10, 24) > 0.5)
        y = sk.masked_lora_linear(x, W, None, A, B, m, 1.5)
        with sk.use_backend("reference"):
            torch.testing.assert_close(y, sk.masked_lora_linear(x, W, None, A, B, m, 1.5))
        xc, Wc = torch.randn(2, 3, 6, 5).to(act), torch.randn(4, 3, 3, 3).to(act)
        sk.masked_lora_conv2d(xc, Wc, None, torch.randn(2, 3, 3, 3).half(), torch.randn(4, 2).half())
        assert registry.backend_for("masked_lora_linear", "cpu", act) in ("cpu", "reference")
    assert registry.lookup("masked_lora_linear", "cpu", torch.float32, torch.float16).backend == "reference"
    unet = tiny_unet()
    sk.patch_unet(unet, init="random", adapter_dtype=torch.float16, target_modules=["to_q"])
    from unets import run, tiny_inputs
    assert run(unet, tiny_inputs()).isfinite().all()
