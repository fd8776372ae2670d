"""Packaging: one version, the build's messages and record, the sdist's contents, and (marker ``dist``,
``make test-dist``) the wheel installed in a clean venv passing the self-check outside the repository."""
import ast
import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
import time
import venv
import warnings

import pytest
import torch

import spare_kernels
from spare_kernels import _version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The build without importing anything of the package: torch only when it compiles.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MAX_JOBS": "1", "SPARE_KERNELS_NATIVE": "0"}


def _setup_py(args, env=None, block_torch=False, cwd=ROOT):
    """Run setup.py with ``args`` (in a fresh process; ``block_torch``: as if torch were not installed,
    like pip's isolated build environment)."""
    pre = "import sys; sys.modules['torch'] = None; " if block_torch else "import sys; "
    code = pre + f"sys.argv = ['setup.py'] + {list(args)!r}; import runpy; runpy.run_path('setup.py', run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env={**ENV, **(env or {})}, capture_output=True,
                          text=True, timeout=300)


# ------------------------------------------------------------------------------------------- version
def test_version_is_in_one_place():
    with open(os.path.join(ROOT, "spare_kernels", "_version.py")) as f:
        assigned = [n.value.value for n in ast.parse(f.read()).body
                    if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "__version__"]
    assert assigned == [spare_kernels.__version__]
    assert importlib.metadata.version("spare_kernels") == spare_kernels.__version__
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    assert 'dynamic = ["version"]' in text and "\nversion =" not in text.split("[tool.setuptools.dynamic]")[0]
    with open(os.path.join(ROOT, "CHANGELOG.md")) as f:
        assert f"## [{spare_kernels.__version__}]" in f.read()


# ------------------------------------------------------------------------------------ setup.py's lines
def test_isolated_build_stops_with_one_line():
    """pip's isolated build has no torch: one line naming --no-build-isolation, exit 1."""
    r = _setup_py(["bdist_wheel", "--dist-dir", os.devnull], block_torch=True)
    assert r.returncode == 1
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and "pip install --no-build-isolation ." in lines[0], r.stdout + r.stderr


def test_metadata_needs_no_torch(tmp_path):
    """pip's metadata step (and an sdist) run without torch and without any build message."""
    r = _setup_py(["-q", "egg_info", "--egg-base", str(tmp_path)], block_torch=True)
    assert r.returncode == 0, r.stderr
    assert "not built" not in r.stderr
    with open(tmp_path / "spare_kernels.egg-info" / "PKG-INFO") as f:
        assert f"Version: {spare_kernels.__version__}" in f.read()


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA torch would build _C_cuda")
@pytest.mark.parametrize("env, why, recorded", [
    ({}, "torch is not a CUDA build", True),
    ({"SPARE_KERNELS_BUILD_CUDA": "0"}, "SPARE_KERNELS_BUILD_CUDA=0", False),
    ({"SPARE_KERNELS_BUILD_EXT": "0"}, "SPARE_KERNELS_BUILD_EXT=0", False),
])
def test_cuda_skip_is_one_line_and_recorded(tmp_path, env, why, recorded):
    """Each way _C_cuda is skipped says so in exactly one line, with why; the build records it
    (SPARE_KERNELS_BUILD_CPU=0: nothing compiles, so this is quick)."""
    r = _setup_py(["build_ext", "--build-lib", str(tmp_path / "lib"), "--build-temp", str(tmp_path / "tmp")],
                  env={"SPARE_KERNELS_BUILD_CPU": "0", **env})
    assert r.returncode == 0, r.stderr
    said = [ln for ln in r.stderr.splitlines() if "_C_cuda" in ln]
    assert len(said) == 1 and "not built" in said[0] and why in said[0], r.stderr
    info = tmp_path / "lib" / "spare_kernels" / "_build_info.json"
    if recorded:
        rec = json.loads(info.read_text())
        assert rec["torch"] == torch.__version__ and rec["extensions"] == {"_C_cuda": f"skipped: {why}"}
    elif info.exists():
        assert "_C_cuda" not in json.loads(info.read_text()).get("extensions", {})


def test_extension_problem_names_the_torch_it_was_built_against(tmp_path, monkeypatch):
    path = tmp_path / "_build_info.json"
    monkeypatch.setattr(_version, "BUILD_INFO", str(path))
    assert _version.build_info() == {} and _version.extension_problem("_C") is None
    path.write_text(json.dumps({"torch": "2.0.0", "extensions": {"_C": "built", "_C_cuda": "skipped: no nvcc"}}))
    msg = _version.extension_problem("_C")   # loaded, but against another torch
    assert "built against torch 2.0.0" in msg and torch.__version__ in msg and "--no-build-isolation" in msg
    path.write_text(json.dumps({"torch": torch.__version__, "extensions": {"_C_cuda": "skipped: no nvcc"}}))
    assert _version.extension_problem("_C_cuda", ImportError("x")) == "not built: setup.py skipped spare_kernels._C_cuda (no nvcc)"
    assert _version.extension_problem("_C") is None
    assert "does not load (boom)" in _version.extension_problem("_C", ImportError("boom"))



@pytest.mark.parametrize("built, running, problem, warns", [
    ("2.13.0+cpu", "2.13.0+cu128", False, False),   # the portable wheel on a CUDA torch: the same ABI
    ("2.13.0", "2.13.1+cpu", False, True),           # a patch release: used, said once
    ("2.13.0+cpu", "2.12.1+cpu", True, False),       # another minor release: another C++ ABI
    ("2.13.0", "3.13.0", True, False),
    ("nightly", "2.13.0", True, False),              # unreadable: only the same string is trusted
])
def test_extension_problem_compares_the_minor_release(tmp_path, monkeypatch, built, running, problem, warns):
    path = tmp_path / "_build_info.json"
    monkeypatch.setattr(_version, "BUILD_INFO", str(path))
    monkeypatch.setattr(_version, "_warned_patch", False)
    monkeypatch.setattr(torch, "__version__", running)
    path.write_text(json.dumps({"torch": built, "extensions": {"_C": "built", "_C_cuda": "skipped: no nvcc"}}))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        msg = _version.extension_problem("_C")
        assert _version.extension_problem("_C_cuda") is None      # skipped: the import's error says why
        assert _version.extension_problem("_C") == msg             # the warning is not repeated
    if problem:
        assert f"built against torch {built} but torch {running} is imported" in msg and "--no-build-isolation" in msg
    else:
        assert msg is None
    said = [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]
    assert len(said) == int(warns), said
    if warns:
        assert f"built against torch {built} and torch {running}" in said[0]


def test_the_record_is_checked_before_the_extension_is_imported(tmp_path, monkeypatch):
    """Importing an extension runs its op registrations: one built against another minor release of
    torch is never imported (cpu and cuda backends)."""
    from spare_kernels.backends import cpu, cuda

    imported = []

    class Importlib:
        @staticmethod
        def import_module(name):
            imported.append(name)
            raise ImportError("not here")

    path = tmp_path / "_build_info.json"
    monkeypatch.setattr(_version, "BUILD_INFO", str(path))
    monkeypatch.setattr(cpu, "importlib", Importlib)
    monkeypatch.setattr(cuda, "importlib", Importlib)
    monkeypatch.setattr(cuda, "_LIB", None)
    monkeypatch.setattr(cuda, "_WHY", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    path.write_text(json.dumps({"torch": "1.0.0", "extensions": {"_C": "built", "_C_cuda": "built"}}))
    C, why = cpu._load()
    assert C is None and "built against torch 1.0.0" in why
    assert cuda._load() is None and "built against torch 1.0.0" in cuda.why_unavailable()
    assert imported == []
    path.write_text(json.dumps({"torch": torch.__version__, "extensions": {"_C": "built", "_C_cuda": "built"}}))
    monkeypatch.setattr(cuda, "_WHY", None)
    assert cpu._load() == (None, "not built: spare_kernels._C is missing or does not load (not here)")
    assert cuda._load() is None and "does not load (not here)" in cuda.why_unavailable()
    assert imported == ["spare_kernels._C", "spare_kernels._C_cuda"]


# ----------------------------------------------------------------------------------------- the sdist
def _tracked(prefix):
    out = subprocess.run(["git", "ls-files", prefix], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_sdist_holds_what_the_wheel_build_needs(tmp_path):
    pytest.importorskip("build")
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "-o", str(tmp_path)], cwd=ROOT,
                   env=ENV, capture_output=True, text=True, check=True, timeout=300)
    sdist, = tmp_path.glob("spare_kernels-*.tar.gz")
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    need = _tracked("csrc") | _tracked("spare_kernels/canvas/weights") | {
        "README.md", "CHANGELOG.md", "setup.py", "pyproject.toml", "MANIFEST.in", "spare_kernels/_version.py"}
    assert not need - names, sorted(need - names)
    junk = [n for n in names if n.endswith((".so", ".pyc")) or n.startswith((".venv", ".cache", "build/", "tests/"))
            or n.endswith("_build_info.json")]
    assert not junk, junk


# ---------------------------------------------------------------------- the wheel in a clean venv
@pytest.mark.dist
def test_wheel_installs_in_a_clean_venv_and_passes_the_selfcheck(tmp_path):
    """Build the sdist and, from it, a portable wheel; install torch==2.13.0 (the CPU wheel on local disk:
    a looser spec would pull a CUDA build) and the wheel in a fresh venv (no system site-packages); the
    self-check runs there, outside the repository, and finds the cpu backend live."""
    t0 = time.perf_counter()
    wheel = os.environ.get("SPARE_KERNELS_DIST_WHEEL")   # make test-dist: the wheel make dist just built
    if not wheel:
        pytest.importorskip("build")
        dist = tmp_path / "dist"
        subprocess.run([sys.executable, "-m", "build", "--no-isolation", "-o", str(dist)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, check=True, timeout=3000)
        wheel, = dist.glob("spare_kernels-*.whl")
    t_build = time.perf_counter() - t0
    venv.create(tmp_path / "venv", with_pip=True)
    py = str(tmp_path / "venv" / "bin" / "python")
    env = {k: v for k, v in ENV.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    for what in (["torch==2.13.0"], [str(wheel)]):   # pip's cache is reused
        r = subprocess.run(pip + what, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, r.stdout + r.stderr
    t_install = time.perf_counter() - t0 - t_build
    r = subprocess.run([py, "-m", "spare_kernels.selfcheck", "--device", "cpu", "--quick"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert f"spare_kernels {spare_kernels.__version__}" in out and "extensions built against torch 2.13.0" in out
    assert any(ln.split()[:4] == ["cpu", "live", "on", "cpu"] for ln in out.splitlines()), out
    assert " 0 failed" in out
    where = subprocess.run([py, "-c", "import spare_kernels; print(spare_kernels.__file__)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(tmp_path / "venv")), where
    print(f"\nbuild {t_build:.0f} s, venv + installs {t_install:.0f} s, "
          f"total {time.perf_counter() - t0:.0f} s")
