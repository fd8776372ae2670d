"""Train a saliency-masked sparse LoRA adapter that makes a tiny UNet forget a prompt, offline, on CPU.

python python/train_sparse_adapter.py [--out DIR] [--steps N] [--density D]: takes the tiny pipeline of
toggle_adapter_pipeline.py (random weights, no downloads), scores the attention projections' weights
with SaliencyCollector (grad_abs of the denoising loss on the forget prompt), keeps the top D of the
entries as element masks (topk_masks), patches the UNet (patch_unet) and trains the masked adapter so
the forget prompt's noise prediction matches the frozen model's on an anchor prompt (the teacher is
the same UNet under disable_adapters: no copy). Writes DIR/adapter.safetensors, which
toggle_adapter_pipeline.py --adapter loads (same base weights)."""
import argparse, os, sys
import torch
import torch.nn.functional as F
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]   # toggle_adapter_pipeline, spare_kernels
import spare_kernels as sk  # noqa: E402
from toggle_adapter_pipeline import build_pipeline  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/train_sparse_adapter")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--density", type=float, default=0.05, help="fraction of weight entries the adapter may change")
    ap.add_argument("--lr", type=float, default=1e-2)
    args = ap.parse_args(argv)
    pipe = build_pipeline(f"{args.out}/tokenizer")
    unet = pipe.unet.requires_grad_(False)
    with torch.no_grad():
        forget, anchor = (pipe.encode_prompt(p, "cpu", 2, False)[0] for p in ("a photo of a cat", "a photo of a dog"))
    g = torch.Generator().manual_seed(0)

    def noisy_batch():   # batch 2, 16x16 latents at random timesteps
        x0, noise = torch.randn(2, 2, 4, 16, 16, generator=g)
        t = torch.randint(0, 1000, (2,), generator=g)
        return pipe.scheduler.add_noise(x0, noise, t), t, noise

    with sk.SaliencyCollector(unet, stat="grad_abs", target_modules=TARGETS) as col:
        for _ in range(2):
            x, t, noise = noisy_batch()
            F.mse_loss(unet(x, t, encoder_hidden_states=forget).sample, noise).backward()
    scores = col.scores()
    masks = sk.topk_masks(scores, density=args.density)   # global top-k over all targeted weights
    sk.patch_unet(unet, masks=masks, target_modules=TARGETS, rank=4)
    print(f"masks from SaliencyCollector grad_abs scores: {len(masks)} "
          f"weights, {args.density:.0%} of their entries trainable")
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=args.lr)
    for step in range(1, args.steps + 1):
        x, t, _ = noisy_batch()
        with torch.no_grad(), sk.disable_adapters(unet):
            target = unet(x, t, encoder_hidden_states=anchor).sample
        loss = F.mse_loss(unet(x, t, encoder_hidden_states=forget).sample, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step}/{args.steps}  loss {loss.item():.6f}", flush=True)
    path = sk.save_adapter(unet, f"{args.out}/adapter.safetensors")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
