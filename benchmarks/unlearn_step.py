"""Where one MiniCanvas unlearning step spends its time, per method (the same task, batch and seeds).

``PYTHONPATH=. python -m benchmarks.unlearn_step [--target style:dots] [--reps 20] [--threads N]
[--no-overlap] [--granularity element block row] [--targets all|attention]`` times, after setup, the
training step of every method (``--targets``: ``Config.targets``) split into its phases: "loss"
(wall time of the forwards and the loss), within it the time spent in teacher forwards (no grad)
and student forwards, then backward and optimizer. With 2+ threads ``spare`` runs the teacher
beside the student (``Trainer(overlap=True)``), so its teacher + student exceeds "loss".
On the base model with the same batch it also times the backward with and without weight
gradients. The last two bound what a masked adapter can save: its backward needs the masked
dense gradient ``M ⊙ (dYᵀX)`` for dA/dB, which is the very weight gradient SalUn trains with.
Writes ``benchmarks/results/unlearn_step.json``.
"""
from __future__ import annotations

import argparse
import os
import threading
import time

import torch

from spare_kernels import canvas
from spare_kernels.masks import GRANULARITIES
from spare_kernels.unlearn import METHODS, Config, Trainer, canvas_task
from spare_kernels.unlearn.config import TARGETS
from spare_kernels.utils.io import write_json

RESULTS = os.path.join(os.path.dirname(__file__), "results")


class _ForwardClock:
    """Accumulates wall time of a module's forwards, split by grad mode (teacher = no grad)."""

    def __init__(self, modules):
        self.t = {"teacher": 0.0, "student": 0.0}
        self._h = []
        self._local = threading.local()   # the teacher may run in a worker thread, beside the student
        for mod in modules:
            self._h.append(mod.register_forward_pre_hook(self._start))
            self._h.append(mod.register_forward_hook(self._stop))

    def _start(self, *_):
        self._local.t0 = time.perf_counter()

    def _stop(self, *_):
        self.t["student" if torch.is_grad_enabled() else "teacher"] += time.perf_counter() - self._local.t0

    def close(self):
        for h in self._h:
            h.remove()


def time_method(method, task, reps, warmup, seed, overlap=True, granularity="element", targets="all"):
    unet = canvas.load_model()
    tr = Trainer(unet, task, Config(method=method, steps=0, seed=seed, granularity=granularity, targets=targets),
                 overlap=overlap)
    teacher = tr.teacher_model
    clock = _ForwardClock([unet] + ([teacher] if teacher is not None else []))
    acc = dict.fromkeys(("loss", "backward", "optimizer"), 0.0)

    def tick(phase):
        nonlocal last
        now = time.perf_counter()
        acc[phase] += now - last
        last = now
    for i in range(warmup + reps):
        if i == warmup:
            clock.t = {"teacher": 0.0, "student": 0.0}
            acc = dict.fromkeys(acc, 0.0)
        last = time.perf_counter()
        tr.step(tick)
    clock.close()
    tr.close()
    ms = {k: 1e3 * v / reps for k, v in {**clock.t, **acc}.items()}
    ms["step"] = ms["loss"] + ms["backward"] + ms["optimizer"]
    return ms


def time_base_backward(task, batch, reps, warmup, seed):
    """Base model, one batch: backward to the input only vs with every weight gradient (ms)."""
    g = torch.Generator().manual_seed(seed)
    unet = canvas.load_model()
    idx = torch.randint(task.x_retain.shape[0], (batch,), generator=g)
    t = torch.randint(0, task.num_train_timesteps, (batch,), generator=g)
    x, _ = task.noised(task.x_retain[idx], t, g)
    c = task.c_retain[idx]
    out = {}
    for name, weights in (("input_only", False), ("with_weight_grads", True)):
        unet.requires_grad_(weights)
        total = 0.0
        for i in range(warmup + reps):
            xi = x.clone().requires_grad_(True)
            y = unet(xi, t, encoder_hidden_states=c).sample.pow(2).mean()
            t0 = time.perf_counter()
            y.backward()
            if i >= warmup:
                total += time.perf_counter() - t0
            unet.zero_grad(set_to_none=True)
        out[name] = 1e3 * total / reps
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="style:dots")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: as set by the environment)")
    p.add_argument("--no-overlap", action="store_true", help="teacher then student, in one thread")
    p.add_argument("--granularity", nargs="+", default=["element"], choices=GRANULARITIES,
                   help="spare's mask granularities (rows 'spare' for element, 'spare/G' for the others)")
    p.add_argument("--targets", default=Config().targets, choices=TARGETS,
                   help="layers every method changes (Config.targets; esd: cross-attention whatever this says)")
    p.add_argument("--out", default=os.path.join(RESULTS, "unlearn_step.json"))
    a = p.parse_args(argv)
    if a.reps < 1 or a.warmup < 0 or a.threads < 0:
        p.error("--reps must be >= 1, --warmup and --threads >= 0")
    if a.threads:
        torch.set_num_threads(a.threads)
    task = canvas_task(a.target, seed=a.seed)
    cols = ("step", "loss", "teacher", "student", "backward", "optimizer")
    print(f"ms per step, {torch.get_num_threads()} thread(s), {a.reps} reps, overlap {not a.no_overlap}; "
          f"target {a.target}, targets {a.targets}")
    print(f"{'method':<16}" + "".join(f"{c:>11}" for c in cols))
    rows = {}
    runs = [(m, g) for m in a.methods for g in (a.granularity if m == "spare" else ["element"])]
    for method, gran in runs:
        label = method if gran == "element" else f"{method}/{gran}"
        rows[label] = time_method(method, task, a.reps, a.warmup, a.seed, overlap=not a.no_overlap, granularity=gran,
                                  targets=a.targets)
        print(f"{label:<16}" + "".join(f"{rows[label][c]:>11.1f}" for c in cols), flush=True)
    batch = Config().batch_forget + Config().batch_retain
    base = time_base_backward(task, batch, a.reps, a.warmup, a.seed)
    print(f"base model backward, batch {batch}: to the input only {base['input_only']:.1f} ms, "
          f"with every weight gradient {base['with_weight_grads']:.1f} ms")
    write_json(a.out, {"target": a.target, "targets": a.targets, "threads": torch.get_num_threads(),
                       "overlap": not a.no_overlap and torch.get_num_threads() >= 2,   # spare's teacher only
                       "reps": a.reps,
                       "ms_per_step": rows, "base_backward_ms": base})
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
