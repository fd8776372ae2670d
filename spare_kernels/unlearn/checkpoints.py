"""Training checkpoints: adapter (or trainable weights), optimizer, step, RNG and loss history, written
atomically; a checkpoint is refused when it was made with other settings."""
from __future__ import annotations

import dataclasses
import errno
import pickle
import zipfile

import torch

from ..masks import Mask, _check_block
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


# Everything _save_checkpoint writes is tensors, dicts, lists, numbers and strings (torch's weights-only
# unpickler takes those) but for the masks of method_state: Mask objects. Allowing exactly that class
# lets a checkpoint load without running arbitrary pickled code (every method, granularity, precision
# and the distributed runs' checkpoints load so: tests/test_probe2_cli.py).
CHECKPOINT_GLOBALS = (Mask,)
# What a damaged or foreign file makes torch.load raise (its zip reader: RuntimeError; the unpickler:
# UnpicklingError, or IndexError / KeyError on a malformed stream). OSError and MemoryError are not
# among them: a checkpoint that could not be read is not shown to be damaged.
_FORMAT_ERRORS = (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError, IndexError,
                  KeyError)


def _reason(e: BaseException) -> str:
    """The line of a torch.load error that says what is wrong (its messages run to paragraphs)."""
    text = str(e).strip()
    for line in text.splitlines():   # the weights-only unpickler's own reason, after torch's advice
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].split(". Please use", 1)[0].strip()
    first = text.splitlines()[0] if text else "no message"
    return first.split(" This is an internal miniz error.", 1)[0]


def _load(path, mmap: bool):
    """``torch.load`` of a checkpoint, weights only; ValueError (naming the file) where it is not one."""
    with open(path, "rb") as f:   # an OSError here (missing, no permission, EIO) propagates as it is
        magic = f.read(4)
    if magic != b"PK\x03\x04":   # torch.save writes a zip archive (and mmap needs one)
        what = "an empty file" if not magic else "not the zip archive torch.save writes"
        raise ValueError(f"resume: {path} is not a checkpoint ({what}); remove it to start afresh")
    try:
        with torch.serialization.safe_globals(list(CHECKPOINT_GLOBALS)):
            # map_location: apply_checkpoint's copy_ / load_state_dict place the tensors
            return torch.load(path, weights_only=True, mmap=mmap, map_location="cpu")
    except _FORMAT_ERRORS as e:
        if isinstance(e, torch.OutOfMemoryError) or "DefaultCPUAllocator" in str(e):
            raise   # out of memory, not a damaged file
        if isinstance(e, RuntimeError) and "file read failed" in str(e):   # the zip reader got fewer bytes
            raise OSError(errno.EIO, f"resume: reading {path} failed ({_reason(e)})", path) from e
        if isinstance(e, pickle.UnpicklingError) and "Unsupported global" in str(e):
            raise ValueError(f"resume: {path} holds objects a checkpoint of this version does not ({_reason(e)}); "
                             "not loaded (it could run code): resume it with the version that wrote it, or "
                             "remove it to start afresh") from None
        raise ValueError(f"resume: {path} is not a readable checkpoint ({type(e).__name__}: {_reason(e)}); "
                         "remove it to start afresh") from None


def read_checkpoint(path, cfg, mmap: bool = False) -> dict:
    """The checkpoint at ``path``, refused with a ``ValueError`` naming the file when it does not load
    or lacks what :func:`_save_checkpoint` writes, when it was made with other settings than ``cfg``
    (each named; ``steps`` and ``checkpoint_every`` may change), or when it is past ``cfg.steps``
    (resuming would report fewer steps than the adapter had). An ``OSError`` (the file could not be
    read) propagates: nothing says the file is damaged. Loaded weights only (:data:`CHECKPOINT_GLOBALS`).

    ``mmap=True``: the tensors are mapped, not read (a check that reads the settings only; the
    state's tensors then alias a private mapping of the file). ``run`` reads the file whole: its
    optimizer state would otherwise stay mapped to a file the run replaces every K steps."""
    state = _load(path, mmap)
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
    try:
        saved["block"] = _check_block(saved["block"])   # saved as a list before Config made it a tuple
    except ValueError:   # the file's fault, not --block's
        raise ValueError(f"resume: {path}: saved block {saved['block']!r} is not a pair of positive ints "
                         "(a damaged checkpoint)") from None
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
