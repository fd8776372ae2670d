"""``spare_kernels.warmup`` and the autotune wrapper (``backends/triton/utils.BucketedAutotuner``).

No GPU here: the enumeration is checked against Triton's own launch path (``warmup.runtime_specs``: every
launch through ``JITFunction.run`` and the autotuner's ``run`` against a stand-in driver, the compile
request recorded instead of compiled) and against the op calls of a real CPU forward and backward; the
compile step runs for sm_90 as the AOT test does. Those run in a subprocess without ``TRITON_INTERPRET``
(the suite sets it, and ``@triton.jit`` reads it at import). Tuning itself needs a GPU (``-m gpu``).
"""
import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.dirname(os.path.abspath(__file__))):   # (run as a script: tests/unets, benchmarks)
    if _p not in sys.path:
        sys.path.insert(0, _p)


# ------------------------------------------------------------------------------ autotune wrapper
class _Kernel:
    """Stands in for a ``JITFunction`` under the autotuner: records the config of every launch."""

    def __init__(self, src="k"):
        import triton.runtime.jit as J

        def k(x, N, IN, BM):
            pass

        self.fn = J.JITFunction.__new__(J.JITFunction)   # only what the wrapper reads: name, module, hash
        self.fn.fn, self.fn.hash = k, src
        self.fn.__dict__["__name__"] = "k"
        self.arg_names = ["x", "N", "IN", "BM"]
        self.launched = []

    def run(self, *args, **kwargs):
        self.launched.append(kwargs["BM"])


def _tuner(kernel, bench, device="GPU-A"):
    import triton

    from spare_kernels.backends.triton import utils as U
    cfgs = [triton.Config({"BM": 64}), triton.Config({"BM": 128})]

    def do_bench(call, quantiles):   # the second candidate (BM 128) is the faster
        call()
        bench.append(1)
        return [2.0 if len(bench) % 2 else 1.0] * 3

    return U.BucketedAutotuner(kernel, kernel.arg_names, cfgs, ["N", "IN"], None, None, do_bench=do_bench,
                               device_name=device)


@pytest.fixture
def tune_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARE_KERNELS_AUTOTUNE_DIR", str(tmp_path))
    return tmp_path


def _jit_cache_key(monkeypatch):
    import triton.runtime.jit as J
    monkeypatch.setattr(J.JITFunction, "cache_key", property(lambda self: self.hash), raising=False)


def test_autotune_keys_bucket_token_counts(tune_dir, monkeypatch):
    _jit_cache_key(monkeypatch)
    k, bench = _Kernel(), []
    at = _tuner(k, bench)
    for n in (4000, 4096, 3000):        # one bucket (4096): tuned once
        at.run(None, n, 320, grid=(1,), warmup=False)
    assert len(bench) == 2              # two candidates benchmarked, once
    at.run(None, 5000, 320, grid=(1,), warmup=False)   # bucket 8192: tuned again
    assert len(bench) == 4
    at.run(None, 4096, 640, grid=(1,), warmup=False)   # other features: not a token count, tuned again
    assert len(bench) == 6
    assert at.keys_of((None, 3000, 320), {})[1] == (4096, 320)
    assert at.keys_of((None, 3000, 320), {})[0] == (3000, 320)
    # every launch after tuning runs the pick of its bucket
    assert len(k.launched) == 6 + 5


def test_autotune_picks_persist_across_processes(tune_dir, monkeypatch):
    from spare_kernels.backends.triton import utils as U
    _jit_cache_key(monkeypatch)
    bench = []
    a = _tuner(_Kernel(), bench)
    a.run(None, 4096, 320, grid=(1,), warmup=False)
    pick = a.picks[(4096, 320)]
    files = os.listdir(tune_dir)
    assert len(files) == 1 and not any(f.startswith(".tmp") for f in files)   # written via rename
    doc = json.load(open(tune_dir / files[0]))
    assert doc["device"] == "GPU-A" and doc["key"] == repr((4096, 320)) and doc["triton"]
    # a new autotuner (another process): the pick comes from disk, nothing benchmarked
    k2, n0 = _Kernel(), len(bench)
    b = _tuner(k2, bench)
    b.run(None, 3000, 320, grid=(1,), warmup=False)
    assert len(bench) == n0 and b.picks[(4096, 320)].kwargs == pick.kwargs
    assert k2.launched == [pick.kwargs["BM"]]
    assert U.TUNE_LOG[-1][2] == "disk"
    # another GPU, another kernel source: tuned again (their own files)
    for kern, dev in ((_Kernel(), "GPU-B"), (_Kernel(src="k2"), "GPU-A")):
        n0 = len(bench)
        _tuner(kern, bench, device=dev).run(None, 4096, 320, grid=(1,), warmup=False)
        assert len(bench) == n0 + 2
    assert len(os.listdir(tune_dir)) == 3


def test_autotune_single_candidate_not_benchmarked(tune_dir, monkeypatch):
    import triton

    from spare_kernels.backends.triton import utils as U
    _jit_cache_key(monkeypatch)
    k, bench = _Kernel(), []
    cfgs = [triton.Config({"BM": 64}), triton.Config({"BM": 128})]
    at = U.BucketedAutotuner(k, k.arg_names, cfgs, ["N"], None, None, device_name="GPU-A",
                             prune_configs_by={"early_config_prune": lambda c, named, **kw: c[1:]},
                             do_bench=lambda call, quantiles: bench.append(1) or [1.0] * 3)
    at.run(None, 100, 320, grid=(1,), warmup=False)
    assert bench == [] and k.launched == [128] and os.listdir(tune_dir) == []


def test_autotune_dir_follows_env(monkeypatch, tmp_path):
    from spare_kernels.backends.triton import utils as U
    monkeypatch.delenv("SPARE_KERNELS_AUTOTUNE_DIR", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    assert U.autotune_dir() == os.path.join(str(tmp_path), "spare_kernels_autotune")
    monkeypatch.delenv("TRITON_CACHE_DIR")
    assert U.autotune_dir().endswith(os.path.join(".cache", "spare_kernels", "autotune"))


# --------------------------------------------------------------------------------- bad arguments
@pytest.fixture(scope="module")
def patched():
    from unets import tiny_unet

    import spare_kernels as sk
    unet = tiny_unet()
    sk.patch_unet(unet, rank=4)
    return unet


@pytest.mark.parametrize("kw, err, text", [
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(height=-8), ValueError, "height"),
    (dict(width=2.5), ValueError, "width"),
    (dict(tokens=True), ValueError, "tokens"),
    (dict(dtype=torch.float64), TypeError, "dtype"),
    (dict(workers=0), ValueError, "workers"),
])
def test_warmup_bad_arguments(patched, kw, err, text):
    import spare_kernels as sk
    with pytest.raises(err, match=text):
        sk.warmup(patched, **kw)


def test_warmup_refuses_what_it_cannot_warm(patched):
    import spare_kernels as sk
    from unets import tiny_unet
    with pytest.raises(TypeError, match="model"):
        sk.warmup("unet")
    with pytest.raises(ValueError, match="patch_unet"):
        sk.warmup(tiny_unet())
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            sk.warmup(patched, tune=True)
    from spare_kernels.backends.triton import utils as U
    if U.INTERPRET:   # the suite's default: the kernels are interpreted functions
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            sk.warmup(patched, progress=False)


@pytest.mark.parametrize("argv, text", [
    (["--resolution", "7"], "--resolution"),
    (["--batch-size", "0"], "--batch-size"),
    (["--rank", "65"], "--rank"),
    (["--workers", "0"], "--workers"),
])
def test_cli_warmup_bad_arguments(argv, text, capsys):
    from spare_kernels.cli import main
    assert main(["warmup"] + argv) == 2
    assert text in capsys.readouterr().err


def test_cli_warmup_choices(capsys):
    from spare_kernels.cli import main
    with pytest.raises(SystemExit):
        main(["warmup", "--config", "sdxl"])
    assert "invalid choice" in capsys.readouterr().err


# ------------------------------------------------------------------- compiled (subprocess) checks
def _compiled(check, timeout=1500, **env):
    e = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    e.setdefault("TRITON_CACHE_DIR", os.path.join(ROOT, ".cache", "triton"))
    e.update(env)
    p = subprocess.run([sys.executable, os.path.abspath(__file__), check], cwd=ROOT, env=e, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return p.stdout


def test_enumeration_is_what_the_runtime_compiles():
    out = _compiled("_check_enumeration")
    assert "ok" in out, out


def test_warmup_compiles_for_sm90(tmp_path):
    out = _compiled("_check_compile", TRITON_CACHE_DIR=str(tmp_path / "triton"),
                    SPARE_KERNELS_AUTOTUNE_DIR=str(tmp_path / "tune"))
    assert "ok" in out, out
    print(out)


def _tiny(kind, dtype=torch.float32, targets="all"):
    """The tiny UNet patched at rank 4 with every target layer masked at ``kind`` granularity."""
    from unets import tiny_unet

    import spare_kernels as sk
    from spare_kernels.masks import Mask
    from spare_kernels.patch import candidates
    from spare_kernels.targets import target_predicate
    unet = tiny_unet(dtype=dtype)
    pred, masks = target_predicate(targets), {}
    g = torch.Generator().manual_seed(0)
    for n, mod in candidates(unet).items():
        if kind == "none" or not pred(n, mod):
            continue
        rows, cols = mod.weight.shape[0], mod.weight[0].numel()
        dense = torch.rand(rows, cols, generator=g) < 0.3
        if kind == "block":
            blocks = torch.rand(-(-rows // 16), -(-cols // 16), generator=g) < 0.5
            dense = blocks.repeat_interleave(16, 0).repeat_interleave(16, 1)[:rows, :cols]
        elif kind == "row":
            dense = (torch.rand(rows, 1, generator=g) < 0.5).expand(rows, cols)
        masks[n + ".weight"] = Mask.from_dense(dense.reshape(mod.weight.shape), kind, block=(16, 16))
    sk.patch_unet(unet, masks=masks or None, rank=4, target_modules=targets, init="random")
    return unet


@contextlib.contextmanager
def _reference_calls():
    """The reference backend forced, its entries wrapped to record ``(op, args)`` of every call (eager calls
    skip the dispatcher, so a dispatch mode does not see them)."""
    import dataclasses

    from spare_kernels import use_backend
    from spare_kernels import warmup as W
    from spare_kernels.backends import registry as R
    calls, saved = [], {}

    def wrap(op, fn):
        def rec(*args):
            calls.append((op, args))
            return fn(*args)
        return rec

    with use_backend("reference"):
        R._load("reference")
        for op in W._OPS:
            e = saved[op] = R._IMPLS[(op, "reference")]
            R._IMPLS[(op, "reference")] = dataclasses.replace(e, fn=wrap(op, e.fn))
        R._CHOICE.clear()
        try:
            yield calls
        finally:
            R._IMPLS.update({(op, "reference"): e for op, e in saved.items()})
            R._CHOICE.clear()


def _check_enumeration():
    """For the tiny UNet (every mask kind, fp32 and bf16, forward and backward): (1) the op calls recorded on
    the meta device are those of a real CPU forward and backward; (2) the specialisations warmup derives are
    exactly the compile requests of Triton's own launch path for those calls."""
    from unets import tiny_inputs

    from spare_kernels import warmup as W
    for kind in ("element", "block", "row", "none"):
        for dt in (torch.float32, torch.bfloat16):
            unet = _tiny(kind, dt)
            x, t, e = tiny_inputs(batch=2, dtype=dt)
            meta = W.record_op_calls(unet, batch_size=2, height=x.shape[2], width=x.shape[3], dtype=dt,
                                     tokens=e.shape[1])
            with _reference_calls() as real:
                unet(x, t, encoder_hidden_states=e).sample.float().sum().backward()
            key = lambda calls: {(op, tuple(W._arg_key(a) for a in args)) for op, args in calls}  # noqa: E731
            assert key(meta) == key(real), (kind, dt, key(meta) ^ key(real))
            assert {op for op, _ in meta} >= {"masked_lora_linear", "masked_lora_linear_backward",
                                              "masked_lora_conv2d", "masked_lora_conv2d_backward"}
            calls = W.distinct_calls(meta)
            specs = W.specs_of(W.record_launches(calls, 132))

            def launch_all():
                W.replay(calls)

            runtime = set(W.runtime_specs(launch_all, sm_count=132))
            mine = {s.key for s in specs}
            assert len(mine) == len(specs) and mine == runtime, (kind, dt, len(mine), len(runtime),
                                                                 sorted(mine ^ runtime)[:2])
            print(kind, dt, len(calls), "calls", len(specs), "specialisations")
    print("ok")


def _check_compile():
    """warmup of the tiny UNet (element masks, bf16, SPARE's attention targets): compiles every
    specialisation for sm_90 on 2 workers, says tuning was skipped; a second warmup finds them all in
    Triton's cache; the CLI runs on the shipped MiniCanvas config."""
    from spare_kernels import warmup as W
    unet = _tiny("element", torch.bfloat16, targets="attention")
    rep = W.warmup(unet, batch_size=2, height=8, width=8, tokens=7, workers=2, progress=False)
    print(rep.summary())
    assert rep.specs > 0 and rep.compiled == rep.specs and rep.cached == 0 and not rep.failed, rep
    assert rep.tuning.startswith("skipped") and rep.tune_keys > 0
    assert set(rep.per_kernel) >= {"_fwd_masked_kernel", "_dx_masked_kernel", "_wgrad_masked_kernel"}
    again = W.warmup(unet, batch_size=2, height=8, width=8, tokens=7, workers=2, progress=False)
    assert again.cached == rep.specs and again.compiled == 0, again
    from spare_kernels.cli import main
    assert main(["warmup", "--config", "canvas", "--workers", "2", "--quiet", "--no-backward"]) == 0
    print("ok")


if __name__ == "__main__":
    globals()[sys.argv[1]]()
