"""The package's version (the one place it is written: pyproject.toml reads it statically) and the
record of how the native extensions were built (``_build_info.json``, written by setup.py's build_ext),
so that a missing or mismatched extension can say why."""
from __future__ import annotations

import json
import os
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


def extension_problem(name: str, error: Optional[BaseException] = None) -> Optional[str]:
    """Why the extension ``name`` (``"_C"`` or ``"_C_cuda"``) is not to be used, or None. ``error``: the
    ImportError loading it raised (None: it loaded). A missing one gives the build's own reason when
    setup.py skipped it or it failed; any gives the torch it was built against when that is not the torch
    imported now (another C++ ABI: unresolved symbols, or calls into the wrong layout)."""
    import torch

    info = build_info()
    state = info.get("extensions", {}).get(name)
    built_with = info.get("torch")
    if error is not None and state and state != "built":
        return f"not built: setup.py {'skipped' if state.startswith('skipped') else 'failed to build'} " \
               f"spare_kernels.{name} ({state.split(': ', 1)[-1]})"
    if built_with and built_with != torch.__version__:
        return (f"spare_kernels.{name} was built against torch {built_with} but torch {torch.__version__} is "
                "imported: reinstall spare_kernels with this torch (pip install --no-build-isolation .)")
    if error is not None:
        return f"not built: spare_kernels.{name} is missing or does not load ({error})"
    return None
