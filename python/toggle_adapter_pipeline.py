"""Switch a spare_kernels adapter on and off inside a diffusers StableDiffusionPipeline, offline.

python python/toggle_adapter_pipeline.py [--adapter FILE] [--out DIR]: builds a tiny pipeline from
configs with random weights (UNet, VAE, CLIP text encoder, CLIP BPE tokenizer from a vocab.json +
merges.txt it writes, DDIM; no downloads), loads an adapter (train_sparse_adapter.py's, else a random
one saved to DIR) and generates the same prompts/seeds with it on, off (disable_adapters), off
(enable_adapter False), on; writes DIR/adapter_{on,off}.png. The tests reuse build_pipeline."""
import argparse, json, os, sys
import torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import spare_kernels as sk  # noqa: E402

UNET = dict(sample_size=16, layers_per_block=1, block_out_channels=(32, 64), cross_attention_dim=32,
            attention_head_dim=8, norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def build_unet(seed=0):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET).eval()


def build_pipeline(folder, seed=0):
    """Tiny StableDiffusionPipeline; CLIP-style byte-level BPE files (``</w>`` ends a word) go to ``folder``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    letters = [t for c in "abcdefghijklmnopqrstuvwxyz" for t in (c, c + "</w>")]
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>"] + letters)}
    merges = [f"{''.join(p[:i])} {p[i]}" for w in "a photo of cat dog painting tree in the style".split()
              for p in [list(w[:-1]) + [w[-1] + "</w>"]] for i in range(1, len(p))]   # letters -> one word token
    vocab.update({t: len(vocab) + i for i, t in enumerate(dict.fromkeys(m.replace(" ", "") for m in merges))})
    os.makedirs(folder, exist_ok=True)
    with open(f"{folder}/vocab.json", "w") as f, open(f"{folder}/merges.txt", "w") as g:
        json.dump(vocab, f), g.write("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tok = CLIPTokenizer.from_pretrained(folder, model_max_length=16)
    torch.manual_seed(seed + 1)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    vae = AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=8, sample_size=32,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=build_unet(seed),
                                   scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompts=("a photo of a cat", "a painting of a dog"), seed=0, steps=3, size=32):
    return pipe(list(prompts), num_inference_steps=steps, height=size, width=size, output_type="pt",
                generator=torch.Generator().manual_seed(seed)).images


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", help="adapter file written by save_adapter (default: save a random one)")
    ap.add_argument("--out", default="out/toggle_adapter")
    args = ap.parse_args(argv)
    pipe = build_pipeline(f"{args.out}/tokenizer")
    if args.adapter is None:   # a non-zero adapter for the same base weights, to make the switch visible
        args.adapter = sk.save_adapter(sk.patch_unet(build_unet(), init="random"), f"{args.out}/random.safetensors")
    sk.load_adapter(pipe.unet, args.adapter)
    name = sk.adapter_names(pipe.unet)[0]
    on = generate(pipe)
    with sk.disable_adapters(pipe.unet):
        off = generate(pipe)
    sk.enable_adapter(pipe.unet, name, False)
    assert torch.equal(generate(pipe), off), "enable_adapter(False) is not the base model"
    sk.enable_adapter(pipe.unet, name, True)
    assert torch.equal(generate(pipe), on), "re-enabling does not restore the adapter"
    for tag, imgs in (("on", on), ("off", off)):   # the prompts side by side
        pipe.numpy_to_pil(imgs.permute(2, 0, 3, 1).flatten(1, 2)[None].numpy())[0].save(f"{args.out}/adapter_{tag}.png")
    print(f"adapter {name!r} from {args.adapter}: mean |on - off| = {(on - off).abs().mean():.4f}, toggles exact; "
          f"wrote {args.out}/adapter_on.png and adapter_off.png")


if __name__ == "__main__":
    main()
