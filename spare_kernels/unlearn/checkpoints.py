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


def read_checkpoint(path, cfg) -> dict:
    """The checkpoint at ``path``, refused (``ValueError`` naming each setting) when it was made with
    other settings than ``cfg`` (``steps`` and ``checkpoint_every`` may change)."""
    state = torch.load(path, weights_only=False, map_location="cpu")   # copy_/load_state_dict place it
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
