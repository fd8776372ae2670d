"""What the module layer costs on top of the op: one SD-1.5 attention layer, forward + backward.

``PYTHONPATH=. python -m benchmarks.patch_overhead [--reps 41] [--out FILE]``

Per shape, side by side in one process (medians of interleaved repetitions), ``x`` requiring grad:

- ``floor``       the frozen ``nn.Linear`` (forward and ``dx``);
- ``op_*``        the fused op called directly on the same tensors (no module);
- ``module_*``    the layer ``patch_unet`` installs, called as a UNet calls it;
- ``peft``        peft's own LoRA layer (dense, factored), the anchor a peft user runs today.

``module_* - op_*`` is the Python cost of the module (what being a peft layer may add); ``module/floor``
is what the step-time tables see. ``dense`` is the adapter without a mask, ``element`` a packed
element mask of density 0.5.
"""
from __future__ import annotations

import argparse
import os

import torch
from torch import nn

import spare_kernels as sk
from spare_kernels.bench import time_side_by_side
from spare_kernels.utils.io import write_json

RESULTS = os.path.join(os.path.dirname(__file__), "results")
# (name, tokens, in, out): SD-1.5 attention projections, batch 1 at a 64×64 latent
SHAPES = [("down0.attn1.to_q (64x64 latent)", 4096, 320, 320),
          ("down0.attn2.to_k (77 text tokens)", 77, 768, 320),
          ("mid.attn1.to_q (8x8 latent)", 64, 1280, 1280),
          ("probe: 1 token, 320->320 (Python cost)", 1, 320, 320)]


class _Holder(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.to_q = lin


def _peft_layer(base, rank):
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear
    return Linear(base, "default", config=LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False),
                  r=rank, lora_alpha=rank)


def schemes(tokens, fin, fout, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(fin, fout).requires_grad_(False)
    x = torch.randn(1, tokens, fin, generator=g).requires_grad_()
    dense = torch.rand(fout, fin, generator=g) < 0.5
    mods = {}
    for kind in ("dense", "element"):
        h = sk.patch_unet(_Holder(base), rank=rank, target_modules=["to_q"], init="random")
        layer = h.to_q
        layer.lora_B["default"].weight.data.mul_(1e-2)   # a trained adapter's scale, not a random one's
        if kind == "element":
            layer.set_mask("default", sk.Mask.from_dense(dense))
        mods[kind] = layer
    peft = _peft_layer(nn.Linear(fin, fout).requires_grad_(False), rank)
    peft.base_layer.load_state_dict(base.state_dict())
    params = [p for m in [*mods.values(), peft] for p in m.parameters() if p.requires_grad]

    def step(fn):
        def go():
            fn(x).sum().backward()
            x.grad = None
            for p in params:
                p.grad = None
        return go

    def op(layer, mask):
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        return lambda x: sk.masked_lora_linear(x, base.weight, base.bias, A, B, mask, layer.scaling["default"])

    return {"floor": step(base), "op_dense": step(op(mods["dense"], None)), "module_dense": step(mods["dense"]),
            "op_element": step(op(mods["element"], mods["element"].masks["default"])),
            "module_element": step(mods["element"]), "peft": step(peft)}


def run(reps=41, quiet=False):
    rows = []
    for name, n, fin, fout in SHAPES:
        t = time_side_by_side(schemes(n, fin, fout), reps=reps, warmup=3)
        row = {"layer": name, "tokens": n, "in": fin, "out": fout, "ms": {k: 1e3 * v for k, v in t.items()}}
        for kind in ("dense", "element"):
            row[f"{kind}_module_minus_op_us"] = 1e6 * (t[f"module_{kind}"] - t[f"op_{kind}"])
            row[f"{kind}_module/floor"] = t[f"module_{kind}"] / t["floor"]
        row["peft/floor"] = t["peft"] / t["floor"]
        rows.append(row)
        if not quiet:
            print(f"{name:<36} floor {row['ms']['floor']:7.3f} ms | dense: module-op "
                  f"{row['dense_module_minus_op_us']:7.1f} us, module/floor {row['dense_module/floor']:.3f} | "
                  f"element: module-op {row['element_module_minus_op_us']:7.1f} us, module/floor "
                  f"{row['element_module/floor']:.3f} | peft/floor {row['peft/floor']:.3f}", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=41)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    a = p.parse_args(argv)
    rows = run(a.reps)
    if a.out:
        write_json(a.out, {"threads": torch.get_num_threads(), "backend": sk.backend_info(), "rows": rows})


if __name__ == "__main__":
    main()
