"""The methods of the recipe: each one's setup (stage 1 and its adapters or trainable weights) and
per-step losses. The methods:

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

import contextlib
import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import disable_adapters
from ..distributed import World, broadcast_object, sharded_saliency, sharded_topk_masks
from ..masks import Mask, topk_masks
from ..patch import patch_unet
from ..saliency import SaliencyCollector
from ..targets import cross_attention_params, family_of, target_predicate
from . import reference as ref
from .distributed import shard
from .timesteps import TimestepSampler, probe


# ------------------------------------------------------------------------------------------ helpers


def _forget_batches(task, sampler, cfg, gen, world: World = World()):
    """The saliency stage's batches: noised forget samples, timesteps as in training. Across ranks,
    every rank draws the whole batch and yields its share, with the share's weight in the batch."""
    n = cfg.saliency_batch
    for _ in range(cfg.saliency_batches):
        idx = torch.randint(task.x_forget.shape[0], (n,), generator=gen)
        t = sampler.sample(n, gen)
        xt, noise = task.noised(task.x_forget[idx], t, gen)
        if not world.distributed:
            yield xt, t, task.c_forget[idx], noise
            continue
        s = shard(n, world)
        yield xt[s], t[s], task.c_forget[idx[s]], noise[s], (s.stop - s.start) / n


def _diffusion_loss(task, unet, batch):
    """The model's own training loss on a batch: MSE to the objective's target (noise, velocity...)."""
    xt, t, c, target = batch[:4]
    loss = F.mse_loss(task.predict(unet, xt, t, c), target)
    return loss * batch[4] if len(batch) > 4 else loss   # a rank's share of the batch mean


def _mse(a, b, n):
    """The mean squared error of a global batch of ``n`` samples, of which ``a``/``b`` are this rank's:
    the share of the sum that the rank's rows contribute (summed over ranks: the batch's mean)."""
    if a.shape[0] == n:
        return F.mse_loss(a, b)
    return F.mse_loss(a, b, reduction="sum") / (n * a[0].numel())


@contextlib.contextmanager
def _seeded(seed):
    """Adapter initialisers draw from torch's global CPU RNG (also for adapters on a GPU): seed it for
    the run, restore it after; other devices' generators are not touched."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def _linear_conv_names(unet, targets: str = "all"):
    """The Linear / Conv2d modules of ``targets`` (``Config.targets``, a preset of the model's family:
    see :mod:`spare_kernels.targets`), in ``named_modules`` order."""
    family = family_of(unet)
    pred = target_predicate(targets, family=family, where="targets")
    names = [n for n, m in unet.named_modules() if type(m) in (nn.Linear, nn.Conv2d) and pred(n, m)]
    if not names:
        raise ValueError(f"targets: {targets!r} matched no Linear/Conv2d layer of the {family} model "
                         f"{type(unet).__name__}")
    return names


def _layer_weights(scores: dict, unet, targets: str = "all") -> dict:
    """The entries of ``scores`` (keyed by parameter name) that are weights of the ``targets`` layers."""
    keys = {f"{n}.weight" for n in _linear_conv_names(unet, targets)}
    return {k: v for k, v in scores.items() if k in keys}


class _Method:
    """Setup (stage 1 + adapters) and the per-step losses of one method."""

    overlap = False   # the teacher may run in another thread while the student runs (thread-safe teacher)

    def __init__(self, unet, task, cfg, world: World = World()):
        self.unet, self.task, self.cfg, self.world = unet, task, cfg, world
        self.curve = None
        self.masks = {}
        self.teacher_model = None
        self.runner = None   # an _Overlap, set by Trainer for methods with overlap = True

    def sampler(self):
        return TimestepSampler(self.task.num_train_timesteps, base=self.task.objective.draw)

    def loss_fn(self):
        """``loss_fn(model, batch)``: the model's training loss (saliency stage)."""
        return functools.partial(_diffusion_loss, self.task)

    def predict(self, model, x, t, c):
        return self.task.predict(model, x, t, c)

    def student_teacher(self, xt, t, c_student, c_teacher):
        """(student prediction, teacher prediction) with one forward each."""
        def teacher():
            with torch.no_grad(), self.teacher():
                return self.predict(self.teacher_model or self.unet, xt, t, c_teacher)

        def student():
            return self.predict(self.unet, xt, t, c_student)
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
        t_r = task.objective.draw(cfg.batch_retain, gen)   # the model's own training draw (DDPM: uniform)
        x_f, _ = task.noised(task.x_forget[i_f], t_f, gen)
        x_r, _ = task.noised(task.x_retain[i_r], t_r, gen)
        # Across ranks: the same global batch on every rank, each computing its share.
        sf, sr = shard(cfg.batch_forget, self.world), shard(cfg.batch_retain, self.world)
        return self.distill(x_f[sf], t_f[sf], i_f[sf], x_r[sr], t_r[sr], i_r[sr])

    def distill(self, x_f, t_f, i_f, x_r, t_r, i_r):
        task, cfg, nf = self.task, self.cfg, x_f.shape[0]
        pred, target = self.student_teacher(
            torch.cat([x_f, x_r]), torch.cat([t_f, t_r]),
            torch.cat([task.c_forget[i_f], task.c_retain[i_r]]), torch.cat([task.c_surrogate[i_f], task.c_retain[i_r]]))
        return _mse(pred[:nf], target[:nf], cfg.batch_forget), _mse(pred[nf:], target[nf:], cfg.batch_retain)

    def state(self) -> dict:
        """What a checkpoint keeps of the setup, so a resume skips it: the timestep curve and the masks
        (packed)."""
        return {"curve": self.curve,
                "masks": {k: m if isinstance(m, Mask) else Mask.from_dense(m) for k, m in self.masks.items()}}

    def teacher(self):
        return contextlib.nullcontext()

    def mask_density(self):
        """Per-weight fraction of entries on (dense bool masks; none for unmasked methods)."""
        return {k: v.float().mean().item() for k, v in self.masks.items()}

    def _full_grad_scores(self, gen):
        """SPARE's full-``.grad`` saliency (the baselines'); across ranks each rank's gradients are
        all-reduced after every backward, as DDP would, so every rank thresholds the same scores."""
        from ..distributed import all_reduce
        world = self.world

        def sync(grads):
            for g in grads:
                r = all_reduce(g, world, "saliency gradient all-reduce")
                if r is not g:   # reduced on the backend's device
                    g.copy_(r)
        return ref.full_grad_saliency(self.unet, _forget_batches(self.task, self.sampler(), self.cfg, gen, world),
                                      self.loss_fn(), sync=sync if world.distributed else None)


class _Spare(_Method):
    def setup(self, gen, restored=None):
        cfg, task, unet, world = self.cfg, self.task, self.unet, self.world
        if restored is not None:   # a resumed run: the checkpoint's curve and masks
            self.curve, self.masks = restored["curve"], restored["masks"]
            self._sampler = TimestepSampler(task.num_train_timesteps, self.curve, cfg.mix, base=task.objective.draw)
        else:
            if cfg.timesteps == "critical":   # one rank probes, every rank gets its curve
                curve = probe(unet, task, cfg.probe_bins, cfg.probe_per_bin, seed=cfg.seed) if world.is_main else None
                self.curve = broadcast_object(curve, world, "timestep probe")
            self._sampler = TimestepSampler(task.num_train_timesteps, self.curve, cfg.mix, base=task.objective.draw)
            self.masks = self._localise(gen)
        with _seeded(cfg.seed):
            patch_unet(unet, masks=self.masks, rank=cfg.rank, alpha=cfg.alpha, init=cfg.init,
                       target_modules=[k[: -len(".weight")] for k in self.masks])
        return [p for p in unet.parameters() if p.requires_grad]

    def _localise(self, gen):
        """Saliency over the forget batches and the exact top-k. Across ranks: each rank collects its
        share of every batch, the sums are reduce-scattered (each rank keeps the tensors it owns) and
        the top-k runs on those shards (spare_kernels.distributed). ``grad_abs`` is ``|Σ g|`` of the
        global batch: ranks collect ``signed`` sums, reduced and made absolute batch by batch."""
        cfg, task, unet, world = self.cfg, self.task, self.unet, self.world
        # "all" on a UNet: every Linear / Conv2d the collector finds (None), as before the setting existed;
        # on a transformer the preset leaves the AdaLN modulation out.
        plain = cfg.targets == "all" and family_of(unet) in ("unet", "generic")
        layers = None if plain else _linear_conv_names(unet, cfg.targets)
        if not world.distributed:
            with SaliencyCollector(unet, stat=cfg.saliency_stat, target_modules=layers) as col:
                for batch in _forget_batches(task, self._sampler, cfg, gen):
                    _diffusion_loss(task, unet, batch).backward()
            return topk_masks(col.scores(), cfg.density, cfg.granularity, cfg.scope, cfg.block)
        owned, plan = sharded_saliency(unet, _forget_batches(task, self._sampler, cfg, gen, world), self.loss_fn(),
                                       cfg.saliency_stat, layers, world)
        return sharded_topk_masks(owned, plan, cfg.density, world, cfg.granularity, cfg.scope, cfg.block)

    overlap = True

    def sampler(self):
        return self._sampler

    def teacher(self):
        # This thread only: the student may be running the same modules in another thread.
        return disable_adapters(self.unet, this_thread=True)

    def mask_density(self):
        return {k: m.density for k, m in self.masks.items()}


class _SpareReference(_Method):
    def setup(self, gen, restored=None):
        cfg, unet = self.cfg, self.unet
        if restored is not None:
            self.masks = {k: m.to_dense() for k, m in restored["masks"].items()}
        else:
            scores = self._full_grad_scores(gen)
            if cfg.targets == "all":   # thresholded over every parameter, as SPARE's code
                self.masks = _layer_weights(ref.kth_threshold_masks(scores, cfg.density), unet)
            else:                      # over the targeted weights only, as spare: the same density over the same weights
                self.masks = ref.kth_threshold_masks(_layer_weights(scores, unet, cfg.targets), cfg.density)
        ref.patch_spare_ref(unet, self.masks, rank=cfg.rank, scale=(cfg.alpha or cfg.rank) / cfg.rank, seed=cfg.seed)
        return [p for p in unet.parameters() if p.requires_grad]

    def teacher(self):
        return ref.spare_ref_disabled(self.unet)

    def distill(self, x_f, t_f, i_f, x_r, t_r, i_r):
        task, unet, cfg = self.task, self.unet, self.cfg      # SPARE's code: four separate forwards
        with torch.no_grad(), self.teacher():
            tgt_f = self.predict(unet, x_f, t_f, task.c_surrogate[i_f])
            tgt_r = self.predict(unet, x_r, t_r, task.c_retain[i_r])
        pf = self.predict(unet, x_f, t_f, task.c_forget[i_f])
        pr = self.predict(unet, x_r, t_r, task.c_retain[i_r])
        return _mse(pf, tgt_f, cfg.batch_forget), _mse(pr, tgt_r, cfg.batch_retain)


class _Lora(_Method):
    def setup(self, gen, restored=None):
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

    def setup(self, gen, restored=None):
        cfg, unet = self.cfg, self.unet
        self.teacher_model = copy.deepcopy(unet).requires_grad_(False)
        if restored is not None:
            self.masks = {k: m.to_dense() for k, m in restored["masks"].items()}
        else:
            scores = self._full_grad_scores(gen)
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
    # Config.targets does not apply: ESD-x is every cross-attention parameter by definition; on an MMDiT
    # (SD3, Flux), whose text meets the image in joint attention, every joint-attention parameter
    # (spare_kernels.targets.cross_attention_params).
    def setup(self, gen, restored=None):
        unet = self.unet
        names = set(cross_attention_params(unet))   # raises, naming the family, when there are none
        self.teacher_model = copy.deepcopy(unet).requires_grad_(False)
        unet.requires_grad_(False)
        params = [p for n, p in unet.named_parameters() if n in names]
        for p in params:
            p.requires_grad_(True)
        return params

    def losses(self, gen, sampler):
        task, cfg = self.task, self.cfg
        i_f = torch.randint(task.x_forget.shape[0], (cfg.batch_forget,), generator=gen)
        t = sampler.sample(cfg.batch_forget, gen)
        xt, _ = task.noised(task.x_forget[i_f], t, gen)
        s = shard(cfg.batch_forget, self.world)
        xt, t, c_f = xt[s], t[s], task.c_forget[i_f[s]]
        # Negative guidance in the model's own prediction space (noise or velocity). Flux has no
        # unconditional branch (guidance-distilled): its "∅" is the empty prompt's conditional pass.
        with torch.no_grad():
            e = self.predict(self.teacher_model, torch.cat([xt, xt]), torch.cat([t, t]),
                             torch.cat([task.c_null.expand_as(c_f), c_f]))
            e0, ef = e.chunk(2)
            target = e0 - cfg.esd_eta * (ef - e0)
        loss = _mse(self.predict(self.unet, xt, t, c_f), target, cfg.batch_forget)
        return loss, torch.zeros(())


_IMPL = {"spare": _Spare, "spare-reference": _SpareReference, "lora": _Lora, "salun": _Salun, "esd": _Esd}
