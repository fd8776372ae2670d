"""What the distributed recipe communicates, and how it scales here.

``python -m benchmarks.distributed bytes``: per step and per run, the bytes that cross the network for
SD-1.5 (built on the meta device from its config) with all-layer element masks: the adapter gradient
all-reduce per step, and the saliency reduction per run, reduce-scatter (what the library does)
against an all-reduce of every score, per rank, for N = 2 and 8 (ring algorithms: a reduce-scatter
sends (N-1)/N of the buffer per rank, an all-reduce 2(N-1)/N). Also the per-rank memory of the
reduced scores. Then the transformers (FLUX.1-dev, SD3.5-large, SD3-medium, built on the meta device
from their published configs: see TRANSFORMERS), for the library's presets "attention" and "all", per
rank at N = 1, 2, 8: bf16 weights, fp32 scores (the collector's local buffer, full-size before and
streamed now; the owned shard after the reduction), the reduce-scatter traffic and bucket transient,
the top-k's working set, the element masks (packed) and their all-gather, rank-4/16 adapters with
grads and Adam, and activations at 512x512 (bf16, gradient checkpointing off and on): autograd's saved
tensors counted on a meta-device forward (:func:`saved_activations`; checked against a real CPU
forward's allocator peak, :func:`estimator_check`). Ends with the FLUX.1-dev table: per-rank peaks of
the recipe's three stages and the cards (24/40/80 GB) that hold them.

``python -m benchmarks.distributed collect``: ``sharded_saliency``'s per-rank peak memory on 2 gloo
ranks (a small FLUX config, fp32, CPU), the full local buffer (``stream=False``) against the streamed
reduction, measured with the c10 allocator's records (spare_kernels.utils.memory).

``python -m benchmarks.distributed allreduce``: the time of one gloo all-reduce of the MiniCanvas and
SD-1.5 adapter gradients between 2 processes on this machine (localhost), medians.

``python -m benchmarks.distributed scaling --steps N``: the MiniCanvas demo (style:dots) as 1 process
x 2 threads and as ``torchrun --nproc_per_node 2`` x 1 thread, one after the other; their seconds
(localise + train), metrics against the quality bar, and whether the masks are identical (from the
adapters' saved masks). Writes ``benchmarks/results/distributed_scaling.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1e6


def adapter_and_weight_entries(unet, rank=4):
    """(adapter entries of rank-``rank`` adapters on every Linear / Conv2d, their weight entries)."""
    ad = w = 0
    for m in unet.modules():
        if type(m) is nn.Linear:
            ad += rank * (m.in_features + m.out_features)
            w += m.weight.numel()
        elif type(m) is nn.Conv2d:
            kh, kw = m.kernel_size
            ad += rank * (m.in_channels // m.groups) * kh * kw + m.out_channels * rank
            w += m.weight.numel()
    return ad, w


def plan_traffic(shapes, n):
    """Per rank, from the library's own ``shard_plan``: bytes sent by the saliency reduction (a bucket's
    reduce-scatter sends ``(n-1)`` padded pieces, ring; a one-tensor bucket is a reduce to its owner,
    counted as the whole tensor from every other rank), the largest transient bucket buffer, and the
    reduced scores the busiest rank holds. fp32."""
    from spare_kernels.distributed import shard_plan
    plan = shard_plan(shapes, n)
    sent, transient = [0] * n, 0
    for b in plan.buckets:
        if len(b) == 1:
            for r in range(n):
                if r != plan.owner[b[0]]:
                    sent[r] += 4 * plan.numel(b[0])
            transient = max(transient, 4 * plan.numel(b[0]))
            continue
        length = max(sum(plan.numel(i) for i in b if plan.owner[i] == r) for r in range(n))
        for r in range(n):
            sent[r] += 4 * (n - 1) * length
        transient = max(transient, 4 * (n + 1) * length)
    held = max(4 * plan.owned_numel(r) for r in range(n))
    return {"sent_max_mb": max(sent) / MB, "transient_mb": transient / MB, "held_max_mb": held / MB,
            "buckets": len(plan.buckets)}


def unet_bytes(args):
    from benchmarks.shapes import build_unet
    from spare_kernels import canvas
    rows, shapes = {}, {}
    for name, unet in (("SD-1.5", build_unet("sd15", device="meta")), ("MiniCanvas", canvas.load_model())):
        ad, w = adapter_and_weight_entries(unet, args.rank)
        rows[name] = {"adapter_entries": ad, "weight_entries": w}
        shapes[name] = {f"{n}.weight": tuple(m.weight.shape) for n, m in unet.named_modules()
                        if type(m) in (nn.Linear, nn.Conv2d)}
    out = {"rank": args.rank, "saliency_batches": args.saliency_batches, "models": rows, "per_world": {}}
    print(f"rank-{args.rank} adapters on every Linear/Conv2d, element masks; fp32 gradients and scores; "
          f"grad_abs reduces each of {args.saliency_batches} saliency batches, the other stats once")
    for name, r in rows.items():
        g, s = 4 * r["adapter_entries"], 4 * r["weight_entries"]
        print(f"\n{name}: adapter gradient {g / MB:.2f} MB a step; scores {s / MB:.1f} MB")
        print(f"{'N':>3} {'grad AR sent/step':>18} {'saliency ours sent':>19} {'(ideal RS)':>11} {'AR sent':>9} "
              f"{'held ours':>10} {'held AR':>8} {'transient':>10} {'buckets':>8}   (MB per rank, the busiest)")
        for n in (2, 8):
            ar, rs = 2 * (n - 1) / n, (n - 1) / n
            t = plan_traffic(shapes[name], n)
            row = {"grad_allreduce_per_step_mb": ar * g / MB, "saliency_ours_sent_mb": t["sent_max_mb"],
                   "saliency_ideal_reduce_scatter_mb": rs * s / MB, "saliency_all_reduce_mb": ar * s / MB,
                   "scores_held_ours_mb": t["held_max_mb"], "scores_held_all_reduce_mb": s / MB,
                   "transient_mb": t["transient_mb"], "buckets": t["buckets"]}
            out["per_world"].setdefault(name, {})[n] = row
            print(f"{n:>3} {row['grad_allreduce_per_step_mb']:>18.2f} {row['saliency_ours_sent_mb']:>19.1f} "
                  f"{row['saliency_ideal_reduce_scatter_mb']:>11.1f} {row['saliency_all_reduce_mb']:>9.1f} "
                  f"{row['scores_held_ours_mb']:>10.1f} {row['scores_held_all_reduce_mb']:>8.1f} "
                  f"{row['transient_mb']:>10.1f} {row['buckets']:>8}")
    return out


# ------------------------------------------------------------------------------------ transformers
GB = 1e9
# The published configs, built with diffusers 0.42.1's classes on the meta device.
# - FLUX.1-dev: FluxTransformer2DModel's defaults (transformer_flux.py: patch 1, in_channels 64,
#   19 double- + 38 single-stream blocks, 24 heads of 128, joint_attention_dim 4096, pooled 768, rope
#   axes (16, 56, 56)) with guidance_embeds=True: loaders/single_file_utils.py calls a Flux checkpoint
#   with a guidance_in layer "flux-dev" (schnell has none) and maps it to black-forest-labs/FLUX.1-dev.
# - SD3-medium, SD3.5-large: diffusers' scripts/convert_sd3_to_diffusers.py builds SD3Transformer2DModel
#   with sample_size 128, patch 2, in_channels 16, joint_attention_dim 4096, num_attention_heads =
#   num_layers (head dim 64, so hidden = 64 x layers = caption_projection_dim), pos_embed_max_size 192
#   ("sd3.0 and sd3.5 8b use 192"), qk_norm "rms_norm" for 3.5. Layers: single_file_utils.py calls a
#   checkpoint "sd3" when its adaLN bias is 9216 = 6 x 1536 wide (24 layers) and "sd35_large" when it
#   has joint_blocks.37 (38 layers); the dual-attention layers (0..12) are SD3.5-medium's (pos_embed 384).
# Parameter counts here: 11.90 B, 8.06 B, 2.03 B (the published 12 B, 8.1 B, 2 B).
TRANSFORMERS = {
    "FLUX.1-dev": ("FluxTransformer2DModel", dict(guidance_embeds=True)),
    "SD3.5-large": ("SD3Transformer2DModel", dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38,
                                                  attention_head_dim=64, num_attention_heads=38,
                                                  joint_attention_dim=4096, caption_projection_dim=2432,
                                                  pooled_projection_dim=2048, out_channels=16,
                                                  pos_embed_max_size=192, qk_norm="rms_norm")),
    "SD3-medium": ("SD3Transformer2DModel", dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                                                 attention_head_dim=64, num_attention_heads=24,
                                                 joint_attention_dim=4096, caption_projection_dim=1536,
                                                 pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)),
}
# Text tokens at 512x512: FLUX.1-dev's pipeline pads T5 to max_sequence_length 512; SD3's joins CLIP's
# 77 and T5's 256 (its default max_sequence_length). Image tokens: a 64x64 latent in 2x2 patches, 1024.
TEXT_TOKENS = {"FLUX.1-dev": 512, "SD3.5-large": 333, "SD3-medium": 333}
IMAGE_TOKENS = 1024
WORLDS = (1, 2, 8)
RANKS = (4, 16)
CARDS = {"24 GB": 24, "A100 40 GB": 40, "A100/H100 80 GB": 80}
# A card "fits" a run whose estimated peak is at most this fraction of its memory: the estimate leaves
# out the CUDA context (~0.5 GB), allocator fragmentation and the teacher forward's transient.
FIT_FRACTION = 0.9

def transformer_targets(model, which):
    """Qualified names of the layers of preset ``which`` ("attention" or "all") on ``model``, by the
    library's own rule (spare_kernels.targets, the model's family): "attention" every attention
    projection of both streams (and Flux's single-block proj_out), "all" every Linear and Conv2d but
    the modulation layers."""
    from spare_kernels.targets import family_of, target_predicate
    pred = target_predicate(which, family=family_of(model))
    return [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d) and pred(n, m)]


def _adapter_entries(m, r):
    if isinstance(m, nn.Conv2d):
        kh, kw = m.kernel_size
        return r * (m.in_channels // m.groups) * kh * kw + m.out_channels * r
    return r * (m.in_features + m.out_features)


def build_transformer(name, device="meta", dtype=torch.bfloat16):
    import diffusers
    cls, cfg = TRANSFORMERS[name]
    with torch.device(device):
        m = getattr(diffusers, cls)(**cfg)
    return m.to(dtype).requires_grad_(False)


def transformer_inputs(name, batch, device="meta", dtype=torch.bfloat16):
    kw = dict(device=device, dtype=dtype)
    t = TEXT_TOKENS[name]
    if name.startswith("FLUX"):
        return dict(hidden_states=torch.empty(batch, IMAGE_TOKENS, 64, **kw),
                    encoder_hidden_states=torch.empty(batch, t, 4096, **kw),
                    pooled_projections=torch.empty(batch, 768, **kw), timestep=torch.empty(batch, **kw),
                    guidance=torch.empty(batch, **kw), img_ids=torch.empty(IMAGE_TOKENS, 3, device=device),
                    txt_ids=torch.empty(t, 3, device=device), return_dict=False)
    side = int(round((IMAGE_TOKENS * 4) ** 0.5))
    return dict(hidden_states=torch.empty(batch, 16, side, side, **kw),
                encoder_hidden_states=torch.empty(batch, t, 4096, **kw),
                pooled_projections=torch.empty(batch, 2048, **kw), timestep=torch.empty(batch, **kw),
                return_dict=False)


def _sid(t):
    return t.untyped_storage()._cdata


class _FlashSaved(torch.autograd.Function):
    """What a fused attention kernel (FlashAttention / cuDNN / memory-efficient SDPA on a GPU) saves
    for its backward: q, k, v, the output and the fp32 log-sum-exp per query; never the T x T weights
    (the math path that SDPA takes on the meta device would save those)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, g):
        raise NotImplementedError("an estimate: the meta forward is never backpropagated")


def _flash_sdpa(query, key, value, *args, **kwargs):
    return _FlashSaved.apply(query, key, value)


class _LoraSaved(torch.autograd.Function):
    """The masked-LoRA op's saved set (spare_kernels.ops.masked_lora: x, W, A, B and the mask; the
    parameters and the mask are counted elsewhere): a frozen Linear alone would save no input."""

    @staticmethod
    def forward(ctx, x, w, b, a, bb):
        ctx.save_for_backward(x, w, a, bb)
        return torch.nn.functional.linear(x, w, b)

    @staticmethod
    def backward(ctx, g):
        raise NotImplementedError("an estimate: the meta forward is never backpropagated")


def saved_activations(model, inputs, lora=(), collect=False, rank=4):
    """One forward of ``model`` on meta tensors, counting the bytes autograd saves for the backward
    (each storage once; parameters and buffers excluded), per transformer block. ``lora``: Linear
    names given a trainable rank-``rank`` adapter (the training step). ``collect``: the saliency pass
    instead (no adapter; the floating inputs require grad, as the collector's aliases do, and every
    Linear's input is held until its backward, as the collector holds it).

    Returns ``{"saved", "per_block": {block: bytes}, "outside", "boundaries", "held", "seen", "order"}``
    (storage ids -> bytes, for the ones that are maps): ``boundaries`` the storages passed into blocks
    (what gradient checkpointing keeps), ``held`` each Linear input (with the layers it feeds), ``seen``
    the saved storages (with their block), ``order`` the forward order of the Linears."""
    mods = dict(model.named_modules())
    blocks = [n for n, m in mods.items() if re.fullmatch(r"(single_)?transformer_blocks\.\d+", n)]
    params = {_sid(p) for p in model.parameters()} | {_sid(b) for b in model.buffers()}
    patched = []
    for n in lora:
        m = mods[n]
        if not isinstance(m, nn.Linear):   # SD3's patch-embedding conv: its input is the latent, no activation
            continue
        a = nn.Parameter(m.weight.new_empty(rank, m.in_features))
        bb = nn.Parameter(m.weight.new_empty(m.out_features, rank))
        params |= {_sid(a), _sid(bb)}
        m.forward = (lambda x, m=m, a=a, bb=bb: _LoraSaved.apply(x, m.weight, m.bias, a, bb))
        patched.append(m)
    cur, seen, per_block, bounds, held, order = ["outside"], {}, {}, {}, {}, []
    alive = []   # every tensor recorded stays referenced: a freed storage's id could be reused
    hs = []
    for bn in blocks:
        def pre(mod, args, kwargs, bn=bn):
            cur[0] = bn
            for a in list(args) + list(kwargs.values()):
                for t in (a if isinstance(a, (tuple, list)) else (a,)):
                    if isinstance(t, torch.Tensor):
                        alive.append(t)
                        bounds.setdefault(_sid(t), t.untyped_storage().nbytes())

        def post(mod, args, kwargs, out):
            cur[0] = "outside"
        hs += [mods[bn].register_forward_pre_hook(pre, with_kwargs=True),
               mods[bn].register_forward_hook(post, with_kwargs=True)]
    for n, m in mods.items():
        if isinstance(m, nn.Linear):
            def fwd(mod, args, out, n=n):
                order.append(n)
                if collect:
                    alive.append(args[0])
                    held.setdefault(_sid(args[0]), (args[0].untyped_storage().nbytes(), set()))[1].add(n)
            hs.append(m.register_forward_hook(fwd))

    def pack(t):
        s = _sid(t)
        if s not in params and s not in seen:
            alive.append(t)
            seen[s] = (t.untyped_storage().nbytes(), cur[0])
            per_block[cur[0]] = per_block.get(cur[0], 0) + seen[s][0]
        return t
    if collect:
        inputs = {k: (v.requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                  for k, v in inputs.items()}
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _flash_sdpa
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(**inputs)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        for h in hs:
            h.remove()
        for m in patched:
            del m.forward
    return {"saved": sum(b for b, _ in seen.values()), "per_block": per_block, "outside": per_block.get("outside", 0),
            "boundaries": bounds, "held": held, "seen": seen,
            "order": order}


def activation_estimate(name, model, targets, rank=4):
    """Activation bytes of one rank at 512x512, bf16 (see the module docstring): the training step's
    student forward on 1 forget + 1 retain sample (batch 2; the teacher's forward keeps nothing), and
    the saliency pass on one sample per rank, each with gradient checkpointing off and on."""
    tr = saved_activations(model, transformer_inputs(name, 2), lora=targets, rank=rank)
    sal = saved_activations(model, transformer_inputs(name, 1), collect=True)
    tset = set(targets)
    # the collector holds the inputs of its targets (only), from the first forward, checkpointing or not
    held = {s: b for s, (b, names) in sal["held"].items() if names & tset}

    def ckpt(r, extra):
        # checkpointing keeps the block inputs (and what is saved outside the blocks), and recomputes
        # one block at a time in the backward: its saved set on top (an upper bound: it may share some)
        blocks = {k: v for k, v in r["per_block"].items() if k != "outside"}
        kept = {**r["boundaries"], **extra}
        kept.update({s: b for s, (b, where) in r["seen"].items() if where == "outside"})
        return sum(kept.values()) + max(blocks.values())
    return {"train_no_ckpt": tr["saved"], "train_ckpt": ckpt(tr, {}),
            "saliency_no_ckpt": sal["saved"] + sum(b for s, b in held.items() if s not in sal["seen"]),
            "saliency_ckpt": ckpt(sal, held),
            "backward_order": list(reversed([n for n in tr["order"] if n in tset]))}


def stream_local_peak(plan, backward_order):
    """Most bytes of local fp32 accumulators a rank holds at once under the streamed reduction
    (spare_kernels.distributed._Stream's rule: buckets launched in reversed plan order, each once it
    and the ones before it are complete), for layers completing in ``backward_order``."""
    index = {n: i for i, n in enumerate(plan.names)}
    bucket_of = {i: j for j, b in enumerate(plan.buckets) for i in b}
    missing = [len(b) for b in plan.buckets]
    order = list(reversed(range(len(plan.buckets))))
    live = peak = nxt = 0
    alive = set()
    for n in backward_order:
        i = index[n]
        alive.add(i)
        live += 4 * plan.numel(i)
        missing[bucket_of[i]] -= 1
        while nxt < len(order) and missing[order[nxt]] == 0:
            peak = max(peak, live)
            for j in plan.buckets[order[nxt]]:
                if j in alive:
                    alive.discard(j)
                    live -= 4 * plan.numel(j)
            nxt += 1
    return max(peak, live)


def topk_transient_bytes():
    """The exact top-k's working set besides the owned scores and masks, read off topk.py (not
    measured): per chunk of ``_CHUNK`` entries, the int32 keys, the GPU path's int64 ones for
    ``index_add_`` and about four bool temporaries; 65536-bin int64 histograms on host and device;
    ``_build``'s int64 tie ranks of a chunk."""
    from spare_kernels.topk import _CHUNK, _NBINS
    return 4 * _CHUNK + 8 * _CHUNK + 4 * _CHUNK + 2 * 8 * (_NBINS + 1) + 8 * _CHUNK


def _mask_bytes_element(shape):
    rows, cols = shape[0], 1
    for d in shape[1:]:
        cols *= d
    return rows * ((cols + 7) // 8)


def transformer_rows(name, args):
    """Every figure of the memory plan for one model: ``{target set: {...}}``."""
    from spare_kernels.distributed import GATHER_BYTES, shard_plan
    model = build_transformer(name)
    n_params = sum(p.numel() for p in model.parameters())
    mods = dict(model.named_modules())
    res = {"params": n_params, "weights_bf16_gb": 2 * n_params / GB, "text_tokens": TEXT_TOKENS[name],
           "image_tokens": IMAGE_TOKENS, "targets": {}}
    for which in ("attention", "all"):
        names = transformer_targets(model, which)
        shapes = {f"{n}.weight": tuple(mods[n].weight.shape) for n in names}
        entries = sum(mods[n].weight.numel() for n in names)
        masks = sum(_mask_bytes_element(s) for s in shapes.values())
        act = activation_estimate(name, model, names, rank=4)
        order = [f"{n}.weight" for n in act.pop("backward_order")]
        row = {"layers": len(names), "weight_entries": entries, "scores_fp32_gb": 4 * entries / GB,
               "masks_packed_gb": masks / GB,
               "adapters": {r: {"entries": sum(_adapter_entries(mods[n], r) for n in names)} for r in RANKS},
               "activations_gb": {k: v / GB for k, v in act.items()}, "per_world": {}}
        for r, a in row["adapters"].items():
            a["params_fp32_gb"] = 4 * a["entries"] / GB
            a["with_grads_and_adam_gb"] = 16 * a["entries"] / GB   # fp32 param + grad + Adam's two moments
        for n in WORLDS:
            plan = shard_plan(shapes, n)
            t = plan_traffic(shapes, n)
            owned = max(plan.owned_numel(r) for r in range(n))
            per_rank_masks = max(sum(_mask_bytes_element(plan.shapes[i]) for i, o in enumerate(plan.owner) if o == r)
                                 for r in range(n))
            streamed = stream_local_peak(plan, order)
            rnd = min(GATHER_BYTES, per_rank_masks) if n > 1 else 0
            row["per_world"][n] = {
                "collector_local_full_gb": 4 * entries / GB,
                "collector_local_streamed_gb": streamed / GB,
                "scores_owned_gb": 4 * owned / GB,
                "owned_over_even_share": owned / (entries / n),
                "reduce_scatter_sent_gb": t["sent_max_mb"] * MB / GB if n > 1 else 0.0,
                "bucket_transient_gb": t["transient_mb"] * MB / GB if n > 1 else 0.0,
                "topk_transient_gb": topk_transient_bytes() / GB,
                "owned_masks_gb": per_rank_masks / GB,
                # besides the masks' result set: this rank's own masks and its packed send buffer; before,
                # the whole N x share all-gather buffer and then a copy of every mask out of it
                "gather_before_gb": (masks + n * per_rank_masks + 2 * per_rank_masks) / GB if n > 1 else 0.0,
                "gather_after_gb": (masks + n * rnd + 2 * per_rank_masks) / GB if n > 1 else 0.0,
            }
        res["targets"][which] = row
    return res


def phase_peaks(res, which, n, rank, ckpt, streamed=True):
    """Per-rank peak (GB) of each stage of the recipe on one of ``n`` ranks, and the largest."""
    row = res["targets"][which]
    w = row["per_world"][n]
    act = row["activations_gb"]
    weights = res["weights_bf16_gb"]
    local = (w["collector_local_streamed_gb"] + w["bucket_transient_gb"]) if streamed else w["collector_local_full_gb"]
    if n == 1:   # one process: the collector's buffer is the scores (no reduction, nothing streamed)
        local = 0.0
    localise = weights + act["saliency_ckpt" if ckpt else "saliency_no_ckpt"] + local + w["scores_owned_gb"]
    gather = w["gather_after_gb"] if streamed else w["gather_before_gb"]
    topk = weights + w["scores_owned_gb"] + max(w["topk_transient_gb"] + w["owned_masks_gb"], gather)
    train = (weights + row["masks_packed_gb"] + row["adapters"][rank]["with_grads_and_adam_gb"]
             + act["train_ckpt" if ckpt else "train_no_ckpt"])
    return {"localise": localise, "topk": topk, "train": train, "peak": max(localise, topk, train)}


# The estimator against a real forward: a small FLUX config in bf16 on the CPU (fused attention there
# saves the same q, k, v, out and log-sum-exp), its forward's allocator peak with the graph kept.
CHECK_FLUX = dict(num_layers=2, num_single_layers=4, attention_head_dim=128, num_attention_heads=2,
                  guidance_embeds=True, joint_attention_dim=512, pooled_projection_dim=64, in_channels=16)


def estimator_check():
    from diffusers import FluxTransformer2DModel

    from spare_kernels.saliency import SaliencyCollector
    from spare_kernels.utils.memory import measure_peak
    ti, tt, b = 256, 128, 2

    def inputs(dev):
        kw = dict(device=dev, dtype=torch.bfloat16)
        g = torch.Generator().manual_seed(0)
        mk = (lambda *s: torch.randn(*s, generator=g).to(**kw)) if dev == "cpu" else (lambda *s: torch.empty(*s, **kw))
        return dict(hidden_states=mk(b, ti, 16), encoder_hidden_states=mk(b, tt, 512), pooled_projections=mk(b, 64),
                    timestep=mk(b), guidance=mk(b), img_ids=torch.zeros(ti, 3, device=dev),
                    txt_ids=torch.zeros(tt, 3, device=dev), return_dict=False)
    with torch.device("meta"):
        meta = FluxTransformer2DModel(**CHECK_FLUX).to(torch.bfloat16).requires_grad_(False)
    names = transformer_targets(meta, "all")
    est_train = saved_activations(meta, inputs("meta"), lora=names)["saved"]
    sal = saved_activations(meta, inputs("meta"), collect=True)
    est_sal = sal["saved"] + sum(v for s, (v, n) in sal["held"].items() if s not in sal["seen"] and n & set(names))
    torch.manual_seed(0)
    cpu = FluxTransformer2DModel(**CHECK_FLUX).to(torch.bfloat16).requires_grad_(False)
    mods = dict(cpu.named_modules())
    for n in names:
        m = mods[n]
        a = nn.Parameter(torch.zeros(4, m.in_features, dtype=torch.bfloat16))
        bb = nn.Parameter(torch.zeros(m.out_features, 4, dtype=torch.bfloat16))
        m.forward = (lambda x, m=m, a=a, bb=bb: _LoraSaved.apply(x, m.weight, m.bias, a, bb))
    kept = []
    train = measure_peak(lambda: kept.append(cpu(**inputs("cpu"))))[1]
    kept.clear()
    for n in names:
        del mods[n].forward
    with SaliencyCollector(cpu, stat="grad_abs", target_modules="all") as col:
        sal_peak = measure_peak(lambda: kept.append(cpu(**inputs("cpu"))))[1]
        kept.clear()
        col.reset()
    out = {"config": CHECK_FLUX, "tokens": [ti, tt], "batch": b,
           "train": {"estimated_mb": est_train / MB, "measured_forward_peak_mb": train / MB},
           "saliency": {"estimated_mb": est_sal / MB, "measured_forward_peak_mb": sal_peak / MB}}
    print(f"estimator check (FLUX config {CHECK_FLUX}, {ti}+{tt} tokens, batch {b}, bf16, CPU): training forward "
          f"{est_train / MB:.1f} MB estimated, {train / MB:.1f} MB measured (allocator peak, graph kept); saliency "
          f"{est_sal / MB:.1f} / {sal_peak / MB:.1f} MB")
    return out


def cmd_transformers(args):
    from diffusers.utils import logging as dlog
    level = dlog.get_verbosity()
    dlog.set_verbosity_error()   # .to(bfloat16) of a config-built model warns about keep-in-fp32 modules it has none of
    try:
        return _transformers(args)
    finally:
        dlog.set_verbosity(level)


def _transformers(args):
    out = {"assumptions": {
        "weights": "bf16, the whole model on every rank (data parallel)",
        "scores": "fp32; element masks bit-packed; adapters fp32 with fp32 grads and Adam's two moments",
        "activations": "bf16 at 512x512: autograd's saved tensors counted on a meta-device forward (each "
                       "storage once), fused attention (q, k, v, out, fp32 log-sum-exp), the masked-LoRA op "
                       "saving its input; training: 1 forget + 1 retain sample per rank; saliency: 1 sample "
                       "per rank; checkpointing: block inputs + outside-block saved + one block recomputed",
        "targets": "the library's presets (spare_kernels.targets, per family)",
        "fits": f"peak <= {FIT_FRACTION} x card memory"}, "models": {}}
    for name in TRANSFORMERS:
        res = transformer_rows(name, args)
        out["models"][name] = res
        print(f"\n{name}: {res['params'] / 1e9:.2f} B parameters, bf16 weights {res['weights_bf16_gb']:.1f} GB "
              f"per rank; 512x512 = {IMAGE_TOKENS} image + {res['text_tokens']} text tokens")
        for which, row in res["targets"].items():
            a = row["activations_gb"]
            print(f"  {which}: {row['layers']} layers, {row['weight_entries'] / 1e9:.2f} B entries: scores "
                  f"{row['scores_fp32_gb']:.2f} GB fp32, masks {row['masks_packed_gb']:.3f} GB packed; adapters "
                  + ", ".join(f"rank {r} {v['params_fp32_gb']:.3f} GB (+grads+Adam {v['with_grads_and_adam_gb']:.2f})"
                              for r, v in row["adapters"].items()))
            print(f"    activations: train {a['train_no_ckpt']:.2f} GB (checkpointing {a['train_ckpt']:.2f}); "
                  f"saliency {a['saliency_no_ckpt']:.2f} GB (checkpointing {a['saliency_ckpt']:.2f})")
            print(f"    {'N':>3} {'local full':>10} {'streamed':>9} {'owned':>7} {'/even':>6} {'RS sent':>8} "
                  f"{'bucket':>7} {'top-k':>6} {'gather old':>10} {'new':>6}   GB per rank (the busiest)")
            for n, w in row["per_world"].items():
                print(f"    {n:>3} {w['collector_local_full_gb']:>10.2f} {w['collector_local_streamed_gb']:>9.3f} "
                      f"{w['scores_owned_gb']:>7.2f} {w['owned_over_even_share']:>6.3f} "
                      f"{w['reduce_scatter_sent_gb']:>8.2f} "
                      f"{w['bucket_transient_gb']:>7.3f} {w['topk_transient_gb'] + w['owned_masks_gb']:>6.3f} "
                      f"{w['gather_before_gb']:>10.2f} {w['gather_after_gb']:>6.2f}")
    out["flux_512"] = flux_table(out["models"]["FLUX.1-dev"])
    out["estimator_check"] = estimator_check()
    return out


def flux_table(res):
    """What a user needs to erase a concept from FLUX.1-dev at 512x512: per-rank peaks and the cards
    that hold them, at N = 1, 2, 8."""
    rows = []
    print("\nFLUX.1-dev at 512x512: peak GB per rank (localise / top-k / train), the cards that hold it "
          f"(peak <= {FIT_FRACTION:.0%} of memory); before = the full local score buffer and mask copy")
    print(f"{'N':>3} {'targets':>9} {'rank':>4} {'ckpt':>5} {'localise':>9} {'top-k':>6} {'train':>6} {'peak':>6} "
          f"{'before':>7}  cards")
    for n in WORLDS:
        for which in ("attention", "all"):
            for rank in RANKS:
                for ckpt in (True, False):
                    p = phase_peaks(res, which, n, rank, ckpt)
                    old = phase_peaks(res, which, n, rank, ckpt, streamed=False)
                    fits = [c for c, gb in CARDS.items() if p["peak"] <= FIT_FRACTION * gb]
                    rows.append({"N": n, "targets": which, "rank": rank, "ckpt": ckpt, **p,
                                 "peak_before": old["peak"], "fits": fits})
                    print(f"{n:>3} {which:>9} {rank:>4} {'on' if ckpt else 'off':>5} {p['localise']:>9.1f} "
                          f"{p['topk']:>6.1f} {p['train']:>6.1f} {p['peak']:>6.1f} {old['peak']:>7.1f}  "
                          f"{', '.join(fits) if fits else 'none'}")
    return rows


def cmd_bytes(args):
    out = unet_bytes(args)
    out["transformers"] = cmd_transformers(args)
    return out


def _allreduce_worker(rank, n, port, sizes, reps, q):
    import datetime

    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n,
                            timeout=datetime.timedelta(seconds=120))
    res = {}
    for name, k in sizes.items():
        x = torch.randn(k)
        for _ in range(3):
            dist.all_reduce(x)
        ts = []
        for _ in range(reps):
            dist.barrier()
            t = time.perf_counter()
            dist.all_reduce(x)
            ts.append(time.perf_counter() - t)
        res[name] = sorted(ts)[len(ts) // 2]
    if rank == 0:
        q.put(res)
    dist.destroy_process_group()


def cmd_allreduce(args):
    import multiprocessing as mp

    from benchmarks.shapes import build_unet
    from spare_kernels import canvas
    sizes = {"MiniCanvas": adapter_and_weight_entries(canvas.load_model(), args.rank)[0],
             "SD-1.5": adapter_and_weight_entries(build_unet("sd15", device="meta"), args.rank)[0]}
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from distworkers import free_port
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    ps = [ctx.Process(target=_allreduce_worker, args=(r, 2, port, sizes, args.reps, q)) for r in range(2)]
    for p in ps:
        p.start()
    res = q.get(timeout=300)
    for p in ps:
        p.join()
    out = {}
    for name, t in res.items():
        out[name] = {"entries": sizes[name], "mb": 4 * sizes[name] / MB, "median_ms": 1e3 * t}
        print(f"gloo all-reduce, 2 processes on localhost, {name} adapter gradient ({4 * sizes[name] / MB:.2f} MB): "
              f"median {1e3 * t:.2f} ms of {args.reps}")
    return out


def _masks(path):
    from safetensors.torch import load_file
    t = load_file(path)
    return {k: v for k, v in t.items() if "mask" in k}


def cmd_scaling(args):
    env = dict(os.environ, PYTHONPATH=REPO)
    runs = {}
    with tempfile.TemporaryDirectory() as d:
        variants = {
            "1 process x 2 threads": [sys.executable, "-m", "spare_kernels", "demo", "--threads", "2"],
            "2 processes x 1 thread (torchrun)": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                  "2", "-m", "spare_kernels", "demo", "--threads", "1"],
        }
        for name, cmd in variants.items():
            out = os.path.join(d, str(len(runs)))
            full = cmd + ["--steps", str(args.steps), "--target", args.target, "--out", out, "--json",
                          os.path.join(out, "r.json"), "--quiet"]
            t = time.perf_counter()
            p = subprocess.run(full, env=dict(env, OMP_NUM_THREADS="2" if "2 threads" in name else "1"), cwd=REPO,
                               capture_output=True, text=True)
            wall = time.perf_counter() - t
            if p.returncode:
                raise SystemExit(f"{name} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
            with open(os.path.join(out, "r.json")) as f:
                r = json.load(f)
            with open(os.path.join(out, "results.json")) as f:
                st = json.load(f)["rows"][0]["stage_seconds"]
            runs[name] = dict(r, wall_seconds=wall, stage_seconds=st,
                              masks=_masks(os.path.join(out, "adapter.safetensors")))
            bar = r["ua"] >= 0.95 and r["base_ira"] - r["ira"] <= 0.05 and r["base_cra"] - r["cra"] <= 0.05
            runs[name]["meets_bar"] = bar
            print(f"{name}: seconds {r['seconds']:.1f} (localise {st['localise']:.1f}, train {st['train']:.1f}); "
                  f"UA {r['ua']:.3f} IRA {r['ira']:.3f} CRA {r['cra']:.3f} (base {r['base_ira']:.3f} / "
                  f"{r['base_cra']:.3f}); bar {'met' if bar else 'NOT met'}; peak {r['peak_mem_mb']:.0f} MB/rank; "
                  f"wall {wall:.1f} s", flush=True)
    a, b = runs.values()
    same = a["masks"].keys() == b["masks"].keys() and all(torch.equal(a["masks"][k], b["masks"][k]) for k in a["masks"])
    print(f"masks identical: {same}; 2x1 / 1x2 seconds: {b['seconds'] / a['seconds']:.3f}")
    for r in runs.values():
        del r["masks"]
    return {"steps": args.steps, "target": args.target, "runs": runs, "masks_identical": same,
            "ratio_2x1_over_1x2": b["seconds"] / a["seconds"]}


# ------------------------------------------------------------------------- the collector's peak, measured
# A small FLUX transformer from a config (2 double- + 4 single-stream blocks of width 512), fp32 on the
# CPU: 25 M score entries (101 MB), so the scores, not the activations of its 96 tokens, set the peak.
SMALL_FLUX = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=128,
                  num_attention_heads=4, joint_attention_dim=512, pooled_projection_dim=64)


def small_flux_batches(n_batches, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 64, 16, generator=g), torch.randn(batch, 32, 512, generator=g),
             torch.randn(batch, 64, generator=g), torch.rand(batch, generator=g),
             torch.randn(batch, 64, 16, generator=g))
            for _ in range(n_batches)]


def small_flux_loss(model, b):
    img = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1)
    out = model(hidden_states=b[0], encoder_hidden_states=b[1], pooled_projections=b[2], timestep=b[3],
                img_ids=img.reshape(-1, 3), txt_ids=torch.zeros(b[1].shape[1], 3), return_dict=False)[0]
    loss = torch.nn.functional.mse_loss(out, b[4])
    return loss * b[5] if len(b) > 5 else loss


def _collect_worker(rank, n, port, stats, n_batches, bucket_elems, q):
    import datetime

    import torch.distributed as dist
    from diffusers import FluxTransformer2DModel

    from spare_kernels.distributed import current_world, sharded_saliency
    from spare_kernels.utils.memory import measure_peak
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n,
                            timeout=datetime.timedelta(seconds=300))
    world = current_world()
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**SMALL_FLUX).requires_grad_(False)
    batches = small_flux_batches(n_batches, 2 * n)
    mine = [tuple(v[rank * 2:(rank + 1) * 2] for v in b) + (1 / n,) for b in batches]
    def backward_alone():   # the forward and backward themselves (inputs requiring grad, no collector)
        for bt in mine:
            small_flux_loss(model, [v.detach().requires_grad_() if torch.is_tensor(v) and v.is_floating_point() else v
                                    for v in bt]).backward()
    res = {"forward and backward alone": {"peak_mb": measure_peak(backward_alone)[1] / MB}}
    for stat in stats:
        for stream in (False, True):
            st = {}
            dist.barrier()
            (owned, plan), peak = measure_peak(sharded_saliency, model, mine, small_flux_loss, stat, None, world,
                                               stream=stream, stats=st, bucket_elems=bucket_elems)
            res[f"{stat} {'streamed' if stream else 'full buffer'}"] = {
                "peak_mb": peak / MB, "owned_mb": 4 * sum(v.numel() for v in owned.values()) / MB,
                "scores_mb": 4 * sum(plan.numel(i) for i in range(len(plan.names))) / MB,
                "local_peak_mb": st["local_peak_bytes"] / MB, "buckets": st["buckets"],
                "in_backward_buckets": st["in_backward_buckets"]}
            del owned
    q.put((rank, res))
    dist.destroy_process_group()


def cmd_collect(args):
    import multiprocessing as mp
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from distworkers import free_port
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    stats = ("grad_abs", "sample_sq")
    ps = [ctx.Process(target=_collect_worker, args=(r, 2, port, stats, args.batches, args.bucket_elems, q))
          for r in range(2)]
    for p in ps:
        p.start()
    got = dict(q.get(timeout=600) for _ in ps)
    for p in ps:
        p.join()
    print(f"sharded_saliency on 2 gloo ranks (1 thread each), a FLUX transformer of config {SMALL_FLUX}, fp32, "
          f"{args.batches} batches of 2 samples per rank, buckets of {args.bucket_elems} entries; c10 CPU allocator "
          f"peak (spare_kernels.utils.memory)")
    print(f"{'':>24} {'rank':>4} {'peak MB':>8} {'owned MB':>9} {'scores MB':>10} {'local acc. MB':>14} "
          f"{'streamed buckets':>17}")
    for key in got[0]:
        if "owned_mb" not in got[0][key]:
            print(f"{key}: peak " + ", ".join(f"rank {r} {got[r][key]['peak_mb']:.1f} MB" for r in sorted(got)))
            continue
        for r in sorted(got):
            v = got[r][key]
            print(f"{key:>24} {r:>4} {v['peak_mb']:>8.1f} {v['owned_mb']:>9.1f} {v['scores_mb']:>10.1f} "
                  f"{v['local_peak_mb']:>14.1f} {v['in_backward_buckets']:>8} of {v['buckets']:<6}")
    return {"config": SMALL_FLUX, "batches": args.batches, "bucket_elems": args.bucket_elems, "samples_per_rank": 2,
            "ranks": {r: got[r] for r in sorted(got)}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bytes")
    b.add_argument("--rank", type=int, default=4)
    b.add_argument("--saliency-batches", type=int, default=4)
    a = sub.add_parser("allreduce")
    a.add_argument("--rank", type=int, default=4)
    a.add_argument("--reps", type=int, default=30)
    s = sub.add_parser("scaling")
    s.add_argument("--steps", type=int, default=200)
    s.add_argument("--target", default="style:dots")
    c = sub.add_parser("collect")
    c.add_argument("--batches", type=int, default=2)
    # FLUX.1-dev's "all" scores are 257 buckets of BUCKET_ELEMS; 2**17 gives this model's 36 M about as many
    c.add_argument("--bucket-elems", type=int, default=1 << 17)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    cmds = {"bytes": cmd_bytes, "allreduce": cmd_allreduce, "scaling": cmd_scaling, "collect": cmd_collect}
    res = cmds[args.cmd](args)
    if args.out:
        from spare_kernels.utils.io import write_json
        write_json(args.out, res)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
