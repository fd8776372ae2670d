"""The loop: :class:`Trainer` (one method, one step at a time) and :func:`run` (the loop with timing,
checkpoints, memory and the result dict)."""
from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import dataclasses
import os
import time
from typing import Optional

import torch

from ..adapters import save_adapter
from ..distributed import World, broadcast_object, check_same, init_from_env, masks_digest
from .checkpoints import _save_checkpoint, apply_checkpoint, read_checkpoint
from .config import Config
from .distributed import GradSync, check_batches, check_consistent, params_digest, reduce_losses, shard_sizes
from .methods import _IMPL


def _state_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def _adam(params, lr):
    """Adam, fused where torch has a fused kernel for these parameters: one pass over all of them
    instead of ~10 small ops per tensor (spare's 202 adapter tensors: 0.7 vs 4.5 ms a step on one
    CPU thread). Every method gets the same optimizer."""
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fused or None)


class _Overlap:
    """Runs the teacher's forward in a worker thread while the calling thread runs the student's, the
    intra-op threads split between them. Small convolutions scale poorly over cores; two independent
    forwards side by side do not. Only with 2+ threads: with one, teacher then student.

    The teacher runs in a copy of the caller's ``contextvars`` context, taken at each call: a pool
    thread does not inherit it, and settings kept in context variables (the backend switch) must
    hold for the teacher as they do for the student."""

    def __init__(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="spare_kernels-teacher")

    @staticmethod
    def available() -> bool:
        # OpenMP keeps the thread count per thread; torch's native pool only warns and oversubscribes.
        return "parallel backend: OpenMP" in torch.__config__.parallel_info()

    @staticmethod
    def _in_worker(n, fn):
        torch.get_num_threads()   # ATen's one-time per-thread init first, or it would reset n
        torch.set_num_threads(n)
        return fn()

    def __call__(self, teacher_fn, student_fn):
        nt = torch.get_num_threads()
        if nt < 2:
            target = teacher_fn()
            return student_fn(), target
        half = nt // 2
        fut = self._pool.submit(contextvars.copy_context().run, self._in_worker, half, teacher_fn)
        torch.set_num_threads(nt - half)
        try:
            pred = student_fn()
        finally:
            concurrent.futures.wait([fut])   # never leave the teacher running past this step
            torch.set_num_threads(nt)
        return pred, fut.result()

    def close(self):
        self._pool.shutdown(wait=True)


# ----------------------------------------------------------------------------------------- trainer
class Trainer:
    """One method on one UNet, a step at a time. Construction runs the method's setup (stage 1 and the
    adapters, or the trainable weights) and makes the Adam optimizer; :meth:`step` takes one training
    step. :func:`run` adds timing, checkpoints, memory and results; ``benchmarks.unlearn_step`` times
    the phases of :meth:`step` through ``clock``.

    ``overlap`` (``spare``, whose teacher is the student with adapters off in its own thread): with 2+
    torch threads the teacher's forward runs in a worker thread beside the student's. :meth:`close`
    (or ``with``) ends the worker; the results change only in float rounding.

    Across ranks (``world``, default: torch.distributed's default group, made from the launcher's
    environment under ``torchrun`` / ``accelerate launch`` when none exists yet; see
    :mod:`.distributed`): the ranks' settings, model and task are compared first; each rank computes
    its share of every batch, gradients are summed over the ranks during the backward, and every
    rank's optimizer steps on the same sums. ``restored``: a checkpoint's method state (curve and
    masks), which replaces the localise stage."""

    def __init__(self, unet, task, cfg: Config, gen: Optional[torch.Generator] = None, overlap: bool = True,
                 world: Optional[World] = None, restored: Optional[dict] = None):
        self.cfg = cfg
        self.device = next(unet.parameters()).device
        # Under a launcher with no process group yet, make it (as run does): never train alone by mistake.
        self.world = world if world is not None else init_from_env(self.device.type)
        self.gen = gen if gen is not None else torch.Generator().manual_seed(cfg.seed)   # draws stay on the CPU
        self.sync = None
        check_consistent(self.world, unet, task, cfg)   # first: what follows then fails alike on every rank
        check_batches(cfg, self.world)
        task = task.to(self.device)   # references only, where the tensors are there already
        self.method = _IMPL[cfg.method](unet, task, cfg, self.world)
        with self.precision():
            self.params = self.method.setup(self.gen, restored)
        self.sampler = self.method.sampler()
        self.teacher_model = self.method.teacher_model   # a frozen copy, or None (teacher = adapters off)
        unet.train(False)
        self.opt = _adam(self.params, cfg.learning_rate)
        if self.world.distributed:
            check_same(self.world, {"masks": masks_digest(self.method.masks),
                                    "parameters": params_digest(self.params)}, "distributed setup")
            self.sync = GradSync(self.params, self.world)
        # CPU only: small convolutions scale poorly over cores, GPUs gain nothing from it.
        if overlap and self.method.overlap and self.device.type == "cpu" and _Overlap.available():
            self.method.runner = _Overlap()

    def close(self):
        if self.method.runner is not None:
            self.method.runner.close()
            self.method.runner = None
        if self.sync is not None:
            self.sync.close()
            self.sync = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def precision(self):
        """The forwards' context: ``torch.autocast`` to bf16 for ``Config(precision="bf16")`` (weights,
        adapters, gradients and optimizer state stay fp32), else nothing."""
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def loss(self, gen: Optional[torch.Generator] = None):
        """-> (weighted total, forget loss, retain loss) of one batch drawn from ``gen`` (default: the
        run's generator); across ranks, this rank's share of them (they sum to the batch's)."""
        with self.precision():
            lf, lr_ = self.method.losses(self.gen if gen is None else gen, self.sampler)
        return self.cfg.w_forget * lf + self.cfg.w_retain * lr_, lf, lr_

    def step(self, clock=None):
        """One optimizer step -> (forget loss, retain loss). ``clock(phase)``, if given, is called when
        the phases "loss", "backward" and "optimizer" end."""
        tick = clock or (lambda phase: None)
        loss, lf, lr_ = self.loss()
        self.opt.zero_grad(set_to_none=True)
        tick("loss")
        loss.backward()
        if self.sync is not None:   # the last buckets' all-reduce, and the sums into .grad
            self.sync.finish()
            lf, lr_ = reduce_losses(lf, lr_, self.world)
        tick("backward")
        self.opt.step()
        tick("optimizer")
        return lf, lr_

    def backward_probe(self, gen: torch.Generator) -> None:
        """One more (unapplied) forward and backward, gradients summed as in :meth:`step`: what the
        memory measurement of :func:`run` runs."""
        self.loss(gen)[0].backward()
        if self.sync is not None:
            self.sync.finish()


# --------------------------------------------------------------------------------------------- run
def _peak_bytes(fn, device) -> int:
    """Peak memory ``fn`` adds on ``device``: the c10 CPU allocator's (``measure_peak``) or CUDA's."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from ..utils.memory import measure_peak
    return measure_peak(fn)[1]


def run(unet, task, cfg: Config, out_dir: Optional[str] = None, resume: bool = False, progress: bool = True) -> dict:
    """Run ``cfg.method`` on ``unet`` (modified in place: adapters patched, or weights trained).

    Returns ``{"method", "seconds", "stage_seconds": {"localise", "train"}, "steps", "history":
    [[forget, retain], ...], "curve", "mask_density", "peak_mem_mb", "state_mb", "world_size",
    "per_rank_batch", ...}``. With ``out_dir`` and ``cfg.checkpoint_every``, ``out_dir/checkpoint.pt``
    is written atomically every K steps; ``resume=True`` continues from it (the final adapter equals
    an uninterrupted run's). The checkpoint keeps the timestep curve and masks, so a resume skips the
    localise stage.

    Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1) the default process group is made
    when none exists (:func:`spare_kernels.distributed.init_from_env`) and the run is data parallel
    across the ranks (:class:`Trainer`); rank 0 alone writes ``out_dir`` and shows progress, and reads
    the checkpoint on resume for every rank (no shared filesystem needed), whatever the number of
    ranks that wrote it. Every rank returns the same result, checked: the ranks' adapters are compared
    by digest at the end.
    """
    from tqdm import tqdm

    world = init_from_env(next(unet.parameters()).device.type)
    main = world.is_main
    if resume and not out_dir:
        raise ValueError("resume: needs out_dir (where checkpoint.pt is)")
    ckpt = os.path.join(out_dir, "checkpoint.pt") if out_dir else None
    if out_dir and main:
        os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    state = None
    if resume:   # rank 0 reads; every rank gets the state, or the reason there is none, and raises alike
        got = (None, None)
        if main:
            try:
                got = (read_checkpoint(ckpt, cfg), None) if os.path.exists(ckpt) else \
                    (None, FileNotFoundError(f"resume: no checkpoint at {ckpt}"))
            except (ValueError, OSError) as e:   # OSError: unreadable now, not damaged (read_checkpoint)
                got = (None, e)
        state, err = broadcast_object(got, world, "checkpoint broadcast")
        if err is not None:
            raise err
    tr = Trainer(unet, task, cfg, world=world, restored=(state or {}).get("method_state"))
    t1 = time.perf_counter()
    m, params, opt, sampler = tr.method, tr.params, tr.opt, tr.sampler
    start, history = 0, []
    overlapped = tr.method.runner is not None
    extra = None
    with tr:
        if state is not None:
            start, history = apply_checkpoint(state, params, opt, tr.gen)
            del state
        bar = tqdm(total=cfg.steps, initial=start, disable=not (progress and main), desc=f"{cfg.method}",
                   dynamic_ncols=True)
        for step in range(start, cfg.steps):
            lf, lr_ = tr.step()
            history.append([lf.item(), lr_.item()])
            bar.set_postfix(forget=f"{history[-1][0]:.4f}", retain=f"{history[-1][1]:.4f}", refresh=False)
            bar.update(1)
            if ckpt and main and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                if extra is None:   # the setup's state (curve, packed masks), built once, only if saved
                    extra = {"method_state": m.state(), "world_size": world.size}
                _save_checkpoint(ckpt, step + 1, params, opt, tr.gen, history, cfg, extra)
        bar.close()
    t2 = time.perf_counter()
    # Memory: persistent training state + the c10 peak of one more (unapplied) step, in this thread
    # (measure_peak sees no other). For an overlapped run that step runs the student forward first,
    # then the teacher's: the teacher's activations on top of the student's saved ones, the most the
    # overlap can hold at once.
    if overlapped and torch.get_num_threads() >= 2:
        m.runner = lambda teacher_fn, student_fn: (student_fn(), teacher_fn())
    state = _state_bytes(list(unet.parameters()) + list(unet.buffers())
                         + (list(m.teacher_model.parameters()) if m.teacher_model is not None else [])
                         + [s for st in opt.state.values() for s in st.values() if torch.is_tensor(s)]
                         + [p.grad for p in params])
    probe_gen = torch.Generator().manual_seed(cfg.seed + 99)
    if world.distributed:   # the run's hooks were removed on leaving the Trainer: this step's own
        tr.sync = GradSync(params, world)
    step_peak = _peak_bytes(lambda: tr.backward_probe(probe_gen), tr.device)
    if tr.sync is not None:
        tr.sync.close()
        tr.sync = None
    m.runner = None
    opt.zero_grad(set_to_none=True)
    if world.distributed:   # the replicas stayed identical (same sums, same optimizer steps)
        check_same(world, {"adapter": params_digest(params)}, "distributed run: end")
    res = {
        "method": cfg.method, "seconds": t2 - t0, "stage_seconds": {"localise": t1 - t0, "train": t2 - t1},
        "steps": cfg.steps, "history": history, "curve": m.curve,
        "timestep_density": sampler.density() if m.curve else [],
        "mask_density": m.mask_density(),
        "state_mb": state / 2**20, "step_peak_mb": step_peak / 2**20, "peak_mem_mb": (state + step_peak) / 2**20,
        "config": dataclasses.asdict(cfg), "world_size": world.size,
        "per_rank_batch": {k: shard_sizes(getattr(cfg, k), world.size)
                           for k in ("batch_forget", "batch_retain", "saliency_batch")},
    }
    if out_dir and cfg.method == "spare":
        path = os.path.join(out_dir, "adapter.safetensors")
        res["adapter"] = save_adapter(unet, path) if main else path
    return res
