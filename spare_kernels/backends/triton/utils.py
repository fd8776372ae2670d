"""Shared pieces of the Triton backend: interpreter detection, autotune sets, dtypes, dot precision,
the launchers' device guard, rank padding, and the ``@triton.jit`` helpers that read the mask wire
format (``spare_kernels.maskfmt``) and round dot operands. Conv kernels reuse all of it.

``TRITON_INTERPRET=1`` must be set before this package's kernel modules are imported: ``@triton.jit``
decides at decoration time whether it returns a compiled or an interpreted function.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner as _Autotuner

from ... import maskfmt as fmt
from . import interpreting

# Read once, like ``@triton.jit`` does (it decides at decoration time).
INTERPRET = interpreting()

# Largest adapter rank the kernels take: the factored kernels hold (BM, R) accumulators and the
# weight-gradient partials are (T, R) per tile; ranks up to 64 are compiled ahead of time and checked
# for spills. Launchers send larger ranks to the reference (same contract).
MAX_RANK = 64

ELEMENT, BLOCK = fmt.ELEMENT, fmt.BLOCK

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
# The same dtypes as AOT signature strings (``triton.compile`` pointer types are ``"*" + this``).
SIG_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
ACT_DTYPES = tuple(TL_DTYPES)


def tl_dtype(dt: torch.dtype):
    try:
        return TL_DTYPES[dt]
    except KeyError:
        raise TypeError(f"triton backend: unsupported dtype {dt} (expected one of {ACT_DTYPES})") from None


def dot_precision() -> str:
    """``input_precision`` of the kernels' fp32 ``tl.dot``\\ s, following torch's own fp32 matmuls:
    ``"tf32"`` when ``torch.backends.cuda.matmul.allow_tf32`` is on, ``"ieee"`` when it is off (torch's
    default). Under the interpreter numpy does the dot: ``"ieee"``. (Small epilogue contractions at
    ``"ieee"`` run as ``"tf32x3"``: see :func:`small_dot`.)"""
    if INTERPRET:
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def bf16_emulated(dtype: torch.dtype) -> bool:
    """True under the interpreter for bf16 data: numpy holds bf16 as raw uint16, so every arithmetic op
    and ``tl.dot`` on it is garbage (only the bf16<->fp32 casts are right). The kernels then carry bf16
    tiles as fp32 right after load and round dot operands through bf16 (``mm_operand``), which is
    exactly what a bf16 tensor-core dot with fp32 accumulation computes. Always False on a GPU."""
    return INTERPRET and dtype == torch.bfloat16


def rank_pad(r: int) -> int | None:
    """Rank as the kernels' constexpr ``R_PAD``: a power of two >= 16 (``tl.dot`` needs every dim >= 16;
    loads past ``r`` are masked to zero). ``None`` above :data:`MAX_RANK`."""
    if r > MAX_RANK:
        return None
    return max(16, triton.next_power_of_2(r))


RANK_PADS = (16, 32, 64)   # every value rank_pad returns (the AOT specialisations)


@contextlib.contextmanager
def device_guard(t: torch.Tensor):
    """Run a launch on ``t``'s device (and so on that device's current stream, which Triton launches on).
    CPU tensors only under the interpreter."""
    if t.device.type == "cuda":
        with torch.cuda.device(t.device):
            yield
    elif INTERPRET and t.device.type == "cpu":
        yield
    else:
        raise RuntimeError(f"triton backend: tensors on {t.device} need a CUDA device "
                           "(or TRITON_INTERPRET=1 for CPU tensors)")


def sm_count(t: torch.Tensor) -> int:
    """Streaming multiprocessors of ``t``'s GPU (1 under the interpreter: no need for parallel slack)."""
    if t.device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(t.device).multi_processor_count


# ------------------------------------------------------------------------------------- autotune
# Every autotuned kernel here goes through :func:`autotune`, so how tuning keys are bucketed and where
# results are cached is decided in one place:
# - Token counts in a key (linear's ``N`` tokens, saliency's ``T`` tokens per sample, conv's ``N`` batch:
#   its pixels are ``N·OH·OW`` with the rest of the key fixed) are rounded up to a power of two
#   (``registry.tokens_bucket``, as the GPU table's keys): a new batch size reuses the pick of its bucket
#   instead of re-tuning (each tuning benchmarks 2 configs at ~25+100 ms of ``do_bench`` each: ≈ 0.3 s per
#   kernel and shape, ≈ 80-200 shapes in a SD-1.5 training step). The masked kernels' keys also carry
#   ``skip_empty`` (block masks skip off tiles, so a block mask's pick is not an element mask's).
# - Picks are kept on disk across processes (:func:`autotune_dir`), one small JSON file per (kernel source,
#   bucketed key, GPU name, triton version, candidate configs), written atomically. Triton's own
#   ``cache_results`` (3.6 and 3.8 both have it) keys on the exact key and the architecture, not the GPU:
#   an H100 and an H200 (both sm_90) would share picks, and every batch size would still tune once.
BUCKETED = ("N", "T")
# What tuned and how, in this process: ``(kernel, bucketed key, source, seconds)``, source one of "tuned",
# "disk" (a pick from an earlier process), "single" (one candidate after pruning: nothing to tune).
TUNE_LOG: list = []


def autotune_dir() -> str:
    """Folder of the on-disk autotune picks: ``$SPARE_KERNELS_AUTOTUNE_DIR``, else ``spare_kernels_autotune``
    under ``$TRITON_CACHE_DIR`` (so the picks travel with the compiled kernels they were measured with),
    else ``~/.cache/spare_kernels/autotune``."""
    import os
    d = os.environ.get("SPARE_KERNELS_AUTOTUNE_DIR")
    if d:
        return d
    t = os.environ.get("TRITON_CACHE_DIR")
    if t:
        return os.path.join(t, "spare_kernels_autotune")
    return os.path.join(os.path.expanduser("~"), ".cache", "spare_kernels", "autotune")


def _config_id(cfg) -> str:
    """A config as text that both triton versions agree on (its kwargs and launch options)."""
    return repr(sorted((k, v) for k, v in cfg.all_kwargs().items() if v is not None))


_DEVICE_NAMES: dict = {}


def _device_name() -> str:
    """Name of the current CUDA device (the launch runs inside ``device_guard``)."""
    i = torch.cuda.current_device()
    n = _DEVICE_NAMES.get(i)
    if n is None:
        n = _DEVICE_NAMES[i] = torch.cuda.get_device_name(i)
    return n


class BucketedAutotuner(_Autotuner):
    """``triton``'s ``Autotuner`` with token counts bucketed in the key and picks kept on disk (see above).
    It decides the config itself and hands triton's ``run`` an exact-key cache entry for it, so triton's
    own benchmarking runs only when a bucket has no pick yet (same code in triton 3.6 and 3.8)."""

    def __init__(self, *args, bucket=BUCKETED, device_name=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.cache_results = False       # ours replaces triton's exact-key disk cache
        self.bucket = tuple(n for n in bucket if n in self.keys)
        self.picks: dict = {}            # bucketed key -> Config
        self.device_name = device_name   # None: the current CUDA device's (looked up per pick)

    def _dev(self) -> str:
        return self.device_name or _device_name()

    def keys_of(self, args, kwargs):
        """``(exact, bucketed)``: triton's own key for this call (the key arguments' values, then every
        argument's dtype, in argument order) and the same with token counts bucketed."""
        from ..registry import tokens_bucket
        named = {**dict(zip(self.arg_names, args)), **kwargs}
        named = {k: v for k, v in named.items() if k in self.arg_names}
        vals = [(k, named[k]) for k in self.keys if k in named]
        dts = [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
        exact = tuple([v for _, v in vals] + dts)
        bucketed = tuple([tokens_bucket(v) if k in self.bucket else v for k, v in vals] + dts)
        return exact, bucketed

    def _disk_path(self, bkey, candidates):
        import hashlib
        import os
        fn = jit_fn(self.fn)
        text = "\n".join([fn.__module__, fn.__name__, fn.cache_key, repr(bkey), self._dev(),
                          triton.__version__] + [_config_id(c) for c in candidates])
        h = hashlib.sha256(text.encode()).hexdigest()[:32]
        return os.path.join(autotune_dir(), f"{fn.__name__}-{h}.json")

    def _disk_get(self, bkey, candidates):
        import json
        try:
            with open(self._disk_path(bkey, candidates)) as f:
                want = json.load(f)["config"]
        except (OSError, ValueError, KeyError):
            return None
        return next((c for c in candidates if _config_id(c) == want), None)

    def _disk_put(self, bkey, candidates, cfg, seconds):
        import json
        import os
        import tempfile
        path = self._disk_path(bkey, candidates)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump({"kernel": jit_fn(self.fn).__name__, "key": repr(bkey), "device": self._dev(),
                           "triton": triton.__version__, "config": _config_id(cfg), "seconds": round(seconds, 3),
                           "candidates": [_config_id(c) for c in candidates]}, f)
            os.replace(tmp, path)   # atomic: a concurrent reader sees the old file or the whole new one
        except OSError as e:        # a read-only home: tuning still works, it is just not kept
            import warnings
            warnings.warn(f"spare_kernels: autotune pick not saved to {path}: {e}", stacklevel=3)

    def run(self, *args, **kwargs):
        if len(self.configs) <= 1:
            return super().run(*args, **kwargs)
        exact, bkey = self.keys_of(args, kwargs)
        cfg = self.picks.get(bkey)
        if cfg is None:
            import time
            name = jit_fn(self.fn).__name__
            self.nargs = dict(zip(self.arg_names, args))
            candidates = self.prune_configs(kwargs)
            if len(candidates) == 1:
                cfg, source = candidates[0], "single"
            else:
                cfg, source = self._disk_get(bkey, candidates), "disk"
            if cfg is None:   # tune (triton benchmarks each candidate on the device), then launch
                self.cache.pop(exact, None)
                t0 = time.perf_counter()
                ret = super().run(*args, **kwargs)
                took = time.perf_counter() - t0
                cfg = self.best_config
                self.picks[bkey] = cfg
                self._disk_put(bkey, candidates, cfg, took)
                TUNE_LOG.append((name, bkey, "tuned", took))
                return ret
            self.picks[bkey] = cfg
            TUNE_LOG.append((name, bkey, source, 0.0))
        self.cache[exact] = cfg
        return super().run(*args, **kwargs)


def autotune(configs, key, prune_configs_by=None, reset_to_zero=None, restore_value=None, bucket=BUCKETED,
             **kwargs):
    """``triton.autotune`` with :class:`BucketedAutotuner`: ``bucket`` names the key arguments that are token
    counts (bucketed to powers of two; names not in ``key`` are ignored)."""
    def decorator(fn):
        return BucketedAutotuner(fn, fn.arg_names, configs, key, reset_to_zero, restore_value,
                                 prune_configs_by=prune_configs_by, bucket=bucket, **kwargs)
    return decorator


# -------------------------------------------------------------------------------- autotune sets
# Three classes of dot, each with its own autotune set: "mma16" (16-bit operands: tensor cores),
# "tf32" (fp32 operands at "tf32": tensor cores, but operand tiles twice the registers of 16-bit ones),
# "fma" (fp32 at "ieee": Triton lowers it to FMAs, each thread holding whole operand slices, so about
# twice the registers again: smaller K steps, more warps per tile). Each launch prunes the autotune set
# to its class (``pruner``); ``aot.py`` compiles each class's set for the dtypes of that class.
def dot_class(dt: torch.dtype, prec: str, fp32_dots: bool = False) -> str:
    """Class of a kernel's main dots: fp32 when the activations are (or when ``fp32_dots``: a kernel whose
    main dots are fp32 whatever the activations), at precision ``prec``; else 16-bit."""
    if dt == torch.float32 or fp32_dots:
        return "fma" if prec == "ieee" else "tf32"
    return "mma16"


# GEMM-shaped kernels (forward x·W_effᵀ, backward dy·W_eff): BM tokens × BN outputs, K step BK. Every
# program rebuilds its W_eff tile (a BN×BK×R rank-r dot) per K step, so the delta's cost relative to
# the main GEMM is R/BM: tall token tiles amortise it. Registers: the fp32 W_eff tile (BN×BK), the
# accumulator (BM×BN) and one 16-rank chunk of B and A live together; the factored kernels add a
# (BM, R) accumulator. ``aot.py`` checks every entry below for spills on sm_80 and sm_90.
_C = triton.Config
_GEMM = {
    "mma16": [
        # Many tokens (SD UNet self-attention / FF at 64×64 latents: N = batch·4096): the classic
        # A100/H100 128×128 tile, 8 warps; BK 32 keeps the fp32 W_eff tile at 16 KiB; 3 stages of x/W
        # tiles fit the 164/228 KiB of shared memory easily.
        _C({"BM": 128, "BN": 128, "BK": 32}, num_warps=8, num_stages=3),
        # Few tokens or narrow layers (cross-attention K/V projections of the text embedding: N =
        # batch·77; 320-channel blocks): 64×64 tiles give 4× the programs so 108/132 SMs are busy;
        # 4 stages hide latency when each program has little work.
        _C({"BM": 64, "BN": 64, "BK": 32}, num_warps=4, num_stages=4),
    ],
    "tf32": [
        # fp32 activations at tf32: 128×64 rather than 128×128 (fp32 operand fragments are twice as
        # large as 16-bit ones; 128×128 spills on sm_80 at rank 64).
        _C({"BM": 128, "BN": 64, "BK": 32}, num_warps=8, num_stages=3),
        # Few tokens: 64×64 with 8 warps (4 warps spill on sm_80 in three kernels).
        _C({"BM": 64, "BN": 64, "BK": 32}, num_warps=8, num_stages=3),
    ],
    "fma": [
        # fp32 "ieee" (torch's allow_tf32 off): K step 16 and 8 warps keep the FMA dot's operand
        # slices in registers (64×64×32 with 4 warps spills; 3 stages spill at rank 64 on sm_90).
        _C({"BM": 64, "BN": 64, "BK": 16}, num_warps=8, num_stages=2),
        # Few tokens: 32-token tiles (4 warps spill at rank 64).
        _C({"BM": 32, "BN": 64, "BK": 16}, num_warps=8, num_stages=3),
    ],
}
# Rank 64 (R_PAD 64: four rank chunks per W_eff tile, a (BM, 64) accumulator in the factored kernels):
# the sets that do not spill there.
_GEMM_R64 = {
    # 128×128 spills in the forward on sm_80: 128×64 with 8 warps.
    "mma16": [_C({"BM": 128, "BN": 64, "BK": 32}, num_warps=8, num_stages=3), _GEMM["mma16"][1]],
    "tf32": _GEMM["tf32"],
    # 64×64 spills in the factored kernels on sm_80 (336-440 B): 32×64 only.
    "fma": [_GEMM["fma"][1]],
}

# Saliency: one program per BO×BI weight tile loops over samples and tokens (K = tokens, step BT); the
# fp32 G tile and the fp32 running statistic both stay in registers (2 × 16 KiB at 64×64).
_SALIENCY = {
    "mma16": [
        # Default: 64×64 tiles, 64-token steps, 8 warps (two fp32 64×64 tiles = 32 registers/thread).
        triton.Config({"BO": 64, "BI": 64, "BT": 64}, num_warps=8, num_stages=3),
        # Few tokens per sample (T <= 32: 8×8 latents, text tokens): a 32-token step wastes less on the
        # masked tail of each sample; 32×64 tiles double the programs for small layers (8 warps: with
        # 4, ptxas spills a few bytes on sm_80 / sm_90).
        triton.Config({"BO": 32, "BI": 64, "BT": 32}, num_warps=8, num_stages=3),
    ],
    "tf32": [
        # fp32 operands: 32-token steps keep the two fp32 operand tiles at the 16-bit set's bytes.
        triton.Config({"BO": 64, "BI": 64, "BT": 32}, num_warps=8, num_stages=3),
        triton.Config({"BO": 32, "BI": 64, "BT": 32}, num_warps=8, num_stages=3),
    ],
    "fma": [
        # fp32 at "ieee": 16-token K steps (FMA dots hold whole K slices in registers).
        triton.Config({"BO": 64, "BI": 64, "BT": 16}, num_warps=8, num_stages=3),
        triton.Config({"BO": 32, "BI": 64, "BT": 16}, num_warps=8, num_stages=2),
    ],
}

# The one config under the interpreter (it pays ~ms per program per K step): few, large programs.
_INTERP_GEMM = triton.Config({"BM": 32, "BN": 128, "BK": 128}, num_warps=4, num_stages=1)
_INTERP_SALIENCY = triton.Config({"BO": 128, "BI": 128, "BT": 32}, num_warps=4, num_stages=1)


def _unique(cfgs):
    out = []
    for c in cfgs:
        if not any(c is o for o in out):
            out.append(c)
    return out


def gemm_configs(cls: str | None = None, r_pad: int | None = None):
    """The GEMM kernels' autotune set for dot class ``cls`` and padded rank ``r_pad`` (everything, for
    the ``triton.autotune`` decorator, when ``cls`` is None)."""
    if INTERPRET:
        return [_INTERP_GEMM]
    if cls is None:
        return _unique([c for t in (_GEMM, _GEMM_R64) for v in t.values() for c in v])
    return list((_GEMM_R64 if r_pad is not None and r_pad >= 64 else _GEMM)[cls])


def saliency_configs(cls: str | None = None, r_pad: int | None = None):
    """The saliency kernel's autotune set for dot class ``cls`` (``r_pad`` unused: same signature as
    :func:`gemm_configs` for :func:`pruner`)."""
    if INTERPRET:
        return [_INTERP_SALIENCY]
    return list(_SALIENCY[cls]) if cls else _unique([c for v in _SALIENCY.values() for c in v])


def pruner(table_fn, act_arg: str, fp32_dots_arg: str | None = None):
    """``early_config_prune`` for ``triton.autotune``: keep the configs of the launch's dot class (from
    the activation argument's dtype, the ``DOT_PREC`` constexpr and, for kernels whose main dots can be
    fp32 under 16-bit activations, the constexpr named ``fp32_dots_arg``) and padded rank (``R_PAD``)."""
    def prune(configs, named_args, **kwargs):
        if INTERPRET:
            return configs
        fp32 = bool(kwargs.get(fp32_dots_arg, False)) if fp32_dots_arg else False
        keep = table_fn(dot_class(named_args[act_arg].dtype, kwargs["DOT_PREC"], fp32), kwargs.get("R_PAD"))
        return [c for c in configs if any(c is k for k in keep)]
    return prune


# Weight-gradient (dA/dB) tiles are square T×T, chosen by the launcher (not autotuned: the list of
# launched tiles and the partials buffer depend on T). Candidates, first = default when the block
# mask's sizes are not multiples of any (then the mask is read per entry):
#   GPU: 64 (16 KiB fp32 G tile, 64-token steps: enough reuse to not be L2-bound), 32 for 32-aligned
#   block masks (so tiles match blocks and off blocks cost nothing). Interpreter: 128 then 32.
WGRAD_TILES = (128, 32) if INTERPRET else (64, 32)
# (tokens per K step of G = dyᵀ·x, warps, stages) per dot class: 8 warps hold the fp32 64×64 G tile and
# the epilogue contractions' operands ((M⊙G)·Aᵀ, Bᵀ·(M⊙G), 16 ranks at a time) in at most ~130 registers;
# fp32 G dots take shorter token steps (tf32 operands are twice the bytes; FMA dots hold whole K slices).
_WGRAD = {"mma16": (64, 8, 3), "tf32": (32, 8, 3), "fma": (16, 8, 3)}


def wgrad_params(cls: str):
    """``(BT, num_warps, num_stages)`` of the weight-gradient kernel."""
    return (32, 4, 1) if INTERPRET else _WGRAD[cls]


REDUCE_WARPS = 4


def wgrad_tile(kind: int, block_o: int, block_i: int) -> int:
    """Square weight tile of the dA/dB kernel: for block masks the largest candidate dividing both block
    sizes (tiles then never straddle an on and an off block), else the default."""
    if kind == BLOCK:
        for t in sorted(WGRAD_TILES, reverse=True):
            if block_o % t == 0 and block_i % t == 0:
                return t
    return WGRAD_TILES[0]


# ------------------------------------------------------------------------ conv autotune sets
# conv.py's implicit-GEMM kernels: BM output (or, in dx, input) pixels × BN output (dx: input) channels,
# K step BK channels of one tap. Their register use is not linear's: every K step gathers its x / dy
# tile through per-pixel offsets and padding masks, the masked kernels read W, the mask and A at columns
# c·kh·kw + tap, and dx_factored adds a rank-r step per tap. So each kernel has its own lists, per dot
# class and padded rank: every entry was compiled for sm_80 and sm_90 (``aot.py``, ptxas -v) from
# candidates around linear's sets, and these are the ones without spills with triton 3.6 (what the GPU
# machines run) and 3.8 (CI) alike (the two allocate differently: 18 compiles of picks made against 3.8
# alone spilled 8-228 B under 3.6, mostly on sm_80, hence BK 16 or 2 stages where noted). ptxas often caps
# 8-warp kernels near 128 registers and spills a few bytes to gain occupancy, so the picks are not
# monotone in tile size. The first entry of each list is for many pixels (SD-1.5 at a 64×64 latent: N·4096),
# the second for few (the 8×8 blocks: N·64 pixels, 1280 channels); 4-warp 64×64 16-bit tiles, linear's
# few-token choice, spill here at rank 64 (fwd_factored 240 B, dx_masked 56 B on sm_80) or sit at 236-255
# registers, so 8 warps throughout.
def _cc(BM, BN, BK, w, st):
    return triton.Config({"BM": BM, "BN": BN, "BK": BK}, num_warps=w, num_stages=st)


_C128x64 = _cc(128, 64, 32, 8, 3)       # the 16-bit / tf32 "many pixels" tile (128×128 reaches 255 registers)
_C64x128 = _cc(64, 128, 32, 8, 3)       # dx_masked rank 16: 128×64 spills 8 B on sm_80 there
_C64x64 = _cc(64, 64, 32, 8, 3)         # few pixels (16-bit, tf32)
_C128x64k16 = _cc(128, 64, 16, 8, 3)    # tf32 factored kernels where the BK 32 tile spills (16-64 B on sm_80)
_C64x64k16 = _cc(64, 64, 16, 8, 3)      # tf32 fwd_factored rank 64 few pixels (BK 32: 255 registers)
_C128x64s2 = _cc(128, 64, 32, 8, 2)    # tf32 fwd_masked rank 64 (3 stages: 8 B of spills on sm_80, 3.6)
_C128x64k16s2 = _cc(128, 64, 16, 8, 2)  # tf32 dx_factored (3 stages: 20 B at rank 64, sm_80, 3.6)
_F64x64 = _GEMM["fma"][0]               # fp32 "ieee": linear's 64×64×16, 8 warps, 2 stages
_F32x64 = _GEMM["fma"][1]               # and its 32×64×16, 3 stages
_F64x32 = _cc(64, 32, 16, 8, 2)         # fma where 64×64 spills (rank 32/64: 24-316 B)
_F64x32s3 = _cc(64, 32, 16, 8, 3)       # fma dx_factored rank 32 (2 stages: 20 B, 3.6)
_F32x64s2 = _cc(32, 64, 16, 8, 2)       # fma fwd_masked rank 64 (3 stages spill 316 B on sm_90)
_CONV_GEMM = {
    "fwd_masked": {"mma16": {16: [_C128x64, _C64x64]},
                   "tf32": {16: [_C128x64, _C64x64], 64: [_C128x64s2, _C64x64]},
                   "fma": {16: [_F64x64, _F32x64], 32: [_F64x32, _F32x64], 64: [_F64x64, _F32x64s2]}},
    "fwd_factored": {"mma16": {16: [_C128x64, _C64x64]},
                     "tf32": {16: [_C128x64k16, _C64x64k16]},   # BK 32: 16-72 B on sm_80 under 3.6
                     "fma": {16: [_F64x64, _F32x64], 64: [_F64x32]}},
    "dx_masked": {"mma16": {16: [_C64x128, _C64x64], 32: [_C128x64, _C64x64]},
                  "tf32": {16: [_C128x64k16, _C64x64]},   # BK 32: 76-124 B on sm_80 under 3.6
                  "fma": {16: [_F64x64, _F32x64]}},
    "dx_factored": {"mma16": {16: [_C128x64k16, _C64x64]},   # BK 32: 20-228 B on sm_80 under 3.6
                    "tf32": {16: [_C128x64k16s2, _C64x64k16]},
                    "fma": {16: [_F64x64, _F32x64], 32: [_F64x32s3, _F32x64]}},
}
CONV_KERNELS = tuple(_CONV_GEMM)


def _by_rank(table, r_pad):
    """``table[r]`` for the largest listed ``r <= r_pad`` (a list holds from its rank up to the next)."""
    return table[max(r for r in table if r <= (r_pad or 16))]


def conv_gemm_configs(kernel: str, cls: str | None = None, r_pad: int | None = None):
    """Autotune set of conv kernel ``kernel`` (``CONV_KERNELS``) for dot class ``cls`` and padded rank
    ``r_pad`` (everything, for the ``triton.autotune`` decorator, when ``cls`` is None)."""
    if INTERPRET:
        return [_INTERP_GEMM]
    t = _CONV_GEMM[kernel]
    if cls is None:
        return _unique([c for per in t.values() for v in per.values() for c in v])
    return list(_by_rank(t[cls], r_pad))


def conv_table(kernel: str):
    """``conv_gemm_configs`` of one kernel as a ``(cls, r_pad)`` table function (for :func:`pruner`)."""
    return lambda cls=None, r_pad=None: conv_gemm_configs(kernel, cls, r_pad)


# Conv weight-gradient kernel: (pixels per K step, warps, stages) per dot class and tile T (the launcher
# picks T as linear's, ``wgrad_tile``). Each step gathers a (T, BT) x tile with per-(column, pixel) padding
# masks, so the steps are shorter than linear's: 16-bit BT 64 at T 64 sits at 240-255 registers; 16-bit
# T 32 with 4 warps spills 8 B on sm_90 under triton 3.6 (8 warps: 64-127 registers, none); tf32 T 64
# spills 40 B on sm_80 with 3 stages; fma T 64 spills 32-40 B with 3 stages.
_CONV_WGRAD = {("mma16", 64): (32, 8, 3), ("mma16", 32): (32, 8, 3),
               ("tf32", 64): (32, 8, 2), ("tf32", 32): (16, 8, 3),
               ("fma", 64): (16, 8, 2), ("fma", 32): (16, 8, 3)}


def conv_wgrad_params(cls: str, T: int):
    """``(BT, num_warps, num_stages)`` of the conv weight-gradient kernel for tile ``T``."""
    return (32, 4, 1) if INTERPRET else _CONV_WGRAD[(cls, T)]


# Conv saliency: linear's sets, except fp32 "ieee" few-pixel tile: 32×64×16 spills in the per-sample
# variant on sm_80 with every stage / warp count tried under one of triton 3.6 and 3.8 (60-168 B);
# 32×32 with 4 warps and 3 stages spills under neither (157-193 registers).
_SALIENCY_CONV_F32x32 = triton.Config({"BO": 32, "BI": 32, "BT": 16}, num_warps=4, num_stages=3)
_SALIENCY_CONV = dict(_SALIENCY, fma=[_SALIENCY["fma"][0], _SALIENCY_CONV_F32x32])


def conv_saliency_configs(cls: str | None = None, r_pad: int | None = None):
    """The conv saliency kernel's autotune set for dot class ``cls`` (as :func:`saliency_configs`)."""
    if INTERPRET:
        return [_INTERP_SALIENCY]
    return list(_SALIENCY_CONV[cls]) if cls else _unique([c for v in _SALIENCY_CONV.values() for c in v])


# ------------------------------------------------------------------------------- jit helpers
@triton.jit
def load_act(ptrs, mask, EMUL_BF16: tl.constexpr):
    """Load an activation-dtype tile (zeros where masked); as fp32 when emulating bf16 (interpreter)."""
    t = tl.load(ptrs, mask=mask, other=0.0)
    if EMUL_BF16:
        t = t.to(tl.float32)
    return t


@triton.jit
def mm_operand(t, ACT: tl.constexpr, EMUL_BF16: tl.constexpr):
    """``t`` rounded to the activation dtype, the dtype the tensor cores consume (fp32: unchanged). When
    emulating bf16 the rounded value is carried as fp32 (same products, fp32 accumulation)."""
    if EMUL_BF16:
        return t.to(ACT).to(tl.float32)
    else:
        return t.to(ACT)


@triton.jit
def small_dot(a, b, DOT_PREC: tl.constexpr):
    """An fp32 contraction over a rank-sized (or weight-tile-sized) K in an epilogue. At ``"ieee"`` it
    runs as ``"tf32x3"`` (three tensor-core passes on split operands, about fp32's accuracy): Triton's
    FMA lowering of an fp32 dot keeps whole K slices of both operands in registers, which spills for
    K = 64. The main K loops keep torch's precision exactly."""
    if DOT_PREC == "ieee" and a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="tf32x3")
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)


def mask_geometry(kind: int, block_o: int = 1, block_i: int = 1):
    """``(row_div, col_div, bit_mask)`` of :func:`mask_tile` for an ELEMENT or BLOCK wire mask."""
    if kind == ELEMENT:
        return 1, 8, 7
    if kind == BLOCK:
        return max(block_o, 1), max(block_i, 1), 0
    raise ValueError(f"mask_geometry: kind {kind} is not element or block")


@triton.jit
def mask_tile(mask_ptr, row_stride, rows, cols, n_rows, n_cols, row_div, col_div, bit_mask):
    """Entries ``(rows[:, None], cols[None, :])`` of an ELEMENT or BLOCK wire mask as an int1 tile, one
    formula for both (``mask_geometry``): entry ``(i, j)`` is bit ``j & bit_mask`` of byte
    ``[i // row_div, j // col_div]``.

    - ELEMENT (uint8 ``(n_rows, ceil(n_cols/8))``, LSB first): ``row_div 1, col_div 8, bit_mask 7``.
    - BLOCK (bool viewed as uint8, ``(ceil(n_rows/bo), ceil(n_cols/bi))``, one 0/1 byte per block):
      ``row_div bo, col_div bi, bit_mask 0`` (any block size; a tile inside one block reads one address).

    Out-of-range entries are off. ``rows`` must be int64 where ``n_rows·row_stride`` can pass 2**31. The 8
    lanes reading one byte hit one cached address, so no shuffle is needed to spread bits."""
    valid = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    byte = tl.load(mask_ptr + (rows // row_div)[:, None] * row_stride + (cols // col_div)[None, :],
                   mask=valid, other=0)
    bit = (cols & bit_mask).to(tl.uint8)
    return ((byte >> bit[None, :]) & 1) != 0


@triton.jit
def any_on(on):
    """Scalar: does the int1 tile have any entry on (the branch that skips off tiles)."""
    return tl.max(tl.max(on.to(tl.int32), axis=1), axis=0) > 0


@triton.jit
def grouped_tile(pid, n_m, n_n, GROUP_M: tl.constexpr):
    """Program id -> (tile row, tile col), GROUP_M rows of tiles at a time so concurrently running
    programs share weight tiles in L2 (the standard Triton matmul swizzle)."""
    in_group = GROUP_M * n_n
    group = pid // in_group
    first_m = group * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


# ------------------------------------------------------------------------------- AOT helpers
class Spec:
    """One ahead-of-time specialisation of a kernel: the raw ``JITFunction``, its signature (argument ->
    triton type string; ``"constexpr"`` for constexprs), the constexpr values, and launch options.
    Kernel modules return theirs from a module-level ``aot_specs()``; ``aot.py`` compiles them."""

    __slots__ = ("fn", "signature", "constexprs", "num_warps", "num_stages", "label")

    def __init__(self, fn, signature, constexprs, num_warps, num_stages, label):
        self.fn, self.signature, self.constexprs = fn, signature, constexprs
        self.num_warps, self.num_stages, self.label = num_warps, num_stages, label

    @property
    def name(self):
        return self.fn.__name__


def jit_fn(kernel):
    """The ``JITFunction`` under an ``Autotuner`` (or other wrapper), or the function itself."""
    from triton.runtime.jit import JITFunction
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def make_spec(kernel, types: dict, constexprs: dict, num_warps: int, num_stages: int, label: str) -> Spec:
    """A :class:`Spec` for ``kernel``: ``types`` gives every runtime argument's type (``"*fp16"``, ``"i32"``,
    ``"fp32"``), ``constexprs`` every constexpr's value; each of the kernel's arguments must be named
    exactly once (checked, so a kernel change that forgets its AOT list fails the AOT step)."""
    fn = jit_fn(kernel)
    names = list(fn.arg_names)
    missing = [n for n in names if n not in types and n not in constexprs]
    extra = [n for n in list(types) + list(constexprs) if n not in names]
    if missing or extra:
        raise ValueError(f"{fn.__name__}: AOT spec missing {missing}, unknown {extra}")
    sig = {n: ("constexpr" if n in constexprs else types[n]) for n in names}
    return Spec(fn, sig, dict(constexprs), num_warps, num_stages, label)


def ptr(dt: torch.dtype) -> str:
    """AOT signature type of a pointer to ``dt`` data."""
    return "*" + SIG_DTYPES[dt]


def config_label(cfg) -> str:
    """``BM128-BN128-BK32-w8-s3`` for a ``triton.Config``."""
    kw = "-".join(f"{k}{v}" for k, v in cfg.kwargs.items())
    return f"{kw}-w{cfg.num_warps}-s{cfg.num_stages}"
