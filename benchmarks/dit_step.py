"""Whole training step and saliency on transformer denoisers (Flux, SD3), side by side.

    PYTHONPATH=. python -m benchmarks.dit_step --config flux-small|sd3-medium|tiny-flux|tiny-sd3
                                               [--threads T] [--reps N] [--sections step saliency]

Models are diffusers' ``FluxTransformer2DModel`` / ``SD3Transformer2DModel`` built from configs with
random weights (no downloads; see ``CONFIGS``: the real block structure and head layout, fewer
blocks or heads so a step fits one CPU core). Targets: every attention projection of both streams
(``attention_targets``), resolved to qualified names inside the blocks so every scheme adapts the
very same layers (the model's top-level ``proj_out`` is not an attention projection).

Step (forward + backward of an MSE loss against a noise target, batch 1, rank 4):

- ``floor``          the frozen model, the latent requires grad (what any adapter method pays at least);
- ``peft``           peft's ``LoraConfig`` via ``inject_adapter_in_model`` (dense LoRA);
- ``ours_dense``     ``spare_kernels.patch_unet`` on the targets, no mask;
- ``ours_element50`` ``patch_unet`` with 50% random element masks;
- ``spare_ref``      SPARE's dense-delta layers (``benchmarks.baselines.patch_spare_ref``), same masks.

Every scheme holds the same A, B (and masks), scaled so ``||s*B@A||_F = --delta-rel * ||W||_F``
(3% by default, an adapter a few steps into training; random ``init`` factors are O(||W||) and
drive activations into denormal/overflow ranges real training never sees). Denormals are flushed
by default (``torch.set_flush_denormal``; ``--no-flush-denormal`` to keep them). Before timing, one
no-grad forward checks ``peft == ours_dense`` and ``spare_ref == ours_element50`` (``agreement``).

Saliency (batch ``--sal-batch``, MSE loss): ``grad_abs`` / ``sample_abs`` (a fresh
``SaliencyCollector`` on the targets, one backward of the batch) against SPARE's loop
(``spare_kernels.unlearn.reference.full_grad_saliency``: every parameter requires grad, forward,
``zero_grad``, backward, ``+= |grad|`` of every parameter) per sample (``spare_loop``, SPARE's batch
1) and on the whole batch (``spare_loop_batch``, the same statistic as ``grad_abs``), and the floor
(one frozen forward + backward of the batch, input gradient only). Each call is a whole pass over
the batch from empty accumulators.

All schemes of a section are timed interleaved in one process (``time_side_by_side``, medians);
only ratios mean anything. Writes ``benchmarks/results/dit_step_<config>.json`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import os
import platform

import torch
import torch.nn.functional as F
from torch import nn

import spare_kernels as sk
from spare_kernels.bench import time_side_by_side
from spare_kernels.targets import target_predicate
from spare_kernels.unlearn.reference import full_grad_saliency
from spare_kernels.utils.io import write_json

from .baselines import patch_spare_ref
from .unet_step import share_copy, with_progress

# FLUX.1-dev's transformer config except the depth (19 double + 38 single blocks) and heads (24):
# the same head size (128, rope axes 16+56+56), text/pooled widths, guidance embedding and the
# 64-channel packed latent (16 latent channels x 2x2). 3 heads (hidden 384), 2 double + 4 single
# blocks: the frozen step on 1024 + 256 tokens measured 1.5-1.6 s on one core of this machine.
FLUX_DEV = dict(patch_size=1, in_channels=64, attention_head_dim=128, joint_attention_dim=4096,
                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# SD3-medium's transformer config except the depth (24 blocks): widths as released (hidden 1536 =
# 24 heads x 64, caption projection 1536, pooled 2048, 16 latent channels, patch 2).
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, attention_head_dim=64, num_attention_heads=24,
                  joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
                  out_channels=16, pos_embed_max_size=192, qk_norm=None)
CONFIGS = {
    # latent: side of the VAE latent (flux: packed 2x2 into tokens of 64 channels); text: prompt tokens
    "flux-small": dict(family="flux", model=dict(FLUX_DEV, num_layers=2, num_single_layers=4, num_attention_heads=3),
                       latent=64, text=256, note="FLUX.1-dev block structure and head size, 3 of 24 heads, "
                       "2 of 19 double + 4 of 38 single blocks; 512x512 image, T5 prompt of 256 tokens "
                       "(schnell's max_sequence_length; dev's is 512)"),
    # 2 blocks: the first a full joint block, the last context_pre_only as SD3-medium's block 23;
    # the frozen step on 256 + 154 tokens measured 1.6 s on one core of this machine
    "sd3-medium": dict(family="sd3", model=dict(SD3_MEDIUM, num_layers=2), latent=32, text=154,
                       note="SD3-medium widths, 2 of 24 blocks (block 0 joint, last context_pre_only as the "
                       "real block 23); 256x256 image, 154 text tokens (77 CLIP + 77 T5: the pipeline "
                       "at max_sequence_length=77)"),
    "tiny-flux": dict(family="flux", model=dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                                pooled_projection_dim=8, guidance_embeds=True,
                                                axes_dims_rope=(2, 2, 4)),
                      latent=8, text=4, note="smoke test"),
    "tiny-sd3": dict(family="sd3", model=dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                              caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
                                              pos_embed_max_size=8),
                     latent=8, text=4, note="smoke test"),
}
# Every attention projection of both streams (used when spare_kernels.targets has no preset_entries)
ATTENTION = {
    "sd3": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
    "flux": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
             "proj_out"),   # a single block's attention output is its proj_out (shared with the MLP branch)
}
BLOCKS = ("transformer_blocks", "single_transformer_blocks")
STEP_SCHEMES = ("floor", "peft", "ours_dense", "ours_element50", "spare_ref")
SAL_SCHEMES = ("grad_abs", "sample_abs", "spare_loop", "spare_loop_batch", "floor")
BATCHED = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")
SHARED_MACHINE = "2-core machine; the other core ran a 1-thread training job throughout"


def build(config: str, seed: int = 0) -> nn.Module:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    c = CONFIGS[config]
    torch.manual_seed(seed)
    cls = FluxTransformer2DModel if c["family"] == "flux" else SD3Transformer2DModel
    return cls(**c["model"]).eval().requires_grad_(False)


def tokens(config: str) -> dict:
    c = CONFIGS[config]
    p = c["model"]["patch_size"] if c["family"] == "sd3" else 2   # flux packs 2x2 latent pixels per token
    return {"image": (c["latent"] // p) ** 2, "text": c["text"]}


def make_inputs(config: str, batch: int, seed: int = 1):
    """``(forward kwargs, noise target)`` as the pipelines feed the model (flux: packed latents and
    position ids, the timestep in [0, 1] and guidance 3.5; sd3: the latent image, timestep in [0, 1000])."""
    c, m = CONFIGS[config], CONFIGS[config]["model"]
    g = torch.Generator().manual_seed(seed)
    kw = dict(encoder_hidden_states=torch.randn(batch, c["text"], m["joint_attention_dim"], generator=g),
              pooled_projections=torch.randn(batch, m["pooled_projection_dim"], generator=g))
    if c["family"] == "flux":
        side = c["latent"] // 2
        img_ids = torch.zeros(side, side, 3)
        img_ids[..., 1] = torch.arange(side)[:, None]   # (0, row, col) per packed token, as the pipeline
        img_ids[..., 2] = torch.arange(side)[None, :]
        kw.update(hidden_states=torch.randn(batch, side * side, m["in_channels"], generator=g),
                  img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(c["text"], 3),
                  timestep=torch.full((batch,), 0.5), guidance=torch.full((batch,), 3.5))
    else:
        kw.update(hidden_states=torch.randn(batch, m["in_channels"], c["latent"], c["latent"], generator=g),
                  timestep=torch.full((batch,), 500.0))
    return kw, torch.randn(kw["hidden_states"].shape, generator=g)


def attention_targets(model: nn.Module, family: str):
    """Qualified names of the attention projections inside the blocks, and where the entries came from."""
    try:
        from spare_kernels.targets import preset_entries
        entries, source = list(preset_entries(family, "attention")), "spare_kernels.targets.preset_entries"
    except ImportError:
        entries, source = list(ATTENTION[family]), "benchmarks.dit_step.ATTENTION"
    pred = target_predicate(entries)
    names = [n for n, m in model.named_modules()
             if type(m) is nn.Linear and n.split(".")[0] in BLOCKS and pred(n, m)]
    if not names:
        raise ValueError(f"family: {family!r}: the entries {entries} match no Linear inside {BLOCKS}")
    return names, entries, source


def adapter_values(model: nn.Module, names, rank: int, delta_rel: float, seed: int = 2) -> dict:
    """``{name: (A, B, dense 50% mask)}`` with ``||B@A||_F = delta_rel * ||W||_F`` (scale 1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in names:
        W = model.get_submodule(n).weight
        A = torch.randn(rank, W.shape[1], generator=g) / W.shape[1] ** 0.5
        B = torch.randn(W.shape[0], rank, generator=g)
        B *= delta_rel * W.norm() / (B @ A).norm()
        out[n] = (A, B, torch.rand(W.shape, generator=g) < 0.5)
    return out


def _load(model: nn.Module, values: dict) -> nn.Module:
    """Copy A and B into every adapted layer (peft/fused: adapter ``default``; SpareRefLayer: its own)."""
    with torch.no_grad():
        for n, (A, B, _) in values.items():
            m = model.get_submodule(n)
            if isinstance(m.lora_A, nn.ModuleDict):
                a, b, s = m.lora_A["default"].weight, m.lora_B["default"].weight, m.scaling["default"]
            else:
                a, b, s = m.lora_A, m.lora_B, m.scale
            if s != 1.0:
                raise ValueError(f"{n}: expected scale 1 (lora_alpha = rank), got {s}")
            a.copy_(A)
            b.copy_(B)
    return model


def variants(model: nn.Module, names, values: dict, rank: int) -> dict[str, nn.Module]:
    from peft import LoraConfig, inject_adapter_in_model
    peft = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=names,
                                              init_lora_weights=False), share_copy(model))
    dense = sk.patch_unet(share_copy(model), rank=rank, target_modules=names, init="random")
    elem = sk.patch_unet(share_copy(model), rank=rank, target_modules=names, init="random")
    for n, (_, _, M) in values.items():
        elem.get_submodule(n).set_mask("default", sk.Mask.from_dense(M))
    ref = patch_spare_ref(share_copy(model), {f"{n}.weight": M for n, (_, _, M) in values.items()}, rank)
    out = {"floor": model, "peft": peft, "ours_dense": dense, "ours_element50": elem, "spare_ref": ref}
    for k, m in out.items():
        if k != "floor":
            _load(m, values)
        trained = [n for n, p in m.named_parameters() if p.requires_grad]
        # only the adapters train (2 factors per target); the base tensors are shared and frozen
        assert all("lora_" in n for n in trained) and len(trained) == (0 if k == "floor" else 2 * len(names)), k
    return out


def _forward(model, kw):
    return model(**kw).sample


def agreement(models: dict, kw) -> dict:
    """Max |difference| / max |output| of the pairs that must compute the same function."""
    with torch.no_grad():
        y = {k: _forward(m, kw) for k, m in models.items()}
    rel = lambda a, b: ((y[a] - y[b]).abs().max() / y[b].abs().max()).item()  # noqa: E731
    return {"peft~ours_dense": rel("peft", "ours_dense"),
            "spare_ref~ours_element50": rel("spare_ref", "ours_element50"),
            "ours_dense~floor": rel("ours_dense", "floor")}   # what the adapters change (not ~0)


def step_fn(model: nn.Module, kw, target, needs_dx: bool):
    x = kw["hidden_states"].clone().requires_grad_(needs_dx)
    kw = dict(kw, hidden_states=x)
    params = [p for p in model.parameters() if p.requires_grad]

    def go():
        F.mse_loss(_forward(model, kw), target).backward()
        x.grad = None
        for p in params:
            p.grad = None
    return go


def _loss(model, batch):
    kw, target = batch
    return F.mse_loss(_forward(model, kw), target)


def saliency_fns(model: nn.Module, names, kw, target) -> dict:
    B = target.shape[0]
    samples = [({k: v[i:i + 1] if k in BATCHED else v for k, v in kw.items()}, target[i:i + 1]) for i in range(B)]

    def collector(stat):
        def go():
            with sk.SaliencyCollector(model, stat=stat, target_modules=names) as col:
                _loss(model, (kw, target)).backward()
                return col.scores()
        return go

    def floor():
        _loss(model, (dict(kw, hidden_states=kw["hidden_states"].detach().requires_grad_()), target)).backward()

    return {"grad_abs": collector("grad_abs"), "sample_abs": collector("sample_abs"),
            "spare_loop": lambda: full_grad_saliency(model, samples, _loss),
            "spare_loop_batch": lambda: full_grad_saliency(model, [(kw, target)], _loss), "floor": floor}


def _denormals_flushed() -> bool:
    """Whether denormals are flushed now (torch has no getter): the smallest one survives a multiply unless."""
    return float(torch.tensor([1e-45]) * 1.0) == 0.0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="flux-small")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds of every scheme first")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--delta-rel", type=float, default=0.03, help="||B@A||_F / ||W||_F of every adapter")
    ap.add_argument("--sal-batch", type=int, default=4, help="samples of the saliency pass")
    ap.add_argument("--sections", nargs="+", choices=("step", "saliency"), default=["step", "saliency"])
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--no-flush-denormal", action="store_true", help="keep denormals (flushed by default)")
    ap.add_argument("--progress", action="store_true", help="a line on stderr per round of the schemes")
    ap.add_argument("--out", help="JSON path (default: benchmarks/results/dit_step_<config>.json)")
    a = ap.parse_args(argv)
    if a.reps < 1 or a.sal_batch < 1 or a.rank < 1 or not a.delta_rel > 0:
        ap.error("--reps, --sal-batch and --rank: expected >= 1; --delta-rel: expected > 0")
    if a.threads:
        torch.set_num_threads(a.threads)
    was = _denormals_flushed()   # a process-wide CPU setting: put back as found (tests run after main)
    flush = torch.set_flush_denormal(not a.no_flush_denormal) and not a.no_flush_denormal
    try:
        c = CONFIGS[a.config]
        model = build(a.config)
        names, entries, source = attention_targets(model, c["family"])
        tok = tokens(a.config)
        print(f"dit_step --config {a.config}: {type(model).__name__}, {c['note']}; {tok['image']} image + "
              f"{tok['text']} text tokens; {len(names)} attention targets ({source}); rank {a.rank}, "
              f"||B@A|| = {a.delta_rel:g} ||W||; {torch.get_num_threads()} threads; flush denormals: {flush}; "
              f"medians of {a.reps} interleaved reps")
        res = {"config": a.config, "family": c["family"], "model_class": type(model).__name__, "model_config": c["model"],
               "note": c["note"], "params": sum(p.numel() for p in model.parameters()), "tokens": tok,
               "targets": {"entries": entries, "source": source, "count": len(names), "names": names},
               "rank": a.rank, "scale": 1.0, "delta_rel_fro": a.delta_rel, "mask_density": 0.5, "reps": a.reps,
               "warmup": a.warmup, "threads": torch.get_num_threads(), "flush_denormal": flush,
               "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
               "shared_machine": SHARED_MACHINE, "loadavg_1min": {"start": os.getloadavg()[0]},
               "backend": sk.backend_info()["ops"]["masked_lora_linear"]}
        fmt = lambda rows: "  ".join(f"{k} {v:.3f}" for k, v in rows.items())  # noqa: E731
        if "step" in a.sections:
            kw, target = make_inputs(a.config, 1)
            values = adapter_values(model, names, a.rank, a.delta_rel)
            models = variants(model, names, values, a.rank)
            res["agreement"] = agreement(models, kw)
            fns = {k: step_fn(m, kw, target, needs_dx=(k == "floor")) for k, m in models.items()}
            t = time_side_by_side(with_progress(fns, a.reps + a.warmup) if a.progress else fns, a.reps, a.warmup)
            res["step"] = {"batch": 1, "ms": {k: 1e3 * v for k, v in t.items()},
                           "per_floor": {k: v / t["floor"] for k, v in t.items()},
                           "ratios": {"ours_element50/spare_ref": t["ours_element50"] / t["spare_ref"],
                                      "ours_dense/peft": t["ours_dense"] / t["peft"]}}
            print(f"step, batch 1 (floor {1e3 * t['floor']:.0f} ms): / floor: {fmt(res['step']['per_floor'])}")
            print(f"  {fmt(res['step']['ratios'])}   agreement (max rel diff): "
                  + "  ".join(f"{k} {v:.1e}" for k, v in res["agreement"].items()))
            del models, fns
        if "saliency" in a.sections:
            kw, target = make_inputs(a.config, a.sal_batch, seed=3)
            fns = saliency_fns(model, names, kw, target)
            t = time_side_by_side(with_progress(fns, a.reps + a.warmup) if a.progress else fns, a.reps, a.warmup)
            res["saliency"] = {"batch": a.sal_batch, "seconds": t, "per_floor": {k: v / t["floor"] for k, v in t.items()},
                               "ratios": {"grad_abs/spare_loop": t["grad_abs"] / t["spare_loop"],
                                          "sample_abs/spare_loop": t["sample_abs"] / t["spare_loop"],
                                          "grad_abs/spare_loop_batch": t["grad_abs"] / t["spare_loop_batch"]}}
            print(f"saliency, batch {a.sal_batch} (floor {t['floor']:.2f} s): / floor: {fmt(res['saliency']['per_floor'])}")
            print(f"  {fmt(res['saliency']['ratios'])}")
        res["loadavg_1min"]["end"] = os.getloadavg()[0]   # > threads + 1: other jobs shared the cores
        folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
        path = write_json(a.out or os.path.join(folder, f"dit_step_{a.config}.json"), res)
        print(f"wrote {path}")
        return res
    finally:
        torch.set_flush_denormal(was)


if __name__ == "__main__":
    main()
