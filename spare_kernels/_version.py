"""The package's version (the one place it is written: pyproject.toml reads it statically) and the
record of how the native extensions were built (``_build_info.json``, written by setup.py's build_ext),
so that a missing or mismatched extension can say why."""
from __future__ import annotations

import json
import os
import re
import warnings
from typing import Optional

__version__ = "0.1.0"

BUILD_INFO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")


def build_info() -> dict:
    """What setup.py recorded when it built the extensions: ``{"torch": version, "cuda": version|None,
    "extensions": {name: "built" | "skipped: why" | "failed: why"}}``; ``{}`` when nothing was recorded
    (a source checkout never built, or SPARE_KERNELS_BUILD_EXT=0)."""
    try:
        with open(BUILD_INFO) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _release(version: str) -> Optional[tuple]:
    """``(major, minor, rest)`` of a torch version without its local suffix (``"2.13.0+cu128"`` ->
    ``(2, 13, ".0")``), or None when it does not read as one."""
    hit = re.fullmatch(r"(\d+)\.(\d+)(\S*)", str(version).split("+", 1)[0])
    return None if hit is None else (int(hit.group(1)), int(hit.group(2)), hit.group(3))


_warned_patch = False


def _torch_problem(name: str, built_with: str) -> Optional[str]:
    """Why an extension built against torch ``built_with`` cannot run with the torch imported now, or None.
    torch keeps its C++ ABI within a minor release: another local build (``+cpu`` / ``+cu128``) is the
    same ABI, another patch release most likely is (said once), another minor release is not."""
    import torch

    here = str(torch.__version__)
    if built_with == here:
        return None
    b, h = _release(built_with), _release(here)
    if b is None or h is None or b[:2] != h[:2]:
        return (f"spare_kernels.{name} was built against torch {built_with} but torch {here} is imported "
                "(another minor release: another C++ ABI): reinstall spare_kernels with this torch "
                "(pip install --no-build-isolation .)")
    global _warned_patch
    if b != h and not _warned_patch:
        _warned_patch = True
        warnings.warn(f"spare_kernels: the extensions were built against torch {built_with} and torch {here} "
                      "is imported; a patch release keeps the C++ ABI, so they are used (reinstall with "
                      "pip install --no-build-isolation . if they misbehave)", RuntimeWarning, stacklevel=3)
    return None


def extension_problem(name: str, error: Optional[BaseException] = None) -> Optional[str]:
    """Why the extension ``name`` (``"_C"`` or ``"_C_cuda"``) is not to be used, or None. Called
    before importing it (``error=None``: importing runs its op registrations, so one built against
    another minor release of torch must not be imported), and with the ImportError the import raised.
    A missing one gives the build's own reason when setup.py skipped it or it failed; one recorded as
    built gives the torch it was built against when that is another minor release than the torch
    imported now (another C++ ABI: unresolved symbols, or calls into the wrong layout); another patch
    release only warns, once."""
    info = build_info()
    state = info.get("extensions", {}).get(name)
    built_with = info.get("torch")
    if error is not None and state and state != "built":
        return f"not built: setup.py {'skipped' if state.startswith('skipped') else 'failed to build'} " \
               f"spare_kernels.{name} ({state.split(': ', 1)[-1]})"
    # a recorded skip or failure is reported by the import's error, not as a torch mismatch
    if isinstance(built_with, str) and built_with and state in (None, "built"):
        problem = _torch_problem(name, built_with)
        if problem is not None:
            return problem
    if error is not None:
        return f"not built: spare_kernels.{name} is missing or does not load ({error})"
    return None
