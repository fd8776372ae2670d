"""The recipe on a rectified-flow transformer (SD3's MMDiT): the objective against diffusers' own
scheduler and a hand-written flow-matching loss, every method end to end on a tiny MiniCanvas-DiT,
the family's targets in the masks and adapters, and checkpoints."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from spare_kernels.unlearn import Config, canvas_task, run
from spare_kernels.unlearn.denoiser import Denoiser, canvas_dit_denoiser
from spare_kernels.unlearn.objective import DDPMObjective, FlowObjective, flux_mu, objective_for

TINY_DIT = dict(sample_size=32, patch_size=2, in_channels=3, out_channels=3, num_layers=2, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
                pos_embed_max_size=16)


def tiny_dit(seed=0):
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**TINY_DIT).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def task():
    return canvas_task("style:dots", n_forget=8, n_retain=16, model="dit")


# ------------------------------------------------------------------------------------------ objective
def test_flow_sigmas_are_the_schedulers_training_table():
    from diffusers import FlowMatchEulerDiscreteScheduler
    for shift in (1.0, 3.0):
        s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        obj = objective_for(s)
        assert isinstance(obj, FlowObjective) and obj.draw_kind == "logit_normal"
        # diffusers' table runs from pure noise down; index t here grows with the noise
        torch.testing.assert_close(obj.sigmas, s.sigmas[:1000].flip(0).float(), rtol=0, atol=1e-6)
        torch.testing.assert_close(obj.model_timestep(torch.tensor([999, 0])),
                                   torch.stack([s.timesteps[0], s.timesteps[-1]]).float(), rtol=1e-6, atol=1e-3)


def test_flux_shift_follows_the_resolution_as_the_scheduler_does():
    from diffusers import FlowMatchEulerDiscreteScheduler
    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                        base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    with pytest.raises(ValueError, match="image_seq_len"):
        objective_for(s)
    lo, hi = objective_for(s, image_seq_len=256), objective_for(s, image_seq_len=4096)
    assert lo.draw_kind == "uniform" and lo.mu == pytest.approx(0.5) and hi.mu == pytest.approx(1.15)
    base = torch.arange(1, 1001, dtype=torch.float64) / 1000
    torch.testing.assert_close(hi.sigmas, s.time_shift(1.15, 1.0, base).float(), rtol=0, atol=1e-6)
    assert flux_mu(1024, s.config) == pytest.approx(0.5 + 0.65 * (1024 - 256) / 3840)
    assert bool((hi.sigmas >= lo.sigmas).all())   # more tokens: more noise at every index


def test_ddpm_objective_is_todays_and_v_prediction_is_the_velocity():
    from diffusers import DDPMScheduler
    s = DDPMScheduler(num_train_timesteps=1000)
    x0, t = torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    xt, target = DDPMObjective(s).noised(x0, t, torch.Generator().manual_seed(0))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(xt, s.add_noise(x0, noise, t)) and torch.equal(target, noise)
    v = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    _, target = objective_for(v).noised(x0, t, torch.Generator().manual_seed(0))
    a = v.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(target, a.sqrt() * noise - (1 - a).sqrt() * x0)
    with pytest.raises(ValueError, match="draw"):
        FlowObjective(draw="beta")


def test_logit_normal_draw_concentrates_mid_noise():
    obj = FlowObjective(draw="logit_normal")
    t = obj.draw(20000, torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 999
    mid = ((t > 250) & (t < 750)).float().mean().item()
    assert 0.6 < mid < 0.75   # P(|N(0,1)| < logit(0.75) = 1.0986) = 0.728 (uniform: 0.5)


# ----------------------------------------------------------------------------------- the loss itself
def test_recipe_loss_is_the_hand_written_flow_matching_loss(task):
    from spare_kernels.unlearn.methods import _diffusion_loss, _forget_batches
    from spare_kernels.unlearn.timesteps import TimestepSampler
    dit = tiny_dit()
    cfg = Config(saliency_batches=1, saliency_batch=4)
    sampler = TimestepSampler(task.num_train_timesteps, base=task.objective.draw)
    batch = next(_forget_batches(task, sampler, cfg, torch.Generator().manual_seed(3)))
    got = _diffusion_loss(task, dit, batch)
    # by hand, from the same draws: the index, the sample, the noise
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(task.x_forget.shape[0], (4,), generator=g)
    u = torch.sigmoid(torch.randn(4, generator=g))
    t = (u * 1000).long()
    sigma = (t + 1).double() / 1000          # shift 1: the scheduler's sigma of that index
    x0 = task.x_forget[idx]
    eps = torch.randn(x0.shape, generator=g)
    s = sigma.float().view(-1, 1, 1, 1)
    xt = (1 - s) * x0 + s * eps
    c = task.c_forget[idx]
    v = dit(hidden_states=xt, timestep=sigma.float() * 1000, encoder_hidden_states=c,
            pooled_projections=c.mean(1)).sample
    want = F.mse_loss(v, eps - x0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_conditions_pack_and_unpack_per_sample():
    d = Denoiser("sd3", fields=(("seq", (5, 4)), ("pooled", (3,))))
    seq, pooled = torch.randn(2, 5, 4), torch.randn(2, 3)
    c = d.pack(seq=seq, pooled=pooled)
    assert c.shape == (2, 23)
    back = d.unpack(torch.cat([c, c])[1:3])   # indexing and concatenation keep samples whole
    assert torch.equal(back["seq"], torch.cat([seq, seq])[1:3]) and torch.equal(back["pooled"][0], pooled[1])
    with pytest.raises(ValueError, match="takes"):
        d.pack(seq=seq)
    with pytest.raises(ValueError, match="family"):
        Denoiser("dit")


# ------------------------------------------------------------------------------------ the methods
def _both_streams(names):
    return {n.rsplit(".", 1)[-1] if not n.endswith("to_out.0") else "to_out.0" for n in names}


@pytest.mark.parametrize("method", ["spare", "spare-reference", "lora", "salun", "esd"])
def test_every_method_runs_on_the_dit(task, method, tmp_path):
    dit = tiny_dit()
    cfg = Config(method=method, steps=2, batch_forget=2, batch_retain=2, saliency_batches=1, saliency_batch=2,
                 probe_bins=2, probe_per_bin=1, targets="attention", density=0.25)
    r = run(dit, task, cfg, out_dir=str(tmp_path), progress=False)
    assert len(r["history"]) == 2 and all(math.isfinite(v) for h in r["history"] for v in h)
    if method in ("spare", "spare-reference", "salun"):
        kinds = _both_streams(k[:-len(".weight")] for k in r["mask_density"])
        assert {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"} <= kinds
        assert not any("norm" in k or "time_text" in k for k in r["mask_density"])


def test_spare_all_targets_leave_the_modulation_out(task, tmp_path):
    dit = tiny_dit()
    cfg = Config(steps=1, batch_forget=2, batch_retain=2, saliency_batches=1, saliency_batch=2,
                 timesteps="uniform", targets="all", density=0.5)
    r = run(dit, task, cfg, out_dir=str(tmp_path), progress=False)
    names = list(r["mask_density"])
    assert any(".ff.net" in n for n in names) and any(".ff_context.net" in n for n in names)
    assert not any(".norm1" in n or "norm_out" in n or "time_text_embed" in n for n in names)


def test_esd_trains_the_joint_attention(task):
    from spare_kernels.unlearn.trainer import Trainer
    dit = tiny_dit()
    tr = Trainer(dit, task, Config(method="esd", steps=1, batch_forget=2))
    names = {n for n, p in dit.named_parameters() if p.requires_grad}
    assert names and all(".attn." in n for n in names)
    assert any("add_k_proj" in n for n in names) and any(".to_q." in n for n in names)
    tr.close()


def test_canvas_dit_denoiser_is_the_models_own_call(task):
    dit = tiny_dit()
    x, t, c = task.x_forget[:2], torch.tensor([10, 900]), task.c_forget[:2]
    got = task.predict(dit, x, t, c)
    sig = task.objective.sigma(t) * 1000
    want = dit(hidden_states=x, timestep=sig, encoder_hidden_states=c, pooled_projections=c.mean(1)).sample
    assert torch.equal(got, want)
    assert task.denoiser.describe() == canvas_dit_denoiser().describe()


def test_resume_on_the_dit_gives_the_uninterrupted_adapter(task, tmp_path):
    cfg = dict(steps=2, batch_forget=2, batch_retain=2, saliency_batches=1, saliency_batch=2, probe_bins=2,
               probe_per_bin=1, targets="attention", checkpoint_every=1)
    full = tiny_dit()
    run(full, task, Config(**cfg), out_dir=str(tmp_path / "a"), progress=False)
    part = tiny_dit()
    run(part, task, Config(**dict(cfg, steps=1)), out_dir=str(tmp_path / "b"), progress=False)
    resumed = tiny_dit()
    run(resumed, task, Config(**cfg), out_dir=str(tmp_path / "b"), resume=True, progress=False)
    a = {k: v for k, v in full.state_dict().items() if "lora" in k}
    b = {k: v for k, v in resumed.state_dict().items() if "lora" in k}
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------- every family, by hand
def _family_task(family, model, scheduler, denoiser, x):
    from spare_kernels.unlearn.task import Task
    g = torch.Generator().manual_seed(5)
    n = x.shape[0]
    if family in ("sd3", "flux"):
        cfg = model.config
        seq, pooled = torch.randn(n, 5, cfg.joint_attention_dim, generator=g), torch.randn(n, cfg.pooled_projection_dim, generator=g)
        c = denoiser.pack(seq=seq, pooled=pooled)
    else:
        seq, mask = torch.randn(n, 5, model.config.caption_channels, generator=g), torch.ones(n, 5)
        mask[0, -2:] = 0
        c = denoiser.pack(seq=seq, mask=mask)
    return Task(x_forget=x, c_forget=c, c_surrogate=c, x_retain=x, c_retain=c, c_null=c[:1], scheduler=scheduler,
                denoiser=denoiser)


@pytest.mark.parametrize("family", ["sd3", "flux", "pixart", "sana"])
def test_recipe_loss_by_hand_on_every_family(family):
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
    from test_families import build

    from spare_kernels.unlearn.methods import _diffusion_loss
    model = build(family)
    if family == "flux":
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
        x = torch.randn(2, 2, 6, 6)            # 2 latent channels -> 8 packed, 3x3 tokens
        den = Denoiser("flux", (("seq", (5, 20)), ("pooled", (12,))), guidance=3.5)
    elif family == "pixart":
        sched = DDPMScheduler(num_train_timesteps=1000)
        x = torch.randn(2, 4, 6, 6)
        den = Denoiser("pixart", (("seq", (5, 20)), ("mask", (5,))))
    else:
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
        x = torch.randn(2, 4, 6, 6) if family == "sd3" else torch.randn(2, 4, 3, 3)
        den = Denoiser(family, (("seq", (5, 20)), ("pooled", (12,))) if family == "sd3" else (("seq", (5, 20)), ("mask", (5,))))
    task = _family_task(family, model, sched, den, x)
    t = torch.tensor([100, 800])
    xt, target = task.noised(x, t, torch.Generator().manual_seed(9))
    got = _diffusion_loss(task, model, (xt, t, task.c_forget, target))
    # by hand: the scheduler's own quantities and the pipeline's own call
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    p = den.unpack(task.c_forget)
    if family == "pixart":
        assert torch.equal(xt, sched.add_noise(x, eps, t))
        out = model(xt, encoder_hidden_states=p["seq"], encoder_attention_mask=p["mask"], timestep=t,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        want = F.mse_loss(out.chunk(2, dim=1)[0], eps)     # learned sigma: the pipeline's first half
    else:
        base = (t + 1).double() / 1000
        if family == "flux":
            mu = flux_mu(9, sched.config)
            sigma = (math.exp(mu) / (math.exp(mu) + (1 / base - 1))).float()
        else:
            sigma = (3 * base / (1 + 2 * base)).float()
        s = sigma.view(-1, 1, 1, 1)
        torch.testing.assert_close(xt, (1 - s) * x + s * eps)
        if family == "flux":
            xp = xt.view(2, 2, 3, 2, 3, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 9, 8)
            ids = torch.stack(torch.meshgrid(torch.arange(3.), torch.arange(3.), indexing="ij"), -1).reshape(9, 2)
            ids = torch.cat([torch.zeros(9, 1), ids], 1)
            o = model(hidden_states=xp, timestep=sigma, guidance=torch.full((2,), 3.5), encoder_hidden_states=p["seq"],
                      pooled_projections=p["pooled"], txt_ids=torch.zeros(5, 3), img_ids=ids).sample
            out = o.view(2, 3, 3, 2, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(2, 2, 6, 6)
        elif family == "sd3":
            out = model(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=p["seq"],
                        pooled_projections=p["pooled"]).sample
        else:
            out = model(xt, encoder_hidden_states=p["seq"], encoder_attention_mask=p["mask"], timestep=sigma * 1000).sample
        want = F.mse_loss(out, eps - x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_two_gloo_ranks_train_the_dit_adapter_of_one_process(tmp_path):
    from distworkers import dit_run_worker, spawn
    cfg = dict(steps=2, batch_forget=4, batch_retain=4, saliency_batches=2, saliency_batch=4, probe_bins=2,
               probe_per_bin=2, targets="attention", density=0.25)
    torch.set_num_threads(1)
    one = dit_run_worker(0, 1, cfg)
    codes, res, errs = spawn("dit_run_worker", 2, str(tmp_path), cfg)
    assert codes == [0, 0], errs
    for r in res:
        assert r["world_size"] == 2 and r["mask_density"] == one["mask_density"]   # the same masks
        for k, v in one["params"].items():   # the same adapter up to float rounding (Adam: see test_distributed)
            assert float((r["params"][k] - v).abs().max()) <= 2e-3, k
    for k in res[0]["params"]:
        assert torch.equal(res[0]["params"][k], res[1]["params"][k])


def test_canvas_sampling_and_the_demo_flag_on_the_dit(tmp_path, monkeypatch, capsys):
    from spare_kernels import canvas
    from spare_kernels.canvas import model as cm
    from spare_kernels.cli import main
    imgs = canvas.sample(tiny_dit(), ["a circle in dots style", "a star in pastel style"], steps=2)
    assert imgs.shape == (2, 3, 32, 32) and 0 <= float(imgs.min()) and float(imgs.max()) <= 1
    monkeypatch.setattr(cm, "WEIGHTS_DIR", str(tmp_path))   # no dit.json there: refused before any work
    assert main(["demo", "--model", "dit", "--steps", "1"]) == 2
    assert "--model dit" in capsys.readouterr().err
