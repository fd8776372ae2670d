"""The Triton kernels compile ahead of time for sm_80 and sm_90, every specialisation the launchers use,
with no spill (issue 16; CI has no GPU). One subprocess runs ``python -m spare_kernels.backends.triton.aot
--arch 80 90``: it fails on any compile error, spill or shared memory over the per-block limit. The
table and its JSON land in ``.cache/aot/`` (the figures of the README's backends section)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills():
    from spare_kernels.backends.triton import aot
    try:
        aot.find_ptxas()
    except FileNotFoundError as e:
        pytest.fail(f"ptxas is needed for the register / spill figures: {e}")
    folder = os.path.join(ROOT, ".cache", "aot")
    os.makedirs(folder, exist_ok=True)
    out = os.path.join(folder, "aot.json")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # compiled, not interpreted
    env.setdefault("TRITON_CACHE_DIR", os.path.join(ROOT, ".cache", "triton"))
    cmd = [sys.executable, "-m", "spare_kernels.backends.triton.aot", "--arch", "80", "90", "--json", out]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    with open(os.path.join(folder, "aot.txt"), "w") as f:
        f.write(p.stdout + p.stderr)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    rows = json.load(open(out))
    assert {r["arch"] for r in rows} == {80, 90}
    kernels = {r["kernel"] for r in rows}
    for arch in (80, 90):
        assert {r["kernel"] for r in rows if r["arch"] == arch} == kernels
    for r in rows:
        assert r["error"] is None and r["regs"] > 0 and r["spills"] == 0, r
    print(p.stdout.strip().splitlines()[-3:])
