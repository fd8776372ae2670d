"""Backend registry: which implementation runs each op, chosen per op, device and activation dtype.

Backends in priority order (fastest first); ``reference`` runs on any device and is the oracle.
What a backend can do is data: one frozen :class:`Entry` per (op, backend). Backends load on first
use, not at ``import spare_kernels`` (so importing the package, or ``spare_kernels.masks``, loads no
compiled extension and no triton).

Forcing: ``SPARE_KERNELS_BACKEND`` or :func:`set_backend` set the process default; :func:`use_backend`
scopes a choice to the current context (a ``contextvars.ContextVar``, like ``torch.no_grad`` is
thread-local): two threads with overlapping scopes never see each other's choice. A new thread starts
from the process default; run work in ``contextvars.copy_context().run`` to carry a scope into it.
A forced backend runs every op it implements on that device; an activation dtype outside its
``dtypes`` runs the reference (e.g. fp64 gradcheck under a forced ``cpu``). Forcing a backend that has
no implementation of an op for that device raises, naming why.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib
import os
import threading
from typing import Callable, Optional

import torch

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
# The modules that register each backend, imported on first use. A backend whose module cannot
# register anything here notes why (see note_unavailable).
_MODULES = {"reference": "spare_kernels.backends.reference", "cpu": "spare_kernels.backends.cpu",
            "triton": "spare_kernels.backends.triton", "cuda": "spare_kernels.backends.cuda"}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One backend's implementation of one op, and what it can do."""
    op: str
    backend: str
    fn: Callable
    devices: tuple[str, ...] = ("any",)                 # device types served; "any": every device
    dtypes: Optional[tuple[torch.dtype, ...]] = None    # activation dtypes served; None: every dtype
    adapter_dtypes: Optional[tuple[torch.dtype, ...]] = None   # lora_A / lora_B dtypes served; None: every
    # Device types served only when this backend is forced, never picked by default (the Triton
    # kernels on CPU tensors under TRITON_INTERPRET=1: a verification mode, far slower than ``cpu``).
    forced_devices: tuple[str, ...] = ()
    # An eager op with its own (C++) autograd over the same kernels: no Python autograd node per call.
    # Eager calls with a frozen weight and bias take it when the forward entry and the backward entry
    # chosen both name it (an entry registered over one of them without it keeps the Python path).
    autograd_twin: Optional[Callable] = None
    # Whether a create_graph backward through this backend is exact by itself (its backward is built
    # from differentiable torch ops). If not, the ops layer runs the reference's formulas for such a
    # backward (see spare_kernels/ops/masked_lora.py): exact double backward on every backend.
    double_backward: bool = False

    def serves(self, device: str, dtype: Optional[torch.dtype] = None, forced: bool = False,
               adapter_dtype: Optional[torch.dtype] = None) -> bool:
        return (("any" in self.devices or device in self.devices or (forced and device in self.forced_devices))
                and (dtype is None or self.dtypes is None or dtype in self.dtypes)
                and (adapter_dtype is None or self.adapter_dtypes is None or adapter_dtype in self.adapter_dtypes))


_IMPLS: dict[tuple[str, str], Entry] = {}
_NOTES: dict[str, str] = {}     # backend -> why it is unavailable (shown by backend_info)
_LOADED: set[str] = set()
_LOCK = threading.RLock()
_CHOICE: dict[tuple, Entry] = {}   # (op, device, dtype, adapter dtype, forced) -> Entry; cleared on register


def _check_backend(name, what="backend"):
    if name is not None and name not in BACKENDS:
        raise ValueError(f"{what}: expected one of {BACKENDS} or None, got {name!r}")
    return name


_default: Optional[str] = _check_backend(os.environ.get("SPARE_KERNELS_BACKEND") or None, "SPARE_KERNELS_BACKEND")
_UNSET = object()
_scoped: contextvars.ContextVar = contextvars.ContextVar("spare_kernels_backend", default=_UNSET)


def register(op: str, backend: str, fn: Callable, *, devices=("any",), dtypes=None, adapter_dtypes=None,
             forced_devices=(), autograd_twin=None, double_backward: bool = False) -> Entry:
    """Register ``fn`` as ``backend``'s implementation of ``op`` (the contract of ``reference.py``)."""
    if op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    _check_backend(backend)
    e = Entry(op, backend, fn, tuple(devices), None if dtypes is None else tuple(dtypes),
              None if adapter_dtypes is None else tuple(adapter_dtypes), tuple(forced_devices), autograd_twin,
              bool(double_backward))
    with _LOCK:
        _IMPLS[(op, backend)] = e
        _CHOICE.clear()
    return e


def note_unavailable(backend: str, why: str) -> None:
    """Record why ``backend`` registers nothing here (not built, not installed, no device...)."""
    _NOTES[backend] = why


def _load(backend: str) -> None:
    if backend in _LOADED:
        return
    with _LOCK:
        if backend in _LOADED:
            return
        _LOADED.add(backend)
        try:
            importlib.import_module(_MODULES[backend])
        except ModuleNotFoundError as e:
            if e.name != _MODULES[backend]:
                raise
            note_unavailable(backend, "not part of this version of spare_kernels")


def _load_all() -> None:
    for b in reversed(BACKENDS):   # the reference first: other backends may fall back to it
        _load(b)


def get_forced_backend() -> Optional[str]:
    """The backend forced in this context (a :func:`use_backend` scope, else the process default)."""
    v = _scoped.get()
    return _default if v is _UNSET else v


def set_backend(name: Optional[str]) -> None:
    """Force ``name`` for every op, process-wide (``None``: the fastest available per device). A
    :func:`use_backend` scope in effect still wins inside it."""
    global _default
    _default = _check_backend(name)


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """Force ``name`` (``None``: none) in this context only, until the block ends."""
    token = _scoped.set(_check_backend(name))
    try:
        yield
    finally:
        _scoped.reset(token)


def _choose(op: str, device: str, dtype, adapter_dtype, forced) -> Entry:
    _load_all()
    if forced is not None:
        e = _IMPLS.get((op, forced))
        if e is None or not e.serves(device, forced=True):
            why = _NOTES.get(forced) or (f"it runs on {', '.join(e.devices + e.forced_devices)} tensors only"
                                         if e is not None else "it has no implementation of this op")
            raise RuntimeError(f"spare_kernels: backend {forced!r} is forced (SPARE_KERNELS_BACKEND / set_backend / "
                               f"use_backend) but cannot run {op} on {device!r}: {why}")
        if e.serves(device, dtype, True, adapter_dtype):
            return e
        return _IMPLS[(op, "reference")]   # a dtype outside the forced backend's lists: the oracle
    for b in BACKENDS:
        e = _IMPLS.get((op, b))
        if e is not None and e.serves(device, dtype, False, adapter_dtype):
            return e
    raise RuntimeError(f"spare_kernels: no backend implements {op} on {device!r} for {dtype}")


# ------------------------------------------------------------------- per-shape GPU choice
# Where two GPU backends (and the reference, the plain ATen composition) serve an op, the faster one per
# shape is data: the table that `python -m benchmarks.gpu --write-table PATH` writes from its measured
# layer and saliency sections (docs/backends.md, "Choosing between triton and cuda"), read from
# ``SPARE_KERNELS_GPU_TABLE`` or, if unset, the package's ``backends/gpu_table.json``. A shape it does
# not list (or no table) takes the priority order of BACKENDS.
_TABLE_FILE = os.path.join(os.path.dirname(__file__), "gpu_table.json")
_table: Optional[dict] = None


def shape_key(*parts) -> str:
    """The table's key of one call: the op's shape description (mask kind, out, cols, rank, tokens
    bucketed to the next power of two...), as the ops layer builds it."""
    return ":".join(str(p) for p in parts)


def tokens_bucket(n: int) -> int:
    """``n`` rounded up to a power of two: calls of similar size share a table entry."""
    return 1 << max(0, int(n) - 1).bit_length()


def gpu_table() -> dict:
    """``{op: {shape_key: backend}}`` of the measured GPU table in use ({} when there is none)."""
    global _table
    if _table is None:
        path = os.environ.get("SPARE_KERNELS_GPU_TABLE") or _TABLE_FILE
        t = {}
        if os.path.exists(path):
            import json
            try:
                with open(path) as f:
                    doc = json.load(f)
                t = doc["choices"]
                if not isinstance(t, dict) or not all(isinstance(v, dict) for v in t.values()):
                    raise ValueError("'choices' must map op -> {shape key: backend}")
                for op, m in t.items():
                    for k, b in m.items():
                        _check_backend(b, f"{path}: choices[{op!r}][{k!r}]")
            except (OSError, ValueError, KeyError) as e:
                raise RuntimeError(f"SPARE_KERNELS_GPU_TABLE: {path} is not a table written by "
                                   f"`python -m benchmarks.gpu --write-table` ({e})") from e
        elif os.environ.get("SPARE_KERNELS_GPU_TABLE"):
            raise RuntimeError(f"SPARE_KERNELS_GPU_TABLE: no such file {path!r}")
        _table = t
    return _table


def set_gpu_table(table: Optional[dict]) -> None:
    """Use ``table`` (``{op: {shape_key: backend}}``; ``None``: reload from the file) for the per-shape
    choice on CUDA."""
    global _table
    if table is not None:
        for op, m in table.items():
            if op not in OPS:
                raise ValueError(f"table: expected ops from {OPS}, got {op!r}")
            for b in m.values():
                _check_backend(b, f"table[{op!r}]")
    with _LOCK:
        _table = None if table is None else {op: dict(m) for op, m in table.items()}
        _CHOICE.clear()


def lookup(op: str, device: str, dtype: Optional[torch.dtype] = None,
           adapter_dtype: Optional[torch.dtype] = None, shape: Optional[str] = None) -> Entry:
    """The :class:`Entry` that runs ``op`` on ``device`` for activations of ``dtype`` (and adapters of
    ``adapter_dtype``) now; on CUDA with no backend forced, ``shape`` (a :func:`shape_key`) picks the
    measured fastest backend from the GPU table when it lists that shape, else the one the cost model
    predicts fastest (masked-LoRA ops, where two GPU backends serve the call)."""
    forced = get_forced_backend()
    if shape is not None and (forced is not None or device != "cuda"):
        shape = None
    key = (op, device, dtype, adapter_dtype, forced, shape)
    e = _CHOICE.get(key)
    if e is None:
        e = None
        if shape is not None:
            b = gpu_table().get(op, {}).get(shape)
            cand = _IMPLS.get((op, b)) if b is not None else None
            if cand is not None and cand.serves(device, dtype, False, adapter_dtype):
                e = cand
            elif b is None:
                e = _modelled(op, device, dtype, adapter_dtype, shape)
        if e is None:
            e = _choose(op, device, dtype, adapter_dtype, forced)
        _CHOICE[key] = e
    return e


def _modelled(op: str, device: str, dtype, adapter_dtype, shape: str) -> Optional[Entry]:
    """A shape no measured table lists: the backend the cost model predicts fastest among the GPU backends
    that serve the call (``spare_kernels.costmodel.choose_backend``); None where fewer than two do, or
    for ops the model does not cover (then the priority order decides)."""
    if not op.startswith("masked_lora_"):
        return None
    _load_all()
    cands = [b for b in BACKENDS if b != "reference" and (op, b) in _IMPLS
             and _IMPLS[(op, b)].serves(device, dtype, False, adapter_dtype)]
    if len(cands) < 2:
        return None
    from .. import costmodel
    kind, out, cols, rank, tokens = (int(v) for v in shape.split(":"))
    return _IMPLS[(op, costmodel.choose_backend(op, kind, tokens, out, cols, rank, cands, dtype=dtype,
                                                device=device))]


def select(op: str, device: str, dtype: Optional[torch.dtype] = None,
           adapter_dtype: Optional[torch.dtype] = None) -> Callable:
    return lookup(op, device, dtype, adapter_dtype).fn


def reference(op: str) -> Callable:
    """The oracle's implementation of ``op``."""
    _load("reference")
    return _IMPLS[(op, "reference")].fn


def backend_for(op: str, device: str, dtype: Optional[torch.dtype] = torch.float32) -> str:
    """Name of the backend that runs ``op`` on ``device`` (for ``dtype`` activations) now."""
    return lookup(op, device, dtype).backend


def entries() -> dict[tuple[str, str], Entry]:
    """Every registered (op, backend) -> Entry, all backends loaded."""
    _load_all()
    return dict(_IMPLS)


def runnable(device: str) -> list[str]:
    """Backends that implement every op on ``device`` here (forced, where only forcing reaches it), in
    priority order."""
    _load_all()
    return [b for b in BACKENDS if all((op, b) in _IMPLS and _IMPLS[(op, b)].serves(device, forced=True) for op in OPS)]


def _dtype_names(dtypes):
    return None if dtypes is None else [str(d).replace("torch.", "") for d in dtypes]


def backend_info() -> dict:
    """What runs where, and why a backend is unavailable:

    ``{"ops": {op: {device: backend}}`` (fp32 activations), ``"forced": name|None``,
    ``"available": {backend: [ops]}``, ``"unavailable": {backend: why}``,
    ``"backends": {backend: {op: {"devices", "dtypes", "autograd_twin", "double_backward"}}}}``."""
    _load_all()
    ops = {}
    for op in OPS:
        ops[op] = {}
        for dev in DEVICES:
            try:
                ops[op][dev] = backend_for(op, dev)
            except RuntimeError:
                ops[op][dev] = None
    available = {b: sorted(op for (op, bb) in _IMPLS if bb == b) for b in BACKENDS}
    detail = {b: {op: {"devices": list(e.devices), "forced_devices": list(e.forced_devices),
                       "dtypes": _dtype_names(e.dtypes), "adapter_dtypes": _dtype_names(e.adapter_dtypes),
                       "autograd_twin": e.autograd_twin is not None,
                       "double_backward": "exact (own backward)" if e.double_backward else "exact (reference formulas)"}
                  for (op, bb), e in sorted(_IMPLS.items()) if bb == b}
              for b in BACKENDS}
    return {"ops": ops, "forced": get_forced_backend(),
            "available": {b: v for b, v in available.items() if v},
            "unavailable": {b: why for b, why in _NOTES.items() if not available.get(b)},
            "backends": {b: v for b, v in detail.items() if v}}
