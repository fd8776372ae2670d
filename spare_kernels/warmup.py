"""``warmup(model)``: compile, in parallel and before the first step, every Triton kernel specialisation a
patched model's fused layers will launch, then (on a GPU) tune each autotuned kernel once.

Without it the first training step of a patched SD-1.5 UNet compiles its kernels one after another as
the launchers meet them (each a few seconds of ``triton.compile``: minutes in all) and tunes each
autotuned kernel per shape on the way.

How the list is made, exactly as the runtime would make it:

1. **Op calls**: one forward and backward of ``model`` on the ``meta`` device (``torch.func.functional_call``
   with meta copies of its parameters and buffers: no memory, no compute), recording every call of this
   library's ops (a ``TorchDispatchMode``): shapes, dtypes, ranks, mask kinds, which gradients backward
   asks for.
2. **Kernel launches**: each distinct call is replayed through the Triton launchers with the kernels
   swapped for recorders (nothing compiles or runs), so the launchers' own logic (which kernel, which
   constexprs, which integer arguments, how many launches) decides; autotuned kernels contribute every
   candidate their pruner keeps for the call.
3. **Specialisations**: each recorded launch goes through Triton's own binder for the target
   (``create_function_from_signature`` + ``JITFunction._pack_args``, the code ``JITFunction.run`` runs):
   integer arguments specialised as the runtime does (``== 1`` becomes a constant, multiples of 16 get
   ``tt.divisibility``), pointers by alignment. ``triton.compile`` of the result writes the very cache
   entry the runtime's JIT later looks up (same source, signature, constants, attributes, options,
   target, triton version).

Compiling needs no GPU (``target``: the GPU's own, else sm_90); tuning does: on a GPU the distinct
launches are replayed for real, one at a time, and :class:`~spare_kernels.backends.triton.utils.
BucketedAutotuner` keeps each pick on disk (token counts bucketed to powers of two), so later processes
and other batch sizes in the same bucket start tuned.

Not covered: the saliency kernels (the collector runs on an unpatched model: they are launched by
``SaliencyCollector``, not by the fused layers), and inputs whose pointers are not 16-byte aligned (the
runtime would compile one more variant for such a view; tensors the launchers allocate or make
contiguous are aligned).
"""
from __future__ import annotations

import contextlib
import hashlib
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field

import torch

# The library's ops and the Triton launcher serving each (spare_kernels/backends/triton/__init__.py).
_OPS = ("masked_lora_linear", "masked_lora_linear_backward", "masked_lora_conv2d", "masked_lora_conv2d_backward")

# Defaults of the model configs the CLI builds (no weights needed: they are built on the meta device).
SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class WarmupReport:
    """What :func:`warmup` did. ``specs``: distinct kernel specialisations (kernel, signature, constants,
    attributes, options); ``compiled`` of them newly compiled, ``cached`` already in Triton's cache;
    ``tuned`` / ``tune_cached`` / ``tune_single``: autotuned (kernel, bucketed key) pairs benchmarked now,
    read from the on-disk picks, or with one candidate; seconds per phase."""
    target: str
    op_calls: int = 0
    launches: int = 0
    specs: int = 0
    compiled: int = 0
    cached: int = 0
    failed: list = field(default_factory=list)
    tune_keys: int = 0
    tuned: int = 0
    tune_cached: int = 0
    tune_single: int = 0
    tuning: str = "skipped"
    workers: int = 1
    seconds: dict = field(default_factory=dict)
    per_kernel: dict = field(default_factory=dict)
    compile_seconds: list = field(default_factory=list)

    def summary(self) -> str:
        s = self.seconds
        kern = ", ".join(f"{k} {n}" for k, n in sorted(self.per_kernel.items()))
        lines = [f"warmup ({self.target}): {self.op_calls} distinct op calls -> {self.launches} kernel launches -> "
                 f"{self.specs} specialisations ({kern})",
                 f"  compile: {self.compiled} compiled, {self.cached} from Triton's cache, {len(self.failed)} failed, "
                 f"{self.workers} workers, {s.get('compile', 0.0):.1f} s"
                 + (f" (median {_median(self.compile_seconds):.2f} s per compiled specialisation)"
                    if self.compile_seconds else ""),
                 f"  tune: {self.tuning}; {self.tune_keys} autotuned (kernel, bucketed key) pairs"
                 + (f": {self.tuned} tuned, {self.tune_cached} from the on-disk picks, {self.tune_single} single "
                    f"candidate, {s.get('tune', 0.0):.1f} s" if self.tuning == "done" else ""),
                 f"  enumerate {s.get('enumerate', 0.0):.1f} s, total {sum(s.values()):.1f} s"]
        for f in self.failed[:10]:
            lines.append(f"  FAILED {f}")
        return "\n".join(lines)


def _median(v):
    v = sorted(v)
    return v[len(v) // 2] if v else 0.0


# ------------------------------------------------------------------------------------ 1. op calls
def _default_inputs(model, batch_size, height, width, dtype, tokens):
    cfg = getattr(model, "config", None)
    need = ("in_channels", "cross_attention_dim")
    if cfg is None or not all(hasattr(cfg, k) for k in need):
        raise ValueError("inputs: model is not a UNet2DConditionModel-like denoiser (no config.in_channels / "
                         "config.cross_attention_dim); pass inputs=(args tuple) for one forward")
    x = torch.empty(batch_size, cfg.in_channels, height, width, dtype=dtype, device="meta")
    t = torch.zeros(batch_size, dtype=torch.long, device="meta")
    e = torch.empty(batch_size, tokens, cfg.cross_attention_dim, dtype=dtype, device="meta")
    return (x, t), {"encoder_hidden_states": e}


def _split_inputs(inputs):
    """``inputs`` as ``(args, kwargs)``: a tuple of positional arguments, or ``(tuple, dict)``."""
    if (isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[0], tuple)
            and isinstance(inputs[1], dict)):
        return inputs
    if isinstance(inputs, tuple):
        return inputs, {}
    raise TypeError(f"inputs: expected a tuple of arguments or (args tuple, kwargs dict), got "
                    f"{type(inputs).__name__}")


def _meta(t, dtype=None):
    return None if t is None else torch.empty(t.shape, dtype=dtype or t.dtype, device="meta")


def _adapter_param(name):
    return ".lora_A." in name or ".lora_B." in name


@contextlib.contextmanager
def op_recorder():
    """Inside: every call of the library's masked LoRA ops (forward and backward) on any device is appended
    to the yielded list as ``(op, args)``."""
    from torch.utils._python_dispatch import TorchDispatchMode
    calls = []

    class _Rec(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, a=(), kw=None):
            name = func.overloadpacket.__name__
            if func.namespace == "spare_kernels" and name in _OPS:
                calls.append((name, tuple(a)))
            return func(*a, **(kw or {}))

    with _Rec():
        yield calls


def record_op_calls(model, inputs=None, *, batch_size=1, height=64, width=64, dtype=None, tokens=77,
                    backward=True):
    """Every call of the library's ops in one forward (and backward) of ``model``, run on the meta device:
    ``[(op, args)]``, args as the op got them (tensors on the meta device, masks as they are). ``dtype``:
    the base weights' and the inputs' dtype (the adapters keep theirs, as ``patch_unet``'s fp32 adapters
    under a 16-bit base); None: the model's own."""
    from torch.func import functional_call

    params = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        dt = None if (dtype is None or _adapter_param(n) or not p.is_floating_point()) else dtype
        params[n] = _meta(p, dt).requires_grad_(p.requires_grad)
    for n, b in model.named_buffers(remove_duplicate=False):
        dt = None if (dtype is None or not b.is_floating_point()) else dtype
        params[n] = _meta(b, dt)
    if inputs is None:
        first = next((p for n, p in model.named_parameters() if not _adapter_param(n) and p.is_floating_point()),
                     None)
        in_dt = dtype or (first.dtype if first is not None else torch.float32)
        args, kwargs = _default_inputs(model, batch_size, height, width, in_dt, tokens)
    else:
        args, kwargs = _split_inputs(inputs)

        def to_meta(v):
            if not isinstance(v, torch.Tensor):
                return v
            return _meta(v, dtype if (dtype is not None and v.is_floating_point()) else None)
        args = tuple(to_meta(a) for a in args)
        kwargs = {k: to_meta(v) for k, v in kwargs.items()}

    with op_recorder() as calls:
        out = functional_call(model, params, args, kwargs)
        if backward:
            out = getattr(out, "sample", out)
            if isinstance(out, (tuple, list)):
                out = out[0]
            if out.requires_grad:
                out.float().sum().backward()
    return calls


# ------------------------------------------------------------------------------ 2. kernel launches
@dataclass
class Launch:
    """One kernel launch the launchers made: the kernel (a ``JITFunction`` or an autotuner), its
    positional and keyword arguments."""
    kernel: object
    args: tuple
    kwargs: dict


class _Recorder:
    def __init__(self, kernel, sink):
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(Launch(self.kernel, args, kwargs))
        return launch


def _kernel_modules():
    from .backends.triton import aot
    import importlib
    return [importlib.import_module(m) for m in aot.MODULES]


def _is_kernel(obj):
    from triton.runtime.jit import KernelInterface
    return isinstance(obj, KernelInterface)


@contextlib.contextmanager
def recording(sm_count: int, gpu=None):
    """Inside: the Triton kernels of every kernel module are recorders (launches are appended to the
    yielded list, nothing compiles or runs), launchers accept tensors on any device, the SM count the
    launchers size their splits by is ``sm_count``, and the cost model's path choices are made for the GPU
    ``gpu`` (a CUDA device; None: the cost model's default for non-CUDA tensors, an H100). Not
    thread-safe (module globals are swapped)."""
    from . import costmodel
    from .backends.triton import utils as U
    if U.INTERPRET:
        raise RuntimeError("TRITON_INTERPRET is set: the kernels were decorated as interpreted functions and "
                           "cannot be compiled; run warmup without it")
    sink: list = []
    saved = []
    for mod in _kernel_modules():
        for name, obj in list(vars(mod).items()):
            if _is_kernel(obj):
                saved.append((mod, name, obj))
                setattr(mod, name, _Recorder(obj, sink))
    saved_u = (U.device_guard, U.sm_count)
    U.device_guard = lambda t: contextlib.nullcontext()
    U.sm_count = lambda t: sm_count
    gpu_model = getattr(costmodel, "_gpu_device", None)
    if gpu is not None and gpu_model is not None:   # the replay's tensors are not on the GPU: name it
        profile = gpu_model(torch.device(gpu))
        costmodel._gpu_device = lambda d: profile
    try:
        yield sink
    finally:
        U.device_guard, U.sm_count = saved_u
        if gpu_model is not None:
            costmodel._gpu_device = gpu_model
        for mod, name, obj in saved:
            setattr(mod, name, obj)


def _launcher(op):
    import importlib
    from .backends import triton as T
    module, name = T._LAUNCHERS[op]
    return getattr(importlib.import_module(f"{T.__name__}.{module}"), name)


def _arg_key(a):
    if isinstance(a, torch.Tensor):
        real = a.device.type != "meta"
        # A real tensor (a mask) matters by value only where the launcher reads it on the host (block
        # masks' tile lists); its identity is a fine proxy.
        return ("T", tuple(a.shape), str(a.dtype), id(a) if real and a.dtype == torch.bool and a.dim() == 2 else None)
    if isinstance(a, (list, tuple)):
        return tuple(_arg_key(x) for x in a)
    return a


def _materialise(a, device):
    """A meta tensor as an (uninitialised) tensor on ``device``; real tensors kept (moved to ``device``)."""
    if isinstance(a, torch.Tensor):
        if a.device.type == "meta":   # bool masks all on: every tile listed, every launch made
            return (torch.ones if a.dtype == torch.bool else torch.zeros)(a.shape, dtype=a.dtype, device=device)
        return a.to(device)
    if isinstance(a, list):
        return [_materialise(x, device) for x in a]
    return a


def _to_meta(a, keep_masks=True):
    """Tensors to the meta device, except (``keep_masks``) bool / uint8 ones, the masks, moved to the CPU:
    the launchers build weight-gradient tile lists from them on the host, which meta tensors cannot."""
    if isinstance(a, torch.Tensor) and a.device.type != "meta":
        if keep_masks and a.dtype in (torch.bool, torch.uint8):
            return a.cpu()
        return torch.empty(a.shape, dtype=a.dtype, device="meta")
    return a


def distinct_calls(calls):
    """``calls`` with duplicates (same op, shapes, dtypes, scalars) dropped, in first-seen order."""
    seen, out = set(), []
    for op, args in calls:
        k = (op, tuple(_arg_key(a) for a in args))
        if k not in seen:
            seen.add(k)
            out.append((op, args))
    return out


def replay(calls, sink=None):
    """Call the Triton launcher of each ``(op, args)`` with the cheapest arguments it takes: data on the meta
    device (free) and masks on the CPU (the launchers list weight-gradient tiles from them on the host);
    then all on the meta device; last, zeros on the CPU (a launcher computing on the host with data and
    masks together). ``sink``: the recorders' list (what a failed try recorded is dropped)."""
    for op, args in calls:
        fn = _launcher(op)
        tries = (lambda: [_to_meta(a) for a in args],
                 lambda: [_to_meta(a, keep_masks=False) for a in args],
                 lambda: [_materialise(a, "cpu") for a in args])
        n0 = len(sink) if sink is not None else 0
        for i, make in enumerate(tries):
            try:
                fn(*make())
                break
            except Exception:   # noqa: BLE001 - the next, more concrete, try
                if sink is not None:
                    del sink[n0:]
                if i == len(tries) - 1:
                    raise


def record_launches(calls, sm_count: int = 132, gpu=None):
    """Replay ``calls`` (from :func:`record_op_calls`) through the Triton launchers (:func:`replay`) with every
    kernel a recorder: ``[Launch]``. ``sm_count`` and ``gpu`` as :func:`recording`."""
    with recording(sm_count, gpu) as sink:
        replay(calls, sink)
    return list(sink)


# ----------------------------------------------------------------------------- 3. specialisations
@dataclass
class KernelSpec:
    """A compile as ``JITFunction.run`` would do it: ``triton.compile(ASTSource(fn, signature, constexprs,
    attrs), target, options)``."""
    fn: object
    signature: dict
    constexprs: dict
    attrs: dict
    options: object
    label: str

    @property
    def name(self):
        return self.fn.__name__

    @property
    def key(self):
        """Identity of the compile (what :func:`runtime_specs` returns for it)."""
        return spec_keys([self])[0]


def default_target():
    """The current GPU's ``GPUTarget``, else sm_90 (an H100 / H200, the machines this project uses)."""
    from triton.backends.compiler import GPUTarget
    if torch.cuda.is_available():
        from triton.runtime.driver import driver
        return driver.active.get_current_target()
    return GPUTarget("cuda", 90, 32)


_BINDERS: dict = {}


def _bind(jit, target, args, kwargs):
    """``(options, signature, constexprs, attrs)`` exactly as ``JITFunction.run`` computes them for this call
    on ``target`` (Triton's own binder and ``_pack_args``; the two kwargs ``run`` adds first)."""
    from triton import knobs
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    k = (id(jit), repr(target))
    if k not in _BINDERS:
        backend = make_backend(target)
        _BINDERS[k] = (backend, create_function_from_signature(jit.signature, jit.params, backend))
    backend, binder = _BINDERS[k]
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", jit.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, spec, opts = binder(*args, **kwargs)
    return jit._pack_args(backend, kwargs, bound, spec, opts)


def candidates(launch):
    """The configs an autotuned launch can run with (the autotuner's pruned set), ``[None]`` for a plain
    kernel."""
    from triton.runtime.autotuner import Autotuner
    k = launch.kernel
    if not isinstance(k, Autotuner):
        return [None]
    k.nargs = dict(zip(k.arg_names, launch.args))
    try:
        return list(k.prune_configs(launch.kwargs)) if len(k.configs) > 1 else list(k.configs)
    finally:
        k.nargs = None


def specs_of(launches, target=None):
    """Distinct :class:`KernelSpec`\\ s of ``launches`` for ``target`` (default :func:`default_target`), in
    first-seen order."""
    from .backends.triton import utils as U
    target = target or default_target()
    seen, out = set(), []
    for ln in launches:
        jit = U.jit_fn(ln.kernel)
        for cfg in candidates(ln):
            kw = dict(ln.kwargs, **(cfg.all_kwargs() if cfg is not None else {}))
            options, signature, constexprs, attrs = _bind(jit, target, ln.args, kw)
            lab = (U.config_label(cfg) if cfg is not None else
                   f"w{options.num_warps}-s{options.num_stages}")
            s = KernelSpec(jit, signature, constexprs, attrs, options, lab)
            if s.key not in seen:
                seen.add(s.key)
                out.append(s)
    return out


def tuning_keys(launches):
    """Distinct ``(kernel, bucketed key)`` pairs of the autotuned launches with more than one candidate: the
    tunings a first step pays (each a benchmark of every candidate on the GPU) when no pick is on disk,
    ``[(name, key, n_candidates)]``."""
    from .backends.triton import utils as U
    seen, out = set(), []
    for ln in launches:
        if isinstance(ln.kernel, U.BucketedAutotuner) and len(ln.kernel.configs) > 1:
            _, bkey = ln.kernel.keys_of(ln.args, ln.kwargs)
            k = (U.jit_fn(ln.kernel).__name__, bkey)
            n = len(candidates(ln))
            if k not in seen and n > 1:
                seen.add(k)
                out.append((k[0], bkey, n))
    return out


def runtime_specs(fn, target=None, sm_count: int = 132):
    """The compiles Triton's own launch path asks for while ``fn()`` runs the launchers: every kernel launch
    goes through ``JITFunction.run`` (its binder, its cache key) and every autotuned one through the
    autotuner's ``run`` (pruning, one benchmark call per candidate), against a stand-in driver for
    ``target`` (no GPU needed); ``knobs.runtime.jit_cache_hook`` records each compile request and skips it,
    so nothing compiles or runs. Every autotuned launch tunes (no pick is kept, as in a first process
    meeting each launch's key), so every candidate that could become a pick is requested. Returns
    ``[(module, kernel name, signature, constexprs, attrs, options)]`` in :attr:`KernelSpec.key`'s form:
    the independent check of :func:`specs_of` (tests, and ``aot.py``'s table); the kernels' runtime state
    (compiled-kernel caches, picks) is restored after."""
    import json

    from triton import knobs
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.driver import driver

    from .backends.triton import utils as U
    target = target or default_target()
    got = []

    class _Driver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return target

        def get_benchmarker(self):
            return lambda call, quantiles=None, **kw: (call(), [1.0, 1.0, 1.0])[1]

    def hook(*, fn, compile, **kw):
        opts = json.loads(compile["specialization_data"])["options"]
        jit = fn.jit_function
        got.append((jit.__module__, jit.__name__, repr(compile["signature"]),
                    repr(sorted(compile["constants"].items())), repr(sorted(compile["configs"][0].items())),
                    repr(sorted(opts.items()))))
        return True   # skip the compile (and so the launch)

    kernels = [obj for mod in _kernel_modules() for obj in vars(mod).values() if _is_kernel(obj)]
    jits = {id(U.jit_fn(k)): U.jit_fn(k) for k in kernels}
    saved_jit = {i: j.__dict__.get("device_caches") for i, j in jits.items()}
    saved_at = [(k, dict(k.cache), dict(getattr(k, "picks", {}))) for k in kernels if isinstance(k, Autotuner)]
    from collections import defaultdict

    class _Forget(dict):
        def __setitem__(self, k, v):
            pass

    prev_hook, prev_name = knobs.runtime.jit_cache_hook, U._device_name
    disk = (U.BucketedAutotuner._disk_get, U.BucketedAutotuner._disk_put)
    prev_driver = driver._active   # (reset_active() would create the default driver: none without a GPU)
    saved_u = (U.device_guard, U.sm_count)
    try:   # every patch inside: whatever fails half-way, the finally restores all of it
        for j in jits.values():
            j.device_caches = defaultdict(j.create_binder)
        for k, _, _ in saved_at:
            if hasattr(k, "picks"):
                k.picks = _Forget()
        U.BucketedAutotuner._disk_get = lambda self, *a: None   # no pick read or written
        U.BucketedAutotuner._disk_put = lambda self, *a: None
        driver.set_active(_Driver())
        knobs.runtime.jit_cache_hook = hook
        U._device_name = lambda: "capture"
        U.device_guard = lambda t: contextlib.nullcontext()
        U.sm_count = lambda t: sm_count
        fn()
    finally:
        U.device_guard, U.sm_count = saved_u
        knobs.runtime.jit_cache_hook = prev_hook
        U._device_name = prev_name
        driver._active = prev_driver
        U.BucketedAutotuner._disk_get, U.BucketedAutotuner._disk_put = disk
        for i, j in jits.items():
            j.device_caches = defaultdict(j.create_binder) if saved_jit[i] is None else saved_jit[i]
        for k, cache, picks in saved_at:
            k.cache = cache
            if hasattr(k, "picks"):
                k.picks = picks
            k.__dict__.pop("do_bench", None)
    return got


def spec_keys(specs):
    """:attr:`KernelSpec.key` of each spec, options as JSON would carry them (for :func:`runtime_specs`)."""
    import json
    return [(s.fn.__module__, s.fn.__name__, repr(s.signature), repr(sorted(s.constexprs.items())),
             repr(sorted(s.attrs.items())), repr(sorted(json.loads(json.dumps(s.options.__dict__)).items())))
            for s in specs]


# ------------------------------------------------------------------------------------- compiling
def is_cached(spec, target) -> bool | None:
    """Whether Triton's on-disk cache already holds ``spec`` for ``target`` (the lookup ``triton.compile``
    makes first); None where this triton's internals differ."""
    try:
        from triton._C.libtriton import get_cache_invalidating_env_vars
        from triton.compiler import ASTSource
        from triton.compiler.compiler import get_cache_key, make_backend
        from triton.runtime.cache import get_cache_manager
        backend = make_backend(target)
        src = ASTSource(spec.fn, spec.signature, spec.constexprs, spec.attrs)
        opts = backend.parse_options(dict(spec.options.__dict__, **src.parse_options()))
        key = get_cache_key(src, backend, opts, env_vars=get_cache_invalidating_env_vars())
        h = hashlib.sha256(key.encode("utf-8")).hexdigest()
        return get_cache_manager(h).get_group(f"{src.name[:150]}.json") is not None
    except Exception:   # noqa: BLE001 - only a report figure depends on it
        return None


def compile_spec(spec, target):
    """``(seconds, cached, error)`` of ``triton.compile`` for ``spec`` (writes Triton's cache)."""
    import triton
    from triton.compiler import ASTSource
    cached = is_cached(spec, target)
    t0 = time.perf_counter()
    try:
        triton.compile(ASTSource(spec.fn, spec.signature, spec.constexprs, spec.attrs), target=target,
                       options=spec.options.__dict__)
        err = None
    except Exception as e:   # noqa: BLE001 - reported per specialisation
        msg = str(e).strip().splitlines()
        err = f"{type(e).__name__}: {msg[-1] if msg else ''}"
    return time.perf_counter() - t0, cached, err


_WORK = None   # (specs, target) for forked workers (inherited, nothing pickled)


def _compile_i(i):
    specs, target = _WORK
    return compile_spec(specs[i], target)


def compile_all(specs, target, workers=None):
    """Compile ``specs`` on ``workers`` processes (forked; default: every CPU): ``[(seconds, cached, error)]``."""
    global _WORK
    workers = max(1, int(workers or os.cpu_count() or 1))
    _WORK = (specs, target)
    try:
        if workers > 1 and len(specs) > 1:
            with mp.get_context("fork").Pool(min(workers, len(specs))) as pool:
                return pool.map(_compile_i, range(len(specs)), chunksize=1)
        return [_compile_i(i) for i in range(len(specs))]
    finally:
        _WORK = None


# ------------------------------------------------------------------------------------------ tuning
def _tune(calls, device):
    """Replay ``calls`` for real on ``device`` (zeros for activations, the masks' own data), one at a time:
    every autotuned kernel tunes (or reads its pick from disk) as a training step would; compiles come
    from Triton's cache."""
    from .backends.triton import utils as U
    n0 = len(U.TUNE_LOG)
    with torch.no_grad():
        for op, args in calls:
            _launcher(op)(*[_materialise(a, device) for a in args])
    torch.cuda.synchronize(device)
    return U.TUNE_LOG[n0:]


# ------------------------------------------------------------------------------------------- warmup
def _check(batch_size, height, width, dtype, workers, tokens):
    for name, v in (("batch_size", batch_size), ("height", height), ("width", width), ("tokens", tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if dtype is not None and dtype not in DTYPES.values():
        raise TypeError(f"dtype: expected one of {tuple(DTYPES.values())} or None, got {dtype!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers: expected a positive int or None, got {workers!r}")


def warmup(model, *, batch_size: int = 1, height: int = 64, width: int = 64, dtype=torch.bfloat16,
           tokens: int = 77, inputs=None, backward: bool = True, workers=None, tune: bool | None = None,
           target=None, sm_count: int | None = None, progress: bool = True) -> WarmupReport:
    """Compile (in parallel) and tune (on a GPU) every Triton kernel the fused layers of ``model`` will
    launch for inputs of this size, before the first step; returns a :class:`WarmupReport` (printed when
    ``progress``).

    - ``model``: a patched UNet (``patch_unet``) or any module with fused layers; nothing of it is run or
      moved (one forward and backward on the meta device).
    - ``batch_size``, ``height``, ``width`` (the latent's: 64 for SD-1.5 at 512 px), ``tokens`` (text
      tokens), ``dtype`` (activations and base weights; ``None``: the model's own): the default inputs of a
      ``UNet2DConditionModel``; for other modules pass ``inputs=(args...)`` or ``(args, kwargs)``.
    - ``backward``: also the backward kernels (training); ``workers``: compile processes (default: every
      CPU); ``tune``: benchmark the autotuned kernels (default: when a CUDA device is present; needs one);
      ``target``: a triton ``GPUTarget`` (default: the GPU's, else sm_90); ``sm_count``: the SM count the
      launchers size their splits by (default: the GPU's, else 132, an H100's).

    Not thread-safe: while it lists the specialisations it swaps the launchers' kernels for recorders
    process-wide, so run it before training starts, never beside a thread that launches kernels.
    """
    _check(batch_size, height, width, dtype, workers, tokens)
    if inputs is not None:
        _split_inputs(inputs)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    from .nn.lora import _Fused
    if not any(isinstance(m, _Fused) for m in model.modules()):
        raise ValueError("model: no fused LoRA layers (patch_unet(model) first): nothing to warm up")
    gpu = torch.cuda.is_available()
    if tune and not gpu:
        raise RuntimeError("tune=True needs a CUDA device (tuning benchmarks the kernels on it)")
    tune = gpu if tune is None else bool(tune)
    target = target or default_target()
    if sm_count is None:
        sm_count = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count if gpu else 132
    rep = WarmupReport(target=f"{target.backend} sm_{target.arch}", workers=max(1, int(workers or os.cpu_count() or 1)))
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)

    t0 = time.perf_counter()
    calls = distinct_calls(record_op_calls(model, inputs, batch_size=batch_size, height=height, width=width,
                                           dtype=dtype, tokens=tokens, backward=backward))
    launches = record_launches(calls, sm_count, torch.device("cuda", torch.cuda.current_device()) if gpu else None)
    specs = specs_of(launches, target)
    keys = tuning_keys(launches)
    rep.op_calls, rep.launches, rep.specs, rep.tune_keys = len(calls), len(launches), len(specs), len(keys)
    for s in specs:
        rep.per_kernel[s.name] = rep.per_kernel.get(s.name, 0) + 1
    rep.seconds["enumerate"] = time.perf_counter() - t0
    say(f"warmup: {len(specs)} kernel specialisations for {len(calls)} distinct op calls; compiling on "
        f"{rep.workers} workers for {rep.target}")

    t0 = time.perf_counter()
    rows = compile_all(specs, target, workers)
    for s, (sec, cached, err) in zip(specs, rows):
        if err:
            rep.failed.append(f"{s.name} {s.label}: {err}")
        elif cached:
            rep.cached += 1
        else:
            rep.compiled += 1
            rep.compile_seconds.append(sec)
    rep.seconds["compile"] = time.perf_counter() - t0

    if not tune:
        rep.tuning = "skipped (no CUDA device)" if not gpu else "skipped (tune=False)"
    elif rep.failed:
        rep.tuning = "skipped (compile failures)"
    else:
        say(f"warmup: tuning {len(keys)} autotuned (kernel, shape) pairs on {torch.cuda.get_device_name()}")
        t0 = time.perf_counter()
        dev = torch.device("cuda", torch.cuda.current_device())
        log = _tune(calls, dev)
        rep.seconds["tune"] = time.perf_counter() - t0
        rep.tuning = "done"
        rep.tuned = sum(1 for r in log if r[2] == "tuned")
        rep.tune_cached = sum(1 for r in log if r[2] == "disk")
        rep.tune_single = sum(1 for r in log if r[2] == "single")
    if progress:
        print(rep.summary(), file=sys.stderr, flush=True)
    return rep


# ---------------------------------------------------------------------------------------- the CLI
def build_model(config: str = "sd15", *, rank: int = 4, mask: str = "element", target_modules="attention",
                dtype=torch.bfloat16):
    """A patched UNet for the CLI: ``sd15`` (SD-1.5's UNet config) or ``canvas`` (the shipped MiniCanvas
    UNet's config), ``rank``, every target layer masked at ``mask`` granularity (``element``, ``block``
    32×32, ``row``, ``none``: dense adapters). Built on the meta device and given uninitialised CPU storage
    in ``dtype`` (masks need data; no init compute: SD-1.5 is 1.7 GB in bf16). Only shapes matter to
    :func:`warmup`."""
    from diffusers import UNet2DConditionModel

    from .masks import Mask
    from .patch import patch_unet
    if config == "sd15":
        cfg = SD15
    elif config == "canvas":
        import json

        from .canvas import model as cm
        with open(os.path.join(cm._weights_dir(None), "unet.json")) as f:
            cfg = json.load(f)["unet_config"]
    else:
        raise ValueError(f"config: expected 'sd15' or 'canvas', got {config!r}")
    if mask not in ("element", "block", "row", "none"):
        raise ValueError(f"mask: expected element, block, row or none, got {mask!r}")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg).eval()
    unet = unet.to(dtype).to_empty(device="cpu")
    masks = None
    if mask != "none":
        from .patch import candidates as _cands
        from .targets import family_of, target_predicate
        pred = target_predicate(target_modules, family=family_of(unet))
        masks = {}
        for name, m in _cands(unet).items():
            if not pred(name, m):
                continue
            rows, cols = m.weight.shape[0], m.weight[0].numel()
            if mask == "element":
                data = torch.zeros(rows, (cols + 7) // 8, dtype=torch.uint8)
                data[:, 0] = 1
            elif mask == "row":
                data = torch.zeros(rows, dtype=torch.bool)
                data[0] = True
            else:
                data = torch.zeros(-(-rows // 32), -(-cols // 32), dtype=torch.bool)
                data[0, 0] = True
            masks[f"{name}.weight"] = Mask(mask, m.weight.shape, data, block=(32, 32))
    patch_unet(unet, masks=masks, rank=rank, target_modules=target_modules)
    return unet


# ``spare_kernels.warmup`` is this module (an import of the submodule sets the package attribute to it, so
# the package cannot also export the function under the same name): calling the module calls the function,
# so ``spare_kernels.warmup(model)`` is ``spare_kernels.warmup.warmup(model)``.
class _CallableModule(type(sys)):
    def __call__(self, *args, **kwargs):
        return warmup(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
