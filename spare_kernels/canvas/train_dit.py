"""Train MiniCanvas-DiT: ``python -m spare_kernels.canvas.train_dit --steps N --out DIR``.

Rectified flow as SD3 trains it: ``σ`` from a logit-normal draw (m = 0, s = 1) shifted by the
scheduler's shift, ``x_t = (1 - σ)·x0 + σ·ε``, MSE on the velocity ``ε - x0``. Freshly rendered
images every step (the endless train split, as the UNet), 10% null prompts for classifier-free
guidance, AdamW + warmup/cosine LR, gradient clipping, EMA weights (the EMA is what gets saved),
forwards under bf16 autocast (fp32 weights). Seeded and resumable like ``canvas.train``.
"""
from __future__ import annotations

import argparse
import copy
import os
import time

import torch

from ..utils.io import atomic_path
from .data import dataset
from .dit import FLOW_SCHEDULER_CONFIG, build_dit, predict, save_dit
from .model import WEIGHTS_DIR
from .text import TextEncoder
from .train import lr_at, optimize


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m spare_kernels.canvas.train_dit", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--null-prob", type=float, default=0.1, help="fraction of null prompts (CFG)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True,
                   help=f"folder for the weights; no default, so a run never replaces the shipped ones by accident "
                        f"(they are in {WEIGHTS_DIR})")
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--keep-state", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    for name in ("steps", "batch_size", "ckpt_every", "warmup"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= a.null_prob < 1:
        p.error("--null-prob must be in [0, 1)")
    if not a.lr > 0:
        p.error("--lr must be > 0")
    return a


def draw_sigma(n: int, gen: torch.Generator, shift: float) -> torch.Tensor:
    """SD3's training draw: u = sigmoid(N(0, 1)), then the scheduler's shift ``s·u / (1 + (s - 1)·u)``."""
    u = torch.sigmoid(torch.randn(n, generator=gen))
    return shift * u / (1 + (shift - 1) * u)


def main(argv=None):
    from tqdm import tqdm

    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    dit = build_dit().train()
    ema = copy.deepcopy(dit).eval().requires_grad_(False)
    text = TextEncoder()
    opt = torch.optim.AdamW(dit.parameters(), lr=args.lr, weight_decay=0.01)
    state_path = os.path.join(args.out, "train_state.pt")
    start, elapsed = 0, 0.0
    if not args.no_resume and os.path.exists(state_path):
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        dit.load_state_dict(st["dit"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        start, elapsed = int(st["step"]), float(st["elapsed"])
        print(f"resuming from step {start} ({state_path})")
    null = text.encode([""])
    shift = float(FLOW_SCHEDULER_CONFIG["shift"])
    n_params = sum(p.numel() for p in dit.parameters())

    def checkpoint(step, wall):
        meta = {"train": {"steps": step, "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup,
                          "ema": args.ema, "null_prob": args.null_prob, "precision": args.precision,
                          "seed": args.seed, "seconds": round(wall, 1), "threads": torch.get_num_threads(),
                          "params": n_params, "objective": "rectified flow, velocity, logit-normal sigma"}}
        save_dit(ema, args.out, text, extra=meta)
        with atomic_path(state_path) as tmp:
            torch.save({"dit": dit.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                        "step": step, "elapsed": wall}, tmp)

    t0 = time.perf_counter() - elapsed
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=args.no_progress,
               desc="canvas dit", dynamic_ncols=True, mininterval=10)
    avg = None
    amp = args.precision == "bf16"
    for step in bar:
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        b = dataset(args.batch_size, seed=args.seed * 10_000_000 + step, split="train")
        x0 = b.images * 2 - 1
        cond = text.encode(b.prompts)
        drop = torch.rand(args.batch_size, generator=g) < args.null_prob
        cond = torch.where(drop[:, None, None], null.expand_as(cond), cond)
        sigma = draw_sigma(args.batch_size, g, shift)
        eps = torch.randn(x0.shape, generator=g)
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * eps
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            v = predict(dit, xt, sigma * 1000, cond)
        loss = (v.float() - (eps - x0)).pow(2).mean()
        optimize(dit, ema, opt, loss, step, args.ema)
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        bar.set_postfix(loss=f"{avg:.4f}", lr=f"{lr_at(step, args):.1e}")
        if (step + 1) % args.ckpt_every == 0 and step + 1 < args.steps:
            checkpoint(step + 1, time.perf_counter() - t0)
            if args.no_progress:
                print(f"step {step + 1}: loss {avg:.4f}, {time.perf_counter() - t0:.0f} s", flush=True)
    wall = time.perf_counter() - t0
    checkpoint(args.steps, wall)
    if not args.keep_state and os.path.exists(state_path):
        os.remove(state_path)
    print(f"wrote {args.out} ({n_params / 1e6:.2f} M params, {args.steps} steps, {wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
