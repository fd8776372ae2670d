"""The library on ``torch.distributed``: saliency reduced across ranks into sharded scores, an exact
top-k over those shards, and the masks every rank ends with, checked by a digest.

Everything here runs on whatever process group torch.distributed already has (NCCL on GPUs, gloo on
CPUs; ``torchrun`` and ``accelerate launch`` make it); nothing is home-made below the collectives.
With no process group, or inside :func:`local`, the world is one rank and nothing communicates.

**Sharding.** Score tensors are owned whole, one rank each (:func:`shard_plan`): a tensor of more than
``BUCKET_ELEMS / N`` entries is a bucket of its own (reduced to its owner); the others form buckets of
consecutive tensors of at most ``BUCKET_ELEMS`` entries, in which the tensors go to the least loaded
rank, largest first, so a bucket's reduce-scatter pads each rank's piece to at most about twice its
even share. Whole tensors keep every unit (a block, row or module mean) on one
rank, computed by the same code in the same order as on one process, so the masks match
:func:`~spare_kernels.topk.topk_masks` on the full scores bit for bit.

**Reduction.** :func:`reduce_scatter_scores` sums each bucket over the ranks with one reduce-scatter
(each rank receives only what it owns; a bucket of one tensor is a reduce to its owner): a rank
holds ``1/N`` of the reduced scores instead of all of them, and sends ``(N-1)/N`` of the score bytes
instead of an all-reduce's ``2(N-1)/N``. :func:`sharded_saliency` does it during each backward
(:class:`_Stream`): a bucket goes out as soon as its layers' statistics are complete and the
collector's accumulators for it are freed, so the local statistics held at once are the buckets
still in progress (FLUX.1-dev, every layer but the modulation: 0.23-0.30 GB instead of the full
34.5 GB fp32 on every rank; ``python -m benchmarks.distributed bytes``).

**Top-k** (:func:`sharded_topk_masks`): ``scope="global"`` runs the generic engine's radix select on
each rank's own tensors, with each level's histogram (65536 int64 bins, 512 KiB) all-reduced, so every
rank finds the same threshold; the units equal to it are counted per tensor and all-reduced, which
gives each tensor its share of the ties in dict order, exactly as on one process.
``scope="per_module"`` needs no exchange at all. Its working set besides its own scores is a few
chunk-sized temporaries (keys, bool flags, ~20 MiB) and its own masks. Each rank then packs its masks
and all-gathers them (element masks: 1 bit per weight entry), in rounds of ``GATHER_BYTES`` per rank
copied into each mask's own buffer: every rank ends with the whole mask set (FLUX.1-dev, every layer
but the modulation: 1.08 GB), plus its own packed share and one round while gathering, never a second
copy of the set.

**What a rank holds.** The plan assigns whole tensors greedily to the least loaded rank, so a rank
owns at most ``total // N`` plus the largest tensor's entries (FLUX.1-dev at N = 8: 1.02x the even
share); in the reduction, its owned shard plus the buckets in progress and one bucket's pieces; in
the top-k, its shard and the temporaries above. The whole model's weights and, after the gather, the
whole mask set are on every rank: data parallelism replicates them.

**Faults.** A collective that fails (a rank died, or stopped with an error) raises
:class:`DistributedError` naming this rank and the step, instead of hanging; a rank that is alive but
stuck is caught by the process group's timeout (:func:`init_from_env`: ``SPARE_KERNELS_DIST_TIMEOUT``
seconds, default 600). An error that one rank finds in its own data (NaN scores in its shard) is
agreed on first, so every rank raises it, naming the tensor.
"""
from __future__ import annotations

import atexit
import contextlib
import contextvars
import datetime
import hashlib
import os
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from .masks import Mask, _check_block, _matrix_shape
from .topk import _CACHE_UNITS, _CHUNK, _build, _histogram, _Keys, _radix, _Source, _validate

TIMEOUT_ENV = "SPARE_KERNELS_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
# Entries per reduce-scatter bucket: the transient of one bucket is its fp32 pieces plus this rank's
# received share; 2**25 entries (128 MiB) keeps it far below SD-1.5's 3.4 GB of scores while the
# bucket count stays small (28 for SD-1.5's 860M entries).
BUCKET_ELEMS = 1 << 25
# Bytes per rank per round of the mask all-gather: a round's buffer is N x 32 MiB (256 MiB at N = 8)
# while every rank fills the whole mask set (FLUX.1-dev, every layer but the modulation: 1.08 GB of
# element masks), where one all-gather needed the N x share buffer and then a copy of every mask out
# of it (at N = 8: 1.37 GB besides the set, now 0.54 GB: the round, this rank's masks and its packed
# share); SD-1.5's 107 MB of masks are one round from N = 4 on.
GATHER_BYTES = 1 << 25


class DistributedError(RuntimeError):
    """A collective failed or disagreed: another rank died, raised, timed out, or holds other data."""


@dataclass(frozen=True)
class World:
    """This process's place in the process group: ``rank`` of ``size``; ``device`` is where collective
    tensors must live (the current CUDA device under NCCL, else the CPU)."""
    rank: int = 0
    size: int = 1
    group: object = None   # None: the default group
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = ""

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __str__(self):
        return f"rank {self.rank} of {self.size}"


_LOCAL = contextvars.ContextVar("spare_kernels_dist_local", default=False)


def current_world(group=None) -> World:
    """The default process group (or ``group``) as a :class:`World`; one rank when torch.distributed
    is not initialised or inside :func:`local`."""
    if _LOCAL.get() or not (dist.is_available() and dist.is_initialized()):
        return World()
    backend = str(dist.get_backend(group))
    dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    # The default group stays None (what collectives take for it): a World held past
    # destroy_process_group() must not keep the group alive into interpreter teardown, where gloo's
    # threads abort the process (1 in 6 four-rank runs here did, destroy or not).
    return World(dist.get_rank(group), dist.get_world_size(group), group, dev, backend)


@contextlib.contextmanager
def local():
    """Run as one rank even under a process group (each rank's own whole jobs, no communication)."""
    tok = _LOCAL.set(True)
    try:
        yield
    finally:
        _LOCAL.reset(tok)


def _env_int(name) -> Optional[int]:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"{name}: expected an integer (set by torchrun / accelerate launch), got {v!r}") from None


def launched() -> bool:
    """Whether this process was started as one of several ranks (``WORLD_SIZE`` > 1 in the environment,
    as ``torchrun``, ``accelerate launch`` and other torch.distributed launchers set it)."""
    n = _env_int("WORLD_SIZE")
    return n is not None and n > 1


def timeout_seconds() -> float:
    """The collective timeout: ``SPARE_KERNELS_DIST_TIMEOUT`` seconds (default 600)."""
    v = os.environ.get(TIMEOUT_ENV)
    if v is None or v == "":
        return DEFAULT_TIMEOUT_S
    try:
        t = float(v)
    except ValueError:
        t = -1.0
    if not (t > 0 and t != float("inf")):
        raise ValueError(f"{TIMEOUT_ENV}: expected a positive number of seconds, got {v!r}")
    return t


def local_device(device_type: str) -> torch.device:
    """This rank's device of ``device_type``: ``cuda:LOCAL_RANK`` for CUDA under a launcher, else the
    CPU (or the current CUDA device)."""
    if device_type != "cuda":
        return torch.device(device_type)
    lr = _env_int("LOCAL_RANK")
    return torch.device("cuda", lr if lr is not None else torch.cuda.current_device())


def init_from_env(device_type: Optional[str] = None, timeout_s: Optional[float] = None) -> World:
    """Initialise the default process group from the launcher's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``) when this process is one of several ranks and none exists yet:
    NCCL when ``device_type`` is ``"cuda"`` (the rank's GPU is ``LOCAL_RANK``), else gloo; collective
    timeout :func:`timeout_seconds` (or ``timeout_s``). A group made by the caller (or by accelerate)
    is used as it is. A group made here is destroyed at exit (:func:`close_group`) unless the caller
    did so first. Returns the :class:`World`."""
    if launched() and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s if timeout_s is not None else timeout_seconds())
        if device_type == "cuda":
            torch.cuda.set_device(local_device("cuda"))
            dist.init_process_group("nccl", timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
        # Left to interpreter teardown, gloo's worker threads abort the process ("terminate called
        # without an active exception", exit -6) after a run that succeeded: half of 12 four-rank
        # runs of one all_gather did so here. atexit runs while the interpreter is still whole.
        _MADE[0] = True
        atexit.register(close_group, own_only=True)
    return current_world()


_MADE = [False]   # whether the default group is one init_from_env made (not the caller's, not accelerate's)


def close_group(own_only: bool = False) -> bool:
    """Destroy the default process group, if there is one (a failure to do so is swallowed: the group
    is already broken); with ``own_only``, only a group :func:`init_from_env` made. -> whether one was
    destroyed."""
    if not (dist.is_available() and dist.is_initialized()) or (own_only and not _MADE[0]):
        return False
    _MADE[0] = False
    try:
        dist.destroy_process_group()
    except Exception:   # noqa: BLE001 (already broken: whatever is being reported matters, not this)
        pass
    return True


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else type(e).__name__


def _run(world: World, what: str, fn: Callable, *args, **kwargs):
    """One collective; a failure becomes a :class:`DistributedError` naming the rank and the step."""
    try:
        return fn(*args, group=world.group, **kwargs)
    except DistributedError:
        raise
    except (RuntimeError, ValueError, ConnectionError, TimeoutError) as e:
        raise DistributedError(f"{world}: {what}: a collective failed; another rank stopped (died or raised), "
                               f"timed out or cannot be reached ({type(e).__name__}: {_first_line(e)})") from e


def _on(world, t):
    return t if t.device == world.device else t.to(world.device)


def all_reduce(t: torch.Tensor, world: World, what: str, op=None) -> torch.Tensor:
    """Sum (or ``op``) of ``t`` over the ranks; returns a tensor on ``t``'s device (``t`` itself when it
    already lives where the backend needs it)."""
    if not world.distributed:
        return t
    x = _on(world, t)
    _run(world, what, dist.all_reduce, x, op=op if op is not None else dist.ReduceOp.SUM)
    return x if x.device == t.device else x.to(t.device)


def all_gather_object(obj, world: World, what: str) -> list:
    if not world.distributed:
        return [obj]
    out = [None] * world.size
    _run(world, what, dist.all_gather_object, out, obj)
    return out


def broadcast_object(obj, world: World, what: str, src: int = 0):
    """``obj`` of rank ``src`` on every rank."""
    if not world.distributed:
        return obj
    box = [obj if world.rank == src else None]
    _run(world, what, dist.broadcast_object_list, box, src=src)
    return box[0]


def agree(world: World, error: Optional[str], what: str) -> None:
    """Every rank says whether it failed (``error``: its message, or None); if any did, every rank
    raises ``ValueError`` with each failing rank's message, so none waits in a later collective."""
    errs = all_gather_object(error, world, what)
    bad = [(r, e) for r, e in enumerate(errs) if e is not None]
    if bad:
        raise ValueError("; ".join(f"rank {r}: {e}" for r, e in bad) if world.distributed else bad[0][1])


def check_same(world: World, fields: dict, what: str) -> None:
    """Refuse to go on unless every rank holds the same ``fields`` (a dict of comparable values):
    ``ValueError`` on every rank naming each field that differs and the ranks' values."""
    every = all_gather_object(fields, world, what)
    diff = []

    def compare(name, vals):
        if all(isinstance(v, dict) for v in vals):   # name the entries that differ (config.seed)
            for sub in dict.fromkeys(k for v in vals for k in v):
                compare(f"{name}.{sub}", [v.get(sub) for v in vals])
        elif any(v != vals[0] for v in vals[1:]):
            diff.append(f"{name} (" + ", ".join(f"rank {r}: {str(v)[:120]!s}" for r, v in enumerate(vals)) + ")")
    for k in fields:
        compare(k, [f.get(k) for f in every])
    if diff:
        raise ValueError(f"{what}: the ranks differ in " + "; ".join(diff))


# ============================================================================================ sharding
@dataclass(frozen=True)
class ShardPlan:
    """Which rank owns each score tensor (whole), and the reduce-scatter buckets (tensor indices)."""
    names: tuple
    shapes: tuple
    owner: tuple
    buckets: tuple
    size: int

    def owned(self, rank: int) -> List[str]:
        return [n for n, o in zip(self.names, self.owner) if o == rank]

    def numel(self, i: int) -> int:
        n = 1
        for d in self.shapes[i]:
            n *= d
        return n

    def owned_numel(self, rank: int) -> int:
        return sum(self.numel(i) for i, o in enumerate(self.owner) if o == rank)


def shard_plan(shapes: Dict[str, tuple], world_size: int, bucket_elems: int = BUCKET_ELEMS) -> ShardPlan:
    """Deterministic ownership of whole tensors (the same on every rank for the same ``shapes``, in
    their order). A tensor of more than ``bucket_elems / world_size`` entries is a bucket of its own
    (a reduce to its owner: no padding); the others form buckets of consecutive tensors of at most
    ``bucket_elems`` entries. Largest first within a bucket, each tensor goes to the least loaded
    rank (load counted over the whole plan; ties to the lower rank)."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: expected an int >= 1, got {world_size!r}")
    names = tuple(shapes)
    shp = tuple(tuple(int(d) for d in shapes[n]) for n in names)
    sizes = []
    for s in shp:
        n = 1
        for d in s:
            n *= d
        sizes.append(n)
    buckets, cur, cur_n = [], [], 0
    big = bucket_elems // world_size
    for i, n in enumerate(sizes):
        if cur and (n > big or cur_n + n > bucket_elems):
            buckets.append(tuple(cur))
            cur, cur_n = [], 0
        if n > big:
            buckets.append((i,))
            continue
        cur.append(i)
        cur_n += n
    if cur:
        buckets.append(tuple(cur))
    owner, load = [0] * len(names), [0] * world_size
    for b in buckets:
        for i in sorted(b, key=lambda i: (-sizes[i], i)):
            r = min(range(world_size), key=lambda r: (load[r], r))
            owner[i] = r
            load[r] += sizes[i]
    return ShardPlan(names, shp, tuple(owner), tuple(buckets), world_size)


def _reduce_scatter(world, out, inp, what):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    _run(world, what, fn, out, inp)


def _all_gather(world, out, inp, what):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    _run(world, what, fn, out, inp)


def _deliverer(plan: ShardPlan, out: dict, transform):
    """``deliver(name, flat, own)``: a reduced tensor (flat) into ``out``, through ``transform``, added to
    what ``out`` holds; ``own``: the memory of ``flat`` is the caller's to give (kept without a copy)."""
    where = {n: i for i, n in enumerate(plan.names)}

    def deliver(name, v, own):
        v = v.view(plan.shapes[where[name]])
        if transform is not None:
            t = transform(v)
            own = own or t.untyped_storage().data_ptr() != v.untyped_storage().data_ptr()
            v = t
        if name in out:
            out[name] += v
        else:
            out[name] = v if own else v.clone()
    return deliver


def _reduce_bucket(world: World, plan: ShardPlan, b: tuple, get: Callable, deliver: Callable, what: str,
                   own: bool = False) -> None:
    """Sum bucket ``b`` (plan indices) over the ranks, each tensor to its owner. ``get(i)``: this rank's
    tensor of index ``i`` (consumed: a reduce works in place on it); ``deliver(name,
    flat, own)`` receives this rank's sums; ``own``: ``get``'s tensors are ours to keep."""
    if not world.distributed:
        for i in b:
            deliver(plan.names[i], get(i).float().reshape(-1), own)
        return
    if len(b) == 1:   # one tensor: a reduce to its owner (no padded pieces for the others)
        i = b[0]
        n, r = plan.names[i], plan.owner[i]
        x = _on(world, get(i).detach().float().contiguous().view(-1))
        _run(world, f"{what} ({n})", dist.reduce, x, dst=r)
        if world.rank == r:
            deliver(n, x, own)
        return
    mine = {r: [i for i in b if plan.owner[i] == r] for r in range(world.size)}
    length = max(sum(plan.numel(i) for i in ix) for ix in mine.values())
    dev = world.device
    inp = torch.zeros(world.size, length, dtype=torch.float32, device=dev)
    for r, ix in mine.items():
        o = 0
        for i in ix:
            k = plan.numel(i)
            inp[r, o:o + k].copy_(get(i).detach().reshape(-1))
            o += k
    got = torch.empty(length, dtype=torch.float32, device=dev)
    _reduce_scatter(world, got, inp.view(-1), what)
    del inp
    o = 0
    for i in mine[world.rank]:
        k = plan.numel(i)
        deliver(plan.names[i], got[o:o + k], False)
        o += k


def reduce_scatter_scores(scores: Dict[str, torch.Tensor], world: World, plan: ShardPlan,
                          into: Optional[Dict[str, torch.Tensor]] = None,
                          transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                          what: str = "saliency reduce-scatter") -> Dict[str, torch.Tensor]:
    """The sum over ranks of every tensor of ``scores`` (the plan's names, each rank its local part),
    delivered to its owner only: ``{name: fp32 tensor}`` for this rank's tensors. ``transform`` is
    applied to each reduced tensor (e.g. ``abs`` per batch); with ``into`` (a previous result), the
    results are added to it in place. ``scores`` is consumed (a reduce may use it as scratch)."""
    out = {} if into is None else into
    deliver = _deliverer(plan, out, transform)
    if not world.distributed:
        for n in plan.names:
            v = scores[n].float()
            deliver(n, v.reshape(-1), v is not scores[n])
        return out
    for b in plan.buckets:
        _reduce_bucket(world, plan, b, lambda i: scores[plan.names[i]], deliver, what)
    return out


def _graph_task_id() -> int:
    f = getattr(torch._C, "_current_graph_task_id", None)   # private; -1 outside a backward
    return f() if f is not None else -1


class _Stream:
    """Reduces a :class:`~spare_kernels.saliency.SaliencyCollector`'s statistics bucket by bucket
    while each backward runs, so a rank never holds the full-size local statistics.

    A forward hook on every target (after the collector's own) counts the layer's calls and hooks its
    output after the collector's gradient hook: when a layer's last call of the forward has been
    reduced into its accumulator, the layer is complete. Buckets are launched in one fixed order,
    the plan's reversed (a backward reaches the last layers first), each as soon as it and every
    bucket before it in that order are complete, so every rank issues the same collectives whatever
    order its hooks fire in; the bucket's accumulators are taken from the collector (freed once
    reduced). After the backward, the rest are launched in the same order (a layer no backward
    reached on this rank sends zeros). The buckets, and what each sums, are those of
    :func:`reduce_scatter_scores`: the same sums, bit for bit.

    A layer's calls made inside a backward (gradient checkpointing's recomputation) are not counted;
    where their outputs get a gradient (reentrant checkpointing) the layer waits for the end of the
    backward, and one whose bucket went out already raises (its sum would be incomplete)."""

    def __init__(self, col, plan: ShardPlan, world: World, transform, what: str):
        self.col, self.plan, self.world, self.what = col, plan, world, what
        self.index = {n: i for i, n in enumerate(plan.names)}
        self.bucket_of = {i: j for j, b in enumerate(plan.buckets) for i in b}
        self.order = list(reversed(range(len(plan.buckets))))
        self.owned: Dict[str, torch.Tensor] = {}
        self.hit = set()
        self.deliver = _deliverer(plan, self.owned, transform)
        dev = {t.key: t.layer.weight.device for t in col.targets}
        self.devices = [dev[n] for n in plan.names]
        self.local_peak_bytes = 0       # most bytes of local accumulators held at once
        self.in_backward_buckets = 0    # buckets launched from the hooks, during a backward
        self.launched_buckets = 0
        self._active = False
        self._handles = [t.hooked.register_forward_hook(partial(self._forward, self.index[t.key]), with_kwargs=True)
                         for t in col.targets]

    def close(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    def _begin(self):
        n, nb = len(self.plan.names), len(self.plan.buckets)
        self.calls, self.fired = [0] * n, [0] * n
        self.waits, self.done = [False] * n, [False] * n
        self.missing = [len(b) for b in self.plan.buckets]
        self.launched = [False] * nb
        self.next = 0

    def backward(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` (a forward and its backward), streaming the reductions; then launch the rest."""
        self._begin()
        self._active = True
        try:
            fn()
        finally:
            self._active = False
        while self.next < len(self.order):
            self._launch(self.order[self.next])
            self.next += 1
        self.col.reset()

    def _forward(self, i, module, args, kwargs, output):
        if not self._active or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) \
                or not output.requires_grad:
            return None
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        if not isinstance(x, torch.Tensor):
            return None
        rerun = _graph_task_id() != -1
        if not rerun:
            self.calls[i] += 1
        output.register_hook(partial(self._grad, i, rerun, [False]))
        return None

    def _grad(self, i, rerun, fired, grad):
        if fired[0] or not self._active:
            return None
        fired[0] = True
        b = self.bucket_of[i]
        if rerun:   # a recomputed forward that gets a gradient: count it at the end of the backward
            if self.launched[b]:
                raise RuntimeError(f"sharded_saliency: {self.plan.names[i]!r} received a gradient through a "
                                   f"forward recomputed in the backward after its statistic was reduced "
                                   f"(reentrant checkpointing of a layer also called outside it); use "
                                   f"non-reentrant checkpointing (use_reentrant=False)")
            if self.done[i]:
                self.done[i] = False
                self.missing[b] += 1
            self.waits[i] = True
            return None
        self.fired[i] += 1
        if not self.waits[i] and not self.done[i] and self.fired[i] == self.calls[i]:
            self.done[i] = True
            self.missing[b] -= 1
            while self.next < len(self.order) and self.missing[self.order[self.next]] == 0:
                self._launch(self.order[self.next])
                self.in_backward_buckets += 1
                self.next += 1
        return None

    def _take(self, i):
        # The collector's accumulator, handed over (it no longer holds it); zeros for a layer this
        # rank's backward did not reach, as scores(all_targets=True) gives them.
        name = self.plan.names[i]
        v = self.col.take(name)
        if v is None:
            return torch.zeros(self.plan.shapes[i], dtype=torch.float32, device=self.devices[i])
        self.hit.add(name)
        return v

    def _launch(self, b):
        live = self.col.held_bytes
        self.local_peak_bytes = max(self.local_peak_bytes, live)
        self.launched[b] = True
        self.launched_buckets += 1
        _reduce_bucket(self.world, self.plan, self.plan.buckets[b], self._take, self.deliver, self.what, own=True)


def sharded_saliency(module, batches, loss_fn, stat: str, target_modules, world: World, stream: bool = True,
                     stats: Optional[dict] = None, bucket_elems: int = BUCKET_ELEMS):
    """Saliency of ``module`` over ``batches`` (this rank's share of each global batch; every rank
    the same number of batches), summed over the ranks into this rank's shard of the scores:
    ``(owned scores, plan)``, for the layers whose backward ran on some rank (as
    ``SaliencyCollector.scores()`` on one process). ``loss_fn(module, batch)`` must weight the rank's
    loss by its share of the batch, so the sums are one process's on the whole batches.

    ``stream=True`` (default): each batch's statistics are reduced during its backward, bucket by
    bucket, as soon as the layers of a bucket are done (:class:`_Stream`), so a rank holds its owned
    share plus the accumulators of the buckets not yet complete, never the full-size local
    statistics. ``grad_abs`` is ``|Σ g|`` of each global batch: the ranks collect ``signed`` sums,
    made absolute once reduced (for a layer called several times in one forward that is
    ``|Σ_calls G|``, where one process takes ``Σ_calls |G|``; a diffusers UNet or transformer calls
    each layer once). The other statistics are reduced batch by batch too and the batches' sums added
    in batch order (one process adds every sample into one buffer: equal up to float rounding).

    ``stream=False``: the whole local statistics are collected first (a full-size fp32 buffer per
    rank), then reduced (``grad_abs``: after every batch; the others once, after the last batch).
    For ``grad_abs``, or one batch, both give the same sums bit for bit; for the other statistics
    over several batches they differ in the order of the float additions only.

    ``stats``: a dict that receives ``local_peak_bytes`` (the most local accumulator bytes held at a
    bucket's launch), ``buckets`` and ``in_backward_buckets`` (launched from the hooks).
    ``bucket_elems``: :func:`shard_plan`'s."""
    from .saliency import SaliencyCollector
    per_batch = stat == "grad_abs"
    owned, hit = None, set()
    with SaliencyCollector(module, stat="signed" if per_batch else stat, target_modules=target_modules) as col:
        # the shapes from the weights themselves: no score buffer is allocated before the first backward
        plan = shard_plan({t.key: tuple(t.layer.weight.shape) for t in col.targets}, world.size, bucket_elems)
        if stream:
            st = _Stream(col, plan, world, torch.abs if per_batch else None, "saliency reduce-scatter")
            try:
                for batch in batches:
                    st.backward(lambda: loss_fn(module, batch).backward())
            finally:
                st.close()
            owned, hit = st.owned, st.hit
            if stats is not None:
                stats.update(local_peak_bytes=st.local_peak_bytes, buckets=st.launched_buckets,
                             in_backward_buckets=st.in_backward_buckets)
        else:
            for batch in batches:
                loss_fn(module, batch).backward()
                hit.update(col.scores())   # layers whose backward ran: one process scores only those
                if per_batch:
                    owned = reduce_scatter_scores(col.scores(all_targets=True), world, plan, into=owned,
                                                  transform=torch.abs)
                    col.reset()
            if not per_batch or owned is None:
                owned = reduce_scatter_scores(col.scores(all_targets=True), world, plan)
            if stats is not None:
                stats.update(local_peak_bytes=4 * sum(plan.numel(i) for i in range(len(plan.names))),
                             buckets=0, in_backward_buckets=0)
    # A layer no rank's backward reached has no score on one process either: drop it everywhere.
    flags = all_reduce(torch.tensor([int(n in hit) for n in plan.names], dtype=torch.int64), world, "saliency layers")
    if not bool(flags.all()):
        keep = [i for i, f in enumerate(flags.tolist()) if f]
        plan = ShardPlan(tuple(plan.names[i] for i in keep), tuple(plan.shapes[i] for i in keep),
                         tuple(plan.owner[i] for i in keep), (), plan.size)
    owned = {n: owned[n] for n in plan.owned(world.rank) if n in owned}
    return owned, plan


# ============================================================================================ top-k
def _mask_bytes(shape, granularity, block) -> int:
    rows, cols = _matrix_shape(tuple(shape))
    if granularity == "element":
        return rows * ((cols + 7) // 8)
    if granularity == "block":
        return (-(-rows // block[0])) * (-(-cols // block[1]))
    if granularity == "row":
        return rows
    return 1


def _mask_payload(m) -> torch.Tensor:
    """The bytes of a ``Mask``'s data, or of a dense bool mask tensor."""
    d = m.data if isinstance(m, Mask) else m.detach()
    return (d.view(torch.uint8) if d.dtype == torch.bool else d).reshape(-1)


def _mask_from_payload(flat: torch.Tensor, shape, granularity, block) -> Mask:
    """The ``Mask`` of its payload bytes ``flat`` (an element mask keeps ``flat``'s memory)."""
    rows, cols = _matrix_shape(tuple(shape))
    if granularity == "element":
        return Mask._trusted("element", torch.Size(shape), flat.view(rows, (cols + 7) // 8))
    if granularity == "block":
        grid = (-(-rows // block[0]), -(-cols // block[1]))
        return Mask("block", torch.Size(shape), flat.view(grid).bool(), block=block)
    if granularity == "row":
        return Mask("row", torch.Size(shape), flat.bool())
    return Mask("module", torch.Size(shape), flat.view(()).bool())


def masks_digest(masks: dict) -> str:
    """SHA-256 over every mask's name, granularity, shape and bits, in order (equal digests: equal
    masks); ``Mask`` objects or dense bool tensors (the baselines' masks)."""
    h = hashlib.sha256()
    for n, m in masks.items():
        h.update(f"{n}|{getattr(m, 'granularity', 'dense')}|{tuple(m.shape)}|".encode())
        h.update(_mask_payload(m).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def gather_masks(owned: Dict[str, Mask], plan: ShardPlan, granularity: str, block, world: World,
                 device=None, round_bytes: Optional[int] = None) -> Dict[str, Mask]:
    """Every rank's masks on every rank, in the plan's order: each rank's packed masks, all-gathered
    in rounds of at most ``round_bytes`` (default :data:`GATHER_BYTES`) per rank, each round's pieces
    copied into the masks' own buffers. A rank holds the whole mask set (its result) plus its own
    packed share and one round's ``N × round_bytes``, never a second copy of the set."""
    if not world.distributed:
        return {n: owned[n] for n in plan.names}
    step = GATHER_BYTES if round_bytes is None else int(round_bytes)
    if step < 1:
        raise ValueError(f"round_bytes: expected a positive number of bytes, got {round_bytes!r}")
    sizes = [_mask_bytes(s, granularity, block) for s in plan.shapes]
    streams = [[i for i, o in enumerate(plan.owner) if o == r] for r in range(world.size)]
    length = max(max(sum(sizes[i] for i in ix) for ix in streams), 1)
    dev = world.device
    mine = torch.zeros(length, dtype=torch.uint8, device=dev)
    o = 0
    for i in streams[world.rank]:
        mine[o:o + sizes[i]].copy_(_mask_payload(owned[plan.names[i]]))
        o += sizes[i]
    out_dev = dev if device is None else torch.device(device)
    bufs = [torch.empty(k, dtype=torch.uint8, device=out_dev) for k in sizes]
    step = min(step, length)
    every = torch.empty(world.size * step, dtype=torch.uint8, device=dev)
    pos, start = [0] * world.size, [0] * world.size   # per rank: its next mask, and where that one begins
    for lo in range(0, length, step):
        hi = min(length, lo + step)
        got = every[:world.size * (hi - lo)]
        _all_gather(world, got, mine[lo:hi], "mask all-gather")
        got = got.view(world.size, hi - lo)
        for r, ix in enumerate(streams):
            while pos[r] < len(ix):
                i = ix[pos[r]]
                a, e = start[r], start[r] + sizes[i]
                if max(a, lo) < min(e, hi):
                    bufs[i][max(a, lo) - a:min(e, hi) - a].copy_(got[r, max(a, lo) - lo:min(e, hi) - lo])
                if e > hi:
                    break
                pos[r], start[r] = pos[r] + 1, e
    del every, mine
    return {n: _mask_from_payload(bufs[i], plan.shapes[i], granularity, block) for i, n in enumerate(plan.names)}


def sharded_topk_masks(owned: Dict[str, torch.Tensor], plan: ShardPlan, density: float, world: World,
                       granularity: str = "element", scope: str = "global", block=(32, 32),
                       device=None) -> Dict[str, Mask]:
    """:func:`~spare_kernels.topk.topk_masks` of the full scores when each rank holds only the tensors
    ``plan`` gives it (``owned``, e.g. from :func:`reduce_scatter_scores`); every rank gets every mask,
    bit for bit those of ``topk_masks`` on all scores in the plan's order, and the ranks' digests are
    compared (a mismatch raises :class:`DistributedError`). ``device``: where the gathered masks go
    (default: the owned scores' device, or the CPU for a rank that owns none)."""
    block = _check_block(block)
    _validate({"_": torch.zeros(1)}, density, granularity, scope, block)   # the arguments, not the scores
    density = float(density)
    missing = [n for n in plan.owned(world.rank) if n not in owned]
    agree(world, f"owned: the plan gives this rank {missing[:3]} but they are not in owned" if missing else None,
          "top-k arguments")
    if device is None:
        device = next(iter(owned.values())).device if owned else torch.device("cpu")
    names = plan.owned(world.rank)
    if scope == "per_module":
        from .topk import topk_masks
        err, mine = None, {}
        try:
            mine = topk_masks({n: owned[n] for n in names}, density, granularity, scope, block) if names else {}
        except (ValueError, TypeError) as e:
            err = str(e)
        agree(world, err, "top-k (per module)")
    else:
        mine = _global_select({n: owned[n] for n in names}, plan, density, granularity, block, world)
    masks = gather_masks(mine, plan, granularity, block, world, device=device)
    digests = all_gather_object(masks_digest(masks), world, "mask digest")
    if any(d != digests[0] for d in digests):
        raise DistributedError(f"{world}: the masks differ across ranks (digests {sorted(set(digests))})")
    return masks


def _global_select(mine: Dict[str, torch.Tensor], plan, density, granularity, block, world) -> Dict[str, Mask]:
    srcs = [_Source(n, t.detach(), granularity, block, _CHUNK, _CACHE_UNITS) for n, t in mine.items()]
    flags = torch.tensor([sum(s.units for s in srcs), sum(s.units for s in srcs if s.cacheable),
                          int(any(s.x.dtype == torch.float64 for s in srcs))], dtype=torch.int64)
    flags = all_reduce(flags, world, "top-k setup")
    n_units, cache_units, any64 = (int(v) for v in flags)
    keys = _Keys(torch.float64 if granularity != "element" or any64 else torch.float32)
    k = round(density * n_units)
    if cache_units <= _CACHE_UNITS:   # the one-process rule, over every rank's units
        for s in srcs:
            if s.cacheable:
                s.fill_cache()
    err = None
    try:
        hist = _histogram(srcs, keys, 0, None, check_nan=True)
    except ValueError as e:
        err, hist = str(e), torch.zeros(1 << 16, dtype=torch.int64)
    agree(world, err, "top-k (NaN check)")
    hist = all_reduce(hist, world, "top-k histogram (level 0)")
    if k == 0 or k == n_units:
        return _build(srcs, keys, "none" if k == 0 else "all", None, 0,
                      0 if k == 0 else sum(s.units for s in srcs))
    threshold, ties = _radix(srcs, keys, hist, k, reduce=lambda h: all_reduce(h, world, "top-k histogram"))
    # Units above and equal to the threshold, per tensor in the plan's (dict) order: each tensor's
    # share of the ties is what is left of them after the tensors before it, as on one process.
    index = {n: i for i, n in enumerate(plan.names)}
    counts = torch.zeros(2, len(plan.names), dtype=torch.int64)
    for s in srcs:
        gt = eq = 0
        for c, _ in s.chunks():
            c = c.to(keys.ftype)
            thr = threshold.to(c.device)
            gt += int(torch.count_nonzero(c > thr))
            eq += int(torch.count_nonzero(c == thr))
        counts[0, index[s.name]], counts[1, index[s.name]] = gt, eq
    counts = all_reduce(counts, world, "top-k tie counts")
    eq = counts[1]
    before = eq.cumsum(0) - eq
    take = torch.minimum((ties - before).clamp(min=0), eq)
    out = {}
    for s in srcs:
        i = index[s.name]
        t = int(take[i])
        out.update(_build([s], keys, "threshold", threshold, t, int(counts[0, i]) + t))
        s.cache = None
    return out


__all__ = ["BUCKET_ELEMS", "DEFAULT_TIMEOUT_S", "GATHER_BYTES", "DistributedError", "ShardPlan", "TIMEOUT_ENV", "World",
           "agree", "all_gather_object", "all_reduce", "broadcast_object", "check_same",
           "close_group", "current_world", "gather_masks", "init_from_env", "launched", "local", "local_device",
           "masks_digest", "reduce_scatter_scores", "shard_plan", "sharded_saliency", "sharded_topk_masks",
           "timeout_seconds"]
