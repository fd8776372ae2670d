"""The CPU engine's tuning variables (SPARE_KERNELS_QF etc., csrc/cpu/engine.cpp knob()): a bad value is
an error naming the variable, the value and what is expected; a good one runs and stays exact.

The cases run in subprocesses (the engine reads its variables once per process), concurrently."""
from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

if importlib.util.find_spec("spare_kernels._C") is None:
    pytest.skip("native extension spare_kernels._C not built", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Element-masked linear forward and backward through the tiled engine (a weight over one whole tile,
# kWholeTile = 256 Ki floats, and more than 4 tokens: neither the one-tile nor the small-T path), against
# the reference; T = 600 also takes the "large" (>= 512 tokens) forward tiles. With arguments
# (variable, value, ...): each variable in turn set to its value alone, the error of the first call
# printed as JSON. One process serves every bad value: a knob whose read throws is not initialised,
# so the next call reads the environment again.
SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    from spare_kernels import maskfmt as fmt
    from spare_kernels.backends import reference as R
    import spare_kernels._C  # noqa: F401
    ops = torch.ops.spare_kernels_cpu
    torch.manual_seed(0)
    torch.set_num_threads(2)
    out, cols, r = 300, 1000, 4
    w, A, B = torch.randn(out, cols), torch.randn(r, cols), torch.randn(out, r)
    m = fmt.pack_bits(torch.rand(out, cols) < 0.5)

    def check(T):
        x, dy = torch.randn(T, cols), torch.randn(T, out)
        args = (w, None, A, B, m, fmt.ELEMENT, 0, 0, 0.5)
        torch.testing.assert_close(ops.masked_lora_linear(x, *args), R.masked_lora_linear(x, *args),
                                   rtol=1e-4, atol=1e-4)
        bargs = (dy, x, w, A, B, m, fmt.ELEMENT, 0, 0, 0.5, True, True, True)
        for got, want in zip(ops.masked_lora_linear_backward(*bargs), R.masked_lora_linear_backward(*bargs)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)

    bad = sys.argv[1:]
    if not bad:
        check(24)
        check(600)
        print("ok")
    errors = {}
    for name, value in zip(bad[::2], bad[1::2]):
        os.environ[name] = value
        try:
            check(24)
            errors[name] = None
        except RuntimeError as e:
            errors[name] = str(e)
        del os.environ[name]
    if bad:
        print(json.dumps(errors))
""")

BAD = [   # one case per variable, in the order the engine reads them: (variable, value, expected)
    ("SPARE_KERNELS_TOKEN_SPLIT", "-1", "a non-negative integer"),
    ("SPARE_KERNELS_QF", "0", "a multiple of 16"),
    ("SPARE_KERNELS_BF", "-5", "an integer in [256, 67108864]"),
    ("SPARE_KERNELS_QFL", "100", "a multiple of 16"),
    ("SPARE_KERNELS_BFL", "99999999999", "an integer in [256, 67108864]"),
    ("SPARE_KERNELS_QB", "abc", "a multiple of 16"),
    ("SPARE_KERNELS_BB", "1e9", "an integer in [256, 67108864]"),
]
GOOD = {
    # Small tiles (many tiles, edge tiles), the token split from 16 tokens, whitespace tolerated.
    "small_tiles": dict(SPARE_KERNELS_QF="32", SPARE_KERNELS_BF="256", SPARE_KERNELS_QFL="48",
                        SPARE_KERNELS_BFL=" 4096 ", SPARE_KERNELS_QB="16", SPARE_KERNELS_BB="512",
                        SPARE_KERNELS_TOKEN_SPLIT="16"),
    # 0: never split; an empty variable is the default; an old name warns.
    "no_split_empty_old_name": dict(SPARE_KERNELS_TOKEN_SPLIT="0", SPARE_KERNELS_QF="", SPARE_QB="64"),
}


def _run(env, args=()):
    e = {k: v for k, v in os.environ.items() if not k.startswith("SPARE_")}
    e.update(env)
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=300)


def _errors(cases):
    r = _run({}, [x for n, v in cases for x in (n, v)])
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs():
    """The cases' subprocesses (each mostly torch's import), run concurrently: every bad value in one,
    in read order (a knob read without error before its turn stays read: such a case reruns alone)."""
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = {k: pool.submit(_run, env) for k, env in GOOD.items()}
        bad = pool.submit(_errors, [(n, v) for n, v, _ in BAD])
        runs = {k: f.result() for k, f in futures.items()}
        runs["bad"] = bad.result()
    for n, v, _ in BAD:
        if runs["bad"][n] is None:
            runs["bad"][n] = _errors([(n, v)])[n]
    return runs


@pytest.mark.parametrize("name,value,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_value_is_an_error_naming_the_variable(runs, name, value, expected):
    msg = runs["bad"][name]
    assert msg is not None, f"{name}={value!r} ran without an error"
    assert f"environment variable {name}='{value}' is invalid: expected {expected}" in msg, msg


def test_good_values_run_and_match_the_reference(runs):
    r = runs["small_tiles"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("ok")


def test_token_split_zero_empty_value_and_old_name(runs):
    r = runs["no_split_empty_old_name"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SPARE_QB is no longer read: it was renamed SPARE_KERNELS_QB" in r.stderr
