"""The backend switch, backend_info, and import without the native extension."""
import contextvars
import dataclasses
import importlib.util
import os
import threading
import subprocess
import sys
import textwrap

import pytest
import torch

import spare_kernels as sk
from conftest import override_entry
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


def spy(monkeypatch, op, backend, calls=None):
    """Replace ``backend``'s entry of ``op`` by one that logs its calls (the choice cache cleared)."""
    fn = registry.entries()[(op, backend)].fn
    calls = [] if calls is None else calls

    def wrapped(*a):
        calls.append(backend)
        return fn(*a)

    override_entry(monkeypatch, op, backend, fn=wrapped, autograd_twin=None)
    return calls


@pytest.mark.parametrize("forced", registry.runnable("cpu"))
def test_forced_backend_is_the_one_called(monkeypatch, forced):
    calls = {b: spy(monkeypatch, "masked_lora_linear", b) for b in registry.runnable("cpu")}
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


def _forced_in_threads(n_threads=2, rounds=200):
    """Threads with overlapping use_backend scopes; each records what it saw inside and after."""
    barrier = threading.Barrier(n_threads)
    seen, errors = {}, []
    names = ["reference", "cpu" if HAS_EXT else None]

    def work(i):
        try:
            mine = names[i % len(names)]
            for _ in range(rounds):
                with sk.use_backend(mine):
                    barrier.wait(timeout=10)          # every thread is inside its scope now
                    got = registry.get_forced_backend()
                    if got != mine:
                        errors.append((i, mine, got))
            seen[i] = registry.get_forced_backend()
        except Exception as e:  # noqa: BLE001 (reported by the assertion)
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return seen, errors


def test_use_backend_is_scoped_per_thread():
    """Overlapping scopes in two threads: each sees its own choice inside, and after both exit the
    process is forced to nothing (a process-global switch left the other thread's choice behind)."""
    before = registry.get_forced_backend()
    seen, errors = _forced_in_threads()
    assert not errors, errors[:3]
    assert set(seen.values()) == {before}
    assert registry.get_forced_backend() == before


def test_set_backend_is_the_default_and_scopes_win_inside():
    prev = registry.get_forced_backend()
    try:
        sk.set_backend("reference")
        assert registry.get_forced_backend() == "reference"
        with sk.use_backend(None):
            assert registry.get_forced_backend() is None      # a scope overrides the default
        out = []
        t = threading.Thread(target=lambda: out.append(registry.get_forced_backend()))
        t.start(), t.join()
        assert out == ["reference"]                            # a new thread sees the process default
        with sk.use_backend("reference"):
            inner = []
            t = threading.Thread(target=lambda: inner.append(registry.get_forced_backend()))
            t.start(), t.join()
            carried = contextvars.copy_context().run(registry.get_forced_backend)
        assert inner == ["reference"] and carried == "reference"
    finally:
        sk.set_backend(prev)


def test_backward_runs_the_backend_chosen_at_forward(monkeypatch):
    """The backward of a call made inside a use_backend scope runs that backend even when it is
    called outside the scope (or in autograd's device thread, which does not see the scope)."""
    calls = spy(monkeypatch, "masked_lora_linear_backward", "reference")
    x = torch.randn(3, 8, requires_grad=True)
    with sk.use_backend("reference"):
        y = sk.masked_lora_linear(x, torch.randn(4, 8), None, torch.randn(2, 8), torch.randn(4, 2))
    y.sum().backward()
    assert calls == ["reference"]


def test_selection_by_activation_dtype():
    """fp32/bf16 CPU activations run the native kernels; fp16 and fp64 the reference, also when cpu is
    forced (its dtypes are data in its entries)."""
    if not HAS_EXT:
        pytest.skip("spare_kernels._C not built in this environment")
    for op in registry.OPS:
        assert registry.backend_for(op, "cpu", torch.float32) == "cpu"
        assert registry.backend_for(op, "cpu", torch.bfloat16) == "cpu"
        assert registry.backend_for(op, "cpu", torch.float16) == "reference"
        with sk.use_backend("cpu"):
            assert registry.backend_for(op, "cpu", torch.float64) == "reference"
    e = registry.entries()[("masked_lora_linear", "cpu")]
    assert e.devices == ("cpu",) and e.dtypes == (torch.float32, torch.bfloat16)
    assert e.autograd_twin is not None and not e.double_backward
    assert registry.entries()[("masked_lora_linear_backward", "reference")].double_backward


def test_backend_info_says_why_a_backend_is_unavailable():
    info = sk.backend_info()
    for b in ("triton", "cuda"):
        if b not in info["available"]:
            assert info["unavailable"][b], info["unavailable"]
    assert "masked_lora_linear" in info["backends"]["reference"]
    ref = info["backends"]["reference"]["masked_lora_linear"]
    assert ref["devices"] == ["any"] and ref["dtypes"] is None
    r = run_py("""
        import sys, warnings
        sys.modules["spare_kernels._C"] = None
        warnings.simplefilter("ignore")
        import spare_kernels as sk
        print(sk.backend_info()["unavailable"]["cpu"])
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("not built"), r.stdout


def test_importing_loads_no_backend():
    """``import spare_kernels`` / ``spare_kernels.masks`` / ``spare_kernels.maskfmt`` load no backend
    module, no compiled extension and no triton: backends load on first use."""
    r = run_py("""
        import sys
        import spare_kernels.maskfmt, spare_kernels.masks, spare_kernels
        loaded = [m for m in sys.modules if m in ("spare_kernels._C", "triton")
                  or (m.startswith("spare_kernels.backends.") and m != "spare_kernels.backends.registry")]
        print(loaded)
        import torch
        spare_kernels.masked_lora_linear(torch.randn(2, 4), torch.randn(3, 4), None, torch.randn(1, 4), torch.randn(3, 1))
        print("spare_kernels.backends.reference" in sys.modules)
    """)
    assert r.returncode == 0, r.stderr
    second, third = r.stdout.strip().splitlines()
    assert second == "[]"
    assert third == "True"
