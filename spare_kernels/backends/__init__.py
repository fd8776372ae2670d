"""Per-device implementations of the ops, behind one registry (bitsandbytes-style).

Nothing is loaded at import: the registry imports a backend's module the first time an op needs one
(``reference`` always registers; ``cpu`` when the native extension ``spare_kernels._C`` was built).
"""
from .registry import (Entry, backend_for, backend_info, get_forced_backend, lookup, select, set_backend,
                       use_backend)

__all__ = ["Entry", "backend_for", "backend_info", "get_forced_backend", "lookup", "select", "set_backend",
           "use_backend"]
