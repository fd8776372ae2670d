"""Saliency collection over a whole (frozen) UNet: hooks that feed the saliency ops (DESIGN §1, §2).

No ``.grad`` tensor is ever created for a UNet weight and no ``requires_grad`` flag is changed: each
targeted layer's input and output gradient are captured by hooks and reduced by
:func:`spare_kernels.ops.saliency_linear` / :func:`~spare_kernels.ops.saliency_conv2d` straight into
one fp32 accumulator per weight.
"""
from __future__ import annotations

import difflib
import threading
import warnings
import weakref
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .backends import get_forced_backend, use_backend
from .ops import STATS, saliency_conv2d, saliency_linear
from .ops.masked_lora import conv_padding
from .targets import family_of, target_predicate, unmatched_entries

PATCHED_ATTR = "_spare_kernels_patched"

TargetSpec = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]


def _is_patched(m) -> bool:
    return getattr(m, PATCHED_ATTR, False) is True and isinstance(getattr(m, "base_layer", None), nn.Module)


def _is_wrapper(m) -> bool:
    # peft tuner layers (lora.Linear, ...) and similar: they hold the real layer as ``base_layer`` and
    # call its forward, so the base layer is hooked itself; its adapter siblings are not UNet weights.
    return not _is_patched(m) and isinstance(getattr(m, "base_layer", None), nn.Module)


def _is_layer(m) -> bool:
    return isinstance(m, (nn.Linear, nn.Conv2d)) and not _is_patched(m)


def _drop_grad(t: Tensor) -> None:
    # graph-entry aliases are leaves; their .grad is never wanted, free it at once
    t.grad = None


def _conv_geometry(name: str, conv: nn.Conv2d):
    """(stride, padding, dilation, groups) as the saliency op takes them, or ValueError naming the module."""
    if conv.padding_mode != "zeros":
        raise ValueError(f"SaliencyCollector: module {name!r}: padding_mode={conv.padding_mode!r} is not supported "
                         f"(only 'zeros'); exclude it with target_modules")
    try:
        pad = conv_padding("SaliencyCollector", conv.padding, conv.kernel_size, list(conv.stride), list(conv.dilation))
    except ValueError as e:
        raise ValueError(f"{e} (module {name!r}); exclude it with target_modules") from None
    return tuple(conv.stride), tuple(pad), tuple(conv.dilation), int(conv.groups)


class _Target:
    __slots__ = ("name", "key", "hooked", "layer", "conv")

    def __init__(self, name, key, hooked, layer, conv):
        self.name = name      # logical name (the wrapper's name for wrapped layers), used for matching
        self.key = key        # the weight's name in named_parameters()
        self.hooked = hooked  # module whose forward input/output are the layer's
        self.layer = layer    # nn.Linear / nn.Conv2d owning the weight
        self.conv = conv      # None for Linear, else (stride, padding, dilation, groups)


class _Pending:
    """One layer call's input, owned by the gradient hook on its output (dies with the graph), and the
    backend forced where the forward ran: the hook may run in autograd's device thread, which does not
    see the caller's use_backend scope."""
    __slots__ = ("target", "x", "version", "backend", "__weakref__")

    def __init__(self, target, x):
        self.target, self.x, self.version = target, x, x._version
        self.backend = get_forced_backend()


class SaliencyCollector:
    """Accumulates saliency statistics (DESIGN §1) of the Linear/Conv2d weights of a frozen module.

    Usage::

        with SaliencyCollector(unet, stat="grad_abs") as col:
            for batch in forget_set:
                loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=ehs).sample, noise)
                loss.backward()
        masks = topk_masks(col.scores(), density=0.01)

    or ``col.start()`` ... ``col.stop()`` (``remove()`` is an alias of ``stop()``). Each backward adds
    one statistic per layer call (``stat`` in :data:`spare_kernels.ops.STATS`; the sample is dim 0 of
    the layer's input: ``(B, T, C)`` / ``(B, C)`` for Linear, ``(B, C, H, W)`` for Conv2d).

    Design decisions:

    * **Frozen weights, no .grad.** The collector never touches ``requires_grad`` and no parameter gets
      a ``.grad``. To still get a graph, a forward pre-hook on ``module`` (while collecting, with grad
      enabled) replaces every floating tensor argument/kwarg (also inside lists/tuples/dicts) that does
      not require grad by ``t.detach().requires_grad_()``: a shallow alias, no copy, sharing ``t``'s
      storage and version counter. Outputs a layer produces from tensors outside the graph (e.g. the
      timestep embedding of integer timesteps, tensors the model builds itself) are made graph entries
      the same way by the layer's forward hook, so *every* targeted layer that runs is scored. These
      aliases are leaves: their ``.grad`` is freed as soon as it is accumulated. Consequence: the
      model must not modify such an input or first-layer output in place (autograd raises). An
      input made under ``torch.inference_mode()`` (which cannot enter a graph) is copied instead.
    * **Mechanism.** A forward hook on each target keeps its input ``x`` and registers a hook on the
      output; when the output's gradient arrives, the op reduces ``(x, grad)`` into the weight's fp32
      accumulator (allocated lazily on the weight's device) and ``x`` is dropped. ``x`` is owned by
      that hook, so it also dies with an unused graph; ``stop()`` / ``reset()`` / exit drop every input
      still waiting. An input modified in place between forward and backward raises RuntimeError.
      Under autocast ``x`` is cast to the gradient's dtype (what the layer computed with).
    * **Calls.** A layer called several times contributes once per call. For ``signed`` this equals
      the statistic of the summed gradient; for ``grad_abs``/``sample_*`` it is the sum over calls
      (``Σ_calls |G_call|``, not ``|Σ_calls G_call|`` = ``param.grad.abs()``). Identical for layers
      called once per forward, which is every layer of a diffusers UNet. Weights tied across modules
      share one accumulator. A graph backpropagated twice (``retain_graph=True``) contributes once.
      Gradient checkpointing gives the same scores (recomputed forwards are not counted twice), but
      the collector holds every layer input until its backward, as an unfrozen backward would.
    * **Targets.** ``None``: every ``nn.Linear`` / ``nn.Conv2d`` except the adapter layers of peft
      wrappers (``lora_A``/``lora_B``... are not UNet weights); a peft-wrapped layer is scored through
      its ``base_layer`` (key ``"...to_q.base_layer.weight"``). A list of names matches a module whose
      qualified name equals an entry or ends with ``"." + entry``; the presets ``"all"`` and
      ``"attention"`` are ``patch_unet``'s; any other string is a regex that must ``re.fullmatch`` the
      qualified name (peft semantics; one rule for both, :mod:`spare_kernels.targets`); a callable gets ``(name, layer)`` with
      ``layer`` the ``nn.Linear``/``nn.Conv2d`` owning the weight. A wrapped layer is matched by the
      wrapper's name (``"...to_q"``) or its own (``"...to_q.base_layer"``). No match: ValueError with
      the closest names; list entries that match nothing (while others do) only warn.
      Modules patched by :mod:`spare_kernels.nn` (attribute ``_spare_kernels_patched = True`` and a
      ``base_layer``) do not call ``base_layer.forward``: the wrapper itself is hooked (its input is
      the base layer's, and as ``y = x·(W + ΔW)ᵀ + b``, ``∂L/∂W = dyᵀ·x`` with ``dy`` the wrapper's output
      gradient), keyed ``"<name>.base_layer.weight"``, and its inner layers skipped.
    * **Scores.** :meth:`scores` returns ``{weight name: fp32 tensor of the weight's shape}`` in
      ``named_parameters()`` order, for the targets that received at least one gradient (a layer that
      never ran has no information, which is not the same as zero salience; ``all_targets=True``
      adds zeros for the rest). The tensors are the live accumulators (no copy: a UNet's worth of
      fp32); clone them if you keep collecting. ``reset()`` starts new buffers, so scores returned
      before stay untouched. For ``signed`` take ``.abs()`` before :func:`~spare_kernels.masks.topk_masks`.
    """

    def __init__(self, module: nn.Module, stat: str = "grad_abs", target_modules: TargetSpec = None):
        if not isinstance(module, nn.Module):
            raise TypeError(f"SaliencyCollector: module: expected an nn.Module, got {type(module).__name__}")
        if not isinstance(stat, str) or stat not in STATS:
            raise ValueError(f"SaliencyCollector: stat: expected one of {STATS}, got {stat!r}")
        self.module = module
        self.stat = stat
        self.targets: List[_Target] = _select(module, target_modules)
        self._acc: Dict[str, Tensor] = {}
        self._live: "weakref.WeakSet[_Pending]" = weakref.WeakSet()
        self._handles = []
        self._collecting = False
        self._lock = threading.Lock()
        # one per weight: backward passes in several threads add into one accumulator (a read-modify-write)
        self._locks = {t.key: threading.Lock() for t in self.targets}
        self._last_task = None
        self.num_forwards = 0    # top-level forwards run while collecting with grad enabled
        self.num_backwards = 0   # backward passes that delivered at least one layer gradient (0 if torch lacks the task id)
        self.num_updates = 0     # saliency op calls (layer calls reduced)

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> "SaliencyCollector":
        if not self._handles:
            self._handles.append(self.module.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            for t in self.targets:
                # prepend: see the layer's own output, before any user hook could replace it
                self._handles.append(t.hooked.register_forward_hook(partial(self._fwd_hook, t), with_kwargs=True,
                                                                    prepend=True))
        self._collecting = True
        return self

    def stop(self) -> None:
        """Remove every hook and drop the inputs still waiting for a gradient; scores are kept."""
        self._collecting = False
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._drop_pending()

    remove = stop

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def reset(self) -> None:
        """Forget all statistics, counters and pending inputs (hooks stay as they are)."""
        self._drop_pending()
        self._acc = {}
        self._last_task = None
        self.num_forwards = self.num_backwards = self.num_updates = 0

    def _drop_pending(self):
        for p in list(self._live):
            p.x = None

    @property
    def num_pending(self) -> int:
        """Layer inputs currently held while waiting for their gradient."""
        return sum(1 for p in list(self._live) if p.x is not None)

    @property
    def names(self) -> List[str]:
        """Weight names of all targets, in ``named_parameters()`` order."""
        return [t.key for t in self._unique_targets()]

    # ----------------------------------------------------------------- results
    def scores(self, all_targets: bool = False) -> Dict[str, Tensor]:
        out = {}
        for t in self._unique_targets():
            if all_targets and t.key not in self._acc:
                self._buffer(t)
            if t.key in self._acc:
                out[t.key] = self._acc[t.key]
        return out

    def take(self, key: str) -> Optional[Tensor]:
        """Remove and return weight ``key``'s accumulator (None if no gradient reached it since the last
        reset): a caller that reduces scores as they complete frees them here."""
        if key not in self._locks:
            return None
        with self._locks[key], self._lock:   # not while a backward adds into it
            return self._acc.pop(key, None)

    @property
    def held_bytes(self) -> int:
        """Bytes of the accumulators held now."""
        return sum(v.numel() * v.element_size() for v in list(self._acc.values()))

    def _unique_targets(self):
        seen = set()
        for t in self.targets:
            if t.key not in seen:
                seen.add(t.key)
                yield t

    def _buffer(self, t: _Target) -> Tensor:
        acc = self._acc.get(t.key)
        if acc is None:
            with self._lock:
                acc = self._acc.get(t.key)
                if acc is None:
                    w = t.layer.weight
                    acc = self._acc[t.key] = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        return acc

    # ----------------------------------------------------------------- hooks
    def _pre_hook(self, module, args, kwargs):
        if not self._collecting or not torch.is_grad_enabled():
            return None
        self.num_forwards += 1
        return _alias(args), _alias(kwargs)

    def _fwd_hook(self, target, module, args, kwargs, output):
        if not self._collecting or not torch.is_grad_enabled() or not isinstance(output, Tensor):
            return None
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
        if not isinstance(x, Tensor):
            return None
        if x.is_inference():   # e.g. a tensor the model keeps, made under inference_mode: no version counter
            x = x.clone()
        replaced = None
        if not output.requires_grad:
            # nothing upstream needs a gradient: make the output a graph entry (alias, no copy)
            output = replaced = output.detach().requires_grad_()
            output.register_post_accumulate_grad_hook(_drop_grad)
        pending = _Pending(target, x)
        self._live.add(pending)
        output.register_hook(partial(self._grad_hook, pending))  # the hook owns x, not the collector
        return replaced

    def _grad_hook(self, pending: _Pending, grad: Tensor):
        x, pending.x = pending.x, None
        if x is None:  # stopped/reset since the forward, or a second backward of a retained graph
            return None
        t = pending.target
        if x._version != pending.version:
            raise RuntimeError(f"SaliencyCollector: the input of {t.name!r} was modified in place between "
                               f"forward and backward; its saliency would be wrong")
        task = _graph_task_id()
        if x.dtype != grad.dtype:
            x = x.to(grad.dtype)
        with self._locks[t.key]:   # the op adds into the buffer in place: one update at a time per weight
            acc = self._buffer(t)
            with use_backend(pending.backend):
                if t.conv is None:
                    if x.dim() == 1:  # unbatched input: one sample
                        x, grad = x[None], grad[None]
                    saliency_linear(x, grad, self.stat, out=acc)
                else:
                    if x.dim() == 3:
                        x, grad = x[None], grad[None]
                    saliency_conv2d(x, grad, tuple(t.layer.weight.shape), self.stat, *t.conv, out=acc)
        with self._lock:
            if task is not None and task != self._last_task:
                self._last_task = task
                self.num_backwards += 1
            self.num_updates += 1
        return None

    def __repr__(self):
        return (f"SaliencyCollector(stat={self.stat!r}, targets={len(self.names)}, scored={len(self._acc)}, "
                f"collecting={self._collecting}, backwards={self.num_backwards})")


def _graph_task_id():
    f = getattr(torch._C, "_current_graph_task_id", None)  # private; only used for a progress counter
    return f() if f is not None else None


def _alias(obj):
    if isinstance(obj, Tensor):
        if obj.is_floating_point() and not obj.requires_grad:
            # a tensor made under torch.inference_mode() has no version counter and cannot enter a graph:
            # a copy (made here, outside inference mode) can; inputs are small next to the model
            a = (obj.clone() if obj.is_inference() else obj.detach()).requires_grad_()
            a.register_post_accumulate_grad_hook(_drop_grad)
            return a
        return obj
    if isinstance(obj, dict):
        vals = {k: _alias(v) for k, v in obj.items()}
        return vals if type(obj) is dict else type(obj)(vals)
    if isinstance(obj, list):
        return [_alias(v) for v in obj]
    if isinstance(obj, tuple):
        vals = [_alias(v) for v in obj]
        return type(obj)(*vals) if hasattr(obj, "_fields") else tuple(vals)
    return obj


# --------------------------------------------------------------------- target selection
def _candidates(root: nn.Module) -> List[tuple]:
    """(logical name, weight layer's own name, hooked module, weight layer) for every scoreable layer."""
    names = {id(m): n for n, m in root.named_modules()}
    logical = {}   # id(module) -> wrapper's name, for base layers of peft-style wrappers
    skip = set()   # ids of modules not to consider (inside patched wrappers, adapter branches)
    out = []
    for name, m in root.named_modules():  # pre-order: a wrapper comes before its children
        if id(m) in skip:
            continue
        lname = logical.get(id(m), name)
        if _is_patched(m):
            layer = m.base_layer
            while not _is_layer(layer):  # e.g. a peft layer under the patch
                if not isinstance(getattr(layer, "base_layer", None), nn.Module):
                    raise ValueError(f"SaliencyCollector: patched module {name!r}: base_layer chain does not end "
                                     f"in an nn.Linear/nn.Conv2d (got {type(layer).__name__})")
                layer = layer.base_layer
            skip.update(id(s) for s in m.modules() if s is not m)
            out.append((lname, names.get(id(layer), name), m, layer))
        elif _is_wrapper(m):
            keep = {id(s) for s in m.base_layer.modules()}
            skip.update(id(s) for s in m.modules() if s is not m and id(s) not in keep)
            logical[id(m.base_layer)] = lname
        elif _is_layer(m):
            out.append((lname, name, m, m))
    return out


def _suffixes(names):
    s = set()
    for n in names:
        parts = n.split(".")
        s.update(".".join(parts[i:]) for i in range(len(parts)))
    return sorted(s)


def _no_match(spec, cands, entries):
    lnames = [c[0] for c in cands]
    if not lnames:
        return ValueError("SaliencyCollector: the module has no nn.Linear or nn.Conv2d layer to score")
    pool = _suffixes(lnames)
    close = []
    for e in entries:
        close += [c for c in difflib.get_close_matches(e, pool, n=5, cutoff=0.5) if c not in close]
    hint = ""
    if isinstance(spec, str):
        hint = " (a string is a regex that must re.fullmatch the whole qualified name; pass a list for suffix matching)"
    shown = ", ".join(repr(c) for c in close[:8]) if close else ", ".join(repr(n) for n in lnames[:8]) + ", ..."
    return ValueError(f"SaliencyCollector: target_modules={spec!r} matched no nn.Linear/nn.Conv2d{hint}; "
                      f"closest module names: {shown}")


def _select(root: nn.Module, spec: TargetSpec) -> List[_Target]:
    cands = _candidates(root)
    if spec is not None and not (isinstance(spec, str) or callable(spec)
                                 or (isinstance(spec, (list, tuple, set, frozenset))
                                     and all(isinstance(e, str) for e in spec))):
        raise TypeError(f"SaliencyCollector: target_modules: expected None, a list of names, a regex string or a "
                        f"callable (name, module) -> bool, got {type(spec).__name__}")
    # The shared rule (targets.py), with "all" for None; a name matches as the logical (wrapper) name
    # or the weight layer's own, except for a callable, which sees the logical name.
    pred = target_predicate(spec, default="all", where="SaliencyCollector: target_modules", family=family_of(root))
    if callable(spec):
        chosen = [c for c in cands if pred(c[0], c[3])]
    else:
        chosen = [c for c in cands if pred(c[0], c[3]) or pred(c[1], c[3])]
    if not chosen:
        raise _no_match(spec, cands, [] if callable(spec) else [spec] if isinstance(spec, str) else list(spec))
    if isinstance(spec, (list, tuple, set, frozenset)):
        unused = unmatched_entries(spec, [c[0] for c in cands] + [c[1] for c in cands])
        if unused:
            warnings.warn(f"SaliencyCollector: target_modules entries {unused} matched no nn.Linear/nn.Conv2d",
                          stacklevel=3)
    pnames = {}
    for n, p in root.named_parameters():  # first name of each (possibly tied) parameter
        pnames.setdefault(id(p), n)
    order = {n: i for i, n in enumerate(pnames.values())}
    targets = []
    for lname, own, hooked, layer in chosen:
        w = getattr(layer, "weight", None)
        if not isinstance(w, Tensor):
            raise ValueError(f"SaliencyCollector: module {own!r} has no weight tensor")
        conv = _conv_geometry(own, layer) if isinstance(layer, nn.Conv2d) else None
        key = pnames.get(id(w), f"{own}.weight")
        targets.append(_Target(lname, key, hooked, layer, conv))
    targets.sort(key=lambda t: order.get(t.key, len(order)))
    return targets


__all__ = ["SaliencyCollector", "STATS"]
