"""The CLI refuses bad input with exit status 2 before any work (issue 15's new-user trial): nothing
loaded, nothing generated, --out not created."""
import pytest

from spare_kernels import canvas
from spare_kernels.cli import main
from spare_kernels.unlearn import Config


@pytest.fixture
def no_work(monkeypatch):
    """Any real work (loading the MiniCanvas model or a pipeline) fails the test."""
    def work(*a, **k):
        raise AssertionError("work started before the flags were checked")
    monkeypatch.setattr(canvas, "load_model", work)
    import spare_kernels.unlearn.diffusers_task as dt
    monkeypatch.setattr(dt, "load_pipeline", work)


@pytest.mark.parametrize("flags, msg", [
    (["--n-per-prompt", "0"], "--n-per-prompt"),
    (["--n-per-prompt", "-3"], "--n-per-prompt"),
    (["--threads", "-1"], "--threads"),
    (["--checkpoint-every", "5"], "--checkpoint-every: needs --out"),
    (["--resume"], "--resume: needs --out"),
    (["--lr", "inf"], "lr: expected a positive finite"),
    (["--resume", "--out", "{tmp}/fresh"], "no checkpoint.pt"),
    (["--resume", "--compare", "--out", "{tmp}/fresh"], "no checkpoint.pt"),
    (["--json", "{tmp}"], "is a directory"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_demo_refuses_before_any_work(no_work, tmp_path, capsys, flags, msg):
    argv = ["demo", "--quiet"] + [f.format(tmp=tmp_path) for f in flags]
    assert main(argv) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize("flags, msg", [
    (["--n-generate", "0"], "--n-generate"),
    (["--resolution", "0"], "--resolution"),
    (["--resolution", "-8"], "--resolution"),
    (["--resolution", "30"], "multiple of 8"),
    (["--threads", "-2"], "--threads"),
    (["--resume"], "no checkpoint.pt"),
    (["--lr", "inf"], "lr: expected a positive finite"),
])
def test_unlearn_refuses_before_any_work(no_work, tmp_path, capsys, flags, msg):
    model = tmp_path / "sd"
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):   # what check_model_dir looks at
        (model / sub).mkdir(parents=True)
    (model / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    out = tmp_path / "out"
    argv = ["unlearn", str(model), "--forget-prompt", "a cat", "--surrogate-prompt", "a dog", "--retain-prompt",
            "a tree", "--data-free", "--out", str(out), "--quiet"] + flags
    assert main(argv) == 2
    assert msg in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("kw", [dict(lr=float("inf")), dict(alpha=float("inf")), dict(w_forget=float("inf")),
                                dict(w_retain=float("nan")), dict(checkpoint_every="x"), dict(checkpoint_every=1.5)])
def test_config_refuses_non_finite_and_non_int_settings(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        Config(**kw)
