"""The second probe's findings in ``spare-kernels unlearn`` (issue 28): a resume with fewer --steps than
its checkpoint, a damaged checkpoint, an unreadable forget image and a resolution far past the
memory at hand are refused with exit status 2 naming what is wrong, before the pipeline is loaded
and before --out is made or changed. A tiny offline SD pipeline from tests/pipelines.py."""
import os

import pytest
import torch

from pipelines import SIZE, build
from spare_kernels.cli import main
from spare_kernels.unlearn import diffusers_task as dt

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return build("sd", str(tmp_path_factory.mktemp("probe2") / "sd"))


@pytest.fixture(scope="module")
def trained(sd, tmp_path_factory):
    """A 3-step run of the tiny pipeline with a checkpoint at every step."""
    out = tmp_path_factory.mktemp("probe2_run") / "out"
    assert main(argv(sd, out, "--steps", "3", "--checkpoint-every", "1")) == 0
    return out


def argv(model, out, *flags, data_free=True):
    return (["unlearn", str(model), "--forget-prompt", "a photo of a cat", "--surrogate-prompt", "a photo of a dog",
             "--retain-prompt", "a painting of a tree", "--n-generate", "1", "--resolution", str(SIZE),
             "--out", str(out), "--quiet", "--threads", "1"] + (["--data-free"] if data_free else []) + list(flags))


@pytest.fixture
def no_load(monkeypatch):
    def load(*a, **k):
        raise AssertionError("the pipeline was loaded before the flags and files were checked")
    monkeypatch.setattr(dt, "load_pipeline", load)


def _files(folder):
    return {p: (folder / p).read_bytes() for p in sorted(os.listdir(folder))}


def test_resume_with_fewer_steps_than_the_checkpoint(trained, sd, no_load, capsys):
    """Finding: --resume --steps 1 on a 3-step checkpoint exited 0, run.json saying 1 step over the
    3-step adapter. Now refused naming both numbers, the run's files untouched."""
    before = _files(trained)
    assert main(argv(sd, trained, "--steps", "1", "--resume", "--checkpoint-every", "1")) == 2
    err = capsys.readouterr().err
    assert "steps=1" in err and "at step 3" in err and "checkpoint.pt" in err, err
    assert _files(trained) == before


def test_resume_with_fewer_steps_than_the_checkpoint_in_the_library(trained):
    """The same refusal from read_checkpoint, so ``run(resume=True)`` and a jobs sweep give it too."""
    from spare_kernels.unlearn import Config
    from spare_kernels.unlearn.checkpoints import read_checkpoint
    path = str(trained / "checkpoint.pt")
    cfg = dict(steps=1, checkpoint_every=1)
    with pytest.raises(ValueError, match=r"at step 3, past steps=1"):
        read_checkpoint(path, Config(**cfg))
    assert read_checkpoint(path, Config(steps=3))["step"] == 3   # as many steps: nothing left to run, accepted


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not_a_dict", "missing_keys"])
def test_resume_with_a_damaged_checkpoint(trained, sd, no_load, tmp_path, capsys, damage):
    """Finding: a damaged checkpoint.pt gave a raw unpickling traceback not naming the file, after the
    pipeline and data were loaded. Now exit 2 naming the file, before loading anything."""
    import shutil
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    ckpt = out / "checkpoint.pt"
    if damage == "garbage":
        ckpt.write_bytes(b"this is not a checkpoint\n" * 10)
    elif damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:200])
    elif damage == "not_a_dict":
        torch.save([1, 2, 3], str(ckpt))
    else:
        state = torch.load(str(ckpt), weights_only=False)
        del state["optimizer"], state["rng"]
        torch.save(state, str(ckpt))
    before = _files(out)
    assert main(argv(sd, out, "--steps", "4", "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("spare-kernels unlearn: error: --resume: ") and str(ckpt) in err[-1], err
    assert "Traceback" not in "\n".join(err)
    if damage == "missing_keys":
        assert "optimizer" in err[-1] and "rng" in err[-1]
    assert _files(out) == before


def test_resume_with_other_settings_is_refused_before_loading(trained, sd, no_load, tmp_path, capsys):
    """A checkpoint made with other settings is refused at the same early point (it named them before,
    but only after loading the pipeline and generating the data)."""
    assert main(argv(sd, trained, "--steps", "4", "--resume", "--rank", "8")) == 2
    assert "rank=4 (now 8)" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["garbage", "truncated", "directory"])
def test_forget_images_with_an_unreadable_image(sd, no_load, tmp_path, capsys, bad):
    """Finding: an unreadable image in --forget-images failed deep in PIL after --out was made. Now
    exit 2 naming the file, before loading and before --out exists."""
    from PIL import Image
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (20, 24), (200, 10, 10)).save(images / "a_good.png")
    broken = images / "b_broken.png"
    if bad == "garbage":
        broken.write_bytes(b"not an image at all")
    elif bad == "truncated":
        Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.jpg")
        broken = images / "b_broken.jpg"
        broken.write_bytes((tmp_path / "full.jpg").read_bytes()[:300])
    else:
        broken.mkdir()
    out = tmp_path / "out"
    assert main(argv(sd, out, "--forget-images", str(images), data_free=False)) == 2
    err = capsys.readouterr().err
    assert "--forget-images" in err and str(broken) in err, err
    assert not out.exists()


def test_forget_images_unreadable_in_a_jobs_file(sd, no_load, tmp_path, capsys):
    import json
    images = tmp_path / "images"
    images.mkdir()
    (images / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"name": "j", "forget_prompts": ["a cat"], "surrogate_prompt": "a dog",
                                "retain_prompts": ["a tree"], "forget_images": str(images)}) + "\n")
    out = tmp_path / "out"
    assert main(["unlearn", str(sd), "--jobs", str(jobs), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "job 'j'" in err and str(images / "x.png") in err, err
    assert not out.exists()


def test_forget_images_load_names_the_file(tmp_path):
    """The library's own loader names the file too (a file broken after the CLI's check)."""
    (tmp_path / "x.png").write_bytes(b"broken")
    with pytest.raises(ValueError, match="x.png"):
        dt._load_images(str(tmp_path), 16)


@pytest.mark.parametrize("res", [65536, 16384])
def test_resolution_past_the_memory_at_hand(sd, no_load, tmp_path, capsys, res):
    """Finding: --resolution 65536 ended in an allocator traceback. Now an estimate up front: exit 2
    saying what was asked, the estimate and what the device has in all, before loading or making --out."""
    out = tmp_path / "out"
    assert main(argv(sd, out, "--resolution", str(res), "--device", "cpu")) == 2
    err = capsys.readouterr().err
    assert f"--resolution {res}" in err and "GiB" in err and "in all" in err, err
    assert not out.exists()


def test_memory_estimate_is_a_lower_bound_that_passes_ordinary_runs(sd):
    """SD-1.5's UNet at 512 px, batch 16: well under an 80 GB card (an ordinary GPU run is not refused);
    64x the pixels is 64x the activations. SD3-medium at 1024 px in bf16, one sample: a few GiB. The
    tiny folder: its default size, its weights' bytes on disk."""
    unet = {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
    a = dt.activation_bytes("unet", unet, latent=64, batch=16, bytes_per_value=4)
    assert 4 * 2**30 < a < 40 * 2**30
    assert dt.activation_bytes("unet", unet, latent=512, batch=16, bytes_per_value=4) == 64 * a
    sd3 = {"num_layers": 24, "num_attention_heads": 24, "attention_head_dim": 64, "patch_size": 2}
    b = dt.activation_bytes("sd3", sd3, latent=128, batch=1, bytes_per_value=2)
    assert 0.5 * 2**30 < b < 8 * 2**30
    got = dt.step_memory(dt.check_model_dir(sd), None, batch=2)
    assert (got["size"], got["latent"]) == (SIZE, SIZE // 2)
    on_disk = sum(os.path.getsize(os.path.join(sd, sub, f)) for sub in ("unet", "vae", "text_encoder")
                  for f in os.listdir(os.path.join(sd, sub)) if f.endswith(".safetensors"))
    assert got["weights"] == on_disk and got["total"] == got["weights"] + got["activations"] > on_disk


def test_resolution_checks_kept(sd, no_load, tmp_path, capsys):
    for res, said in (("0", "positive multiple of 8"), ("-16", "positive multiple of 8"), ("20", "multiple of 8")):
        assert main(argv(sd, tmp_path / "out", "--resolution", res)) == 2
        assert said in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_demo_resume_with_a_damaged_checkpoint(tmp_path, capsys, monkeypatch):
    """demo reads the checkpoint at the same early point: before the MiniCanvas model is loaded."""
    from spare_kernels import canvas
    monkeypatch.setattr(canvas, "load_model", lambda *a, **k: pytest.fail("loaded before the checkpoint was read"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"\x80\x02 broken")
    assert main(["demo", "--resume", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--resume: " in err and str(out / "checkpoint.pt") in err, err


# ---------------------------------------------------------------------- review of the fixes (issue 28)
SMALL = dict(steps=1, batch_forget=2, batch_retain=2, saliency_batches=1, saliency_batch=4, probe_bins=4,
             probe_per_bin=2, checkpoint_every=1)


@pytest.fixture(scope="module")
def canvas_task_():
    from spare_kernels import canvas
    from spare_kernels.unlearn import canvas_task
    return canvas_task("style:" + canvas.STYLES[0], n_forget=8, n_retain=16)


@pytest.fixture
def load_calls(monkeypatch):
    """The keyword arguments of every torch.load the checkpoint reader makes."""
    from spare_kernels.unlearn import checkpoints
    calls, real = [], torch.load

    def spy(*a, **k):
        calls.append(k)
        return real(*a, **k)
    monkeypatch.setattr(checkpoints.torch, "load", spy)
    return calls


@pytest.mark.parametrize("method,extra", [("spare", {}), ("spare-reference", {}), ("lora", {}), ("salun", {}),
                                          ("esd", {}), ("spare", {"granularity": "block"}),
                                          ("spare", {"granularity": "row"}), ("spare", {"granularity": "module"}),
                                          ("salun", {"granularity": "row"}), ("spare", {"timesteps": "uniform"}),
                                          ("spare", {"precision": "bf16"})])
def test_every_checkpoint_kind_loads_weights_only(canvas_task_, tmp_path, load_calls, method, extra):
    """Review: checkpoints were unpickled whole (weights_only=False). Every kind the recipe writes (each
    method, mask granularity, without a curve, bf16; the 2-rank runs' are the same dict plus world_size:
    test_distributed's resume tests) loads weights only, allowing exactly the Mask class; mapped or read."""
    from spare_kernels import canvas
    from spare_kernels.masks import Mask
    from spare_kernels.unlearn import Config, run
    from spare_kernels.unlearn.checkpoints import read_checkpoint
    cfg = Config(method=method, **SMALL, **extra)
    run(canvas.load_model(), canvas_task_, cfg, out_dir=str(tmp_path), progress=False)
    path = str(tmp_path / "checkpoint.pt")
    for mmap in (True, False):
        state = read_checkpoint(path, cfg, mmap=mmap)
        assert state["step"] == 1 and state["world_size"] == 1
        masks = state["method_state"].get("masks") or {}
        assert all(isinstance(m, Mask) for m in masks.values())
        assert bool(masks) == (method in ("spare", "spare-reference", "salun"))
    assert [(k["weights_only"], k["mmap"]) for k in load_calls] == [(True, True), (True, False)]


def test_resume_reads_the_checkpoint_once_and_the_cli_check_maps_it(trained, sd, no_load, canvas_task_, tmp_path,
                                                                   load_calls):
    """Review: --resume read the whole file (unpickling it unsafely) in the CLI's check, then again in
    run(). The check maps it (no tensor data read), the run reads it once; both weights only."""
    with pytest.raises(AssertionError, match="pipeline was loaded"):   # the check passed, on to loading
        main(argv(sd, trained, "--steps", "4", "--resume"))
    assert [(k["weights_only"], k["mmap"]) for k in load_calls] == [(True, True)]
    load_calls.clear()
    from spare_kernels import canvas
    from spare_kernels.unlearn import Config, run
    run(canvas.load_model(), canvas_task_, Config(**SMALL), out_dir=str(tmp_path), progress=False)
    r = run(canvas.load_model(), canvas_task_, Config(**dict(SMALL, steps=2)), out_dir=str(tmp_path), resume=True,
            progress=False)
    assert len(r["history"]) == 2
    assert [(k["weights_only"], k["mmap"]) for k in load_calls] == [(True, False)]


RAN = []


def _mark(*a):
    RAN.append(a)
    return {}


class _Evil:
    def __reduce__(self):
        return (_mark, ("ran",))


def test_a_checkpoint_holding_other_objects_is_not_unpickled(trained, tmp_path):
    """Weights only: a checkpoint that would call code on loading is refused naming the file and what it
    holds, and the code does not run."""
    from spare_kernels.unlearn import Config
    from spare_kernels.unlearn.checkpoints import read_checkpoint
    state = torch.load(str(trained / "checkpoint.pt"), weights_only=False)
    state["history"] = _Evil()
    path = str(tmp_path / "checkpoint.pt")
    torch.save(state, path)
    for mmap in (True, False):
        with pytest.raises(ValueError, match=r"holds objects a checkpoint of this version does not .*_mark") as e:
            read_checkpoint(path, Config(steps=4), mmap=mmap)
        assert path in str(e.value) and len(str(e.value)) < 400   # torch's paragraphs of advice cut to the reason
    assert RAN == []


@pytest.mark.parametrize("error", [OSError(5, "Input/output error"), PermissionError(13, "Permission denied"),
                                   MemoryError(), RuntimeError("DefaultCPUAllocator: not enough memory: you tried "
                                                               "to allocate 1 bytes")])
def test_a_checkpoint_that_cannot_be_read_now_is_not_called_damaged(trained, sd, no_load, monkeypatch, capsys, error):
    """Review: every exception of torch.load became "not a readable checkpoint ...; remove it to start
    afresh", an EIO or out-of-memory too: following the advice deleted a good checkpoint. They propagate
    as they are now (the CLI: exit 2 "cannot read" for an OSError, never the advice to remove it)."""
    from spare_kernels.unlearn import Config, checkpoints

    def fail(*a, **k):
        raise error
    monkeypatch.setattr(checkpoints.torch, "load", fail)
    with pytest.raises(type(error)) as e:
        checkpoints.read_checkpoint(str(trained / "checkpoint.pt"), Config(steps=4))
    assert e.value is error
    if isinstance(error, OSError):
        assert main(argv(sd, trained, "--steps", "4", "--resume")) == 2
        err = capsys.readouterr().err
        assert "--resume: cannot read" in err and str(trained / "checkpoint.pt") in err and error.strerror in err
        assert "remove" not in err, err
    else:
        with pytest.raises(type(error)):
            main(argv(sd, trained, "--steps", "4", "--resume"))


def test_a_short_read_of_the_zip_is_an_os_error(trained, monkeypatch):
    from spare_kernels.unlearn import Config, checkpoints

    def fail(*a, **k):
        raise RuntimeError("PytorchStreamReader failed reading file data/3: file read failed")
    monkeypatch.setattr(checkpoints.torch, "load", fail)
    with pytest.raises(OSError, match="file read failed") as e:
        checkpoints.read_checkpoint(str(trained / "checkpoint.pt"), Config(steps=4))
    assert "remove" not in str(e.value)


def test_a_damaged_saved_block_blames_the_checkpoint_not_the_flag(trained, sd, no_load, tmp_path, capsys):
    """Review: a damaged saved ``block`` was reported as "--block: expected a pair ...", the user's flag."""
    import shutil
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    state = torch.load(str(out / "checkpoint.pt"), weights_only=False)
    state["config"]["block"] = [0, "x"]
    torch.save(state, str(out / "checkpoint.pt"))
    assert main(argv(sd, out, "--steps", "4", "--resume")) == 2
    err = capsys.readouterr().err
    assert f"--resume: {out / 'checkpoint.pt'}: saved block [0, 'x']" in err and "--block" not in err, err


def test_memory_bound_is_the_devices_total_not_what_is_free(sd, no_load, monkeypatch, tmp_path, capsys):
    """Review: the CPU figure was MemAvailable and the cgroup's limit - memory.current, which counts the
    page cache: ~0 in a container that just read a model folder, refusing a run that fits. Now the total:
    min(MemTotal, the cgroup's memory.max), named in the message; an ordinary run passes with ~0 free."""
    import builtins
    import io

    from spare_kernels import cli
    fake = {"/proc/meminfo": "MemTotal:       16777216 kB\nMemFree:      100 kB\nMemAvailable:   100 kB\n",
            "/sys/fs/cgroup/memory.max": "8589934592\n", "/sys/fs/cgroup/memory.current": "8589934000\n"}
    monkeypatch.setattr(cli, "open", lambda p, *a, **k: io.StringIO(fake[p]) if p in fake else builtins.open(p, *a, **k),
                        raising=False)
    assert cli._total_bytes(torch.device("cpu")) == (8 * 2**30, "the cgroup limit /sys/fs/cgroup/memory.max")
    with pytest.raises(AssertionError, match="pipeline was loaded"):   # the memory check passed
        main(argv(sd, tmp_path / "out"))
    assert main(argv(sd, tmp_path / "out", "--resolution", "8192", "--device", "cpu")) == 2
    err = capsys.readouterr().err
    assert "more than the 8.0 GiB cpu has in all (the cgroup limit /sys/fs/cgroup/memory.max)" in err, err
    del fake["/sys/fs/cgroup/memory.max"]
    assert cli._total_bytes(torch.device("cpu")) == (16 * 2**30, "MemTotal")


def test_an_empty_forget_folder_has_one_message(sd, no_load, tmp_path, capsys):
    """Review: three checks of an empty forget folder, three messages. One check now (check_images, and
    the loader through it), one message naming the extensions it looks for."""
    import json
    from spare_kernels.unlearn.diffusers_task import IMAGE_EXTENSIONS
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    said = f"forget set: empty: no {'/'.join(IMAGE_EXTENSIONS)} files in {str(empty)!r}"
    assert main(argv(sd, tmp_path / "out", "--forget-images", str(empty), data_free=False)) == 2
    assert capsys.readouterr().err.strip().endswith(f"--forget-images: {said}")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"name": "j", "forget_prompts": ["a cat"], "surrogate_prompt": "a dog",
                                "retain_prompts": ["a tree"], "forget_images": str(empty)}) + "\n")
    assert main(["unlearn", str(sd), "--jobs", str(jobs), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"--jobs: job 'j': forget_images: {said}")
    with pytest.raises(ValueError) as e:
        dt._load_images(str(empty), 16)
    assert str(e.value) == f"forget images: {said}"
    assert not (tmp_path / "out").exists()


def test_forget_images_help_and_loader_take_every_listed_extension(tmp_path, capsys):
    """Review: --forget-images' help said png/jpg; the loader takes .jpeg, .webp and .bmp too (any case)."""
    from PIL import Image, features
    from spare_kernels.unlearn.diffusers_task import IMAGE_EXTENSIONS
    with pytest.raises(SystemExit):
        main(["unlearn", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "/".join(e[1:] for e in IMAGE_EXTENSIONS) in help_text, help_text
    exts = [e for e in IMAGE_EXTENSIONS if e != ".webp" or features.check("webp")]
    for i, e in enumerate(exts):
        Image.new("RGB", (20, 24), (10 * i, 0, 0)).save(tmp_path / f"im{i}{e.upper() if i % 2 else e}")
    assert dt.check_images(str(tmp_path)) == len(exts)
    assert dt._load_images(str(tmp_path), 16).shape == (len(exts), 3, 16, 16)
