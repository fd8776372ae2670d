"""Denoiser families (spare_kernels.targets) on tiny diffusers models built from configs: the table
against the real classes (a diffusers rename fails here), each preset's layers, sk.patch / sk.unpatch,
the ops on the families' layer shapes through every backend, masks and adapters, saliency against
plain autograd, and torch.compile of one patched block per family."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spare_kernels as sk
from conftest import tol_check
from spare_kernels.saliency import SaliencyCollector
from spare_kernels.targets import (FAMILIES, GROUPS, PRESETS, _matcher, cross_attention_params, family_of, layer_group,
                                   preset_entries, target_predicate)

pytestmark = pytest.mark.usefixtures("one_thread")

TRANSFORMERS = ("sd3", "flux", "pixart", "sana")
D = 24     # inner dim: 2 heads x 12, not a power of two
TXT = 5    # text tokens; image tokens are 3 x 3 = 9: odd token counts everywhere


def build(family, seed=0, **over):
    """A tiny model of ``family`` (20-50 k parameters; the UNet is the suite's TINY): every kind of
    block the family has (SD3: a dual-attention block and the context_pre_only last block)."""
    import diffusers
    torch.manual_seed(seed)
    if family == "unet":
        from benchmarks.shapes import TINY
        cls, cfg = diffusers.UNet2DConditionModel, TINY
    elif family == "sd3":
        cls, cfg = diffusers.SD3Transformer2DModel, dict(
            sample_size=6, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=12,
            num_attention_heads=2, joint_attention_dim=20, caption_projection_dim=D, pooled_projection_dim=12,
            pos_embed_max_size=6, dual_attention_layers=(0,), qk_norm="rms_norm")
    elif family == "flux":
        cls, cfg = diffusers.FluxTransformer2DModel, dict(
            patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=12,
            num_attention_heads=2, joint_attention_dim=20, pooled_projection_dim=12, guidance_embeds=True,
            axes_dims_rope=(4, 4, 4))
    elif family == "pixart":
        cls, cfg = diffusers.PixArtTransformer2DModel, dict(
            num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=1,
            cross_attention_dim=D, sample_size=6, patch_size=2, caption_channels=20, norm_num_groups=1)
    else:
        cls, cfg = diffusers.SanaTransformer2DModel, dict(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=1,
            num_cross_attention_heads=2, cross_attention_head_dim=12, cross_attention_dim=D, caption_channels=20,
            sample_size=3, patch_size=1)
    return cls(**{**cfg, **over}).eval()


# Configuration variants that add layers the base tiny models lack, so that every table entry is seen.
VARIANTS = {
    "unet": [dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=6 * 8 + 32)],   # SDXL's add_embedding
    "sd3": [],
    "flux": [],
    "pixart": [dict(use_additional_conditions=True)],                   # PixArt-alpha 1024's micro-conditions
    "sana": [dict(guidance_embeds=True)],                               # Sana-Sprint's guidance embedder
}


def inputs(family, model, batch=2, seed=1):
    """Keyword arguments as the family's pipeline passes them (Flux: packed latents, ids, guidance)."""
    g = torch.Generator().manual_seed(seed)
    c = model.config

    def r(*s):
        return torch.randn(*s, generator=g)

    t = torch.tensor([10.0, 700.0][:batch])
    if family == "unet":
        return dict(sample=r(batch, 4, 8, 8), timestep=t, encoder_hidden_states=r(batch, TXT, 32))
    if family == "sd3":
        return dict(hidden_states=r(batch, 4, 6, 6), encoder_hidden_states=r(batch, TXT, c.joint_attention_dim),
                    pooled_projections=r(batch, c.pooled_projection_dim), timestep=t)
    if family == "flux":
        ids = torch.zeros(3, 3, 3)
        ids[..., 1] += torch.arange(3)[:, None]
        ids[..., 2] += torch.arange(3)[None, :]
        return dict(hidden_states=r(batch, 9, c.in_channels),
                    encoder_hidden_states=r(batch, TXT, c.joint_attention_dim),
                    pooled_projections=r(batch, c.pooled_projection_dim), timestep=t / 1000,
                    img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(TXT, 3), guidance=torch.full((batch,), 3.5))
    mask = torch.ones(batch, TXT)
    mask[0, -2:] = 0   # padded prompt tokens
    if family == "pixart":
        return dict(hidden_states=r(batch, 4, 6, 6), encoder_hidden_states=r(batch, TXT, c.caption_channels),
                    encoder_attention_mask=mask, timestep=t,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return dict(hidden_states=r(batch, 4, 3, 3), encoder_hidden_states=r(batch, TXT, c.caption_channels),
                encoder_attention_mask=mask, timestep=t)


def run(model, inp):
    return model(**inp, return_dict=False)[0]


def layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def preset_layers(model, family, preset):
    pred = target_predicate(preset, family=family)
    return [n for n, m in layers(model) if pred(n, m)]


def patched(model):
    from spare_kernels.nn import iter_patched
    return dict(iter_patched(model))


# ------------------------------------------------------------------------------------- (a) the table
@pytest.mark.parametrize("family", ("unet",) + TRANSFORMERS)
def test_table_matches_the_real_classes(family):
    """Every Linear/Conv2d of every variant is in exactly the group the table gives (none unlisted), and
    every entry of every group matches a layer of the real diffusers class (cross: a module)."""
    fam = FAMILIES[family]
    models = [build(family)] + [build(family, **v) for v in VARIANTS[family]]
    seen = {g: set() for g in GROUPS}
    cross = set()
    for model in models:
        assert family_of(model) == family
        for name, _ in layers(model):
            g = layer_group(family, name)
            assert g is not None, f"{family}: {name} is in no group of the table"
            seen[g].update(e for e in getattr(fam, g) if name == e or name.endswith("." + e))
        hit = _matcher(fam, fam.cross)
        cross.update(e for n, _ in model.named_modules() if hit(n) for e in fam.cross if n.endswith("." + e))
    for g in GROUPS:
        want = set(getattr(fam, g))
        assert seen[g] == want, f"{family}.{g}: entries matching nothing {want - seen[g]}"
    assert cross == set(fam.cross)


# ----------------------------------------------------------------------------- (b) the presets' layers
_SD3_JOINT = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k", "attn.to_out.0",
              "attn.to_q", "attn.to_v"]
_QKVO = ["to_k", "to_out.0", "to_q", "to_v"]
_ATTN12 = [f"attn{i}.{p}" for i in (1, 2) for p in _QKVO]
BLOCK_LAYERS = {   # family -> block -> preset -> the block's layers (sorted)
    "unet": {"down_blocks.0.attentions.0.transformer_blocks.0": {
        "attention": _ATTN12, "attention+mlp": _ATTN12 + ["ff.net.0.proj", "ff.net.2"]}},
    "sd3": {"transformer_blocks.0": {   # dual attention (attn2) and the text stream's out and MLP
        "attention": sorted(_SD3_JOINT + [f"attn2.{p}" for p in _QKVO]),
        "attention+mlp": sorted(_SD3_JOINT + [f"attn2.{p}" for p in _QKVO]
                                + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"])},
            "transformer_blocks.1": {   # context_pre_only: no to_add_out, no ff_context
        "attention": sorted(set(_SD3_JOINT) - {"attn.to_add_out"}),
        "attention+mlp": sorted(set(_SD3_JOINT) - {"attn.to_add_out"}) + ["ff.net.0.proj", "ff.net.2"]}},
    "flux": {"transformer_blocks.0": {
        "attention": sorted(_SD3_JOINT),
        "attention+mlp": sorted(_SD3_JOINT + ["ff.net.0.proj", "ff.net.2",
                                              "ff_context.net.0.proj", "ff_context.net.2"])},
             "single_transformer_blocks.0": {
        "attention": ["attn.to_k", "attn.to_q", "attn.to_v", "proj_out"],
        "attention+mlp": ["attn.to_k", "attn.to_q", "attn.to_v", "proj_mlp", "proj_out"]}},
    "pixart": {"transformer_blocks.0": {"attention": _ATTN12,
                                        "attention+mlp": _ATTN12 + ["ff.net.0.proj", "ff.net.2"]}},
    "sana": {"transformer_blocks.0": {"attention": _ATTN12,
                                      "attention+mlp": _ATTN12 + ["ff.conv_inverted", "ff.conv_point"]}},
}
# "all" beyond the blocks' attention+mlp: the layers outside the blocks that it takes (never modulation)
OUTSIDE_ALL = {
    "sd3": ["context_embedder", "pos_embed.proj", "proj_out"],
    "flux": ["context_embedder", "proj_out", "x_embedder"],
    "pixart": ["caption_projection.linear_1", "caption_projection.linear_2", "pos_embed.proj", "proj_out"],
    "sana": ["caption_projection.linear_1", "caption_projection.linear_2", "patch_embed.proj", "proj_out"],
}
COUNTS = {"unet": (32, 40, 83), "sd3": (19, 25, 28), "flux": (12, 17, 20), "pixart": (8, 10, 14), "sana": (8, 10, 14)}


@pytest.mark.parametrize("family", ("unet",) + TRANSFORMERS)
def test_preset_layers(family):
    model = build(family)
    got = {p: preset_layers(model, family, p) for p in PRESETS}
    assert tuple(len(got[p]) for p in PRESETS) == COUNTS[family]
    for block, want in BLOCK_LAYERS[family].items():
        for preset, names in want.items():
            mine = sorted(n[len(block) + 1:] for n in got[preset] if n.startswith(block + "."))
            assert mine == names, (block, preset)
    if family == "unet":   # "all" is every Linear and Conv2d, as before
        assert got["all"] == [n for n, _ in layers(model)]
        return
    blocks = FAMILIES[family].blocks
    inside = [n for n in got["all"] if n.split(".")[0] in blocks]
    assert inside == got["attention+mlp"] or family == "sana"   # Sana: ff.conv_depth in no preset
    assert sorted(n for n in got["all"] if n.split(".")[0] not in blocks) == OUTSIDE_ALL[family]
    assert not any(layer_group(family, n) == "modulation" for n in got["all"])


def test_presets_per_family_and_generic():
    assert preset_entries("unet", "attention") == ("to_q", "to_k", "to_v", "to_out.0")
    pred = target_predicate(None)   # the default family is the UNet: today's presets
    assert pred("a.attn1.to_out.0", None) and pred("to_q", None) and not pred("a.ff.net.2", None)
    assert target_predicate("all")("a.time_emb_proj", None)
    gen = target_predicate("attention+mlp", family="generic")
    assert gen("anything", None) and target_predicate("attention", family="generic")("x.to_k", None)
    flux = target_predicate("attention", family="flux")
    assert flux("single_transformer_blocks.3.proj_out", None) and not flux("proj_out", None)
    assert flux("base_model.model.single_transformer_blocks.3.proj_out", None)    # under peft's PeftModel
    assert not target_predicate("all", family="sd3")("transformer_blocks.0.norm1.linear", None)
    assert not target_predicate("all", family="sana")("transformer_blocks.0.ff.conv_depth", None)
    assert target_predicate(["ff.conv_depth"], family="sana")("transformer_blocks.0.ff.conv_depth", None)
    with pytest.raises(ValueError, match="family: expected one of"):
        target_predicate("attention", family="dit")
    with pytest.raises(ValueError, match="not a list of names"):
        preset_entries("sd3", "all")
    with pytest.raises(ValueError, match="preset: expected one of"):
        preset_entries("sd3", "mlp")


def test_family_of_sees_through_wrappers():
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig, get_peft_model

    class MyDiT(SD3Transformer2DModel):   # a subclass: found by its MRO
        pass

    model = build("sd3")
    assert family_of(MyDiT(**model.config)) == "sd3"
    assert family_of(torch.compile(model)) == "sd3"          # the wrapper only, never run
    assert family_of(nn.Sequential(nn.Linear(2, 2))) == "generic"
    assert family_of(get_peft_model(build("pixart"), LoraConfig(r=2, target_modules=["to_q"]))) == "pixart"
    sk.patch(model)
    assert family_of(model) == "sd3"


def test_cross_attention_params():
    want = {"sd3": {"transformer_blocks.0.attn", "transformer_blocks.1.attn"},   # not attn2 (image self-attention)
            "flux": {"transformer_blocks.0.attn", "single_transformer_blocks.0.attn"},
            "pixart": {"transformer_blocks.0.attn2"}, "sana": {"transformer_blocks.0.attn2"}}
    unet = build("unet")
    assert cross_attention_params(unet) == [n for n, _ in unet.named_parameters() if ".attn2." in n]   # ESD-x today
    for family, mods in want.items():
        model = build(family)
        prefixes = tuple(m + "." for m in mods)
        assert cross_attention_params(model) == [n for n, _ in model.named_parameters() if n.startswith(prefixes)]
    with pytest.raises(ValueError, match="generic"):
        cross_attention_params(nn.Sequential(nn.Linear(2, 2)))


# ------------------------------------------------------------------------------- (c) patch / unpatch
@pytest.mark.parametrize("family", TRANSFORMERS)
def test_patch_unpatch_bit_exact(family):
    model = build(family)
    first = next(iter(model.parameters()))
    first.requires_grad_(False)                       # a flag that must come back as it was
    types = [type(m) for m in model.modules()]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    inp = inputs(family, model)
    with torch.no_grad():
        y0 = run(model, inp)
        assert sk.patch(model) is model               # default: the "attention" preset, B = 0
        assert sorted(patched(model)) == sorted(preset_layers(build(family), family, "attention"))
        torch.testing.assert_close(run(model, inp), y0, rtol=1e-5, atol=1e-6)
        sk.unpatch(model)
        assert torch.equal(run(model, inp), y0)
        sk.patch(model, target_modules="all", init="random")
        assert len(patched(model)) == COUNTS[family][2]
        assert not torch.allclose(run(model, inp), y0)
        sk.unpatch(model)
        y1 = run(model, inp)
    assert torch.equal(y1, y0)
    assert [type(m) for m in model.modules()] == types and not hasattr(model, "peft_config")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    # patch_unet resolves presets by family too
    sk.patch_unet(model, target_modules="attention+mlp")
    assert sorted(patched(model)) == sorted(preset_layers(build(family), family, "attention+mlp"))
    sk.unpatch_unet(model)


def test_patch_messages_read_for_a_transformer():
    class Pipe:
        transformer = None
    with pytest.raises(TypeError, match=r"model: .*pass pipe\.transformer"):
        sk.patch(Pipe())
    model = build("flux")
    with pytest.raises(ValueError, match=r"matched no nn.Linear/nn.Conv2d of the model \(flux family\)") as e:
        sk.patch(model, target_modules=["to_qq"])
    assert "to_q" in str(e.value)
    with pytest.raises(ValueError, match="of the unet"):
        sk.patch_unet(model, target_modules=["to_qq"])
    with pytest.raises(ValueError, match="model: expected a denoiser"):
        sk.patch(nn.Sequential(nn.ReLU()))
    assert not patched(model) and not hasattr(model, "peft_config")


# ----------------------------------------------------------------- (d) ops on the families' shapes
def _shapes(family):
    """One (name, base layer) per distinct shape among the layers of the family's "all" preset."""
    model = build(family)
    out, seen = [], set()
    for name in preset_layers(model, family, "all"):
        m = model.get_submodule(name)
        key = (type(m), tuple(m.weight.shape), getattr(m, "stride", None), m.bias is None)
        if key not in seen:
            seen.add(key)
            out.append((name, m))
    return out


def _text_stream(name):
    return any(k in name for k in ("add_", "to_add_out", "ff_context", "context_embedder", "caption_projection"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", TRANSFORMERS)
def test_ops_on_family_layer_shapes(backend, family, dtype):
    """Forward and backward of each distinct layer shape (element mask, rank 4, fp32 adapters) against
    the fp64 formula, bounded by the same formula's own error in ``dtype`` (conftest.tol_check)."""
    g = torch.Generator().manual_seed(0)
    r, s = 4, 0.75
    for name, m in _shapes(family):
        W = m.weight.detach().to(dtype)
        b = None if m.bias is None else m.bias.detach().to(dtype)
        rows, cols = W.shape[0], W[0].numel()
        if isinstance(m, nn.Linear):
            x = torch.randn(2, TXT if _text_stream(name) else 9, W.shape[1], generator=g)
            conv = None
        else:   # the token grid as the conv sees it: odd sides
            x = torch.randn(2, W.shape[1], 5, 7, generator=g)
            conv = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)
        A = torch.randn(r, *W.shape[1:], generator=g) / cols ** 0.5
        B = torch.randn(rows, r, *([1, 1] if conv else []), generator=g)
        dense = torch.rand(W.shape, generator=g) > 0.5
        mask = sk.Mask.from_dense(dense)

        def f(x, A, B, W, b, M, op=True):
            if op:
                return (sk.masked_lora_linear(x, W, b, A, B, mask, scale=s) if conv is None
                        else sk.masked_lora_conv2d(x, W, b, A, B, mask, s, **conv))
            delta = (B.reshape(rows, r).to(W.dtype) @ A.reshape(r, -1).to(W.dtype)).view(W.shape)
            We = W + s * M.to(W.dtype) * delta
            return F.linear(x, We, b) if conv is None else F.conv2d(x, We, b, **conv)

        xs, As, Bs = x.to(dtype).requires_grad_(), A.clone().requires_grad_(), B.clone().requires_grad_()
        y = f(xs, As, Bs, W, b, None)
        gy = torch.randn(y.shape, generator=g).to(dtype)
        got = (y,) + torch.autograd.grad(y, (xs, As, Bs), gy)
        ref = [t.detach().double().requires_grad_() for t in (x.to(dtype), A, B)]
        y64 = f(*ref, W.double(), None if b is None else b.double(), dense.double(), op=False)
        want = (y64,) + torch.autograd.grad(y64, ref, gy.double())
        low = [x.to(dtype).requires_grad_(), A.to(dtype).requires_grad_(), B.to(dtype).requires_grad_()]
        ylo = f(*low, W, b, dense, op=False)
        lows = (ylo,) + torch.autograd.grad(ylo, low, gy)
        assert got[2].dtype == torch.float32 and y.dtype == dtype
        for what, a, a64, alo in zip(("y", "dx", "dA", "dB"), got, want, lows):
            tol_check(a, a64, alo, what=f"{family} {name} {tuple(W.shape)} {what}")


# ----------------------------------------------------------- (e) masks and adapters, (f) saliency
def _scores(model, family, inp, preset):
    fz = copy.deepcopy(model).requires_grad_(False)
    with SaliencyCollector(fz, "grad_abs", target_modules=target_predicate(preset, family=family)) as col:
        run(fz, inp).square().sum().backward()
    return col.scores()


@pytest.mark.parametrize("family", TRANSFORMERS)
def test_masks_and_adapter_round_trip(family, tmp_path):
    model = build(family)
    inp = inputs(family, model)
    scores = _scores(model, family, inp, "attention+mlp")
    assert sorted(scores) == sorted(f"{n}.weight" for n in preset_layers(model, family, "attention+mlp"))
    masks = sk.topk_masks(scores, 0.25)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="masks:")   # every mask lands on a targeted layer
        sk.patch(model, masks=masks, target_modules="attention+mlp", init="random", rank=3)
    layers_ = patched(model)
    assert len(layers_) == len(masks) and all(m.masks["default"] is not None for m in layers_.values())
    with torch.no_grad():
        y = run(model, inp)
    path = sk.save_adapter(model, tmp_path / "adapter.safetensors")
    fresh = build(family)   # same seed: the same base weights
    sk.load_adapter(fresh, path)
    loaded = patched(fresh)
    assert loaded.keys() == layers_.keys()
    for n, m in layers_.items():
        assert torch.equal(loaded[n].masks["default"].data, m.masks["default"].data)
        assert torch.equal(loaded[n].lora_A["default"].weight, m.lora_A["default"].weight)
    with torch.no_grad():
        assert torch.equal(run(fresh, inp), y)


@pytest.mark.parametrize("is_patched", [False, True], ids=["plain", "patched"])
@pytest.mark.parametrize("family", TRANSFORMERS)
def test_saliency_matches_param_grad(family, is_patched):
    model = build(family)
    if is_patched:
        sk.patch(model, target_modules="all", init="random")   # the LoRA branch changes the output gradient
    inp = inputs(family, model)
    scores = _scores(model, family, inp, "all")
    ref = copy.deepcopy(model).requires_grad_(True)
    run(ref, inp).square().sum().backward()
    grads = {n: p.grad for n, p in ref.named_parameters()}
    base = ".base_layer" if is_patched else ""
    assert sorted(scores) == sorted(f"{n}{base}.weight" for n in preset_layers(build(family), family, "all"))
    for k, s in scores.items():
        torch.testing.assert_close(s, grads[k].abs(), rtol=1e-4, atol=1e-5 * max(grads[k].abs().max().item(), 1e-12),
                                   msg=lambda m: f"{family} {k}: {m}")


# --------------------------------------------------------------------------------- (g) torch.compile
COMPILED_BLOCK = {"sd3": "transformer_blocks.0", "flux": "single_transformer_blocks.0",
                  "pixart": "transformer_blocks.0", "sana": "transformer_blocks.0"}


@pytest.mark.parametrize("family", TRANSFORMERS)
def test_compile_one_patched_block_fullgraph(family):
    """One block, patched on every preset layer (element masks on half of them), compiled with
    fullgraph=True through ``aot_eager`` (Dynamo + AOTAutograd, as tests/test_compile_unet.py: no
    Inductor codegen on CPU); output and adapter gradients match eager. Its inputs are what the model
    passes it, captured from a real forward."""
    model = build(family)
    name = COMPILED_BLOCK[family]
    targets = [n for n in preset_layers(model, family, "all") if n.startswith(name + ".")]
    g = torch.Generator().manual_seed(0)
    masks = {f"{n}.weight": sk.Mask.from_dense(torch.rand(model.get_submodule(n).weight.shape, generator=g) > 0.5)
             for n in targets[::2]}
    sk.patch(model, masks=masks, target_modules=targets, init="random")
    block = model.get_submodule(name)
    seen = {}
    hook = block.register_forward_pre_hook(lambda m, a, k: seen.update(a=a, k=k), with_kwargs=True)
    with torch.no_grad():
        run(model, inputs(family, model))
    hook.remove()

    def step(fn):
        out = fn(*seen["a"], **seen["k"])
        out = out if isinstance(out, tuple) else (out,)
        sum(o.square().mean() for o in out if o is not None).backward()
        grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.requires_grad}
        block.zero_grad(set_to_none=True)
        return [o.detach() for o in out if o is not None], grads

    y, gr = step(block)
    torch._dynamo.reset()
    yc, grc = step(torch.compile(block, fullgraph=True, backend="aot_eager"))   # raises on any graph break
    assert len(gr) == 2 * len(targets) and grc.keys() == gr.keys()
    for a, b in zip(yc + list(grc.values()), y + list(gr.values())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, b.abs().max().item()))
