"""Train the MiniCanvas classifier: ``python -m spare_kernels.canvas.train_classifier --steps N --out DIR``.

Fresh procedural training images every step (the endless train split), augmented with generator-like
corruptions (smooth colour fields, small warps, noise, blur; see ``augment``); Adam + cosine LR. At the end
the held-out split (``dataset(n, seed=0, split="test")``) accuracy of each head is printed and stored in
``classifier.json``.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from .classifier import CLASSIFIER_CONFIG, Classifier, save_classifier
from .data import OBJECTS, STYLES, dataset
from .model import WEIGHTS_DIR


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m spare_kernels.canvas.train_classifier",
                                description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--test-n", type=int, default=1080, help="held-out images for the final accuracy")
    p.add_argument("--out", required=True,
                   help=f"folder for the weights; no default, so a run never replaces the shipped ones by accident "
                        f"(they are in {WEIGHTS_DIR})")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    for name in ("steps", "batch_size", "test_n"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return a


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Generator-like corruptions, so that the heads judge silhouette and palette, not pixel-exact
    texture (a diffusion model draws a recognisable checker circle with blotchy squares, which a
    classifier trained on clean renders called a heart): per image a smooth random colour field
    (three scales, amplitude up to 0.25) for half of them, speckle (up to 8% of the pixels
    take a neighbour's value), a small elastic warp (up to ~1 px), Gaussian noise
    (sigma up to 0.06) and, for half of them, a light 3x3 blur."""
    n = x.shape[0]
    field = sum(w * F.interpolate(torch.randn(n, 3, k, k, generator=g), size=x.shape[-1], mode="bicubic",
                                  align_corners=True) for k, w in ((5, 1.0), (9, 0.5), (16, 0.5)))
    amp = torch.rand(n, 1, 1, 1, generator=g) * 0.25 * (torch.rand(n, 1, 1, 1, generator=g) < 0.5)
    x = x + amp * field
    # speckle: up to 8% of the pixels take a neighbour's value (ragged edges, broken texture)
    shifted = torch.roll(x, shifts=(int(torch.randint(-1, 2, (1,), generator=g)), 1), dims=(2, 3))
    speckle = torch.rand(n, 1, *x.shape[-2:], generator=g) < 0.08 * torch.rand(n, 1, 1, 1, generator=g)
    x = torch.where(speckle, shifted, x)
    flow = F.interpolate(torch.randn(n, 2, 4, 4, generator=g), size=x.shape[-1], mode="bicubic",
                         align_corners=True).permute(0, 2, 3, 1)
    grid = F.affine_grid(torch.eye(2, 3).expand(n, 2, 3), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid + flow * torch.rand(n, 1, 1, 1, generator=g) * 0.05, padding_mode="border",
                      align_corners=False)
    sigma = torch.rand(n, 1, 1, 1, generator=g) * 0.06
    x = x + sigma * torch.randn(x.shape, generator=g)
    k = torch.tensor([0.25, 0.5, 0.25])
    k2 = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k2, groups=3)
    pick = (torch.rand(n, 1, 1, 1, generator=g) < 0.5).float()
    return (pick * blurred + (1 - pick) * x).clamp(0, 1)


@torch.no_grad()
def held_out_accuracy(clf: Classifier, n: int = 1080) -> dict:
    b = dataset(n, seed=0, split="test")
    ps, po = clf.eval().predict(b.images, tta=True)
    return {"style": (ps == b.styles).float().mean().item(), "object": (po == b.objects).float().mean().item()}


def main(argv=None):
    from tqdm import tqdm

    args = parse_args(argv)
    torch.manual_seed(args.seed)
    clf = Classifier(**CLASSIFIER_CONFIG).train()
    opt = torch.optim.Adam(clf.parameters(), lr=args.lr)
    t0 = time.perf_counter()
    bar = tqdm(range(args.steps), disable=args.no_progress, desc="canvas classifier", dynamic_ncols=True)
    avg = None
    for step in bar:
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        b = dataset(args.batch_size, seed=args.seed * 10_000_000 + step, split="train")
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        ls, lo = clf(augment(b.images, g))
        loss = F.cross_entropy(ls, b.styles) + F.cross_entropy(lo, b.objects)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        bar.set_postfix(loss=f"{avg:.4f}")
    wall = time.perf_counter() - t0
    acc = held_out_accuracy(clf, args.test_n)
    save_classifier(clf, args.out, extra={
        "held_out_accuracy": acc, "held_out": {"split": "test", "seed": 0, "n": args.test_n, "tta": True},
        "styles": list(STYLES), "objects": list(OBJECTS),
        "train": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                  "seconds": round(wall, 1), "threads": torch.get_num_threads()}})
    print(f"held-out accuracy: style {acc['style']:.4f}, object {acc['object']:.4f} "
          f"({args.test_n} images); {wall / 60:.1f} min; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
