"""patch_unet / unpatch_unet and the nn modules on tiny diffusers UNets."""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import spare_kernels as sk
from spare_kernels.nn import MaskedLoRAConv2d, MaskedLoRALinear, iter_patched
from unets import run, tiny_inputs, tiny_unet

ATTN = ("to_q", "to_k", "to_v", "to_out.0")


def state(unet):
    return {k: v.clone() for k, v in unet.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def assert_unchanged(y, y0, backend):
    """The docs' promise (docs/api.md) for a zero delta: bit for bit where the base GEMM is torch's own (reference,
    cpu), to float rounding on the fused Triton kernels (they sum x·W_eff in their own order; under the
    interpreter numpy's matmul, whose order differs from torch's by CPU)."""
    if backend == "triton":
        torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(y, y0)


def test_default_targets_zero_init_exact_and_unpatch_bit_identical(backend):
    unet = tiny_unet()
    before = state(unet)
    originals = {n: m for n, m in unet.named_modules() if n.endswith(ATTN)}
    inp = tiny_inputs()
    with torch.no_grad():
        y0 = run(unet, inp)
    assert sk.patch_unet(unet) is unet
    patched = dict(iter_patched(unet))
    assert set(patched) == set(originals) and len(patched) > 0
    assert all(isinstance(m, MaskedLoRALinear) for m in patched.values())
    with torch.no_grad():
        assert_unchanged(run(unet, inp), y0, backend)      # B = 0: the base model
    sk.unpatch_unet(unet)
    assert not list(iter_patched(unet))
    assert all(unet.get_submodule(n) is m for n, m in originals.items())
    assert same_state(state(unet), before)


def test_all_preset_list_regex_callable():
    unet = tiny_unet()
    n_all = sum(type(m) in (nn.Linear, nn.Conv2d) for m in unet.modules())
    sk.patch_unet(unet, target_modules="all")
    kinds = [type(m) for _, m in iter_patched(unet)]
    assert len(kinds) == n_all and MaskedLoRAConv2d in kinds
    u2 = sk.patch_unet(tiny_unet(), target_modules=["to_q", "conv_in"])
    assert {n.split(".")[-1] for n, _ in iter_patched(u2)} == {"to_q", "conv_in"}
    u3 = sk.patch_unet(tiny_unet(), target_modules=r".*attn2\.to_[kv]")
    assert {n.split(".")[-1] for n, _ in iter_patched(u3)} == {"to_k", "to_v"}
    u4 = sk.patch_unet(tiny_unet(), target_modules=lambda n, m: isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1))
    assert all(m.base_layer.kernel_size == (1, 1) for _, m in iter_patched(u4)) and list(iter_patched(u4))


def test_errors_name_the_problem():
    with pytest.raises(TypeError, match="pipe.unet"):
        class Pipe:
            unet = None
        sk.patch_unet(Pipe())
    with pytest.raises(ValueError, match="UNet-like"):
        sk.patch_unet(nn.Sequential(nn.ReLU()))
    unet = tiny_unet()
    with pytest.raises(ValueError, match="nearest module names") as e:
        sk.patch_unet(unet, target_modules=["to_qq"])
    assert "to_q" in str(e.value)
    with pytest.raises(ValueError, match="rank"):
        sk.patch_unet(unet, rank=0)
    with pytest.raises(ValueError, match="init"):
        sk.patch_unet(unet, init="xavier")
    key = next(n for n, _ in unet.named_parameters() if n.endswith("attn1.to_q.weight"))
    w = unet.get_parameter(key)
    with pytest.raises(ValueError, match="nearest adapted weights"):
        sk.patch_unet(unet, masks={key.replace("to_q", "to_qx"): torch.ones_like(w, dtype=torch.bool)})
    with pytest.raises(ValueError, match="weight's shape"):
        sk.patch_unet(unet, masks={key: torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(TypeError, match="float"):
        sk.patch_unet(unet, masks={key: torch.ones_like(w)})
    assert not list(iter_patched(unet)) and not hasattr(unet, "peft_config")   # nothing changed by the failed calls
    assert all(p.requires_grad for p in unet.parameters())


def test_masks_by_parameter_name_and_dense_default(backend):
    unet = tiny_unet()
    inp = tiny_inputs()
    with torch.no_grad():
        y0 = run(unet, inp)
    params = dict(unet.named_parameters())
    keys = [k for k in params if k.endswith(("to_q.weight", "to_v.weight"))]
    masks = {k: sk.Mask.from_dense(torch.zeros_like(params[k], dtype=torch.bool)) for k in keys}
    sk.patch_unet(unet, masks=masks, init="random")
    for name, m in iter_patched(unet):
        has = f"{name}.weight" in masks
        assert (m.masks["default"] is not None) == has       # no entry: dense adapter
    # zero masks on q, v; dense random adapters on k and out: the output must move
    with torch.no_grad():
        assert not torch.allclose(run(unet, inp), y0)
    u2 = tiny_unet()
    all_zero = {f"{n}.weight": torch.zeros_like(m.weight, dtype=torch.bool) for n, m in u2.named_modules()
                if n.endswith(ATTN)}
    sk.patch_unet(u2, masks=all_zero, init="random")
    with torch.no_grad():
        assert_unchanged(run(u2, inp), y0, backend)           # all-zero masks: the base model


def test_patched_forward_matches_merged_weights(backend):
    unet = tiny_unet()
    params = dict(unet.named_parameters())
    masks = {k: torch.rand_like(v) > 0.5 for k, v in params.items() if k.endswith(("to_q.weight", "to_out.0.weight"))}
    sk.patch_unet(unet, masks=masks, init="random", target_modules="all", rank=3, alpha=6)
    inp = tiny_inputs()
    with torch.no_grad():
        y = run(unet, inp)
        sk.merge_adapter(unet)
        ym = run(unet, inp)
        sk.unmerge_adapter(unet)
    torch.testing.assert_close(y, ym, rtol=1e-3, atol=1e-3 * y.abs().max().item())


def test_training_moves_only_adapters(backend):
    unet = tiny_unet()
    base = state(unet)
    sk.patch_unet(unet, target_modules="all", rank=2)
    params = [p for p in unet.parameters() if p.requires_grad]
    assert params and all(".lora_" in n for n, p in unet.named_parameters() if p.requires_grad)
    opt = torch.optim.SGD(params, lr=0.1)
    inp = tiny_inputs()
    for _ in range(2):
        loss = run(unet, inp).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for p in unet.parameters() if not p.requires_grad)
    sk.unpatch_unet(unet)
    assert same_state(state(unet), base)


def test_stack_toggle_scale_remove_and_disable(backend):
    unet = tiny_unet()
    inp = tiny_inputs()
    with torch.no_grad():
        y0 = run(unet, inp)
    sk.patch_unet(unet, init="random", adapter_name="a")
    sk.patch_unet(unet, init="random", adapter_name="b", target_modules=["to_k"])
    assert sk.adapter_names(unet) == ["a", "b"]
    with torch.no_grad():
        yab = run(unet, inp)
        sk.enable_adapter(unet, "b", False)
        ya = run(unet, inp)
        sk.set_active_adapters(unet, ["b"])
        yb = run(unet, inp)
        sk.set_active_adapters(unet, ["a", "b"])
        assert torch.allclose(run(unet, inp), yab)
        sk.set_adapter_scale(unet, "b", 0.0)
        torch.testing.assert_close(run(unet, inp), ya, rtol=1e-5, atol=1e-5)
        weights = {n: p.data_ptr() for n, p in unet.named_parameters()}
        with sk.disable_adapters(unet):
            assert torch.equal(run(unet, inp), y0)
        assert weights == {n: p.data_ptr() for n, p in unet.named_parameters()}   # nothing copied
        sk.remove_adapter(unet, "a")
        assert sk.adapter_names(unet) == ["b"]
    assert not torch.allclose(ya, yab) and not torch.allclose(yb, ya)
    with pytest.raises(ValueError, match="adapter_names"):
        sk.set_active_adapters(unet, ["zzz"])
    # stacking: the sum of the two adapters' deltas equals each alone, layer by layer (linearity)
    lin = MaskedLoRALinear(nn.Linear(16, 8))
    lin.add_adapter("p", 2, 0.5, init="random", mask=torch.rand(8, 16) > 0.5)
    lin.add_adapter("q", 3, 2.0, init="random")
    x = torch.randn(5, 16)
    with torch.no_grad():
        both = lin(x)
        ref = x @ (lin.weight + lin.delta_weight("p") + lin.delta_weight("q")).t() + lin.bias
    torch.testing.assert_close(both, ref, rtol=1e-5, atol=1e-5)


def test_peft_interop(backend):
    from peft import LoraConfig
    unet = tiny_unet()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v", "conv1", "proj_in"],
                                init_lora_weights=False))
    inp = tiny_inputs()
    with torch.no_grad():
        yp = run(unet, inp)
    peft_sd = state(unet)
    peft_layers = {n: m for n, m in unet.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    sk.patch_unet(unet)     # adapter "default" exists: convert only
    patched = dict(iter_patched(unet))
    assert set(patched) == set(peft_layers)
    for n, m in patched.items():
        assert m.lora_A["default"].weight is peft_layers[n].lora_A["default"].weight    # same objects
    with torch.no_grad():
        torch.testing.assert_close(run(unet, inp), yp, rtol=1e-4, atol=1e-4)
    assert same_state(state(unet), peft_sd)                     # peft-style keys, same values
    unet.load_state_dict(peft_sd)                               # and they load
    sk.unpatch_unet(unet)
    assert all(unet.get_submodule(n) is m for n, m in peft_layers.items())
    assert same_state(state(unet), peft_sd)


class _DtypeSpy(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.outs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.outs.append((str(func), t.dtype, t.numel()))
        return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_adapters_fp32_no_fp32_activation_copy(backend, dtype):
    lin = nn.Linear(64, 48).to(dtype)
    m = MaskedLoRALinear(lin)
    m.add_adapter("default", 4, 1.0, init="random")
    assert m.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(32, 64, dtype=dtype, requires_grad=True)
    with _DtypeSpy() as spy:
        y = m(x)
        y.float().sum().backward()
    assert y.dtype == dtype and m.lora_A["default"].weight.grad.dtype == torch.float32
    big_fp32 = [o for o in spy.outs if o[1] == torch.float32 and o[2] >= x.numel() and "sum" not in o[0]
                and "_to_copy" in o[0] and o[2] != y.numel()]
    assert not big_fp32, big_fp32
    unet = tiny_unet(dtype=dtype)
    sk.patch_unet(unet, init="random")
    with torch.no_grad():
        out = run(unet, tiny_inputs(dtype=dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_module_follows_dtype_and_masks_stay_bool():
    m = MaskedLoRAConv2d(nn.Conv2d(4, 6, 3, padding=1))
    m.add_adapter("default", 2, 1.0, init="random", mask=torch.rand(6, 4, 3, 3) > 0.5)
    m.double()
    assert m.masks["default"].data.dtype == torch.uint8 and m.lora_A["default"].weight.dtype == torch.float64
    y = m(torch.randn(1, 4, 5, 5, dtype=torch.float64))
    assert y.dtype == torch.float64
    with pytest.raises(ValueError, match="padding_mode"):
        MaskedLoRAConv2d(nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"))


def _lowp_copy(m, dtype):
    """``m`` with its base layer in ``dtype`` and its adapters as they are: what autocast should run."""
    import copy
    c = copy.deepcopy(m)
    c.base_layer.to(dtype)
    return c


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_autocast_casts_like_nn_layers(backend, dtype, kind):
    """Under torch.autocast a patched layer takes fp32 or low-precision activations, as nn.Linear /
    nn.Conv2d do: x, weight and bias in the autocast dtype, fp32 adapters and their gradients kept;
    the op's own fp32 work is not cast down (bit for bit the layer cast by hand, autocast off), and a
    backward called inside the autocast region gives the same gradients."""
    if kind == "linear":
        m = MaskedLoRALinear(nn.Linear(40, 24))
        m.add_adapter("default", 4, 1.0, init="random", mask=torch.rand(24, 40) > 0.5)
        x0 = torch.randn(3, 5, 40)
    else:
        m = MaskedLoRAConv2d(nn.Conv2d(6, 10, 3, padding=1))
        m.add_adapter("default", 3, 1.0, init="random", mask=torch.rand(10, 6, 3, 3) > 0.5)
        x0 = torch.randn(2, 6, 7, 5)
    m.lora_B["default"].weight.data.normal_()
    ref = _lowp_copy(m, dtype)

    def grads(mod, x, ctx_fwd, ctx_bwd):
        x = x.detach().requires_grad_(True)
        mod.zero_grad(set_to_none=True)
        with ctx_fwd():
            y = mod(x)
        with ctx_bwd():
            (y.float() ** 2).sum().backward()
        return y, x.grad, mod.lora_A["default"].weight.grad, mod.lora_B["default"].weight.grad

    import contextlib
    ac = lambda: torch.autocast("cpu", dtype=dtype)   # noqa: E731
    off = contextlib.nullcontext
    want = grads(ref, x0.to(dtype), off, off)
    assert want[0].dtype == dtype and want[2].dtype == torch.float32
    for xin in (x0, x0.to(dtype)):                        # fp32 input, or a low-precision one from an earlier layer
        for bwd in (off, ac):
            got = grads(m, xin, ac, bwd)
            assert got[0].dtype == dtype and got[1].dtype == xin.dtype
            assert got[2].dtype == got[3].dtype == torch.float32
            torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
            torch.testing.assert_close(got[1], want[1].to(xin.dtype), rtol=0, atol=0)
            for g, w in zip(got[2:], want[2:]):
                torch.testing.assert_close(g, w, rtol=0, atol=0)
    # The public ops cast the same way.
    A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
    with ac():
        if kind == "linear":
            y = sk.masked_lora_linear(x0, m.weight, m.bias, A, B, m.masks["default"], 1.0)
        else:
            y = sk.masked_lora_conv2d(x0, m.weight, m.bias, A, B, m.masks["default"], 1.0, padding=1)
    torch.testing.assert_close(y, want[0], rtol=0, atol=0)


def test_autocast_patched_unet_trains(backend):
    """A patched UNet under autocast (bf16): forward and backward run, the output is bf16, the fp32
    adapter gradients are close to those of the fp32 model (bf16 activations, to their precision)."""
    unet = tiny_unet()
    sk.patch_unet(unet)
    params = [p for p in unet.parameters() if p.requires_grad]
    with torch.no_grad():   # small deltas: init="random" would make this random net's attention chaotic
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    inputs = tiny_inputs()
    out = {}
    for mode in ("fp32", "autocast"):
        unet.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            y = run(unet, inputs)
        (y.float() ** 2).mean().backward()
        out[mode] = y, [p.grad.clone() for p in params]
    assert out["autocast"][0].dtype == torch.bfloat16 and out["fp32"][0].dtype == torch.float32
    g32 = torch.cat([g.flatten() for g in out["fp32"][1]])
    g16 = torch.cat([g.flatten() for g in out["autocast"][1]])
    assert g16.dtype == torch.float32 and torch.isfinite(g16).all()
    assert (g16 - g32).norm() <= 0.03 * g32.norm()   # measured 1.2%; the plain UNet's own: 1.6%


def test_autocast_stacked_adapters(backend):
    """Two stacked adapters under autocast: the same as the layer cast by hand with autocast off."""
    m = MaskedLoRALinear(nn.Linear(40, 24))
    m.add_adapter("a", 4, 1.0, init="random", mask=torch.rand(24, 40) > 0.5)
    m.add_adapter("b", 2, 0.5, init="random")
    for n in ("a", "b"):
        m.lora_B[n].weight.data.normal_()
    assert m.active_adapters == ["a", "b"]
    ref = _lowp_copy(m, torch.bfloat16)
    x = torch.randn(5, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    torch.testing.assert_close(y, ref(x.bfloat16()), rtol=0, atol=0)


def test_custom_ops_called_under_autocast_keep_their_precision(backend):
    """The registered ops called directly (torch.ops, as compiled graphs and hooks do) under
    autocast: no cast inside, bit for bit the result without autocast."""
    from spare_kernels.masks import Mask
    x, W, A, B = torch.randn(6, 40), torch.randn(24, 40), torch.randn(4, 40), torch.randn(24, 4)
    wire = Mask.from_dense(torch.rand(24, 40) > 0.5).wire()
    dy = torch.randn(6, 24)
    calls = [lambda: torch.ops.spare_kernels.masked_lora_linear(x, W, None, A, B, *wire, 1.0),
             lambda: torch.ops.spare_kernels.masked_lora_linear_backward(dy, x, W, A, B, *wire, 1.0, True, True, True),
             lambda: sk.saliency_linear(x[:, None], dy[:, None], "sample_sq")]
    for f in calls:
        want = f()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = f()
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=0, atol=0)
