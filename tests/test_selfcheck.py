"""python -m spare_kernels.selfcheck: the device self-check, run here on the CPU."""
import io

import torch

import spare_kernels
from conftest import available_backends, override_entry
from spare_kernels import selfcheck
from spare_kernels.backends import registry


def test_selfcheck_passes_on_every_cpu_backend(capsys):
    assert selfcheck.main(["--device", "cpu", "--quick"]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.endswith(("pass", "FAIL"))]
    n = sum(1 for _ in selfcheck.grid(quick=True))
    assert len(rows) == n * len(available_backends("cpu"))
    assert f"{len(rows)} passed, 0 failed" in out


def test_selfcheck_fails_a_wrong_kernel(monkeypatch):
    """A kernel off by 10% on the forward is caught and reported, and the exit status says so."""
    # Any backend but the oracle shows it; triton@cpu (the interpreter) would only add half a minute.
    backend = [b for b in available_backends("cpu") if b not in ("triton", "reference")][0]
    fn = registry.entries()[("masked_lora_linear", backend)].fn
    override_entry(monkeypatch, "masked_lora_linear", backend, fn=lambda *a: fn(*a) * 1.1, autograd_twin=None)
    buf = io.StringIO()
    fails = selfcheck.run("cpu", [backend], quick=True, out=buf)
    n_linear = sum(1 for name, _, _ in selfcheck.grid(quick=True) if name.startswith("linear"))
    assert fails == n_linear, buf.getvalue()
    assert "FAIL" in buf.getvalue()


def test_selfcheck_refuses_an_unavailable_device_or_backend(capsys):
    if not torch.cuda.is_available():
        assert selfcheck.main(["--device", "cuda"]) == 2
        assert "sees no CUDA device" in capsys.readouterr().err
    if "triton" not in available_backends("cpu"):
        assert selfcheck.main(["--device", "cpu", "--backend", "triton"]) == 2
        assert "triton" in capsys.readouterr().err


def test_selfcheck_says_which_backends_are_live_and_why_not(capsys):
    assert selfcheck.main(["--info"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"spare_kernels {spare_kernels.__version__}, torch {torch.__version__}")
    rows = {ln.split()[0]: ln for ln in out[1:] if not ln.split()[0] == "warning:"}
    assert set(rows) == set(registry.BACKENDS)
    info = registry.backend_info()
    for b in registry.BACKENDS:
        if b in registry.runnable("cpu"):
            assert "live on cpu" in rows[b], rows[b]
        else:
            assert "not live: " + info["unavailable"][b] in rows[b], rows[b]
    assert "live on cpu (default)" in rows[info["ops"]["masked_lora_linear"]["cpu"]]
