"""Backend registry: one table of (op, backend) -> implementation, chosen per device at call time.

Backends in priority order (fastest first). ``reference`` runs on any device and is the oracle.
Force one with ``SPARE_KERNELS_BACKEND=reference|cpu|triton|cuda`` or :func:`set_backend`.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable

BACKENDS = ("cuda", "triton", "cpu", "reference")
DEVICES = ("cpu", "cuda")
OPS = (
    "masked_lora_linear",
    "masked_lora_linear_backward",
    "masked_lora_conv2d",
    "masked_lora_conv2d_backward",
    "saliency_linear",
    "saliency_conv2d",
)

# (op, backend) -> (device types it serves, fn); "any" serves every device.
_IMPLS: dict[tuple[str, str], tuple[tuple[str, ...], Callable]] = {}
_NOTES: dict[str, str] = {}  # backend -> why it is unavailable (shown by backend_info)


def _check_backend(name, what="backend"):
    if name is not None and name not in BACKENDS:
        raise ValueError(f"{what}: expected one of {BACKENDS} or None, got {name!r}")
    return name


_forced: str | None = _check_backend(os.environ.get("SPARE_KERNELS_BACKEND") or None,
                                     "SPARE_KERNELS_BACKEND")


def register(op: str, backend: str, devices: tuple[str, ...] = ("any",)):
    """Decorator: register ``fn`` as ``backend``'s implementation of ``op`` on ``devices``."""
    if op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    _check_backend(backend)

    def deco(fn):
        _IMPLS[(op, backend)] = (tuple(devices), fn)
        return fn

    return deco


def note_unavailable(backend: str, why: str) -> None:
    _NOTES[backend] = why


def _serves(op, backend, device):
    entry = _IMPLS.get((op, backend))
    return entry is not None and ("any" in entry[0] or device in entry[0])


def backend_for(op: str, device: str) -> str:
    """Name of the backend that runs ``op`` on ``device`` now."""
    if _forced is not None:
        if not _serves(op, _forced, device):
            why = _NOTES.get(_forced, "it has no implementation of this op for this device")
            raise RuntimeError(
                f"spare_kernels: backend {_forced!r} is forced (SPARE_KERNELS_BACKEND / set_backend) "
                f"but cannot run {op} on {device!r}: {why}")
        return _forced
    for b in BACKENDS:
        if _serves(op, b, device):
            return b
    raise RuntimeError(f"spare_kernels: no backend implements {op} on {device!r}")


def select(op: str, device: str) -> Callable:
    return _IMPLS[(op, backend_for(op, device))][1]


def set_backend(name: str | None) -> None:
    """Force ``name`` for every op (``None``: fastest available per device)."""
    global _forced
    _forced = _check_backend(name)


def get_forced_backend() -> str | None:
    return _forced


@contextlib.contextmanager
def use_backend(name: str | None):
    """Context manager form of :func:`set_backend`; restores the previous choice."""
    global _forced
    prev = _forced
    set_backend(name)
    try:
        yield
    finally:
        _forced = prev


def backend_info() -> dict:
    """``{"ops": {op: {device: backend}}, "forced": name|None, "available": {...}, "unavailable": {...}}``."""
    ops = {}
    for op in OPS:
        ops[op] = {}
        for dev in DEVICES:
            try:
                ops[op][dev] = backend_for(op, dev)
            except RuntimeError:
                ops[op][dev] = None
    available = {b: sorted({op for (op, bb) in _IMPLS if bb == b}) for b in BACKENDS}
    return {"ops": ops, "forced": _forced,
            "available": {b: v for b, v in available.items() if v},
            "unavailable": dict(_NOTES)}
