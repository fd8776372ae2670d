"""The backend switch, backend_info, and import without the native extension."""
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import spare_kernels as sk
from spare_kernels.backends import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_EXT = importlib.util.find_spec("spare_kernels._C") is not None


def run_py(code, **env):
    e = dict(os.environ)
    e.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=ROOT, env=e, timeout=300)


def test_backend_info_lists_every_op_and_device():
    info = sk.backend_info()
    assert set(info["ops"]) == set(registry.OPS)
    for op, per_dev in info["ops"].items():
        assert per_dev["cpu"] in ("cpu", "reference")
    assert "reference" in info["available"]


def test_native_cpu_backend_is_default_when_built():
    if not HAS_EXT:
        pytest.skip("spare_kernels._C not built in this environment")
    info = sk.backend_info()
    assert all(v["cpu"] == "cpu" for v in info["ops"].values()), info


def _spy(monkeypatch, op, backend):
    devices, fn = registry._IMPLS[(op, backend)]
    calls = []

    def wrapped(*a):
        calls.append(backend)
        return fn(*a)

    monkeypatch.setitem(registry._IMPLS, (op, backend), (devices, wrapped))
    return calls


@pytest.mark.parametrize("forced", [b for b in registry.BACKENDS if registry._serves("masked_lora_linear", b, "cpu")])
def test_forced_backend_is_the_one_called(monkeypatch, forced):
    calls = {b: _spy(monkeypatch, "masked_lora_linear", b) for b in registry.BACKENDS
             if ("masked_lora_linear", b) in registry._IMPLS}
    with sk.use_backend(forced):
        sk.masked_lora_linear(torch.randn(3, 8), torch.randn(4, 8), None, torch.randn(2, 8), torch.randn(4, 2))
    assert calls[forced] == [forced]
    assert all(not c for b, c in calls.items() if b != forced)


def test_set_backend_validates_and_restores():
    with pytest.raises(ValueError, match="expected one of"):
        sk.set_backend("fast")
    prev = registry.get_forced_backend()
    with sk.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="'cuda' is forced"):
            sk.masked_lora_linear(torch.randn(3, 8), torch.randn(4, 8), None, torch.randn(2, 8), torch.randn(4, 2))
    assert registry.get_forced_backend() == prev


def test_env_var_forces_backend():
    r = run_py("import spare_kernels as sk; print(sk.backend_info()['ops']['saliency_linear']['cpu'])",
               SPARE_KERNELS_BACKEND="reference")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "reference"
    bad = run_py("import spare_kernels", SPARE_KERNELS_BACKEND="gpu")
    assert bad.returncode != 0 and "SPARE_KERNELS_BACKEND" in bad.stderr


def test_import_without_extension_warns_once_and_uses_reference():
    r = run_py("""
        import sys, warnings
        sys.modules["spare_kernels._C"] = None          # as if built with SPARE_KERNELS_BUILD_EXT=0
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import spare_kernels as sk
            import torch
            y = sk.masked_lora_linear(torch.randn(3, 8), torch.randn(4, 8), None, torch.randn(2, 8), torch.randn(4, 2))
        msgs = [str(x.message) for x in w if "spare_kernels" in str(x.message)]
        print(len(msgs), sk.backend_info()["ops"]["masked_lora_linear"]["cpu"], tuple(y.shape))
        print(msgs[0])
    """)
    assert r.returncode == 0, r.stderr
    first, msg = r.stdout.strip().splitlines()
    assert first == "1 reference (3, 4)"
    assert "not built" in msg and "reference" in msg
