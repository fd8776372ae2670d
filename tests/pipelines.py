"""Tiny diffusers pipeline folders of every family the ``unlearn`` command reads, built offline from
configs (random weights, tokenizers written here): SD-1.x (and an SD-2 v-prediction variant), SDXL,
SD3 (with and without its T5), Flux, PixArt-alpha/-Sigma and Sana.

``build(kind, folder)`` saves one with ``save_pretrained``; the tests cache them per session. Sizes
are the smallest each class accepts with one or two blocks: a VAE of two blocks (factor 2), so a 16 px
image is an 8x8 latent, 16 image tokens after the transformers' 2x2 patches.
"""
from __future__ import annotations

import json
import os

import torch

KINDS = ("sd", "sd2v", "sdxl", "sd3", "sd3_no_t5", "flux", "pixart_alpha", "pixart_sigma", "sana")
WORDS = "a photo of cat dog bird painting tree house in the style red blue".split()
SIZE = 16         # the tests' image size: 8x8 latents with the factor-2 VAEs
CLIP_LEN = 16     # the CLIP tokenizers' and text models' sequence length


def clip_tokenizer(folder: str):
    """A CLIPTokenizer from a vocab.json + merges.txt written to ``folder``: letters, and every word of
    :data:`WORDS` merged into one token (``</w>`` ends a word, as CLIP's BPE)."""
    from transformers import CLIPTokenizer
    letters = [t for c in "abcdefghijklmnopqrstuvwxyz" for t in (c, c + "</w>")]
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>"] + letters)}
    merges = []
    for w in WORDS:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        for i in range(1, len(parts)):
            merges.append(("".join(parts[:i]), parts[i]))
            vocab.setdefault("".join(parts[:i + 1]), len(vocab))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(dict.fromkeys(f"{a} {b}" for a, b in merges)) + "\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=CLIP_LEN)


def t5_tokenizer():
    """T5's tokenizer class (a Unigram model): <pad>, </s>, <unk>, one piece per word, letters."""
    from transformers import T5Tokenizer
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in WORDS] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def gemma_tokenizer():
    """Gemma's tokenizer class (a BPE model): every word of :data:`WORDS` merged from its letters, a
    leading <bos> as Gemma's own tokenizer.json adds."""
    from tokenizers import processors
    from transformers import GemmaTokenizer
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for c in "abcdefghijklmnopqrstuvwxyz\u2581":
        vocab.setdefault(c, len(vocab))
    merges = []
    for w in WORDS:
        p = "\u2581" + w
        for i in range(2, len(p) + 1):
            merges.append((p[:i - 1], p[i - 1]))
            vocab.setdefault(p[:i], len(vocab))
    tok = GemmaTokenizer(vocab=vocab, merges=merges)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)])
    return tok


def _clip_text(vocab_size, hidden=32, projection=None, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=CLIP_LEN, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, projection_dim=projection or hidden)
    return (CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)).eval()


def _t5(vocab_size, d_model=32, seed=0):
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_ff=2 * d_model, d_kv=8, num_heads=4,
                                   num_layers=1, relative_attention_num_buckets=8)).eval()


def _vae(latent_channels=4, shift=None, scale=0.18215):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    kw = {} if shift is None else {"shift_factor": shift}
    return AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=8, sample_size=SIZE, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         scaling_factor=scale, **kw).eval()


def _clip_pair(folder, sub, projection=None, seed=0):
    tok = clip_tokenizer(os.path.join(folder, "_build", sub))
    return tok, _clip_text(len(tok), projection=projection, seed=seed)


def build(kind: str, folder: str) -> str:
    """Save the tiny ``kind`` pipeline (one of :data:`KINDS`) to ``folder``; -> ``folder``."""
    import diffusers as d
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    torch.manual_seed(0)
    if kind in ("sd", "sd2v"):
        tok, te = _clip_pair(folder, "tok")
        unet = d.UNet2DConditionModel(sample_size=SIZE // 2, layers_per_block=1, block_out_channels=(16, 32),
                                      cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
                                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        sched = d.DDIMScheduler(clip_sample=False, steps_offset=1,
                                prediction_type="v_prediction" if kind == "sd2v" else "epsilon")
        pipe = d.StableDiffusionPipeline(vae=_vae(), text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                         safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif kind == "sdxl":
        tok, te = _clip_pair(folder, "tok")
        tok2, te2 = _clip_pair(folder, "tok2", projection=16, seed=1)
        unet = d.UNet2DConditionModel(sample_size=SIZE // 2, layers_per_block=1, block_out_channels=(16, 32),
                                      cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8,
                                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                      addition_embed_type="text_time", addition_time_embed_dim=8,
                                      projection_class_embeddings_input_dim=6 * 8 + 16)
        pipe = d.StableDiffusionXLPipeline(vae=_vae(), text_encoder=te, text_encoder_2=te2, tokenizer=tok,
                                           tokenizer_2=tok2, unet=unet, scheduler=d.EulerDiscreteScheduler())
    elif kind in ("sd3", "sd3_no_t5"):
        tok, te = _clip_pair(folder, "tok", projection=16)
        tok2, te2 = _clip_pair(folder, "tok2", projection=16, seed=1)
        tok3 = t5_tokenizer() if kind == "sd3" else None
        te3 = _t5(len(tok3), d_model=64) if tok3 is not None else None   # joint dim >= the two CLIPs side by side
        tr = d.SD3Transformer2DModel(sample_size=SIZE // 2, patch_size=2, in_channels=4, num_layers=2,
                                     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
                                     caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
                                     pos_embed_max_size=16)
        pipe = d.StableDiffusion3Pipeline(transformer=tr, scheduler=d.FlowMatchEulerDiscreteScheduler(shift=3.0),
                                          vae=_vae(shift=0.0609, scale=1.5305), text_encoder=te, tokenizer=tok,
                                          text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=te3,
                                          tokenizer_3=tok3)
    elif kind == "flux":
        tok, te = _clip_pair(folder, "tok")
        tok2 = t5_tokenizer()
        tr = d.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                      attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                      pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
        sched = d.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                  base_image_seq_len=256, max_image_seq_len=4096)
        pipe = d.FluxPipeline(transformer=tr, scheduler=sched, vae=_vae(shift=0.1159, scale=0.3611), text_encoder=te,
                              tokenizer=tok, text_encoder_2=_t5(len(tok2)), tokenizer_2=tok2)
    elif kind in ("pixart_alpha", "pixart_sigma"):
        tok = t5_tokenizer()
        tr = d.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=1, cross_attention_dim=16, caption_channels=32,
                                        sample_size=SIZE // 2, patch_size=2)
        cls = d.PixArtAlphaPipeline if kind == "pixart_alpha" else d.PixArtSigmaPipeline
        pipe = cls(tokenizer=tok, text_encoder=_t5(len(tok)), vae=_vae(), transformer=tr,
                   scheduler=d.DPMSolverMultistepScheduler())
    else:   # sana
        from transformers import Gemma2Config, Gemma2Model
        tok = gemma_tokenizer()
        torch.manual_seed(0)
        te = Gemma2Model(Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                      pad_token_id=0, bos_token_id=2, eos_token_id=1)).eval()
        vae = d.AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=8,
                              encoder_block_types=("ResBlock", "ResBlock"), decoder_block_types=("ResBlock", "ResBlock"),
                              encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
                              encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                              encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()),
                              decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407).eval()
        tr = d.SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                      num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                      cross_attention_dim=16, caption_channels=32, sample_size=SIZE // 2, patch_size=1)
        sched = d.DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
        pipe = d.SanaPipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=tr, scheduler=sched)
    pipe.save_pretrained(folder)
    import shutil
    shutil.rmtree(os.path.join(folder, "_build"), ignore_errors=True)
    return folder


__all__ = ["CLIP_LEN", "KINDS", "SIZE", "WORDS", "build", "clip_tokenizer", "gemma_tokenizer", "t5_tokenizer"]
