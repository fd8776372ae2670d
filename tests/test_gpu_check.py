"""The GPU check's plan (benchmarks/gpu_check.sh) and the benchmark's design section, without a GPU: the
plan's limits fit the 8 minutes a lent GPU gives the script, every benchmark section it names exists,
every step has its function, and the design shapes are the four the issue names."""
import json
import os
import re
import subprocess

import pytest

from benchmarks import gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def _script():
    with open(SCRIPT) as f:
        return f.read()


def plan():
    """``[(step, gpu_s or None, rehearsal_s or None)]`` and ``(BUDGET, GRACE)`` as the script reads them."""
    text = _script()
    body = re.search(r"^PLAN='\n(.*?)^'", text, flags=re.M | re.S).group(1)
    rows = []
    for line in body.splitlines():
        f = line.split()
        if len(f) >= 3:
            rows.append((f[0], None if f[1] == "-" else int(f[1]), None if f[2] == "-" else int(f[2])))
    budget = int(re.search(r"^BUDGET=(\d+)", text, flags=re.M).group(1))
    grace = int(re.search(r"^GRACE=(\d+)", text, flags=re.M).group(1))
    return rows, budget, grace


def test_the_plan_fits_eight_minutes():
    rows, budget, grace = plan()
    gpu_rows = [r for r in rows if r[1] is not None]
    assert budget == 480
    assert len(gpu_rows) >= 8
    assert sum(s for _, s, _ in gpu_rows) + grace * len(gpu_rows) <= 480, gpu_rows
    # the script's own check agrees (it refuses to run a plan over budget)
    res = subprocess.run(["bash", SCRIPT, "--plan"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{len(gpu_rows)} GPU steps" in res.stdout


def test_every_step_has_a_function_and_every_section_exists():
    rows, _, _ = plan()
    text = _script()
    names = [n for n, _, _ in rows]
    assert len(names) == len(set(names))
    for n in names:
        assert re.search(rf"^step_{n}\(\)", text, flags=re.M), f"no step_{n}() in gpu_check.sh"
    sections = [n[len("bench_"):] for n in names if n.startswith("bench_")]
    assert sections and set(sections) <= set(gpu.SECTIONS), sections
    # what the issue asks the GPU run to measure is in its plan (layers: the long sweep, not for 8 min)
    assert {"design", "saliency", "topk", "cold", "step", "run"} <= set(sections)
    gpu_steps = [n for n, g, _ in rows if g is not None]
    # the build comes before anything that runs a kernel, the cuda tests before triton's JIT
    assert gpu_steps.index("build") < gpu_steps.index("selfcheck") < gpu_steps.index("pytest_cuda") \
        < gpu_steps.index("bench_cold") < gpu_steps.index("pytest_triton")
    assert gpu_steps[-1] == "report"
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0


def test_the_design_shapes_are_the_four_that_decide():
    got = [(s["kind"], gpu.gemm_view(s)) for s in gpu.design_specs()]
    assert got == [("linear", (32768, 320, 320)),      # 320 Linear at 32k tokens (8 × 64×64)
                   ("linear", (2048, 1280, 1280)),     # 1280 Linear at 2k tokens (8 × 16×16)
                   ("conv2d", (32768, 320, 2880)),     # 3×3 conv, 320 ch at 64×64: cols = 320·9
                   ("linear", (616, 320, 768))]        # cross-attention K/V at T = 77 × 8


def test_merged_results_and_the_bound_table(tmp_path):
    row = {"layer": "linear 8x4->4", "kind": "linear", "batch": 1, "rank": 4, "why": "w",
           "ms": {"floor": 1.0, "spare_ref": 3.0, "ours_element": 1.6, "ours_block": 1.1, "ours_dense": 1.0,
                  "peft": 1.2, "ours_row": 1.0, **{f"{n}@cuda": 1.0 for n in gpu.OURS}},
           "elem/spare_ref": 0.53, "elem/floor": 1.6, "block/floor": 1.1, "dense/peft": 0.83, "row/peft": 0.83,
           "elem/bound": 1.3, "bound_ms": {"floor": 0.8, "ours_element": 1.23, "merged": None},
           "over_bound": {"floor": 1.25, "ours_element": 1.3, "merged": None},
           "choice": {n: "cuda" for n in gpu.OURS}, "default_backend": {n: "cuda" for n in gpu.OURS},
           "keys": {n: f"k{i}" for i, n in enumerate(gpu.OURS)}, **{f"{n}/best": 1.0 for n in gpu.OURS}}
    head = {"device": "GPU X", "torch": "t", "triton": "3.6.0", "dtype": "torch.bfloat16", "reps": 3, "cuda": True}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({**head, "design": [row], "seconds": 2.0}))
    b.write_text(json.dumps({**head, "topk": {"scores": 1e6, "k": 5, "density": 0.05, "ms": {"ours": 6.0, "cat_kthvalue": 9.0},
                                              "mask_mb": 1, "extra_mb": {"ours": None, "cat_kthvalue": None}},
                             "seconds": 3.0}))
    doc = gpu.merge([str(a), str(b)])
    assert doc["seconds"] == 5.0 and doc["design"] == [row] and "topk" in doc
    md = gpu.report(doc)
    assert "| linear 8x4->4 | 1 | 4 | ours_element | 1.600 | 1.230 | 1.30 ✗ |" in md   # misses 1.15
    assert "| linear 8x4->4 | 1 | 4 | floor | 1.000 | 0.800 | 1.25 |" in md           # no target on the floor
    assert "6.00 ✗ ms (target ≤ 5)" in md
    table = tmp_path / "t.json"
    assert gpu.main(["--from", str(a), str(b), "--write-table", str(table)]) == 0
    assert json.loads(table.read_text())["choices"]["masked_lora_linear"] == {f"k{i}": "cuda" for i in range(4)}
    c = tmp_path / "c.json"
    c.write_text(json.dumps({**head, "device": "GPU Y"}))
    with pytest.raises(ValueError, match="different devices"):
        gpu.merge([str(a), str(c)])


def test_predict_prints_the_bounds_of_every_design_shape(capsys):
    if not hasattr(getattr(gpu, "_cm", None), "bound"):
        pytest.skip("spare_kernels.costmodel has no bound() yet")
    assert gpu.predict("h100", ranks=(4,)) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("| ") and "(" in ln and "design shape" not in ln]
    assert len(rows) == 4, out


def test_saliency_and_topk_rows_get_their_bounds():
    cm = getattr(gpu, "_cm", None)
    if not hasattr(cm, "saliency_passes") or not hasattr(cm, "topk_passes"):
        pytest.skip("spare_kernels.costmodel has no saliency/top-k passes yet")
    import torch
    spec = {"kind": "linear", "n": 4096, "in": 320, "out": 320}
    rows = [{"batch": 8, "ms": {"sample_abs": 1.0, "gemm": 0.5}}]
    gpu.saliency_bounds(rows, [spec], torch.bfloat16, cm.H100)
    b = rows[0]["bound_ms"]
    assert 0 < b["gemm"] <= b["sample_abs"]          # the per-sample statistic costs at least the one GEMM
    assert rows[0]["over_bound"]["gemm"] == pytest.approx(0.5 / b["gemm"])
    assert gpu.saliency_bounds(rows, [spec], torch.bfloat16, None) is None and rows[0]["bound_ms"]["gemm"] is None
