"""Training checkpoints: adapter (or trainable weights), optimizer, step, RNG and loss history, written
atomically; a checkpoint is refused when it was made with other settings."""
from __future__ import annotations

import dataclasses

import torch

from ..masks import _check_block
from ..utils.io import atomic_path
from .config import Config


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



def _save_checkpoint(path, step, params, opt, gen, history, cfg, extra=None):
    """``extra``: more entries (the method's setup state: timestep curve and masks, so a resume skips
    the localise stage; the world size it was written on)."""
    state = {"step": step, "params": [p.detach().clone() for p in params], "optimizer": opt.state_dict(),
             "rng": gen.get_state(), "history": history, "config": dataclasses.asdict(cfg)}
    state.update(extra or {})
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


# What _save_checkpoint writes (method_state and world_size: only checkpoints of newer versions).
CHECKPOINT_KEYS = ("step", "params", "optimizer", "rng", "history", "config")


def read_checkpoint(path, cfg) -> dict:
    """The checkpoint at ``path``, refused with a ``ValueError`` naming the file when it does not load
    or lacks what :func:`_save_checkpoint` writes, when it was made with other settings than ``cfg``
    (each named; ``steps`` and ``checkpoint_every`` may change), or when it is past ``cfg.steps``
    (resuming would report fewer steps than the adapter had)."""
    try:
        state = torch.load(path, weights_only=False, map_location="cpu")   # copy_/load_state_dict place it
    except Exception as e:   # pickle, zip, EOF, OS errors alike: the file is not a checkpoint
        raise ValueError(f"resume: {path} is not a readable checkpoint ({type(e).__name__}: "
                         f"{str(e).strip() or 'no message'}); remove it to start afresh") from None
    if not isinstance(state, dict):
        raise ValueError(f"resume: {path} is not a checkpoint (it holds a {type(state).__name__}, expected a dict)")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise ValueError(f"resume: {path} is not a complete checkpoint (no {', '.join(missing)})")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0 or not isinstance(state["config"], dict):
        raise ValueError(f"resume: {path} is not a valid checkpoint (step {step!r}, config of type "
                         f"{type(state['config']).__name__})")
    if step > cfg.steps:
        raise ValueError(f"resume: {path} is already at step {step}, past steps={cfg.steps}: give steps >= {step}, "
                         "or another output directory to start afresh")
    want, default = dataclasses.asdict(cfg), dataclasses.asdict(Config(method=cfg.method))
    saved = {k: state["config"].get(k, default[k]) for k in want}   # settings added since: their defaults
    saved["block"] = _check_block(saved["block"])   # saved as a list before Config made it a tuple
    diff = {k: (saved[k], v) for k, v in want.items() if k not in ("steps", "checkpoint_every") and saved[k] != v}
    if diff:
        raise ValueError(f"resume: the checkpoint {path} was made with other settings: "
                         + ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in diff.items()))
    state["path"] = path
    return state


def apply_checkpoint(state, params, opt, gen):
    """Load a :func:`read_checkpoint` state into the trainable parameters, optimizer and generator;
    -> ``(step, history)``."""
    path = state.get("path", "the checkpoint")
    if len(state["params"]) != len(params) or any(a.shape != b.shape for a, b in zip(state["params"], params)):
        raise ValueError(f"resume: the checkpoint {path} does not match this model's trainable parameters")
    with torch.no_grad():
        for p, v in zip(params, state["params"]):
            p.copy_(v)
    opt.load_state_dict(state["optimizer"])
    _own_adam_implementation(opt)
    gen.set_state(state["rng"])
    return state["step"], state["history"]


def _load_checkpoint(path, params, opt, gen, cfg):
    return apply_checkpoint(read_checkpoint(path, cfg), params, opt, gen)
