"""The unlearning recipe (spare_kernels.unlearn) and the command line on MiniCanvas, small budgets."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from spare_kernels import canvas
from spare_kernels.unlearn import METHODS, Config, Task, TimestepSampler, Trainer, canvas_task, probe, run

SMALL = dict(steps=2, batch_forget=2, batch_retain=2, saliency_batches=1, saliency_batch=4, probe_bins=4,
             probe_per_bin=2)


@pytest.fixture(scope="module")
def task():
    return canvas_task("style:" + canvas.STYLES[0], n_forget=8, n_retain=16)


def _count_forwards(unet):
    n = [0]
    unet.register_forward_pre_hook(lambda *a: n.__setitem__(0, n[0] + 1))
    return n


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_and_reports(method, task):
    unet = canvas.load_model()
    r = run(unet, task, Config(method=method, **SMALL), progress=False)
    assert r["method"] == method and r["steps"] == 2 and len(r["history"]) == 2
    assert r["seconds"] > 0 and r["peak_mem_mb"] > 0
    assert all(torch.isfinite(torch.tensor(h)).all() for h in r["history"])
    if method in ("spare", "spare-reference", "salun"):
        d = list(r["mask_density"].values())
        assert d and all(0 <= v <= 1 for v in d)


def test_adam_is_fused_on_cpu_and_steps_like_the_loop_version():
    from spare_kernels.unlearn.trainer import _adam
    ps = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt, opt_ref = _adam(ps, 1e-2), torch.optim.Adam(ref, lr=1e-2, foreach=False)
    assert opt.defaults["fused"] and not opt_ref.defaults["fused"]
    for _ in range(3):
        for p, q in zip(ps, ref):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        opt_ref.step()
    for p, q in zip(ps, ref):
        torch.testing.assert_close(p, q)
    assert not _adam([torch.nn.Parameter(torch.randn(2, device="meta"))], 1e-2).defaults["fused"]


def test_spare_one_student_and_one_teacher_forward_per_step(task):
    for method, per_step in (("spare", 2), ("spare-reference", 4)):
        unet = canvas.load_model()
        tr = Trainer(unet, task, Config(method=method, **SMALL))
        n = _count_forwards(unet)
        tr.loss()
        assert n[0] == per_step, method


def test_trainer_steps_like_run(task):
    """Trainer.step is run's loop body: the same losses, phases reported in order."""
    cfg = Config(method="spare", **SMALL)
    r = run(canvas.load_model(), task, cfg, progress=False)
    tr = Trainer(canvas.load_model(), task, cfg)
    phases = []
    hist = [[v.item() for v in tr.step(phases.append)] for _ in range(cfg.steps)]
    assert phases == ["loss", "backward", "optimizer"] * cfg.steps
    assert hist == r["history"]
    assert tr.teacher_model is None and all(p.requires_grad for p in tr.params)


@pytest.mark.parametrize("method", ["spare", "salun"])
def test_overlapped_teacher_gives_the_same_steps(method, task):
    """With 2 threads the teacher forward runs in a worker thread beside the student's: the losses and
    parameters of teacher-then-student (to float rounding: each forward now runs on one intra-op
    thread, and kernels may block their sums by thread count). salun does not use the overlap (no
    gain); it is forced here to check the mechanism with a frozen-copy teacher."""
    import threading

    from spare_kernels.unlearn.trainer import _Overlap
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = {}
        for overlap in (False, True):
            unet = canvas.load_model()
            with Trainer(unet, task, Config(method=method, **SMALL), overlap=overlap) as tr:
                assert (tr.method.runner is not None) == (overlap and method == "spare")
                if overlap and method == "salun":
                    tr.method.runner = _Overlap()
                teacher = tr.teacher_model or unet
                seen = set()
                teacher.register_forward_pre_hook(
                    lambda *a: seen.add(threading.get_ident()) if not torch.is_grad_enabled() else None)
                hist = [[v.item() for v in tr.step()] for _ in range(3)]
                assert torch.get_num_threads() == 2          # restored after every step
                params = [p.detach().clone() for p in tr.params]
                out[overlap] = hist, params, set(seen)
                seen.clear()
                with torch.autocast("cpu", dtype=torch.bfloat16):   # thread-local: no overlap under it
                    total, _, _ = tr.loss()
                total.backward()
                assert seen == {threading.get_ident()} and total.isfinite()
                tr.opt.zero_grad(set_to_none=True)
        torch.testing.assert_close(torch.tensor(out[True][0]), torch.tensor(out[False][0]), rtol=1e-4, atol=1e-9)
        for a, b in zip(out[True][1], out[False][1]):   # Adam moves every entry by ~lr (1e-2) a step
            torch.testing.assert_close(a, b, rtol=1e-3, atol=3e-4)
        assert out[False][2] == {threading.get_ident()}
        assert out[True][2] and threading.get_ident() not in out[True][2]
    finally:
        torch.set_num_threads(prev)


def test_overlap_propagates_errors_and_restores_threads():
    from spare_kernels.unlearn.trainer import _Overlap
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    ov = _Overlap()
    try:
        done = []
        with pytest.raises(ZeroDivisionError):
            ov(lambda: done.append("teacher"), lambda: 1 / 0)
        assert done == ["teacher"] and torch.get_num_threads() == 2    # the teacher finished first
        with pytest.raises(KeyError):
            ov(lambda: {}["x"], lambda: 1)
        assert torch.get_num_threads() == 2
        assert ov(lambda: torch.get_num_threads(), lambda: torch.get_num_threads()) == (1, 1)
    finally:
        ov.close()
        torch.set_num_threads(prev)


def test_overlap_runs_the_teacher_in_the_callers_context():
    """A pool thread does not inherit the caller's contextvars (the backend switch is to become one):
    the teacher sees the value set in the calling thread at each call, and cannot change the caller's."""
    import contextvars

    from spare_kernels.unlearn.trainer import _Overlap
    var = contextvars.ContextVar("spare_kernels_test_var", default="unset")
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    ov = _Overlap()
    try:
        for value in ("first", "second"):      # copied at each call, not once for the pool
            token = var.set(value)
            try:
                def teacher():
                    seen = var.get()
                    var.set("changed by the teacher")
                    return seen
                assert ov(teacher, var.get) == (value, value)
                assert var.get() == value
            finally:
                var.reset(token)
    finally:
        ov.close()
        torch.set_num_threads(prev)


def test_disable_adapters_this_thread_only(task):
    """disable_adapters(this_thread=True) switches adapters off for the calling thread only."""
    import threading
    from spare_kernels import disable_adapters, patch_unet
    base = canvas.load_model()
    unet = canvas.load_model()
    torch.manual_seed(0)
    patch_unet(unet, rank=2, init="random")
    x, t, c = task.x_forget[:2], torch.tensor([10, 500]), task.c_forget[:2]
    with torch.no_grad():
        want_base = base(x, t, encoder_hidden_states=c).sample
        want_student = unet(x, t, encoder_hidden_states=c).sample
        got = {}
        entered, leave = threading.Event(), threading.Event()

        def teacher():
            with disable_adapters(unet, this_thread=True):
                entered.set()
                got["teacher"] = unet(x, t, encoder_hidden_states=c).sample
                leave.wait(60)
        th = threading.Thread(target=teacher)
        th.start()
        entered.wait(60)
        got["student"] = unet(x, t, encoder_hidden_states=c).sample    # while the other thread is inside
        leave.set()
        th.join()
        assert torch.equal(got["teacher"], want_base)
        assert torch.equal(got["student"], want_student) and not torch.equal(want_student, want_base)
        with disable_adapters(unet, this_thread=True), disable_adapters(unet, this_thread=True):
            pass                                                          # nests, then clears
        assert torch.equal(unet(x, t, encoder_hidden_states=c).sample, want_student)
        from spare_kernels import merge_adapter, unmerge_adapter
        merge_adapter(unet, "default")
        with pytest.raises(RuntimeError, match="merged"):
            with disable_adapters(unet, this_thread=True):
                pass
        unmerge_adapter(unet)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_spare_reference_layer_keeps_its_mask_as_uint8_like_spares_code(kind, monkeypatch):
    """SpareRefLayer stores its mask as a uint8 buffer and casts it to the delta's dtype at use: fp32
    results are the float mask's bit for bit; under bf16 autocast the delta stays bf16 (a float buffer
    promoted it to fp32: weight-sized fp32 passes SPARE's code does not pay)."""
    import torch.nn.functional as F

    from spare_kernels.unlearn import reference
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(24, 16) if kind == "linear" else torch.nn.Conv2d(8, 12, 3, padding=1)
    x = torch.randn((2, 5, 24) if kind == "linear" else (2, 8, 6, 6), generator=g)
    mask = torch.rand(base.weight.shape, generator=g) > 0.5
    layer = reference.SpareRefLayer(base, 4, mask, scale=0.5, init="random", generator=g)
    assert layer.mask.dtype == torch.uint8 and torch.equal(layer.mask.bool(), mask)
    fn = F.linear if kind == "linear" else (lambda a, w: F.conv2d(a, w, None, 1, 1))
    delta = (layer.lora_B @ layer.lora_A.reshape(4, -1)).view(base.weight.shape) * 0.5 * mask.float()
    assert torch.equal(layer(x), base(x) + fn(x, delta))
    assert torch.equal(reference.SpareRefLayer(base, 4, mask.float(), init="random",
                                               generator=torch.Generator().manual_seed(1)).mask, layer.mask)
    name = "linear" if kind == "linear" else "conv2d"
    seen, real = [], getattr(F, name)
    monkeypatch.setattr(F, name, lambda a, w, *r, **k: seen.append(w.dtype) or real(a, w, *r, **k))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    assert seen[-1] == torch.bfloat16, seen      # the delta's call (the base layer's weight is fp32)
    with pytest.raises(ValueError, match="0/1"):
        reference.SpareRefLayer(base, 4, torch.full(base.weight.shape, 0.5))


def test_spare_teacher_is_the_unpatched_model(task):
    from spare_kernels import disable_adapters
    base = canvas.load_model()
    unet = canvas.load_model()
    run(unet, task, Config(method="spare", **SMALL), progress=False)
    x, t, c = task.x_forget[:2], torch.tensor([10, 500]), task.c_forget[:2]
    with torch.no_grad(), disable_adapters(unet):
        a = unet(x, t, encoder_hidden_states=c).sample
    with torch.no_grad():
        b = base(x, t, encoder_hidden_states=c).sample
        s = unet(x, t, encoder_hidden_states=c).sample
    assert torch.equal(a, b)
    assert not torch.equal(s, b)        # the trained adapter changes the student


def test_resume_gives_the_uninterrupted_adapter(task, tmp_path):
    cfg = dict(SMALL, steps=4, checkpoint_every=2)
    a = canvas.load_model()
    run(a, task, Config(method="spare", **cfg), out_dir=str(tmp_path / "a"), progress=False)
    b = canvas.load_model()
    run(b, task, Config(method="spare", **dict(cfg, steps=2)), out_dir=str(tmp_path / "b"), progress=False)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 2
    c = canvas.load_model()           # a fresh process would start from the shipped model too
    run(c, task, Config(method="spare", **cfg), out_dir=str(tmp_path / "b"), resume=True, progress=False)
    pa = {n: p for n, p in a.named_parameters() if "lora_" in n}
    pc = {n: p for n, p in c.named_parameters() if "lora_" in n}
    assert pa.keys() == pc.keys() and pa
    for n in pa:
        assert torch.equal(pa[n], pc[n]), n


def test_resume_keeps_this_runs_adam_implementation(task, tmp_path):
    """A checkpoint whose optimizer was the per-tensor Adam (before fused Adam) resumes with the fused
    one, and ends where the uninterrupted run does (to the two implementations' rounding)."""
    from spare_kernels.unlearn.checkpoints import _load_checkpoint
    from spare_kernels.unlearn.trainer import Trainer
    cfg = dict(SMALL, steps=4, checkpoint_every=2)
    a = canvas.load_model()
    run(a, task, Config(method="spare", **cfg), out_dir=str(tmp_path / "a"), progress=False)
    run(canvas.load_model(), task, Config(method="spare", **dict(cfg, steps=2)), out_dir=str(tmp_path / "b"),
        progress=False)
    ck = tmp_path / "b" / "checkpoint.pt"
    state = torch.load(ck, weights_only=False)
    assert all(g["fused"] for g in state["optimizer"]["param_groups"])
    for g in state["optimizer"]["param_groups"]:
        g["fused"] = None
    for st in state["optimizer"]["state"].values():
        st["step"] = torch.tensor(float(st["step"]))
    torch.save(state, ck)
    with Trainer(canvas.load_model(), task, Config(method="spare", **cfg)) as tr:
        _load_checkpoint(str(ck), tr.params, tr.opt, tr.gen, tr.cfg)
        assert all(g["fused"] for g in tr.opt.param_groups)
        tr.step()
    c = canvas.load_model()
    run(c, task, Config(method="spare", **cfg), out_dir=str(tmp_path / "b"), resume=True, progress=False)
    pa = {n: p for n, p in a.named_parameters() if "lora_" in n}
    pc = {n: p for n, p in c.named_parameters() if "lora_" in n}
    assert pa.keys() == pc.keys() and pa
    for n in pa:
        torch.testing.assert_close(pa[n], pc[n], rtol=1e-4, atol=1e-6)


def test_resume_accepts_a_checkpoint_with_block_as_a_list(task, tmp_path):
    # written so before Config made block a tuple: still the same settings
    cfg = Config(method="spare", **dict(SMALL, checkpoint_every=1, steps=1))
    run(canvas.load_model(), task, cfg, out_dir=str(tmp_path), progress=False)
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=False)
    state["config"]["block"] = list(state["config"]["block"])
    torch.save(state, path)
    r = run(canvas.load_model(), task, dataclasses.replace(cfg, steps=2), out_dir=str(tmp_path), resume=True,
            progress=False)
    assert len(r["history"]) == 2


ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def _is_attention(name):
    return name.endswith(tuple("." + a for a in ATTENTION))


@pytest.mark.parametrize("method", METHODS)
def test_targets_attention_restricts_saliency_masks_and_adapters(method, task):
    """Config.targets="attention": saliency, threshold, masks and adapters (spare, spare-reference), peft
    adapters (lora), trainable masked weights (salun) on to_q/to_k/to_v/to_out.0 only; the threshold
    keeps the density over those weights. esd trains its cross-attention set whatever the setting."""
    from torch import nn

    from spare_kernels.unlearn.reference import SpareRefLayer
    model = canvas.load_model()
    attn = {f"{n}.weight" for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d) and _is_attention(n)}
    layers = {f"{n}.weight" for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)}
    assert attn and len(attn) < len(layers)
    got = {}
    for targets in ("all", "attention"):
        unet = canvas.load_model()
        with Trainer(unet, task, Config(method=method, targets=targets, **SMALL)) as tr:
            trained = {n for n, p in unet.named_parameters() if p.requires_grad}
            masks = {k.replace(".base_layer", ""): v for k, v in tr.method.masks.items()}
            got[targets] = trained
            if method in ("spare", "spare-reference", "salun"):
                assert set(masks) == (attn if targets == "attention" else layers), method
                if targets == "attention":   # the density is kept over the targeted weights alone
                    on = sum(float(m.density) * m.numel if hasattr(m, "density") else float(m.sum())
                             for m in tr.method.masks.values())
                    total = sum(model.get_parameter(k).numel() for k in attn)
                    assert on / total == pytest.approx(0.5, abs=0.01)
            if method == "spare-reference":
                swapped = {f"{n}.weight" for n, m in unet.named_modules() if isinstance(m, SpareRefLayer)}
                assert swapped == set(masks)
            if method in ("spare", "lora") and targets == "attention":
                owners = {n.rsplit(".lora_", 1)[0].replace(".base_layer", "") for n in trained}
                assert {o + ".weight" for o in owners} == attn, sorted(owners)[:4]
            if method == "salun":
                assert trained == set(masks)
            tr.step()
    if method == "esd":
        assert got["all"] == got["attention"] and all(".attn2." in n for n in got["all"])
    else:
        assert got["attention"] < got["all"]


def test_resume_with_a_checkpoint_from_before_targets(task, tmp_path):
    """A checkpoint from before Config.targets existed resumes with the default (every Linear and
    Conv2d); a run with targets="attention" refuses it."""
    cfg = Config(method="spare", **dict(SMALL, checkpoint_every=1, steps=1))
    run(canvas.load_model(), task, cfg, out_dir=str(tmp_path), progress=False)
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=False)
    assert state["config"]["targets"] == "all"
    del state["config"]["targets"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="targets='all' \\(now 'attention'\\)"):
        run(canvas.load_model(), task, dataclasses.replace(cfg, steps=2, targets="attention"), out_dir=str(tmp_path),
            resume=True, progress=False)
    r = run(canvas.load_model(), task, dataclasses.replace(cfg, steps=2), out_dir=str(tmp_path), resume=True,
            progress=False)
    assert len(r["history"]) == 2 and r["config"]["targets"] == "all"


def test_resume_refuses_other_settings(task, tmp_path):
    run(canvas.load_model(), task, Config(method="spare", **dict(SMALL, checkpoint_every=1)),
        out_dir=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="density"):
        run(canvas.load_model(), task, Config(method="spare", **dict(SMALL, density=0.3)), out_dir=str(tmp_path),
            resume=True, progress=False)
    with pytest.raises(FileNotFoundError):
        run(canvas.load_model(), task, Config(method="spare", **SMALL), out_dir=str(tmp_path / "none"),
            resume=True, progress=False)


def test_timestep_sampler_and_probe(task):
    g = torch.Generator().manual_seed(0)
    u = TimestepSampler(1000).sample(4000, g)
    assert u.min() >= 0 and u.max() < 1000 and abs(u.float().mean().item() - 500) < 30
    curve = {"edges": [0, 250, 500, 750, 1000], "score": [0.0, 0.0, 1.0, 0.0]}
    t = TimestepSampler(1000, curve, mix=1.0).sample(500, g)
    assert ((t >= 500) & (t < 750)).all()
    s = TimestepSampler(1000, curve, mix=0.5)
    assert abs(sum(s.density()) - 1) < 1e-9 and s.density()[2] == pytest.approx(0.625)
    p = probe(canvas.load_model(), task, bins=4, per_bin=2)
    assert p["edges"] == [0, 250, 500, 750, 1000] and len(p["score"]) == 4 and min(p["score"]) >= 0


def test_bad_input_is_rejected_with_the_valid_names(task):
    with pytest.raises(ValueError, match="spare-reference"):
        Config(method="nope")
    with pytest.raises(ValueError, match="timesteps"):
        Config(timesteps="sometimes")
    # every setting is checked when the Config is made, before any stage runs
    for kw, msg in ((dict(granularity="tile"), "granularity: expected one of element, block, row"),
                    (dict(scope="local"), "scope: expected one of global, per_module"),
                    (dict(saliency_stat="fisher"), "saliency_stat: expected one of grad_abs"),
                    (dict(init="zeros"), "init: expected one of gaussian"),
                    (dict(block=(32,)), "block: expected a pair"), (dict(block=(8, True)), "block: expected a pair"),
                    (dict(mix=1.5), "mix"), (dict(mix=float("nan")), "mix"), (dict(lr=-1e-3), "lr"),
                    (dict(alpha=0), "alpha"), (dict(w_retain=-1), "w_retain"),
                    (dict(targets="attn"), "targets: expected one of all, attention, attention\\+mlp, got 'attn'")):
        with pytest.raises(ValueError, match=msg):
            Config(**kw)
    assert Config(block=[16, 8]).block == (16, 8)    # a CLI / JSON list compares equal to a checkpoint's tuple
    with pytest.raises(ValueError, match=canvas.STYLES[1]):
        canvas_task("style:nope")
    with pytest.raises(ValueError, match="object"):
        canvas_task("shape:circle")
    with pytest.raises(ValueError, match="forget set: empty"):
        Task(task.x_forget[:0], task.c_forget[:0], task.c_surrogate[:0], task.x_retain, task.c_retain,
               task.c_null, task.scheduler)


def test_cli_demo_errors_before_any_work(tmp_path, capsys):
    from spare_kernels.cli import main
    assert main(["demo", "--target", "style:nope", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "style:nope" in err or "nope" in err
    assert canvas.STYLES[0] in err
    assert not (tmp_path / "o").exists()
    assert main(["demo", "--surrogate", "nope"]) == 2
    assert canvas.STYLES[1] in capsys.readouterr().err
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    if not os.access(ro, os.W_OK):     # (root ignores permissions)
        assert main(["demo", "--out", str(ro / "x")]) == 2
        assert "--out" in capsys.readouterr().err
    for flags, msg in ((["--mix", "2"], "mix"), (["--block", "0", "8"], "block"), (["--lr", "0"], "lr"),
                       (["--density", "0"], "density")):
        assert main(["demo", *flags, "--out", str(tmp_path / "o5")]) == 2
        assert msg in capsys.readouterr().err
        assert not (tmp_path / "o5").exists()


def test_cli_demo_end_to_end(tmp_path, capsys):
    from spare_kernels.cli import RESULT_KEYS, main
    out, js = tmp_path / "run", tmp_path / "r.json"
    assert main(["demo", "--steps", "2", "--n-per-prompt", "1", "--out", str(out), "--json", str(js), "--quiet",
                 "--granularity", "block", "--block", "16", "8", "--rank", "2", "--mix", "0.25", "--lr", "0.005",
                 "--targets", "attention"]) == 0
    doc = json.loads(js.read_text())
    assert set(RESULT_KEYS) <= set(doc) and doc["method"] == "spare" and doc["steps"] == 2
    res = json.loads((out / "results.json").read_text())
    cfg = res["configs"]["spare"]
    assert (cfg["granularity"], cfg["block"], cfg["rank"], cfg["mix"], cfg["lr"], cfg["targets"]) == \
        ("block", [16, 8], 2, 0.25, 0.005, "attention")
    assert res["rows"][0]["targets"] == "attention"
    for f in ("adapter.safetensors", "loss_curves.png", "timesteps_spare.png", "mask_density_spare.png",
              "samples_before.png", "samples_after_spare.png", "results.json"):
        assert (out / f).exists(), f
    assert "UA" in capsys.readouterr().out


def test_cli_unlearn_on_a_local_pipeline(tmp_path, capsys):
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
    from toggle_adapter_pipeline import build_pipeline

    from spare_kernels import adapter_names, load_adapter
    from spare_kernels.cli import main
    model = tmp_path / "sd"
    build_pipeline(str(model)).save_pretrained(str(model))
    out = tmp_path / "out"
    argv = ["unlearn", str(model), "--forget-prompt", "a photo of a cat", "--surrogate-prompt", "a photo of a dog",
            "--retain-prompt", "a painting of a tree", "--data-free", "--n-generate", "1", "--steps", "2",
            "--granularity", "row", "--scope", "per_module", "--out", str(out), "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    assert "generating" not in capsys.readouterr().out          # --quiet
    assert (out / "adapter.safetensors").exists() and (out / "run.json").exists()
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(str(model), subfolder="unet")
    load_adapter(unet, str(out / "adapter.safetensors"))
    assert adapter_names(unet) == ["default"]
    # bf16 forwards on an explicit device, attention targets: adapter in fp32, on to_q/to_k/to_v/to_out.0 only
    out_bf = tmp_path / "out_bf16"
    capsys.readouterr()
    assert main(argv[:-3] + ["--out", str(out_bf), "--precision", "bf16", "--device", "cpu", "--targets", "attention"]) == 0
    said = capsys.readouterr().out     # not --quiet: the long parts say what they do
    assert "generating 1 forget images" in said and "generating 1 retain images" in said, said
    from safetensors.torch import load_file
    a32, a16 = load_file(str(out / "adapter.safetensors")), load_file(str(out_bf / "adapter.safetensors"))
    assert all(v.dtype == torch.float32 for k, v in a16.items() if "lora_" in k) and any("lora_" in k for k in a16)
    run_cfg = json.loads((out_bf / "run.json").read_text())["config"]
    assert (run_cfg["precision"], run_cfg["granularity"], run_cfg["scope"], run_cfg["targets"]) == \
        ("bf16", "row", "per_module", "attention")
    assert a16.keys() < a32.keys() and all(any(f".{t}." in k for t in ("to_q", "to_k", "to_v", "to_out.0")) for k in a16)
    for bad, msg in (("meta", "expected cpu or cuda"), ("cpu:1", "expected cpu or cuda"),
                     ("nonsense", "expected a torch device")) + (
            () if torch.cuda.is_available() else (("cuda", "no CUDA device"),)):
        assert main(argv[:-3] + ["--out", str(tmp_path / "o_dev"), "--device", bad]) == 2
        assert msg in capsys.readouterr().err
    # a directory that is not a diffusers pipeline, an empty forget set
    assert main(["unlearn", str(tmp_path), "--forget-prompt", "x", "--surrogate-prompt", "y",
                 "--retain-prompt", "z", "--data-free", "--out", str(tmp_path / "o2")]) == 2
    assert "not a diffusers pipeline" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["unlearn", str(model), "--forget-prompt", "x", "--surrogate-prompt", "y", "--retain-prompt", "z",
                 "--forget-images", str(empty), "--out", str(tmp_path / "o3")]) == 2
    assert "forget set: empty" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A tiny offline diffusers pipeline folder (python/toggle_adapter_pipeline.py's builder)."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
    from toggle_adapter_pipeline import build_pipeline
    model = tmp_path_factory.mktemp("tiny_sd") / "sd"
    build_pipeline(str(model)).save_pretrained(str(model))
    return model


def test_cli_unlearn_refuses_an_incomplete_pipeline_folder(tiny_sd, tmp_path, capsys, monkeypatch):
    """Right subfolders, missing files (an interrupted download): exit 2 naming the folder and the part
    that does not load, before --out is made; a missing tokenizer vocabulary (transformers then builds
    a tokenizer that knows no word) too. An unwritable --out is refused before the model loads."""
    import shutil

    from spare_kernels.cli import main
    from spare_kernels.unlearn import diffusers_task
    out = tmp_path / "out"
    for missing, said in (("unet/diffusion_pytorch_model.safetensors", "unet/ does not load (OSError"),
                          ("text_encoder/config.json", "text_encoder/ does not load"),
                          ("tokenizer/tokenizer.json", "tokenizer/ holds 2 tokens where text_encoder/ embeds 80")):
        model = tmp_path / f"sd_without_{missing.replace('/', '_')}"
        shutil.copytree(tiny_sd, model)
        os.remove(model / missing)
        assert main(["unlearn", str(model), "--forget-prompt", "a cat", "--surrogate-prompt", "a dog",
                     "--retain-prompt", "a tree", "--data-free", "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()   # diffusers may log warnings first
        assert err[-1].startswith(f"spare-kernels unlearn: error: model: {str(model)!r}: {said}"), err
        assert not out.exists()
    afile = tmp_path / "a_file"
    afile.write_text("")
    monkeypatch.setattr(diffusers_task, "load_pipeline", lambda *a, **k: pytest.fail("loaded before --out was checked"))
    assert main(["unlearn", str(tiny_sd), "--forget-prompt", "a cat", "--surrogate-prompt", "a dog",
                 "--retain-prompt", "a tree", "--data-free", "--out", str(afile / "out"), "--quiet"]) == 2
    assert f"--out: cannot write to {str(afile / 'out')!r} ({str(afile)!r} is not a directory)" in capsys.readouterr().err


def test_cli_unlearn_refuses_empty_prompts_by_flag(tmp_path, capsys):
    """An empty or blank prompt (it would encode as the unconditional prompt) is refused naming its
    flag, before the model is looked at and before --out exists; blank lines of a file are skipped,
    a file of blank lines only is refused."""
    from spare_kernels.cli import main
    good = {"--forget-prompt": "a cat", "--surrogate-prompt": "a dog", "--retain-prompt": "a tree"}
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\t\n")
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("\n  a cat  \n\n")
    out = tmp_path / "out"

    def argv(**over):
        flags = dict(good, **over)
        return ["unlearn", str(tmp_path / "no_model"), "--data-free", "--out", str(out)] + [
            x for k, v in flags.items() if v is not None for x in (k, v)]
    for flag in good:
        for bad in ("", "   ", "\t\n"):
            assert main(argv(**{flag: bad})) == 2, (flag, bad)
            err = capsys.readouterr().err
            assert f"spare-kernels unlearn: error: {flag}: expected a non-empty prompt" in err, err
            assert not out.exists()
    for flag in ("--forget-prompt", "--retain-prompt"):
        assert main(argv(**{flag: "a bird"}) + [f"{flag}s-file", str(blank)]) == 2
        assert f"{flag}s-file: {str(blank)!r} holds no prompt" in capsys.readouterr().err
        # a file with blank lines around a prompt is fine: the run gets as far as the model directory
        assert main(argv(**{flag: None}) + [f"{flag}s-file", str(mixed)]) == 2
        assert "model: not a directory" in capsys.readouterr().err
    assert not out.exists()


def test_compare_table_shows_spares_time_over_each_method():
    from spare_kernels.cli import format_table
    row = dict(ua=1.0, ira=0.99, cra=0.93, base_ira=1.0, base_cra=0.92, fidelity_psnr=29.0, peak_mem_mb=95)
    rows = [dict(row, method="spare", seconds=50.0), dict(row, method="spare-reference", seconds=80.0),
            dict(row, method="salun", seconds=0.0)]
    lines = format_table(rows).splitlines()
    assert "spare/x" in lines[0]
    assert lines[2].split()[8] == "1.000" and lines[3].split()[8] == "0.625" and lines[4].split()[8] == "-"
    assert "spare/x" not in format_table(rows[:1]) and "spare/x" not in format_table(rows[1:])


def test_bf16_precision_runs_forwards_in_bf16_and_keeps_fp32_state(task):
    with pytest.raises(ValueError, match="precision"):
        Config(precision="fp16")
    unet = canvas.load_model()
    with Trainer(unet, task, Config(method="spare", precision="bf16", **SMALL)) as tr:
        seen = []
        h = unet.register_forward_hook(lambda m, i, o: seen.append(o.sample.dtype))
        lf, lr_ = tr.step()
        h.remove()
        assert seen and set(seen) == {torch.bfloat16}          # teacher and student forwards
        assert torch.isfinite(lf) and torch.isfinite(lr_)
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in tr.params)
    # a checkpoint from before Config.precision existed resumes (missing settings take their defaults)
    from spare_kernels.unlearn.checkpoints import _load_checkpoint, _save_checkpoint
    import dataclasses
    with Trainer(canvas.load_model(), task, Config(method="spare", **SMALL)) as tr:
        tr.step()
        state_cfg = Config(method="spare", **SMALL)
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            ck = os.path.join(d, "checkpoint.pt")
            _save_checkpoint(ck, 1, tr.params, tr.opt, tr.gen, [], state_cfg)
            st = torch.load(ck, weights_only=False)
            del st["config"]["precision"]
            torch.save(st, ck)
            assert _load_checkpoint(ck, tr.params, tr.opt, tr.gen, state_cfg)[0] == 1
            with pytest.raises(ValueError, match="precision"):
                _load_checkpoint(ck, tr.params, tr.opt, tr.gen, dataclasses.replace(state_cfg, precision="bf16"))


def test_task_to_moves_samples_and_conditions(task):
    t2 = task.to("cpu")
    assert t2 is not task and t2.x_forget.device.type == "cpu" and torch.equal(t2.c_null, task.c_null)
    assert t2.scheduler is task.scheduler and t2.target == task.target
