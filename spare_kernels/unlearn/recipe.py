"""The SPARE recipe and its baselines, in one harness (same task, seeds and step budget).

``run(unet, task, config)`` runs one method end to end and returns a result dict; ``Trainer`` is its
loop one step at a time. The methods:

- ``spare``: saliency by :class:`~spare_kernels.SaliencyCollector` (no ``.grad`` for UNet weights) on
  noised forget samples at timesteps drawn as in training, exact ``topk_masks``, fused sparse adapters
  from :func:`~spare_kernels.patch_unet`, self-distillation with forget + retain through **one** student
  and **one** teacher forward per step (teacher = the same UNet with adapters off, no copy), timesteps
  from the concept-critical curve mixed with uniform.
- ``spare-reference``: SPARE's code path: full-``.grad`` saliency, ``cat``+``kthvalue`` threshold, dense
  adapter + second GEMM (:class:`~spare_kernels.unlearn.reference.SpareRefLayer`), four forwards per
  step, uniform timesteps.
- ``lora``: dense peft LoRA on the same layers, the same distillation (two forwards), uniform timesteps.
- ``salun``: saliency-masked full fine-tune (SalUn): full-``.grad`` saliency, weight gradients masked,
  the same distillation objective against a frozen copy, uniform timesteps.
- ``esd``: ESD-x: cross-attention weights fine-tuned towards negative guidance,
  ``ε*(x_t, c_f) = ε₀(x_t, ∅) − η (ε₀(x_t, c_f) − ε₀(x_t, ∅))``, on noised forget samples, uniform timesteps.

``Config.targets`` picks the layers the methods may change: ``"all"`` (every Linear and Conv2d, the
default) or ``"attention"`` (the attention projections ``to_q``/``to_k``/``to_v``/``to_out.0``, where
SPARE's own code puts its adapters). It restricts the saliency scores and the threshold (one density
over those weights only), the masks and the adapters of ``spare`` and ``spare-reference``, ``lora``'s
adapters and ``salun``'s trainable masked weights. ``esd`` ignores it: ESD-x is defined by its
parameter set (every cross-attention parameter), which is neither target set.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import copy
import dataclasses
import math
import numbers
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import disable_adapters, save_adapter
from ..masks import GRANULARITIES, SCOPES, _check_block, topk_masks
from ..nn.lora import INITS
from ..ops.saliency import STATS
from ..patch import patch_unet, target_predicate
from ..saliency import SaliencyCollector
from ..utils.io import atomic_path
from . import reference as ref
from .timesteps import TimestepSampler, probe

METHODS = ("spare", "spare-reference", "lora", "salun", "esd")
PRECISIONS = ("fp32", "bf16")   # fp16 would need loss scaling
TIMESTEPS = ("critical", "uniform")
TARGETS = ("all", "attention")   # every Linear and Conv2d; to_q/to_k/to_v/to_out.0 (SPARE's choice)
_DEFAULT_LR = {"spare": 1e-2, "spare-reference": 1e-2, "lora": 1e-2, "salun": 3e-4, "esd": 3e-4}


def _real(v) -> bool:
    """A finite real number (an infinite lr or loss weight would only produce NaN later)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class Config:
    method: str = "spare"
    steps: int = 200
    batch_forget: int = 8
    batch_retain: int = 8
    lr: Optional[float] = None            # None: the method's default
    rank: int = 4
    init: str = "kaiming"                 # adapter init (peft's default; B = 0 so training starts at the base model)
    alpha: Optional[float] = None         # scale = alpha / rank (None: 1.0)
    density: float = 0.5                  # SPARE's per-weight default
    granularity: str = "element"
    scope: str = "global"
    block: tuple = (32, 32)
    saliency_stat: str = "grad_abs"
    saliency_batches: int = 4
    saliency_batch: int = 16
    w_forget: float = 1.0
    w_retain: float = 1.0
    timesteps: str = "critical"           # or "uniform" (the ablation)
    mix: float = 0.5                      # weight of the concept curve in the timestep mixture
    probe_bins: int = 10
    probe_per_bin: int = 8
    esd_eta: float = 1.0
    seed: int = 0
    checkpoint_every: int = 0             # 0: no checkpoints
    precision: str = "fp32"               # or "bf16": forwards under torch.autocast (weights, adapters fp32)
    targets: str = "all"                  # or "attention" (to_q/to_k/to_v/to_out.0); esd ignores it

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {self.method!r}")
        for k in ("steps", "batch_forget", "batch_retain", "rank", "saliency_batches", "saliency_batch",
                  "probe_bins", "probe_per_bin"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if k == "steps" else 1):
                raise ValueError(f"{k}: expected an int >= {0 if k == 'steps' else 1}, got {v!r}")
        if not (_real(self.density) and 0 < self.density <= 1):
            raise ValueError(f"density: expected a fraction in (0, 1], got {self.density!r}")
        for k, allowed in (("granularity", GRANULARITIES), ("scope", SCOPES), ("saliency_stat", STATS),
                           ("init", INITS), ("timesteps", TIMESTEPS), ("precision", PRECISIONS),
                           ("targets", TARGETS)):
            if getattr(self, k) not in allowed:
                raise ValueError(f"{k}: expected one of {', '.join(allowed)}, got {getattr(self, k)!r}")
        self.block = _check_block(self.block)   # a tuple: a CLI / JSON list compares equal to a checkpoint's
        if not (_real(self.mix) and 0 <= self.mix <= 1):
            raise ValueError(f"mix: expected a weight in [0, 1], got {self.mix!r}")
        for k in ("lr", "alpha"):
            v = getattr(self, k)
            if v is not None and not (_real(v) and v > 0):
                raise ValueError(f"{k}: expected a positive finite number (or None for the default), got {v!r}")
        for k in ("w_forget", "w_retain"):
            if not (_real(getattr(self, k)) and getattr(self, k) >= 0):
                raise ValueError(f"{k}: expected a finite weight >= 0, got {getattr(self, k)!r}")
        ce = self.checkpoint_every
        if isinstance(ce, bool) or not isinstance(ce, int) or ce < 0:
            raise ValueError(f"checkpoint_every: expected an int >= 0, got {ce!r}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else _DEFAULT_LR[self.method]


# ------------------------------------------------------------------------------------------ helpers
def _eps(unet, x, t, c):
    return unet(x, t.to(x.device), encoder_hidden_states=c).sample   # t is drawn on the CPU


def _forget_batches(task, sampler, cfg, gen):
    """The saliency stage's batches: noised forget samples, timesteps as in training."""
    for _ in range(cfg.saliency_batches):
        idx = torch.randint(task.x_forget.shape[0], (cfg.saliency_batch,), generator=gen)
        t = sampler.sample(cfg.saliency_batch, gen)
        xt, noise = task.noised(task.x_forget[idx], t, gen)
        yield xt, t, task.c_forget[idx], noise


def _diffusion_loss(unet, batch):
    xt, t, c, noise = batch
    return F.mse_loss(_eps(unet, xt, t, c), noise)


@contextlib.contextmanager
def _seeded(seed):
    """Adapter initialisers draw from torch's global CPU RNG (also for adapters on a GPU): seed it for
    the run, restore it after; other devices' generators are not touched."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def _linear_conv_names(unet, targets: str = "all"):
    """The Linear / Conv2d modules of ``targets`` (``Config.targets``), in ``named_modules`` order."""
    names = [n for n, m in unet.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
    if targets == "attention":
        pred = target_predicate("attention")
        names = [n for n in names if pred(n, None)]
        if not names:
            raise ValueError("targets: 'attention' matched no to_q/to_k/to_v/to_out.0 layer of the UNet")
    return names


def _layer_weights(scores: dict, unet, targets: str = "all") -> dict:
    """The entries of ``scores`` (keyed by parameter name) that are weights of the ``targets`` layers."""
    keys = {f"{n}.weight" for n in _linear_conv_names(unet, targets)}
    return {k: v for k, v in scores.items() if k in keys}


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


def _own_adam_implementation(opt):
    """``load_state_dict`` takes the checkpoint's ``fused`` / ``foreach`` too: keep this run's choice
    (a checkpoint from before fused Adam, or from another device), with the step counters where the
    fused kernel wants them."""
    fused = opt.defaults.get("fused")
    for g in opt.param_groups:
        g["fused"], g["foreach"] = fused, opt.defaults.get("foreach")
        for p in g["params"]:
            st = opt.state.get(p)
            if fused and st and "step" in st:
                st["step"] = torch.as_tensor(st["step"], dtype=torch.float32, device=p.device)


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


class _Method:
    """Setup (stage 1 + adapters) and the per-step losses of one method."""

    overlap = False   # the teacher may run in another thread while the student runs (thread-safe teacher)

    def __init__(self, unet, task, cfg):
        self.unet, self.task, self.cfg = unet, task, cfg
        self.curve = None
        self.masks = {}
        self.teacher_model = None
        self.runner = None   # an _Overlap, set by Trainer for methods with overlap = True

    def sampler(self):
        return TimestepSampler(self.task.num_train_timesteps)

    def student_teacher(self, xt, t, c_student, c_teacher):
        """(student prediction, teacher prediction) with one forward each."""
        def teacher():
            with torch.no_grad(), self.teacher():
                return _eps(self.teacher_model or self.unet, xt, t, c_teacher)

        def student():
            return _eps(self.unet, xt, t, c_student)
        # Autocast is thread-local: a worker would run the teacher without it.
        if self.runner is not None and not torch.is_autocast_enabled("cpu"):
            return self.runner(teacher, student)
        target = teacher()
        return student(), target

    def losses(self, gen, sampler):
        task, cfg = self.task, self.cfg
        i_f = torch.randint(task.x_forget.shape[0], (cfg.batch_forget,), generator=gen)
        i_r = torch.randint(task.x_retain.shape[0], (cfg.batch_retain,), generator=gen)
        t_f = sampler.sample(cfg.batch_forget, gen)
        t_r = torch.randint(0, task.num_train_timesteps, (cfg.batch_retain,), generator=gen)
        x_f, _ = task.noised(task.x_forget[i_f], t_f, gen)
        x_r, _ = task.noised(task.x_retain[i_r], t_r, gen)
        return self.distill(x_f, t_f, i_f, x_r, t_r, i_r)

    def distill(self, x_f, t_f, i_f, x_r, t_r, i_r):
        task, nf = self.task, x_f.shape[0]
        pred, target = self.student_teacher(
            torch.cat([x_f, x_r]), torch.cat([t_f, t_r]),
            torch.cat([task.c_forget[i_f], task.c_retain[i_r]]), torch.cat([task.c_surrogate[i_f], task.c_retain[i_r]]))
        return F.mse_loss(pred[:nf], target[:nf]), F.mse_loss(pred[nf:], target[nf:])

    def teacher(self):
        return contextlib.nullcontext()

    def mask_density(self):
        """Per-weight fraction of entries on (dense bool masks; none for unmasked methods)."""
        return {k: v.float().mean().item() for k, v in self.masks.items()}


class _Spare(_Method):
    def setup(self, gen):
        cfg, task, unet = self.cfg, self.task, self.unet
        if cfg.timesteps == "critical":
            self.curve = probe(unet, task, cfg.probe_bins, cfg.probe_per_bin, seed=cfg.seed)
        self._sampler = TimestepSampler(task.num_train_timesteps, self.curve, cfg.mix)
        # "all": every Linear / Conv2d the collector finds (None), as before the setting existed.
        layers = None if cfg.targets == "all" else _linear_conv_names(unet, cfg.targets)
        with SaliencyCollector(unet, stat=cfg.saliency_stat, target_modules=layers) as col:
            for batch in _forget_batches(task, self._sampler, cfg, gen):
                _diffusion_loss(unet, batch).backward()
        scores = col.scores()
        self.masks = topk_masks(scores, cfg.density, cfg.granularity, cfg.scope, cfg.block)
        with _seeded(cfg.seed):
            patch_unet(unet, masks=self.masks, rank=cfg.rank, alpha=cfg.alpha, init=cfg.init,
                       target_modules=[k[: -len(".weight")] for k in self.masks])
        return [p for p in unet.parameters() if p.requires_grad]

    overlap = True

    def sampler(self):
        return self._sampler

    def teacher(self):
        # This thread only: the student may be running the same modules in another thread.
        return disable_adapters(self.unet, this_thread=True)

    def mask_density(self):
        return {k: m.density for k, m in self.masks.items()}


class _SpareReference(_Method):
    def setup(self, gen):
        cfg, task, unet = self.cfg, self.task, self.unet
        scores = ref.full_grad_saliency(unet, _forget_batches(task, self.sampler(), cfg, gen), _diffusion_loss)
        if cfg.targets == "all":   # thresholded over every parameter, as SPARE's code
            self.masks = _layer_weights(ref.kth_threshold_masks(scores, cfg.density), unet)
        else:                      # over the targeted weights only, as spare: the same density over the same weights
            self.masks = ref.kth_threshold_masks(_layer_weights(scores, unet, cfg.targets), cfg.density)
        ref.patch_spare_ref(unet, self.masks, rank=cfg.rank, scale=(cfg.alpha or cfg.rank) / cfg.rank, seed=cfg.seed)
        return [p for p in unet.parameters() if p.requires_grad]

    def teacher(self):
        return ref.spare_ref_disabled(self.unet)

    def distill(self, x_f, t_f, i_f, x_r, t_r, i_r):
        task, unet = self.task, self.unet      # SPARE's code: four separate forwards
        with torch.no_grad(), self.teacher():
            tgt_f = _eps(unet, x_f, t_f, task.c_surrogate[i_f])
            tgt_r = _eps(unet, x_r, t_r, task.c_retain[i_r])
        pf = _eps(unet, x_f, t_f, task.c_forget[i_f])
        pr = _eps(unet, x_r, t_r, task.c_retain[i_r])
        return F.mse_loss(pf, tgt_f), F.mse_loss(pr, tgt_r)



class _Lora(_Method):
    def setup(self, gen):
        from peft import LoraConfig, inject_adapter_in_model
        cfg = self.cfg
        lc = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha or cfg.rank,
                        target_modules=_linear_conv_names(self.unet, cfg.targets), init_lora_weights=True)
        self.unet.requires_grad_(False)
        with _seeded(cfg.seed):
            inject_adapter_in_model(lc, self.unet)
        return [p for n, p in self.unet.named_parameters() if "lora_" in n and p.requires_grad]

    def teacher(self):
        from peft.tuners.tuners_utils import BaseTunerLayer

        @contextlib.contextmanager
        def off():
            layers = [m for m in self.unet.modules() if isinstance(m, BaseTunerLayer)]
            for m in layers:
                m.enable_adapters(False)
            try:
                yield
            finally:
                for m in layers:
                    m.enable_adapters(True)
        return off()


class _Salun(_Method):
    # Its teacher (a frozen copy) could overlap, but measured side by side at 2 threads it gains
    # nothing (150 vs 147 ms a step), while spare's gains 4%: SalUn runs in its faster setting.
    overlap = False

    def setup(self, gen):
        cfg, task, unet = self.cfg, self.task, self.unet
        self.teacher_model = copy.deepcopy(unet).requires_grad_(False)
        scores = ref.full_grad_saliency(unet, _forget_batches(task, self.sampler(), cfg, gen), _diffusion_loss)
        self.masks = ref.kth_threshold_masks(_layer_weights(scores, unet, cfg.targets), cfg.density)
        unet.requires_grad_(False)
        params = []
        for k, m in self.masks.items():
            p = unet.get_parameter(k)
            p.requires_grad_(True)
            mf = m.to(p.dtype)
            p.register_hook(lambda g, mf=mf: g * mf)
            params.append(p)
        return params



class _Esd(_Method):
    # Config.targets does not apply: ESD-x is every cross-attention parameter by definition.
    def setup(self, gen):
        unet = self.unet
        self.teacher_model = copy.deepcopy(unet).requires_grad_(False)
        unet.requires_grad_(False)
        params = [p for n, p in unet.named_parameters() if ".attn2." in n]
        if not params:
            raise ValueError("esd: the UNet has no cross-attention (attn2) parameters to fine-tune")
        for p in params:
            p.requires_grad_(True)
        return params

    def losses(self, gen, sampler):
        task, cfg = self.task, self.cfg
        i_f = torch.randint(task.x_forget.shape[0], (cfg.batch_forget,), generator=gen)
        t = sampler.sample(cfg.batch_forget, gen)
        xt, _ = task.noised(task.x_forget[i_f], t, gen)
        c_f = task.c_forget[i_f]
        with torch.no_grad():
            e = _eps(self.teacher_model, torch.cat([xt, xt]), torch.cat([t, t]),
                     torch.cat([task.c_null.expand_as(c_f), c_f]))
            e0, ef = e.chunk(2)
            target = e0 - cfg.esd_eta * (ef - e0)
        loss = F.mse_loss(_eps(self.unet, xt, t, c_f), target)
        return loss, torch.zeros(())


_IMPL = {"spare": _Spare, "spare-reference": _SpareReference, "lora": _Lora, "salun": _Salun, "esd": _Esd}


# ------------------------------------------------------------------------------------- checkpoints
def _save_checkpoint(path, step, params, opt, gen, history, cfg):
    state = {"step": step, "params": [p.detach().clone() for p in params], "optimizer": opt.state_dict(),
             "rng": gen.get_state(), "history": history, "config": dataclasses.asdict(cfg)}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path, params, opt, gen, cfg):
    state = torch.load(path, weights_only=False, map_location="cpu")   # copy_/load_state_dict place it
    want, default = dataclasses.asdict(cfg), dataclasses.asdict(Config(method=cfg.method))
    saved = {k: state["config"].get(k, default[k]) for k in want}   # settings added since: their defaults
    saved["block"] = _check_block(saved["block"])   # saved as a list before Config made it a tuple
    diff = {k: (saved[k], v) for k, v in want.items() if k not in ("steps", "checkpoint_every") and saved[k] != v}
    if diff:
        raise ValueError(f"resume: the checkpoint {path} was made with other settings: "
                         + ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in diff.items()))
    if len(state["params"]) != len(params) or any(a.shape != b.shape for a, b in zip(state["params"], params)):
        raise ValueError(f"resume: the checkpoint {path} does not match this model's trainable parameters")
    with torch.no_grad():
        for p, v in zip(params, state["params"]):
            p.copy_(v)
    opt.load_state_dict(state["optimizer"])
    _own_adam_implementation(opt)
    gen.set_state(state["rng"])
    return state["step"], state["history"]


# ----------------------------------------------------------------------------------------- trainer
class Trainer:
    """One method on one UNet, a step at a time. Construction runs the method's setup (stage 1 and the
    adapters, or the trainable weights) and makes the Adam optimizer; :meth:`step` takes one training
    step. :func:`run` adds timing, checkpoints, memory and results; ``benchmarks.unlearn_step`` times
    the phases of :meth:`step` through ``clock``.

    ``overlap`` (``spare``, whose teacher is the student with adapters off in its own thread): with 2+
    torch threads the teacher's forward runs in a worker thread beside the student's. :meth:`close`
    (or ``with``) ends the worker; the results change only in float rounding."""

    def __init__(self, unet, task, cfg: Config, gen: Optional[torch.Generator] = None, overlap: bool = True):
        self.cfg = cfg
        self.gen = gen if gen is not None else torch.Generator().manual_seed(cfg.seed)   # draws stay on the CPU
        self.device = next(unet.parameters()).device
        task = task.to(self.device)   # references only, where the tensors are there already
        self.method = _IMPL[cfg.method](unet, task, cfg)
        with self.precision():
            self.params = self.method.setup(self.gen)
        self.sampler = self.method.sampler()
        self.teacher_model = self.method.teacher_model   # a frozen copy, or None (teacher = adapters off)
        unet.train(False)
        self.opt = _adam(self.params, cfg.learning_rate)
        # CPU only: small convolutions scale poorly over cores, GPUs gain nothing from it.
        if overlap and self.method.overlap and self.device.type == "cpu" and _Overlap.available():
            self.method.runner = _Overlap()

    def close(self):
        if self.method.runner is not None:
            self.method.runner.close()
            self.method.runner = None

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
        run's generator)."""
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
        tick("backward")
        self.opt.step()
        tick("optimizer")
        return lf, lr_


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
    [[forget, retain], ...], "curve", "mask_density", "peak_mem_mb", "state_mb", ...}``. With
    ``out_dir`` and ``cfg.checkpoint_every``, ``out_dir/checkpoint.pt`` is written atomically every
    K steps; ``resume=True`` continues from it (the final adapter equals an uninterrupted run's).
    """
    from tqdm import tqdm

    if resume and not out_dir:
        raise ValueError("resume: needs out_dir (where checkpoint.pt is)")
    ckpt = os.path.join(out_dir, "checkpoint.pt") if out_dir else None
    if resume and not os.path.exists(ckpt):
        raise FileNotFoundError(f"resume: no checkpoint at {ckpt}")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    tr = Trainer(unet, task, cfg)
    t1 = time.perf_counter()
    m, params, opt, sampler = tr.method, tr.params, tr.opt, tr.sampler
    start, history = 0, []
    overlapped = tr.method.runner is not None
    with tr:
        if resume:
            start, history = _load_checkpoint(ckpt, params, opt, tr.gen, cfg)
        bar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc=f"{cfg.method}", dynamic_ncols=True)
        for step in range(start, cfg.steps):
            lf, lr_ = tr.step()
            history.append([lf.item(), lr_.item()])
            bar.set_postfix(forget=f"{history[-1][0]:.4f}", retain=f"{history[-1][1]:.4f}", refresh=False)
            bar.update(1)
            if ckpt and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                _save_checkpoint(ckpt, step + 1, params, opt, tr.gen, history, cfg)
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
    step_peak = _peak_bytes(lambda: tr.loss(probe_gen)[0].backward(), tr.device)
    m.runner = None
    opt.zero_grad(set_to_none=True)
    res = {
        "method": cfg.method, "seconds": t2 - t0, "stage_seconds": {"localise": t1 - t0, "train": t2 - t1},
        "steps": cfg.steps, "history": history, "curve": m.curve,
        "timestep_density": sampler.density() if m.curve else [],
        "mask_density": m.mask_density(),
        "state_mb": state / 2**20, "step_peak_mb": step_peak / 2**20, "peak_mem_mb": (state + step_peak) / 2**20,
        "config": dataclasses.asdict(cfg),
    }
    if out_dir and cfg.method == "spare":
        res["adapter"] = save_adapter(unet, os.path.join(out_dir, "adapter.safetensors"))
    return res
