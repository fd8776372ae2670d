"""The anchors every benchmark names, each faithful to what its namesake really runs.

Layer level (one layer, forward + backward with ``x`` requiring grad, ``W`` frozen, A/B trained):

- ``floor``     the frozen layer: forward and ``dx`` only, what any adapter method pays;
- ``peft``      a real peft LoRA layer (``peft.tuners.lora.layer.Linear`` / ``Conv2d``), dense LoRA;
- ``spare_ref`` SPARE's scheme as the authors' ``vision-unlearning`` package runs it with sparse-peft:
                ``base(x) + F.linear(x, (B@A)*scale*M)`` (a second full GEMM / conv), M a dense uint8
                mask cast to the compute dtype at use, as SPARE's code keeps it;
- ``merged``    ``F.linear(x, W + scale*M*(B@A))`` through autograd;
- ``ours_*``    this library's fused op (element mask, block mask, row mask, or dense factored).

UNet level (saliency): ``naive_per_sample`` (one backward per sample, ``.grad`` of every weight) and
``full_grad`` (SPARE's code: ``.grad`` for every parameter, ``abs()`` accumulated per batch).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spare_kernels import Mask, masked_lora_conv2d, masked_lora_linear
from spare_kernels.unlearn.reference import patch_spare_ref as _patch_spare_ref


def _peft_layer(base: nn.Module, rank: int, alpha: float):
    from peft import LoraConfig
    from peft.tuners.lora.layer import Conv2d as PeftConv2d
    from peft.tuners.lora.layer import Linear as PeftLinear
    cfg = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False)
    cls = PeftLinear if isinstance(base, nn.Linear) else PeftConv2d
    layer = cls(base, "default", config=cfg, r=rank, lora_alpha=alpha)
    base.requires_grad_(False)
    return layer


def make_layer_case(spec: dict, rank: int = 4, density: float = 0.5, block_density: float = 0.1,
                    block=(32, 32), seed: int = 0, dtype=torch.float32, device="cpu",
                    adapter_dtype=None) -> dict:
    """Tensors and masks for one layer shape (``spec`` as ``benchmarks.shapes.layer_shapes`` gives), on
    ``device``; adapters in ``adapter_dtype`` (default: ``dtype``)."""
    g = torch.Generator().manual_seed(seed)
    if spec["kind"] == "linear":
        x = torch.randn(spec["n"], spec["in"], generator=g)
        base = nn.Linear(spec["in"], spec["out"])
        A = torch.randn(rank, spec["in"], generator=g) / spec["in"] ** 0.5
        B = torch.randn(spec["out"], rank, generator=g)
    else:
        x = torch.randn(*spec["x"], generator=g)
        out, cin, kh, kw = spec["weight"]
        base = nn.Conv2d(cin * spec.get("groups", 1), out, (kh, kw), spec["stride"], spec["padding"],
                         spec.get("dilation", 1), spec.get("groups", 1))
        A = torch.randn(rank, cin, kh, kw, generator=g) / (cin * kh * kw) ** 0.5
        B = torch.randn(out, rank, 1, 1, generator=g)
    base = base.to(dtype=dtype, device=device).requires_grad_(False)
    W = base.weight
    rows, cols = W.shape[0], W[0].numel()
    dense = torch.rand(W.shape, generator=g) < density
    tiles = torch.rand(-(-rows // block[0]), -(-cols // block[1]), generator=g) < block_density
    on_rows = torch.rand(rows, generator=g) < density
    ad = adapter_dtype or dtype
    dense = dense.to(device)
    return dict(kind=spec["kind"], spec=spec, x=x.to(dtype=dtype, device=device), base=base,
                A=A.to(dtype=ad, device=device), B=B.to(dtype=ad, device=device), dense=dense,
                element=Mask.from_dense(dense), block=Mask("block", W.shape, tiles.to(device), block),
                row=Mask("row", W.shape, on_rows.to(device)), rank=rank, scale=1.0)


def layer_schemes(case: dict, names=None) -> dict:
    """``{name: closure}``; each closure runs one forward + backward and clears the grads."""
    base, s, kind = case["base"], case["scale"], case["kind"]
    W, b = base.weight, base.bias
    x = case["x"].clone().requires_grad_()
    A = case["A"].clone().requires_grad_()
    B = case["B"].clone().requires_grad_()
    Mf = case["dense"].to(W.dtype)
    M8 = case["dense"].to(torch.uint8)   # SPARE's code keeps a uint8 mask and casts it at use
    if kind == "linear":
        fn, op, geo, B2 = F.linear, masked_lora_linear, {}, B
    else:
        geo = dict(stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups)
        fn, op, B2 = (lambda x_, w_, b_=None: F.conv2d(x_, w_, b_, **geo)), masked_lora_conv2d, B

    def delta():
        d = B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)
        return d.view(W.shape).to(W.dtype)

    peft_layer = None

    def peft_fwd():
        nonlocal peft_layer
        if peft_layer is None:
            peft_layer = _peft_layer(base, case["rank"], case["rank"] * s)
            with torch.no_grad():
                peft_layer.lora_A["default"].weight.copy_(A.detach().view_as(peft_layer.lora_A["default"].weight))
                peft_layer.lora_B["default"].weight.copy_(B.detach().view_as(peft_layer.lora_B["default"].weight))
        return peft_layer(x)

    fwd = {
        "floor": lambda: fn(x, W, b),
        "peft": peft_fwd,
        "spare_ref": lambda: fn(x, W, b) + fn(x, delta() * s * M8.to(W.dtype)),
        "merged": lambda: fn(x, W + s * Mf * delta(), b),
        "ours_element": lambda: op(x, W, b, A, B2, case["element"], s, **geo),
        "ours_block": lambda: op(x, W, b, A, B2, case["block"], s, **geo),
        "ours_row": lambda: op(x, W, b, A, B2, case["row"], s, **geo),
        "ours_dense": lambda: op(x, W, b, A, B2, None, s, **geo),
    }
    names = names or list(fwd)

    def run(f):
        def go():
            y = f()
            y.backward(torch.ones_like(y))
            x.grad = A.grad = B.grad = None
            if peft_layer is not None:
                for p in peft_layer.parameters():
                    p.grad = None
        return go

    return {k: run(fwd[k]) for k in names}


# ----------------------------------------------------------------------------- whole-UNet anchors
# SPARE's own adapter layer lives in the package (the unlearning recipe's spare-reference baseline
# runs it too); the benchmarks patch it with random (non-zero) factors so every op really runs.
def patch_spare_ref(unet: nn.Module, masks: dict, rank: int = 4) -> nn.Module:
    """Swap each module whose ``<name>.weight`` is in ``masks`` for a ``SpareRefLayer``."""
    return _patch_spare_ref(unet, masks, rank=rank, init="random")
