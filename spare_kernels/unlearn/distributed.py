"""The recipe across the ranks of ``torch.distributed`` (data parallel; see docs/distributed.md).

- **Batches.** Every rank draws the same global batch from the run's generator (indices, timesteps,
  noise) and keeps its contiguous share (:func:`shard`): rank ``r`` of ``N`` takes rows
  ``[r·B//N, (r+1)·B//N)``. Its losses are weighted by its share of the batch, so the sum over ranks
  is the global batch's mean loss and the summed gradient is one process's on the whole batch. The
  generator's state stays the same on every rank, so a checkpoint resumes on any number of ranks.
- **Gradients** (:class:`GradSync`): the trainable parameters only (adapters; the frozen UNet has no
  gradient and is never wrapped) are summed over the ranks in buckets of ``BUCKET_BYTES``, each
  all-reduce launched asynchronously from a post-accumulate-grad hook as soon as its bucket's
  gradients are complete (in a fixed order, so every rank issues the same collectives), overlapping
  the rest of the backward. The optimizer then steps on identical gradients: its state stays
  replicated and identical, which the end of :func:`~spare_kernels.unlearn.run` checks by digest.
- **Agreement** (:func:`fingerprint`): settings, model weights, task data and versions are compared
  across ranks before any work; a difference is refused on every rank, naming it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import List, Optional

import torch

from ..distributed import World, _run, all_reduce, check_same

# Gradient bucket cap. SD-1.5's rank-4 all-layer adapter gradients are 16.9 MB (benchmarks.distributed
# bytes): under DDP's 25 MiB cap they would be one bucket, sent only once the whole backward is done;
# 4 MiB makes 5 buckets, the first 4 sent while the backward goes on. MiniCanvas's 0.37 MB is one
# bucket either way (one all-reduce a step: 0.87 ms median over gloo on localhost here).
BUCKET_BYTES = 4 << 20


def _rows(n: int, rank: int, size: int) -> slice:
    return slice(rank * n // size, (rank + 1) * n // size)


def shard(n: int, world: World) -> slice:
    """This rank's rows of a global batch of ``n``: ``[r·n//N, (r+1)·n//N)``."""
    return _rows(n, world.rank, world.size)


def shard_sizes(n: int, size: int) -> List[int]:
    """Every rank's number of rows of a global batch of ``n``."""
    return [s.stop - s.start for s in (_rows(n, r, size) for r in range(size))]


def check_batches(cfg, world: World) -> None:
    """Every rank must get at least one sample of every batch it splits."""
    if not world.distributed:
        return
    names = ["batch_forget", "saliency_batch"] + ([] if cfg.method == "esd" else ["batch_retain"])
    for k in names:
        v = getattr(cfg, k)
        if v < world.size:
            raise ValueError(f"{k}: {v} samples cannot be split over {world.size} ranks (each rank needs at "
                             f"least one); use {k} >= {world.size}")


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach()
        h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.double().sum().cpu().numpy().tobytes() if t.is_floating_point() else
                 t.long().sum().cpu().numpy().tobytes())
    return h.hexdigest()


def fingerprint(unet, task, cfg) -> dict:
    """What must be equal on every rank: the settings, the model (names, shapes, dtypes and a float64
    sum of every parameter and buffer), the task's samples and conditions, and the versions."""
    import spare_kernels
    named = list(unet.named_parameters()) + list(unet.named_buffers())
    model = hashlib.sha256()
    for n, _ in named:
        model.update(n.encode())
    model.update(_digest([t for _, t in named]).encode())
    data = _digest([task.x_forget, task.c_forget, task.c_surrogate, task.x_retain, task.c_retain, task.c_null])
    return {"config": dataclasses.asdict(cfg), "model": model.hexdigest()[:16],
            "task": f"{task.target}->{task.surrogate} {data[:16]}",
            "objective": json.dumps([task.objective.describe(), task.denoiser.describe()], sort_keys=True),
            "device type": next(unet.parameters()).device.type,
            "versions": f"spare_kernels {spare_kernels.__version__}, torch {torch.__version__}"}


def check_consistent(world: World, unet, task, cfg) -> None:
    if world.distributed:
        check_same(world, fingerprint(unet, task, cfg), "distributed run: refused before any work")


def params_digest(params) -> str:
    """Bitwise digest of the trainable parameters (the replicas must stay identical)."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                 if p.numel() else b"")
    return h.hexdigest()


class GradSync:
    """Sums the gradients of ``params`` over the ranks, bucketed and overlapped with the backward.

    Buckets hold parameters in reverse order (the backward produces the last layers' gradients
    first) up to ``bucket_bytes``. A post-accumulate-grad hook marks a parameter ready; when its bucket
    is complete, every complete bucket from the next one due is launched (``all_reduce`` with
    ``async_op``), so all ranks issue the same collectives in the same order whatever order their
    hooks fire in. :meth:`finish` launches what is left (a parameter that got no gradient this step
    contributes zeros), waits, and writes the sums back into ``.grad``."""

    def __init__(self, params, world: World, bucket_bytes: int = BUCKET_BYTES):
        self.params, self.world = list(params), world
        self.buckets: List[List[int]] = []
        cur, size = [], 0
        for i in reversed(range(len(self.params))):
            p = self.params[i]
            nb = p.numel() * p.element_size()
            if cur and size + nb > bucket_bytes:
                self.buckets.append(cur)
                cur, size = [], 0
            cur.append(i)
            size += nb
        if cur:
            self.buckets.append(cur)
        self.bucket_of = {i: b for b, ix in enumerate(self.buckets) for i in ix}
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)]
        self._reset()

    def _reset(self):
        self._missing = [len(ix) for ix in self.buckets]
        self._seen = set()
        self._next = 0
        self._work: List[Optional[tuple]] = [None] * len(self.buckets)

    def _hook(self, i):
        def ready(p):
            b = self.bucket_of[i]
            if i in self._seen:
                raise RuntimeError("GradSync: a gradient arrived twice in one step; one backward per step "
                                   "(no gradient accumulation over several backwards), then finish()")
            self._seen.add(i)
            self._missing[b] -= 1
            while self._next < len(self.buckets) and self._missing[self._next] == 0:
                self._launch(self._next)
                self._next += 1
        return ready

    def _launch(self, b):
        ps = [self.params[i] for i in self.buckets[b]]
        dev = self.world.device
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dev) for p in ps])
        work = _run(self.world, "gradient all-reduce", torch.distributed.all_reduce, flat, async_op=True)
        self._work[b] = (flat, work)

    def finish(self) -> None:
        """Wait for every bucket (launching those not yet launched) and write the summed gradients."""
        while self._next < len(self.buckets):
            self._launch(self._next)
            self._next += 1
        try:
            for b, (flat, work) in enumerate(self._work):
                _run(self.world, "gradient all-reduce (wait)", lambda group=None: work.wait())
                o = 0
                for i in self.buckets[b]:
                    p = self.params[i]
                    v = flat[o:o + p.numel()].view_as(p).to(p.device)
                    o += p.numel()
                    if p.grad is None:
                        p.grad = v.clone()
                    else:
                        p.grad.copy_(v)
        finally:
            self._reset()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def reduce_losses(lf: torch.Tensor, lr_: torch.Tensor, world: World):
    """The global batch's losses from each rank's weighted parts (a sum over the ranks)."""
    if not world.distributed:
        return lf, lr_
    both = torch.stack([lf.detach().float().reshape(()), lr_.detach().float().reshape(())]).cpu()
    both = all_reduce(both, world, "loss all-reduce")
    return both[0], both[1]
