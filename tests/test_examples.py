"""The runnable examples in python/ run as documented (subprocess, CPU, offline) and write what they promise."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_example(name, *args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".cache" / "inductor"))
    p = subprocess.run([sys.executable, f"python/{name}.py", *map(str, args)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{name} exited {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    return p.stdout


@pytest.mark.parametrize("name", ["train_sparse_adapter", "toggle_adapter_pipeline"])
def test_short_documented_with_argparse(name):
    src = (ROOT / "python" / f"{name}.py").read_text()
    assert src.startswith('"""') and f"python/{name}.py" in src.split('"""')[1] and "[--out DIR]" in src
    assert len(src.splitlines()) < 80 and "argparse.ArgumentParser" in src and 'add_argument("--out"' in src


def test_train_then_toggle_with_that_adapter(tmp_path):
    out = run_example("train_sparse_adapter", "--out", tmp_path / "train", "--steps", 3)
    adapter = tmp_path / "train" / "adapter.safetensors"
    assert adapter.is_file() and "step 3/3" in out and "wrote" in out
    out = run_example("toggle_adapter_pipeline", "--adapter", adapter, "--out", tmp_path / "toggle")
    for f in ("adapter_on.png", "adapter_off.png"):
        assert (tmp_path / "toggle" / f).stat().st_size > 0
    assert "toggles exact" in out


def test_toggle_default_random_adapter(tmp_path):
    from PIL import Image
    out = run_example("toggle_adapter_pipeline", "--out", tmp_path)
    assert (tmp_path / "random.safetensors").is_file() and "toggles exact" in out
    on, off = (Image.open(tmp_path / f"adapter_{t}.png") for t in ("on", "off"))
    assert on.size == off.size == (64, 32)                # the two prompts side by side, 32x32 each
    assert on.tobytes() != off.tobytes()                  # a random adapter changes the images
