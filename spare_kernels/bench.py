"""Side-by-side timing of one layer's forward+backward under the schemes people use.

Times are medians of interleaved repetitions in one process (these machines are noisy), so only
the ratios between schemes are meaningful. Anchors (each what its namesake really runs):

- ``floor``     the frozen layer: forward and ``dx`` only, what any adapter method pays;
- ``lora``      dense LoRA in factored form, ``base(x) + s·(x·Aᵀ)·Bᵀ`` (peft's LoRA layer);
- ``spare_ref`` SPARE's code: ``base(x) + F.linear(x, (B@A)·s·M)``, a second full GEMM;
- ``merged``    ``F.linear(x, W + s·M⊙(B@A))`` through autograd.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from .masks import Mask
from .ops import masked_lora_linear


def time_side_by_side(fns: dict[str, Callable[[], object]], reps: int = 7, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each fn; calls interleaved so drift hits all alike."""
    if reps < 1:
        raise ValueError(f"reps: expected >= 1, got {reps}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples = {k: [] for k in fns}
    names = list(fns)
    for i in range(reps):
        for k in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            fns[k]()
            samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def linear_case(n: int, inf: int, out: int, rank: int = 4, density: float = 0.5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inf, generator=g)
    W = torch.randn(out, inf, generator=g) / inf ** 0.5
    b = torch.randn(out, generator=g)
    A = (torch.randn(rank, inf, generator=g) / inf ** 0.5).requires_grad_()
    B = torch.randn(out, rank, generator=g).requires_grad_()
    dense = torch.rand(out, inf, generator=g) < density
    return x, W, b, A, B, dense


def linear_schemes(x, W, b, A, B, dense, scale=1.0, block_density=0.1, block=(32, 32)):
    """fwd+bwd closures for the anchors and for this library's op (element and block masks)."""
    xg = x.clone().requires_grad_()
    Mf = dense.float()
    elem = Mask.from_dense(dense)
    g = torch.Generator().manual_seed(1)
    tiles = torch.rand(-(-W.shape[0] // block[0]), -(-W.shape[1] // block[1]), generator=g) < block_density
    blk = Mask("block", W.shape, tiles, block)

    def run(f):
        def go():
            y = f()
            y.backward(torch.ones_like(y))
            xg.grad = A.grad = B.grad = None
        return go

    return {
        "floor": run(lambda: F.linear(xg, W, b)),
        "lora": run(lambda: F.linear(xg, W, b) + scale * F.linear(F.linear(xg, A), B)),
        "spare_ref": run(lambda: F.linear(xg, W, b) + F.linear(xg, (B @ A) * scale * Mf)),
        "merged": run(lambda: F.linear(xg, W + scale * Mf * (B @ A), b)),
        "ours_element": run(lambda: masked_lora_linear(xg, W, b, A, B, elem, scale)),
        "ours_block": run(lambda: masked_lora_linear(xg, W, b, A, B, blk, scale)),
        "ours_dense": run(lambda: masked_lora_linear(xg, W, b, A, B, None, scale)),
    }


# SD-1.5 UNet Linear shapes at a 32×32 latent, batch 1: (tokens, in, out).
DEMO_SHAPES = [(1024, 320, 320), (256, 640, 640), (64, 1280, 1280), (77, 768, 1280), (256, 640, 5120)]


def ops_table(shapes=DEMO_SHAPES, reps: int = 7, rank: int = 4) -> list[dict]:
    rows = []
    for n, inf, out in shapes:
        t = time_side_by_side(linear_schemes(*linear_case(n, inf, out, rank)), reps=reps)
        rows.append({"shape": f"{n}x{inf}->{out}", **{k: v / t["lora"] for k, v in t.items()},
                     "lora_ms": 1e3 * t["lora"]})
    return rows


def format_table(rows: list[dict]) -> str:
    cols = ["floor", "lora", "spare_ref", "merged", "ours_element", "ours_block", "ours_dense"]
    head = f"{'layer (N x in -> out)':<22}{'lora ms':>9}" + "".join(f"{c:>14}" for c in cols)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['shape']:<22}{r['lora_ms']:>9.2f}" + "".join(f"{r[c]:>14.2f}" for c in cols))
    return "\n".join(lines)
