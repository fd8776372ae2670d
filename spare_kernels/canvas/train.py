"""Train the MiniCanvas UNet: ``python -m spare_kernels.canvas.train --steps N --out DIR``.

DDPM (epsilon prediction, cosine betas, Min-SNR-gamma loss weights) on freshly rendered procedural
images every step (an endless train split), 10% null prompts for classifier-free guidance, AdamW +
warmup/cosine LR, EMA weights (the EMA is what gets saved). Seeded: a run is a function of ``--seed``
and the arguments. Resumable: a ``train_state.pt`` in ``--out`` is picked up unless ``--no-resume``; it
is deleted at the end unless ``--keep-state``. The EMA weights are also written to ``--out`` at every
checkpoint.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import time

import torch

from ..utils.io import atomic_path
from .data import dataset
from .model import UNET_CONFIG, WEIGHTS_DIR, build_unet, noise_scheduler, save_model
from .text import TextEncoder


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m spare_kernels.canvas.train", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--null-prob", type=float, default=0.1, help="fraction of null prompts (CFG)")
    p.add_argument("--min-snr", type=float, default=5.0,
                   help="Min-SNR-gamma loss weight min(SNR, gamma)/SNR (Hang et al. 2023); 0 = plain MSE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True,
                   help=f"folder for the weights; no default, so a run never replaces the shipped ones by accident "
                        f"(they are in {WEIGHTS_DIR})")
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--init", default=None, help="start from the weights in this folder (fine-tune, new LR schedule)")
    p.add_argument("--no-text-time", action="store_true",
                   help="the earlier architecture without the text-time embedding (to reproduce the shipped "
                        "weights' first two stages, see docs/unlearning.md)")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--keep-state", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    for name in ("steps", "batch_size", "ckpt_every"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= a.null_prob < 1:
        p.error("--null-prob must be in [0, 1)")
    if a.min_snr < 0:
        p.error("--min-snr must be >= 0")
    return a


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def optimize(model, ema, opt, loss, step, ema_rate):
    """One step: backward, clip at 1.0, the optimizer, then the EMA (its rate warmed up over the first steps)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    d = min(ema_rate, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.lerp_(p, 1 - d)


def main(argv=None):
    from tqdm import tqdm

    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    config = dict(UNET_CONFIG)
    if args.no_text_time:
        config.update(addition_embed_type=None)
    unet = build_unet(config).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    text = TextEncoder()
    sched = noise_scheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)
    state_path = os.path.join(args.out, "train_state.pt")
    start, elapsed = 0, 0.0
    init_meta = None
    if args.init is not None:
        from .model import load_meta, load_model

        init_meta = {"path": os.path.abspath(args.init), **load_meta(args.init).get("train", {})}
        try:
            missing, unexpected = unet.load_state_dict(load_model(args.init).state_dict(), strict=False)
        except RuntimeError as e:                 # shape mismatches
            raise SystemExit(f"--init {args.init}: the weights do not fit this UNet: {e}") from None
        if unexpected or any(not k.startswith("add_embedding.") for k in missing):
            raise SystemExit(f"--init {args.init}: the weights do not fit this UNet (missing {missing}, "
                             f"unexpected {unexpected})")
        if missing:
            # A model from before the text-time embedding: zero its output gain (adaLN-zero style),
            # so training starts from exactly the init model's function.
            unet.add_embedding.norm2.weight.data.zero_()
        ema.load_state_dict(unet.state_dict())
    if not args.no_resume and os.path.exists(state_path):
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        unet.load_state_dict(st["unet"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        start, elapsed = int(st["step"]), float(st["elapsed"])
        print(f"resuming from step {start} ({state_path})")
    null = text.encode([""])
    acp = sched.alphas_cumprod
    n_params = sum(p.numel() for p in unet.parameters())

    def checkpoint(step, wall):
        meta = {"train": {"steps": step, "batch_size": args.batch_size, "lr": args.lr, "ema": args.ema,
                          "null_prob": args.null_prob, "min_snr": args.min_snr, "seed": args.seed,
                          "seconds": round(wall, 1), "threads": torch.get_num_threads(), "params": n_params,
                          "init": init_meta}}
        save_model(ema, args.out, text, extra=meta)
        with atomic_path(state_path) as tmp:
            torch.save({"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                        "step": step, "elapsed": wall}, tmp)

    t0 = time.perf_counter() - elapsed
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=args.no_progress,
               desc="canvas unet", dynamic_ncols=True)
    avg = None
    for step in bar:
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        b = dataset(args.batch_size, seed=args.seed * 10_000_000 + step, split="train")
        x0 = b.images * 2 - 1
        cond = text.encode(b.prompts)
        drop = torch.rand(args.batch_size, generator=g) < args.null_prob
        cond = torch.where(drop[:, None, None], null.expand_as(cond), cond)
        t = torch.randint(0, sched.config.num_train_timesteps, (args.batch_size,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        err = (unet(xt, t, cond).sample - eps).pow(2).mean((1, 2, 3))
        if args.min_snr > 0:
            # Down-weights the low-noise steps whose easy targets otherwise dominate the gradient;
            # the shape is decided at the high-noise ones.
            snr = a.flatten() / (1 - a).flatten()
            err = err * snr.clamp(max=args.min_snr) / snr
        loss = err.mean()
        optimize(unet, ema, opt, loss, step, args.ema)
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        bar.set_postfix(loss=f"{avg:.4f}", lr=f"{lr_at(step, args):.1e}")
        if (step + 1) % args.ckpt_every == 0 and step + 1 < args.steps:
            checkpoint(step + 1, time.perf_counter() - t0)
    wall = time.perf_counter() - t0
    checkpoint(args.steps, wall)
    if not args.keep_state and os.path.exists(state_path):
        os.remove(state_path)
    print(f"wrote {args.out} ({n_params / 1e6:.2f} M params, {args.steps} steps, {wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
