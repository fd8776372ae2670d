"""Cost model of the masked-LoRA ops: FLOPs and bytes of every pass, and the lower bound they imply on a
named device (DESIGN §3, §4). Stub: the interface the backends call; the model itself lands next."""
from __future__ import annotations

import os

from . import maskfmt as fmt

PATHS = ("composite", "fused")


def choose_path(op: str, kind: int, n: int, out: int, cols: int, rank: int, *, density: float = 1.0,
                dtype=None, device="cuda", backend: str = "triton") -> str:
    """``"composite"`` (one memory-bound ``W_eff`` build + vendor GEMMs + one mask-and-contract pass) or
    ``"fused"`` (in-register tiles) for one call of ``op`` (``"linear"`` / ``"conv2d"``) with mask ``kind``
    over ``n`` tokens (conv: N·H'·W') and a weight of ``out × cols``. ``SPARE_KERNELS_PATH`` forces one."""
    forced = os.environ.get("SPARE_KERNELS_PATH", "auto")
    if forced in PATHS:
        return forced
    if forced != "auto":
        raise ValueError(f"SPARE_KERNELS_PATH: expected one of {PATHS + ('auto',)}, got {forced!r}")
    if kind == fmt.BLOCK and density <= 0.25:
        return "fused"
    return "fused" if n <= 512 else "composite"
