"""Fused masked-LoRA layers that *are* peft LoRA layers.

``MaskedLoRALinear`` / ``MaskedLoRAConv2d`` subclass peft's ``lora.Linear`` / ``lora.Conv2d``: peft and
diffusers see a peft layer (``isinstance(m, BaseTunerLayer)``, ``lora_A.<name>.weight`` keys, ``r``,
``lora_alpha``, ``scaling``, ``set_adapter``, ``enable_adapters``, ``delete_adapter``, ``set_scale``,
``merge``/``unmerge``...), and every one of those calls keeps peft's meaning. What changes is how the
layer computes:

- **fast path** (no extra call arguments, no hook on the base layer, no adapter dropout active): the
  live adapters run through the fused op, ``y = x·(W + s·M⊙(B·A))ᵀ + b``; the first adapter fused with
  the base layer, stacked ones as deltas;
- **peft's path** otherwise: ``base_layer(x, ...)`` (its hooks fire as under peft) plus each adapter on
  ``dropout(x)``, peft's own code where no live adapter has a mask, the masked delta through the op
  (zero base) where one has.

An adapter may carry a mask (``masks[name]``: ``None`` or a :class:`~spare_kernels.masks.Mask`); masks
are not in the state dict (``save_adapter`` stores them, bit-packed), so peft's state dict is exactly a
stock layer's. ``merge`` keeps the original values of every entry it changes, so ``unmerge`` restores
the base weight bit-exactly (the records follow ``.to()``/``.half()``; a second layer merging into a
weight it shares with another, tied, is refused: :func:`check_untied` checks a whole model). Layers
given an adapter that peft runs with its own variant code (DoRA, ``lora_bias``, ...) turn back into
peft's own class, as long as they hold no mask.

Like peft's, these layers are not ``nn.Linear`` / ``nn.Conv2d`` instances; they expose the base
layer's geometry (``in_features``, ``out_features``; ``in_channels``, ``kernel_size``, ``stride``, ...)
and ``weight``/``bias``. Factor shapes follow peft: Linear ``A (r, in)``, ``B (out, r)``; Conv2d
``A (r, in, kh, kw)``, ``B (out, r, 1, 1)``.
"""
from __future__ import annotations

import math
import numbers
import threading
import warnings
import weakref
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora import layer as peft_lora
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import Tensor, nn
from torch.nn.modules import module as _nn_module
from torch.utils.weak import WeakIdKeyDictionary

from .. import maskfmt as fmt
from ..masks import Mask, as_mask
from ..ops import _checks as chk
from ..ops import masked_lora_conv2d, masked_lora_linear
from ..ops.masked_lora import conv2d_checked, conv_args, linear_checked
from ..utils import autocast as _autocast

INITS = ("gaussian", "kaiming", "random")
_BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16}   # an integer view of each float width

# Layers whose adapters are off in the current thread only (disable_adapters(..., this_thread=True)):
# a teacher forward in a worker thread while the student runs the same modules in another.
_THREAD = threading.local()

# base weight -> weakref of the fused layer whose merges it carries: a second layer merging into the
# same (tied) weight is refused, since its delta would reach the first layer's output too. Weak keys by
# identity (a Tensor's == is elementwise): an entry goes with its weight, so a model deleted while merged
# leaves none, and a dead weight's id reused by a new tensor finds nothing. _apply re-keys a merged layer's
# entry where a conversion replaced the Parameter.
_MERGED_INTO = WeakIdKeyDictionary()


def thread_disabled() -> dict:
    """``{id(layer): depth}`` of the layers disabled in this thread (the calling thread's own dict)."""
    d = getattr(_THREAD, "off", None)
    if d is None:
        d = _THREAD.off = {}
    return d


def _observable(m: nn.Module) -> bool:
    """Whether calling ``m`` as a module does more than its class's forward: hooks of any kind, or a
    forward replaced on the instance (accelerate's and diffusers' hook wrappers, offloading, layerwise
    casting)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or "forward" in m.__dict__)


def _global_hooks() -> bool:
    g = _nn_module
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
                or g._global_backward_pre_hooks)


def _changed(old: Tensor, new: Tensor):
    """Where ``new`` differs from ``old`` bit for bit (-0.0 + 0.0 is +0.0: equal values, other bits), and
    the old values there: what restores ``old`` exactly."""
    bits = _BITS[old.element_size()]
    where = new.view(bits) != old.view(bits)
    return Mask.from_dense(where), old[where].clone()


class _Fused:
    """What the fused layers add to peft's: masks, the fused forward, bit-exact merges."""

    _spare_kernels_patched = True   # marker read by hooks that must see through the wrapper
    # peft deletes an adapter's entry from each of these on delete_adapter, so masks go with it
    other_param_names = peft_lora.LoraLayer.other_param_names + ("masks",)
    _PLAIN_FORWARD: type = nn.Module   # the base class whose forward the fast path reproduces

    def __init__(self, base_layer: nn.Module, adapter_name: Optional[str] = None, config=None, r: int = 0,
                 lora_alpha: int = 1, **kwargs):
        base = base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer
        if not isinstance(base, self._PLAIN_FORWARD):
            raise TypeError(f"base_layer: expected nn.{self._PLAIN_FORWARD.__name__}, got {type(base).__name__}")
        self._check_geometry(base)
        self.__dict__["masks"] = {}
        if adapter_name is None:   # an empty layer: adapters come from add_adapter
            _empty_lora_layer(self, base_layer)
            self._init_empty(base)
        else:                      # peft's own constructor
            super().__init__(base_layer, adapter_name, config=config, r=r, lora_alpha=lora_alpha, **kwargs)
        if isinstance(self, _Fused):   # not when the config made it peft's own layer (update_layer)
            self._init_fused()

    @staticmethod
    def _check_geometry(base: nn.Module) -> None:
        """Raise for a base layer whose peft LoRA the op does not compute (see :func:`check_base`)."""
        check_base(base)

    def _init_empty(self, base: nn.Module) -> None:
        """What peft's constructor would set besides the adapter."""

    def _init_fused(self) -> None:
        d = self.__dict__
        d.setdefault("masks", {})
        d.setdefault("_merge_backup", {})
        d.setdefault("_sk_adapters", set())   # added through this library's add_adapter (unpatch removes them)
        # adapters peft runs with its own code here (a LoRA variant or lora_bias on a layer that holds masks)
        d["_special"] = {a for a in self.lora_A if a in getattr(self, "lora_variant", {}) or self.lora_bias.get(a)}
        base = self.get_base_layer()
        # The fused op computes what the base class's own forward does; a subclass with its own
        # forward (or a base that is itself wrapped) runs through base_layer(x) instead.
        d["_plain_base"] = self.base_layer is base and type(base).forward is self._PLAIN_FORWARD.forward

    # -------------------------------------------------------------------------- adapters
    def add_adapter(self, name: str, rank: int, scale: float = 1.0, mask=None, init: str = "gaussian",
                    dtype: torch.dtype = torch.float32, lora_A: Optional[Tensor] = None,
                    lora_B: Optional[Tensor] = None, active: bool = True) -> None:
        """Add adapter ``name`` as peft would (``r = rank``, ``lora_alpha = scale·rank``, no dropout) with
        this library's init: ``lora_A``/``lora_B`` given are used as they are (a Parameter is kept, not
        copied); else ``init``: ``gaussian`` (A ~ N(0, 1/r), B = 0, peft's "gaussian"), ``kaiming`` (peft's
        default: A kaiming-uniform, B = 0), ``random`` (both non-zero, for tests and benchmarks). Unlike
        peft's ``set_adapter``, the other adapters stay active (stacked) and keep their flags."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"adapter_name: expected a non-empty string without '.', got {name!r}")
        if name in self.lora_A:
            raise ValueError(f"adapter_name: {name!r} already exists on this layer")
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
            raise ValueError(f"rank: expected a positive int, got {rank!r}")
        rank = int(rank)
        scale = chk.scale("", scale)
        a_shape, b_shape = factor_shapes(self.get_base_layer(), rank)
        if (lora_A is None) != (lora_B is None):   # one alone would be dropped for a drawn pair
            raise ValueError(f"lora_A/lora_B: expected both factors or neither, got only "
                             f"{'lora_A' if lora_B is None else 'lora_B'}")
        if lora_A is None:
            if init not in INITS:
                raise ValueError(f"init: expected one of {INITS}, got {init!r}")
            if dtype not in chk.FLOAT_DTYPES:
                raise TypeError(f"dtype: expected a floating-point dtype {chk.FLOAT_DTYPES}, got {dtype!r}")
        else:
            self._check_factors(lora_A, lora_B, a_shape, b_shape)
        if mask is not None:
            mask = as_mask(mask, self.weight.shape, self.weight.device)
        flags = [(p, p.requires_grad) for p in self._adapter_params()]
        prev = list(self.active_adapters)
        cfg = LoraConfig(r=rank, lora_alpha=scale * rank, init_lora_weights=False, lora_dropout=0.0)
        # peft builds the factor modules (drawing its own init); the values are ours, from the same
        # random stream as before: a seed gives the same adapter whatever peft draws.
        with torch.random.fork_rng(devices=[]):
            self.update_layer(name, rank, lora_alpha=scale * rank, config=cfg)
        for p, f in flags:
            p.requires_grad_(f)
        self.scaling[name] = scale   # exactly, not alpha / r rounded
        if lora_A is None or lora_B is None:
            lora_A, lora_B = draw_factors(a_shape, b_shape, init, rank, dtype)
        dev = self.weight.device
        for fac, t in ((self.lora_A[name], lora_A), (self.lora_B[name], lora_B)):
            fac.weight = t if isinstance(t, nn.Parameter) else nn.Parameter(t.to(dev))
        self.masks[name] = mask
        self._sk_adapters.add(name)
        self._active_adapter = prev + [name] if active else prev

    def _check_factors(self, A, B, a_shape, b_shape) -> None:
        """Given factors the forward can run: float tensors of one dtype (the op multiplies them together;
        peft's own code fails on a mix too), of the layer's shapes; a Parameter (kept as it is, not moved)
        on the weight's device."""
        for key, t in (("lora_A", A), ("lora_B", B)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{key}: expected a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in chk.FLOAT_DTYPES:
                raise TypeError(f"{key}: expected a floating-point tensor, got {t.dtype}")
        if A.dtype != B.dtype:
            raise TypeError(f"lora_A/lora_B: expected one dtype for both factors, got lora_A {A.dtype} and "
                            f"lora_B {B.dtype}; convert one (e.g. lora_B.to({A.dtype}))")
        if tuple(A.shape) != a_shape or tuple(B.shape) != b_shape:
            raise ValueError(f"lora_A/lora_B: expected shapes {a_shape} and {b_shape}, "
                             f"got {tuple(A.shape)} and {tuple(B.shape)}")
        dev = self.weight.device
        for key, t in (("lora_A", A), ("lora_B", B)):
            if isinstance(t, nn.Parameter) and t.device != dev:
                raise ValueError(f"{key}: a Parameter is used as it is: expected it on the weight's device {dev}, "
                                 f"got {t.device}")

    def _adapter_params(self):
        return [p for d in (self.lora_A, self.lora_B) for m in d.values() for p in m.parameters()]

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
        """peft's, and then: a mask slot for the adapter. An adapter peft runs with its own variant code
        (DoRA, lora_bias, ...) makes the layer peft's own class again where it holds no mask and no merge;
        where it does, that adapter runs peft's code inside this layer (and merges bit-exactly too)."""
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        self.masks[adapter_name] = None
        if adapter_name in getattr(self, "lora_variant", {}) or self.lora_bias.get(adapter_name):
            if any(m is not None for m in self.masks.values()) or self.merged_adapters:
                self._special.add(adapter_name)
            else:
                release(self)
                warnings.warn(f"adapter {adapter_name!r} is a LoRA variant (DoRA, lora_bias, ...): its layer runs "
                              "peft's own code, unfused", UserWarning, stacklevel=3)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._special.discard(adapter_name)
        self._sk_adapters.discard(adapter_name)

    def set_mask(self, name: str, mask) -> None:
        """``None`` (dense adapter), a ``Mask`` or a bool/uint8 tensor of the weight's shape."""
        self._check_name(name)
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged; unmerge it before changing its mask")
        if mask is not None and name in self._special:
            raise ValueError(f"mask: adapter {name!r} is a LoRA variant (DoRA, lora_bias, ...) that peft computes "
                             "with its own code, which takes no mask")
        if mask is not None:
            mask = as_mask(mask, self.weight.shape, self.weight.device)
        self.masks[name] = mask

    def _check_name(self, name):
        if name not in self.lora_A:
            raise KeyError(f"adapter_name: {name!r} not on this layer (has {list(self.lora_A)})")

    def remove_adapter(self, name: str) -> None:
        """peft's ``delete_adapter``, refused while the adapter is merged; the other adapters keep their
        active state and ``requires_grad`` flags (peft's would re-activate one and change flags)."""
        self._check_name(name)
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged; unmerge it before removing it")
        delete_quietly(self, name)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # Masks and merge backups follow the module's device and float dtype; their content is kept
        # (fn itself may be to_empty's, which would not keep it).
        def move(t):
            like = fn(t)
            dtype = like.dtype if t.is_floating_point() else t.dtype
            return t if (like.device == t.device and dtype == t.dtype) else t.to(like.device, dtype)
        # the masks were checked when made: no second check (a device read per padded element mask)
        for k, m in self.masks.items():
            if m is not None:
                self.masks[k] = Mask._trusted(m.granularity, m.shape, move(m.data), m.block)
        for k, parts in self._merge_backup.items():
            self._merge_backup[k] = tuple(None if p is None else (Mask._trusted(p[0].granularity, p[0].shape,
                                                                                move(p[0].data), p[0].block),
                                                                  move(p[1])) for p in parts)
        if self.merged_adapters:   # the conversion may have replaced the base weight's Parameter
            _MERGED_INTO[self.get_base_layer().weight] = weakref.ref(self)
        return self

    # -------------------------------------------------------------------------- merging
    def delta_weight(self, name: str) -> Tensor:
        """``scale·M⊙(B·A)`` of the weight's shape, fp32 (fp64 for fp64 weights)."""
        self._check_name(name)
        A = self.lora_A[name].weight
        B = self.lora_B[name].weight
        acc = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        d = (B.reshape(B.shape[0], -1).to(acc) @ A.reshape(A.shape[0], -1).to(acc)).view(self.weight.shape)
        d = d * self.scaling[name]
        m = self.masks.get(name)
        return d if m is None else d * m.to_dense()

    def get_delta_weight(self, adapter) -> Tensor:
        """peft's: the adapter's delta in its own dtype, with its mask applied."""
        return self.delta_weight(adapter).to(self.lora_B[adapter].weight.dtype)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list] = None) -> None:
        """peft's ``merge`` (``None``: the active adapters; already merged ones are skipped with peft's
        warning), folding ``M⊙(B·A)`` (a variant's merge is peft's own). The original values of every
        changed entry are kept (a packed position mask plus the values: for a dense adapter about one
        copy of the weight while merged), so :meth:`unmerge` restores the weight bit-exactly."""
        if isinstance(safe_merge, str):
            raise TypeError(f"merge: safe_merge: expected a bool, got the string {safe_merge!r}; the signature is "
                            f"peft's, merge(safe_merge=False, adapter_names=None): use "
                            f"merge(adapter_names=[{safe_merge!r}])")
        base = self.get_base_layer()
        names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.lora_A]
        if names:
            self._refuse_tied_merge(base.weight)
        for name in names:
            W = base.weight
            if name in getattr(self, "lora_variant", {}):
                new = self.lora_variant[name].merge_safe(self, name, W.detach().clone()).to(W.dtype)
            else:
                new = (W.to(torch.float64 if W.dtype == torch.float64 else torch.float32)
                       + self.delta_weight(name)).to(W.dtype)
            new_b = None
            if self.lora_bias.get(name):
                if base.bias is None:
                    raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has "
                                       "no bias.")
                new_b = (base.bias + self.lora_B[name].bias * self.scaling[name]).to(base.bias.dtype)
            if safe_merge and not (torch.isfinite(new).all() and (new_b is None or torch.isfinite(new_b).all())):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            self._merge_backup[name] = (_changed(W, new), None if new_b is None else _changed(base.bias, new_b))
            W.copy_(new)
            if new_b is not None:
                base.bias.copy_(new_b)
            self.merged_adapters.append(name)
            _MERGED_INTO[W] = weakref.ref(self)

    def _refuse_tied_merge(self, W) -> None:
        ref = _MERGED_INTO.get(W)
        other = ref() if ref is not None else None
        if (other is not None and other is not self and other.merged_adapters
                and other.get_base_layer().weight is W):
            raise ValueError(f"merge: this layer's base weight is shared with another patched layer (tied weights) "
                             f"that has {other.merged_adapters} merged into it: a second merge would reach both "
                             "layers' outputs; untie the weights (give one a copy) or keep the adapter unmerged")

    @torch.no_grad()
    def unmerge(self, adapter_name: Optional[str] = None) -> None:
        """Undo merges bit-exactly, newest first (``adapter_name``: down to and including that adapter;
        peft's ``unmerge()`` undoes all of them, and warns when nothing is merged)."""
        if adapter_name is not None and adapter_name not in self.merged_adapters:
            raise RuntimeError(f"adapter {adapter_name!r} is not merged")
        if not self.merged_adapters:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        self.check_unmerge(adapter_name)   # every record fits before the first is restored
        base = self.get_base_layer()
        while self.merged_adapters:
            last = self.merged_adapters[-1]
            for t, part in zip((base.weight, base.bias), self._merge_backup[last]):
                if part is not None:
                    where, values = part
                    t[where.to_dense().to(t.device)] = values.to(t.device, t.dtype)
            self.merged_adapters.pop()   # only once restored: a failure leaves the books as the weights
            self._merge_backup.pop(last)
            self._caches.pop(f"{last}-weight_norm", None)   # a DoRA merge's cache, peft's unmerge would pop
            if last == adapter_name:
                break
        ref = _MERGED_INTO.get(base.weight)
        if not self.merged_adapters and ref is not None and ref() is self:
            del _MERGED_INTO[base.weight]

    def check_unmerge(self, adapter_name: Optional[str] = None) -> None:
        """Raise (changing nothing) where :meth:`unmerge` could not restore the merges it would undo
        (``None``: all): a record missing, or the base weight or bias replaced since by one of another
        shape. Callers that unmerge several layers check them all first."""
        merged = list(self.merged_adapters)
        if adapter_name is not None:
            if adapter_name not in merged:
                raise RuntimeError(f"adapter {adapter_name!r} is not merged")
            merged = merged[merged.index(adapter_name):]
        base = self.get_base_layer()
        for name in merged:
            parts = self._merge_backup.get(name)
            if parts is None:
                raise RuntimeError(f"unmerge: adapter {name!r} is marked merged but this layer holds no record of the "
                                   "values its merge changed")
            for what, t, part in zip(("weight", "bias"), (base.weight, base.bias), parts):
                if part is not None and (t is None or tuple(part[0].shape) != tuple(t.shape)):
                    now = None if t is None else tuple(t.shape)
                    raise RuntimeError(f"unmerge: adapter {name!r}: the base {what} is now {now}, merged it was "
                                       f"{tuple(part[0].shape)}: it was replaced after merging, so the merge "
                                       "cannot be undone")

    @torch.no_grad()
    def unmerged_weight(self) -> Tensor:
        """A copy of the base weight with every merge undone (newest first, as :meth:`unmerge`); the
        layer is left as it is."""
        if self.merged_adapters:
            self.check_unmerge()
        W = self.weight.detach().clone()
        for name in reversed(self.merged_adapters):
            where, values = self._merge_backup[name][0]
            W[where.to_dense().to(W.device)] = values.to(W.device, W.dtype)
        return W

    # -------------------------------------------------------------------------- forward
    def _run_op(self, x, weight, bias, name):
        raise NotImplementedError

    @staticmethod
    def _owned(x, weight, A, B) -> bool:
        """The module validated its weight, adapters and masks when they were set (and moves them
        together): only ``x`` is new. Inputs that pass skip the op wrapper's checks; any other goes
        through them (and gets its clear error there)."""
        return (isinstance(x, Tensor) and x.dtype == weight.dtype and x.device == weight.device
                and A.dtype == B.dtype and A.device == weight.device and B.device == weight.device)

    def _wire(self, name):
        m = self.masks.get(name)
        return (None, fmt.NONE, 0, 0) if m is None else m.wire()

    def _live_adapters(self) -> list:
        """The adapters this call adds, with peft's rules: none while disabled (merged ones are
        unmerged first, as peft does) or while anything is merged (the base weight carries them)."""
        if self._disable_adapters:
            if self.merged_adapters:
                self.unmerge()
            return []
        if self._off_in_this_thread():
            return []
        if self.merged_adapters:
            return []
        act = self._active_adapter
        if isinstance(act, str):
            act = [act]
        have = self._modules["lora_A"]._modules   # (direct: nn.Module.__getattr__ costs ~0.4 µs a call)
        return [a for a in act if a in have]

    def _off_in_this_thread(self) -> bool:
        """Whether ``disable_adapters(..., this_thread=True)`` holds this layer in the calling thread."""
        off = getattr(_THREAD, "off", None)
        if not (off and id(self) in off):
            return False
        if self.merged_adapters:
            raise RuntimeError(f"adapters disabled while {self.merged_adapters} are merged into the base "
                               "weight; unmerge them first")
        return True

    def _fusable_call(self, bl, live) -> bool:
        """Whether the fused op computes exactly what peft's forward would, observably: not when the
        base layer's or a factor's own call does more than its class's forward (hooks, a wrapped
        forward), a variant adapter is live, or an adapter's dropout is active (training)."""
        if not self._plain_base or _observable(bl) or _global_hooks():
            return False
        special, mods = self._special, self._modules
        fa, fb = mods["lora_A"]._modules, mods["lora_B"]._modules
        for a in live:
            if a in special or _observable(fa[a]) or _observable(fb[a]):
                return False
        if self.training:
            drop = mods["lora_dropout"]._modules
            return all(type(drop[a]) is nn.Identity for a in live)
        return True

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if args or kwargs:   # peft's extra arguments (adapter_names for mixed batches, variant kwargs)
            return self._forward_peft(x, *args, **kwargs)
        live = self._live_adapters()
        bl = self._modules["base_layer"]
        if not live:
            return bl(x)
        if not self._fusable_call(bl, live):
            return self._forward_peft(x)
        # (the base's own weight and bias: peft's weight/bias properties walk the wrapper chain, ~4 µs)
        weight, bias = bl.weight, bl.bias
        dt = _autocast.dtype(x) if isinstance(x, Tensor) else None
        if dt is not None:   # as nn.Linear / nn.Conv2d under autocast; the op runs with it off
            return _autocast.call(self._run_live, dt, x, weight, bias, live)
        return self._run_live(x, weight, bias, live)

    def _run_live(self, x, weight, bias, live):
        # The first adapter is fused with the base layer; a further masked one adds its delta through the
        # op (zero base), a further unmasked one its factored x·Aᵀ·Bᵀ as peft computes it.
        y = self._run_op(x, weight, bias, live[0])
        for name in live[1:]:
            if self.masks.get(name) is not None:   # (weight: the autocast copy, where autocast is on)
                y = y + self._run_op(x, torch.zeros_like(weight), None, name)
            else:
                y = y + self._factored(x, name).to(y.dtype)
        return y

    def _factored(self, x, name):
        A, B = self.lora_A[name], self.lora_B[name]
        return B(A(self._cast_input_dtype(x, A.weight.dtype))) * self.scaling[name]

    def _forward_peft(self, x, *args, **kwargs):
        """peft's forward structure (base layer called as itself, adapters on ``dropout(x)``): peft's
        own code where no live adapter is masked, the masked delta through the op where one is."""
        if not self._disable_adapters and self._off_in_this_thread():
            kwargs.pop("adapter_names", None)
            return self.base_layer(x, *args, **kwargs)
        names = kwargs.get("adapter_names")
        if self._disable_adapters or self.merged_adapters:
            return super().forward(x, *args, **kwargs)   # peft's own: the base (and its errors)
        live = self._live_adapters()
        masked = [a for a in (set(names) if names is not None else live) if self.masks.get(a) is not None]
        if not masked:
            return super().forward(x, *args, **kwargs)
        if names is not None:
            raise ValueError(f"adapter_names: mixed-batch inference with masked adapters {sorted(masked)} is not "
                             "supported; run one batch per adapter (set_adapters) or merge the adapter")
        variant_kwargs = {k: kwargs.pop(k, None) for k in getattr(peft_lora, "VARIANT_KWARG_KEYS", ())}
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for a in live:
            if self.masks.get(a) is not None:
                result = result + self._delta(self.lora_dropout[a](x), a).to(out_dtype)
                continue
            xa = self._cast_input_dtype(x, self.lora_A[a].weight.dtype)
            if a in self._special and a in getattr(self, "lora_variant", {}):
                result = self.lora_variant[a].forward(self, active_adapter=a, x=xa, result=result,
                                                      **variant_kwargs, **kwargs)
            else:
                result = result + self.lora_B[a](self.lora_A[a](self.lora_dropout[a](xa))) * self.scaling[a]
        return result.to(out_dtype)

    def _delta(self, x, name):
        """``x`` through the adapter's masked delta alone (the op with a zero base weight)."""
        w = self.get_base_layer().weight
        zero = lambda x_, w_, b_: self._run_op(x_, torch.zeros_like(w_), None, name)   # noqa: E731
        dt = _autocast.dtype(x)
        if dt is not None:
            return _autocast.call(zero, dt, x, w, None)
        return zero(x.to(w.dtype), w, None)

    def extra_repr(self) -> str:
        parts = []
        for n in self.lora_A:
            m = self.masks.get(n)
            dens = "dense" if m is None else f"{m.granularity} {m.density:.3f}"
            parts.append(f"{n}: r={self.lora_A[n].weight.shape[0]}, scale={self.scaling[n]:g}, mask={dens}")
        return "; ".join(parts)


def draw_factors(shape_a, shape_b, init: str, rank: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """This library's adapter init, from the CPU random stream (a seed gives the same adapter on every
    device): ``gaussian`` A ~ N(0, 1/r), ``kaiming`` A kaiming-uniform (B = 0 for both), ``random`` B ~ N(0, 1)."""
    A = torch.empty(shape_a, dtype=dtype)
    B = torch.zeros(shape_b, dtype=dtype)
    if init == "kaiming":
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    else:
        nn.init.normal_(A, std=1.0 / rank)
    if init == "random":
        nn.init.normal_(B, std=1.0)
    return A, B


def delete_quietly(layer: nn.Module, name: str) -> None:
    """peft's ``delete_adapter`` on any LoRA layer, the other adapters' active state and ``requires_grad``
    flags kept (peft's would re-activate another adapter, change flags and warn)."""
    act = [a for a in layer.active_adapters if a != name]
    flags = [(p, p.requires_grad) for p in layer.parameters()]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=f"Adapter {name} was active which is now deleted")
        layer.delete_adapter(name)
    layer._active_adapter = act
    for p, f in flags:
        p.requires_grad_(f)


def _empty_lora_layer(layer, base_layer) -> None:
    """A peft LoRA layer on ``base_layer`` with no adapter yet (peft's constructors add one)."""
    nn.Module.__init__(layer)
    peft_lora.LoraLayer.__init__(layer, base_layer)
    layer._active_adapter = []
    base_layer.requires_grad_(False)
    layer.__dict__["_sk_created"] = True   # unpatch_unet puts the base layer back


class MaskedLoRALinear(_Fused, peft_lora.Linear):
    """peft's ``lora.Linear`` running ``y = x·(W + s·M⊙(B·A))ᵀ + b`` through the fused op.

    ``MaskedLoRALinear(linear)`` is an empty layer (adapters from :meth:`add_adapter`); peft's own
    signature ``MaskedLoRALinear(linear, adapter_name, config=LoraConfig(...), r=..., lora_alpha=...)``
    builds one as peft does (what its dispatcher and :func:`spare_kernels.use_fused_lora` call)."""

    _PLAIN_FORWARD = nn.Linear

    def _init_empty(self, base: nn.Module) -> None:
        self.fan_in_fan_out = False
        self.is_target_conv_1d_layer = False

    def _run_op(self, x, weight, bias, name):
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        if self._owned(x, weight, A, B) and x.dim() >= 1 and x.shape[-1] == weight.shape[1]:
            return linear_checked(x, weight, bias, A, B, self._wire(name), self.scaling[name])
        return masked_lora_linear(x, weight, bias, A, B, self.masks.get(name), self.scaling[name])


class MaskedLoRAConv2d(_Fused, peft_lora.Conv2d):
    """peft's ``lora.Conv2d`` (``A``: the base kernel ``in→r``, ``B``: 1×1 ``r→out``) running the masked
    delta fused into the conv. Constructors as :class:`MaskedLoRALinear`. Grouped and dilated convs are
    refused: peft's conv LoRA has no groups or dilation on ``A``, so it is not the same adapter there."""

    _PLAIN_FORWARD = nn.Conv2d

    def _init_empty(self, base: nn.Module) -> None:
        self._kernel_dim = base.weight.dim()
        self.conv_fn = F.conv2d

    # the base conv's geometry, as code written for nn.Conv2d reads it
    in_channels = property(lambda self: self.get_base_layer().in_channels)
    out_channels = property(lambda self: self.get_base_layer().out_channels)
    kernel_size = property(lambda self: self.get_base_layer().kernel_size)
    stride = property(lambda self: self.get_base_layer().stride)
    padding = property(lambda self: self.get_base_layer().padding)
    dilation = property(lambda self: self.get_base_layer().dilation)
    groups = property(lambda self: self.get_base_layer().groups)
    padding_mode = property(lambda self: self.get_base_layer().padding_mode)

    def _geometry(self, c):
        """``(stride, padding, dilation, smallest input (H, W))`` as the op takes them, kept until the
        base conv's attributes change."""
        key = (c.stride, c.padding, c.dilation, c.kernel_size)
        geo = self.__dict__.get("_geo")
        if geo is None or geo[0] != key:
            stride, padding, dilation = conv_args("masked_lora_conv2d", c.stride, c.padding, c.dilation,
                                                  c.kernel_size)
            min_hw = [dilation[d] * (c.kernel_size[d] - 1) + 1 - 2 * padding[d] for d in range(2)]
            geo = self.__dict__["_geo"] = (key, (stride, padding, dilation, min_hw))
        return geo[1]

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if not (args or kwargs) and isinstance(x, Tensor) and x.dim() not in (3, 4):
            raise ValueError(f"x: expected a 3-D (unbatched) or 4-D tensor, got shape {tuple(x.shape)}")
        return super().forward(x, *args, **kwargs)

    # unbatched (C, H, W) input, as nn.Conv2d takes it: the op sees a batch of one
    def _run_live(self, x, weight, bias, live):
        if x.dim() == 3:
            return super()._run_live(x.unsqueeze(0), weight, bias, live).squeeze(0)
        return super()._run_live(x, weight, bias, live)

    def _delta(self, x, name):
        if x.dim() == 3:
            return super()._delta(x.unsqueeze(0), name).squeeze(0)
        return super()._delta(x, name)

    def _run_op(self, x, weight, bias, name):
        c = self.base_layer
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        if self._owned(x, weight, A, B) and x.dim() == 4 and x.shape[1] == weight.shape[1] * c.groups:
            stride, padding, dilation, min_hw = self._geometry(c)
            if x.shape[2] >= min_hw[0] and x.shape[3] >= min_hw[1]:
                return conv2d_checked(x, weight, bias, A, B, self._wire(name), self.scaling[name],
                                      stride, padding, dilation, c.groups)
        return masked_lora_conv2d(x, weight, bias, A, B, self.masks.get(name), self.scaling[name],
                                  c.stride, c.padding, c.dilation, c.groups)


# fused class -> peft's own, and back (the layers change class in place: same object, same hooks)
_STOCK = {MaskedLoRALinear: peft_lora.Linear, MaskedLoRAConv2d: peft_lora.Conv2d}
_FUSED = {v: k for k, v in _STOCK.items()}


def factor_shapes(base_layer: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of ``(lora_A, lora_B)`` of rank ``rank`` on ``base_layer`` (peft's layout)."""
    if isinstance(base_layer, nn.Conv2d):
        c = base_layer
        return (rank, c.in_channels // c.groups, *c.kernel_size), (c.out_channels, rank, 1, 1)
    return (rank, base_layer.in_features), (base_layer.out_features, rank)


def unfusable_reason(base_layer: nn.Module) -> Optional[str]:
    """Why peft's LoRA on ``base_layer`` is not what the fused layers compute (``None``: it is)."""
    if not isinstance(base_layer, (nn.Linear, nn.Conv2d)):
        return f"a {type(base_layer).__name__}, not an nn.Linear or nn.Conv2d"
    # An empty weight: nothing for the op to compute (its reductions need in > 0); peft's own code
    # computes the layer (the base's output, an empty delta).
    sizes = (("in_features", "out_features") if isinstance(base_layer, nn.Linear)
             else ("in_channels", "out_channels"))
    empty = [f"{k}={getattr(base_layer, k)}" for k in sizes if getattr(base_layer, k) == 0]
    if empty:
        return f"{' and '.join(empty)} (an empty weight)"
    if isinstance(base_layer, nn.Conv2d):
        c = base_layer
        if c.padding_mode != "zeros":
            return f"padding_mode={c.padding_mode!r} (expected 'zeros')"
        if c.groups != 1:
            return f"groups={c.groups} (peft's conv LoRA has no groups on A)"
        if tuple(c.dilation) != (1, 1):
            return f"dilation={tuple(c.dilation)} (peft's conv LoRA has no dilation on A)"
        if c.padding == "same" and any((k - 1) % 2 for k in c.kernel_size):
            return f"padding='same' with the even kernel {tuple(c.kernel_size)} (asymmetric padding)"
    return None


def check_base(base_layer: nn.Module) -> None:
    """Raise what :func:`wrap` would for ``base_layer``, building nothing."""
    why = unfusable_reason(base_layer)
    if why is None:
        return
    if not isinstance(base_layer, (nn.Linear, nn.Conv2d)):
        raise TypeError(f"base_layer: expected nn.Linear or nn.Conv2d, got {type(base_layer).__name__}")
    raise ValueError(f"base_layer: {why} is not supported")


def _byte_range(t: Tensor):
    """``(key, start, end)``: the storage a tensor views and the bytes its elements can touch there
    (``[start, end)``, from its offset over its strides' reach); ``None`` for an empty tensor. A meta
    tensor (no storage) is keyed by its identity alone."""
    if t.numel() == 0:
        return None
    ptr = t.untyped_storage().data_ptr() if t.device.type != "meta" else 0
    if not ptr:
        return ("id", id(t)), 0, 1
    es = t.element_size()
    start = t.storage_offset() * es
    reach = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
    return (t.device, ptr), start, start + (reach + 1) * es


def check_untied(model: nn.Module, layers, op: str = "merge_adapter") -> None:
    """Raise (a ``ValueError`` naming both) where a LoRA layer of ``layers`` (``(name, layer)`` pairs of
    ``model``) has a base weight or bias whose bytes another parameter of ``model`` holds too (tied weights,
    or overlapping views of one storage): a merge would add the delta to that module as well, so the merged
    model would not compute the adapted one. Disjoint views of one buffer (FSDP's flat parameters) are not
    tied. Call it before the first merge."""
    owners: dict = {}   # storage -> [(start, end, parameter name)]
    for n, p in model.named_parameters(remove_duplicate=False):
        r = _byte_range(p)
        if r is not None:
            owners.setdefault(r[0], []).append((r[1], r[2], n))
    for name, m in layers:
        base = m.get_base_layer()
        for what in ("weight", "bias"):
            t = getattr(base, what, None)
            r = _byte_range(t) if isinstance(t, Tensor) else None
            if r is None:
                continue
            key, lo, hi = r
            # the layer's own parameters are not others (its weight under both names, its factors)
            others = [(o, (s, e) == (lo, hi)) for s, e, o in owners.get(key, ()) if s < hi and lo < e
                      and name and not o.startswith(name + ".")]
            if others:
                o, same = others[0]
                how = "tied weights" if same else "overlapping views of one storage"
                raise ValueError(f"{op}: layer {name!r}: its base {what} is shared with {o!r} ({how}): merging "
                                 "would add the delta to both; untie them (give one a copy) or keep the adapter "
                                 "unmerged")


def check_unmerge_all(named_layers, fn: str, adapter_name: Optional[str] = None) -> None:
    """Raise (changing nothing; a ``RuntimeError`` prefixed ``"<fn>: layer '<name>': "``) where a fused layer
    of ``named_layers`` (``(name, layer)`` pairs) could not undo its merges of ``adapter_name`` (``None``:
    all of them): what callers that unmerge several layers check before the first is restored. Layers that
    run peft's own code, and those with nothing to undo, are skipped."""
    for n, m in named_layers:
        if not isinstance(m, _Fused):
            continue
        if (adapter_name in m.merged_adapters) if adapter_name is not None else m.merged_adapters:
            try:
                m.check_unmerge(adapter_name)
            except RuntimeError as e:
                raise RuntimeError(f"{fn}: layer {n!r}: {e}") from None


def wrap(base_layer: nn.Module) -> _Fused:
    """An empty fused layer on ``base_layer`` (adapters come from ``add_adapter``)."""
    if isinstance(base_layer, nn.Conv2d):
        return MaskedLoRAConv2d(base_layer)
    if isinstance(base_layer, nn.Linear):
        return MaskedLoRALinear(base_layer)
    raise TypeError(f"base_layer: expected nn.Linear or nn.Conv2d, got {type(base_layer).__name__}")


def why_not_fused(layer: nn.Module) -> Optional[str]:
    """Why a peft LoRA layer must keep peft's own class (``None``: :func:`adopt` can take it)."""
    if type(layer) not in _FUSED:
        return f"peft builds it as {type(layer).__module__}.{type(layer).__name__}"
    if layer.base_layer is not layer.get_base_layer():
        return "its base layer is itself an adapter layer"
    why = unfusable_reason(layer.get_base_layer())
    if why is not None:
        return f"its base layer has {why}"
    variants = sorted(getattr(layer, "lora_variant", {}))
    if variants:
        return f"adapter(s) {variants} are LoRA variants (DoRA, ...) that peft computes with its own code"
    if any(getattr(layer, "lora_bias", {}).values()):
        return "an adapter has lora_bias=True"
    if layer.merged_adapters:
        return f"adapters {layer.merged_adapters} are merged (peft's merge keeps no copy to unmerge bit-exactly)"
    return None


def adopt(layer: nn.Module) -> _Fused:
    """Turn peft's own ``lora.Linear`` / ``lora.Conv2d`` into the fused class, in place: the same object
    (parameters, hooks, flags, active adapters) now running the fused op. Raises if it cannot."""
    if isinstance(layer, _Fused):
        return layer
    why = why_not_fused(layer)
    if why is not None:
        raise (TypeError if type(layer) not in _FUSED else ValueError)(f"layer: cannot run fused: {why}")
    stock, had = type(layer), set(layer.__dict__)
    layer.__class__ = _FUSED[stock]
    try:
        layer._init_fused()
        for a in layer.lora_A:
            layer.masks.setdefault(a, None)
    except BaseException:   # peft's own layer again, as it was: a caller's rollback does not know of it
        layer.__class__ = stock
        for k in set(layer.__dict__) - had:
            del layer.__dict__[k]
        raise
    return layer


def release(layer: _Fused) -> nn.Module:
    """The inverse of :func:`adopt`: the same object as peft's own class (masks dropped)."""
    if layer.merged_adapters:
        raise RuntimeError(f"layer: adapters {layer.merged_adapters} are merged; unmerge() first (peft's own "
                           "class could not undo these merges bit-exactly)")
    layer.__class__ = _STOCK[type(layer)]
    for k in ("masks", "_merge_backup", "_plain_base", "_geo", "_sk_created", "_sk_adapters", "_special"):
        layer.__dict__.pop(k, None)
    return layer


def iter_patched(module: nn.Module) -> Iterator[tuple[str, _Fused]]:
    for name, m in module.named_modules():
        if isinstance(m, _Fused):
            yield name, m
