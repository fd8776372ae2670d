"""Per-device implementations of the ops, behind one registry (bitsandbytes-style).

Importing this package registers every backend that can load here: ``reference`` always,
``cpu`` when the native extension ``spare_kernels._C`` was built.
"""
from . import reference  # noqa: F401  (registers the oracle)
from . import cpu  # noqa: F401  (registers the native CPU kernels, or warns once)
from .registry import backend_for, backend_info, get_forced_backend, select, set_backend, use_backend

__all__ = ["backend_for", "backend_info", "get_forced_backend", "select", "set_backend", "use_backend"]
