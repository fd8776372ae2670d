"""Thin modules over the ops: a frozen base layer plus named masked-LoRA adapters.

State-dict keys follow peft (``base_layer.weight``, ``lora_A.<adapter>.weight``,
``lora_B.<adapter>.weight``), so peft-style checkpoints load either way. Factor shapes follow peft
too: Linear ``A (r, in)``, ``B (out, r)``; Conv2d ``A (r, in/groups, kh, kw)``, ``B (out, r, 1, 1)``.
Masks are not in the state dict (``save_adapter`` stores them, bit-packed).
"""
from __future__ import annotations

import math
import numbers
import threading
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

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


def thread_disabled() -> dict:
    """``{id(layer): depth}`` of the layers disabled in this thread (the calling thread's own dict)."""
    d = getattr(_THREAD, "off", None)
    if d is None:
        d = _THREAD.off = {}
    return d


class _Factor(nn.Module):
    """One LoRA factor held as ``.weight`` (peft's key layout)."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)


class _MaskedLoRALayer(nn.Module):
    _spare_kernels_patched = True   # marker read by hooks that must see through the wrapper

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.masks: dict[str, Optional[Mask]] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self._merge_backup: dict[str, tuple[Mask, Tensor]] = {}
        self.adapters_disabled = False
        self.set_original(base_layer)

    def set_original(self, module: nn.Module) -> None:
        """What ``unpatch_unet`` puts back; kept out of the module tree (no duplicate state-dict keys)."""
        self.__dict__["_original"] = module

    # -------------------------------------------------------------------------- adapters
    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.base_layer.bias

    def _factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return factor_shapes(self.base_layer, rank)

    def add_adapter(self, name: str, rank: int, scale: float = 1.0, mask=None, init: str = "gaussian",
                    dtype: torch.dtype = torch.float32, lora_A: Optional[Tensor] = None,
                    lora_B: Optional[Tensor] = None, active: bool = True) -> None:
        """Add adapter ``name``. ``lora_A``/``lora_B`` given (e.g. peft's parameters) are used as they
        are, not copied; else ``init``: ``gaussian`` (A ~ N(0, 1/r), B = 0, peft's "gaussian"),
        ``kaiming`` (peft's default: A kaiming-uniform, B = 0), ``random`` (both non-zero, for tests and
        benchmarks)."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"adapter_name: expected a non-empty string without '.', got {name!r}")
        if name in self.lora_A:
            raise ValueError(f"adapter_name: {name!r} already exists on this layer")
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
            raise ValueError(f"rank: expected a positive int, got {rank!r}")
        rank = int(rank)
        scale = chk.scale("", scale)
        a_shape, b_shape = self._factor_shapes(rank)
        dev = self.weight.device
        if lora_A is None or lora_B is None:
            if init not in INITS:
                raise ValueError(f"init: expected one of {INITS}, got {init!r}")
            # Drawn on the CPU, then moved: a seed gives the same adapter on every device.
            lora_A = torch.empty(a_shape, dtype=dtype)
            lora_B = torch.zeros(b_shape, dtype=dtype)
            if init == "kaiming":
                nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
            else:
                nn.init.normal_(lora_A, std=1.0 / rank)
            if init == "random":
                nn.init.normal_(lora_B, std=1.0)
            lora_A, lora_B = lora_A.to(dev), lora_B.to(dev)
        elif tuple(lora_A.shape) != a_shape or tuple(lora_B.shape) != b_shape:
            raise ValueError(f"lora_A/lora_B: expected shapes {a_shape} and {b_shape}, "
                             f"got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
        self.lora_A[name] = _Factor(lora_A)
        self.lora_B[name] = _Factor(lora_B)
        self.scaling[name] = scale
        self.masks[name] = None
        self.set_mask(name, mask)
        if active:
            self.active_adapters.append(name)

    def _check_name(self, name):
        if name not in self.lora_A:
            raise KeyError(f"adapter_name: {name!r} not on this layer (has {list(self.lora_A)})")

    def set_mask(self, name: str, mask) -> None:
        """``None`` (dense adapter), a ``Mask`` or a bool/uint8 tensor of the weight's shape."""
        self._check_name(name)
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged; unmerge it before changing its mask")
        if mask is not None:
            mask = as_mask(mask, self.weight.shape, self.weight.device)
        self.masks[name] = mask

    def remove_adapter(self, name: str) -> None:
        self._check_name(name)
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged; unmerge it before removing it")
        del self.lora_A[name], self.lora_B[name], self.scaling[name], self.masks[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def set_scale(self, name: str, scale: float) -> None:
        self._check_name(name)
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged; unmerge it before changing its scale")
        self.scaling[name] = chk.scale("", scale)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for k, m in self.masks.items():
            if m is not None:   # masks follow the module's device (bool/uint8 data: dtype casts skip them)
                self.masks[k] = Mask(m.granularity, m.shape, fn(m.data), m.block or (32, 32))
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
        m = self.masks[name]
        return d if m is None else d * m.to_dense()

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Fold the adapter into the base weight; the original values of every changed entry are kept
        (as a packed position mask + values), so :meth:`unmerge` restores the weight bit-exactly."""
        self._check_name(name)
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is already merged")
        W = self.weight
        new = (W.to(torch.float64 if W.dtype == torch.float64 else torch.float32) + self.delta_weight(name)).to(W.dtype)
        # Changed bits, not changed values: -0.0 + 0.0 is +0.0, equal to -0.0 but another bit pattern.
        bits = _BITS[W.element_size()]
        changed = new.view(bits) != W.view(bits)
        self._merge_backup[name] = (Mask.from_dense(changed), W[changed].clone())
        W.copy_(new)
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self, name: Optional[str] = None) -> None:
        """Undo merges, newest first (``name``: down to and including that adapter)."""
        if name is not None and name not in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is not merged")
        while self.merged_adapters:
            last = self.merged_adapters.pop()
            where, values = self._merge_backup.pop(last)
            self.weight[where.to_dense()] = values
            if last == name:
                break

    @torch.no_grad()
    def unmerged_weight(self) -> Tensor:
        """A copy of the base weight with every merge undone (newest first, as :meth:`unmerge`); the
        layer is left as it is."""
        W = self.weight.detach().clone()
        for name in reversed(self.merged_adapters):
            where, values = self._merge_backup[name]
            W[where.to_dense()] = values
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
        m = self.masks[name]
        return (None, fmt.NONE, 0, 0) if m is None else m.wire()

    def _live_adapters(self) -> list[str]:
        off = getattr(_THREAD, "off", None)
        if self.adapters_disabled or (off and id(self) in off):
            if self.merged_adapters:
                raise RuntimeError(f"adapters disabled while {self.merged_adapters} are merged into the base "
                                   "weight; unmerge them first")
            return []
        return [a for a in self.active_adapters if a not in self.merged_adapters]

    def forward(self, x: Tensor) -> Tensor:
        live = self._live_adapters()
        if not live:
            return self.base_layer(x)
        dt = _autocast.dtype(x) if isinstance(x, Tensor) else None
        if dt is not None:   # as nn.Linear / nn.Conv2d under autocast; the op runs with it off
            return _autocast.call(self._run_live, dt, x, self.weight, self.bias, live)
        return self._run_live(x, self.weight, self.bias, live)

    def _run_live(self, x, weight, bias, live):
        # The first adapter is fused with the base layer; further stacked ones add their delta alone.
        y = self._run_op(x, weight, bias, live[0])
        for name in live[1:]:
            y = y + self._run_op(x, torch.zeros_like(weight), None, name)
        return y

    def extra_repr(self) -> str:
        parts = []
        for n in self.lora_A:
            m = self.masks[n]
            dens = "dense" if m is None else f"{m.granularity} {m.density:.3f}"
            parts.append(f"{n}: r={self.lora_A[n].weight.shape[0]}, scale={self.scaling[n]:g}, mask={dens}")
        return "; ".join(parts)


class MaskedLoRALinear(_MaskedLoRALayer):
    """``nn.Linear`` + masked LoRA adapters: ``y = x·(W + s·M⊙(B·A))ᵀ + b`` via the fused op."""

    def __init__(self, base_layer: nn.Linear):
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer: expected nn.Linear, got {type(base_layer).__name__}")
        super().__init__(base_layer)

    def _run_op(self, x, weight, bias, name):
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        if self._owned(x, weight, A, B) and x.dim() >= 1 and x.shape[-1] == weight.shape[1]:
            return linear_checked(x, weight, bias, A, B, self._wire(name), self.scaling[name])
        return masked_lora_linear(x, weight, bias, A, B, self.masks[name], self.scaling[name])


class MaskedLoRAConv2d(_MaskedLoRALayer):
    """``nn.Conv2d`` + masked LoRA adapters (peft's conv LoRA shapes) via the fused op."""

    def __init__(self, base_layer: nn.Conv2d):
        if not isinstance(base_layer, nn.Conv2d):
            raise TypeError(f"base_layer: expected nn.Conv2d, got {type(base_layer).__name__}")
        check_base(base_layer)
        super().__init__(base_layer)

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

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, Tensor) and x.dim() == 3:   # unbatched (C, H, W), as nn.Conv2d takes it
            return super().forward(x.unsqueeze(0)).squeeze(0)
        if isinstance(x, Tensor) and x.dim() != 4:
            raise ValueError(f"x: expected a 3-D (unbatched) or 4-D tensor, got shape {tuple(x.shape)}")
        return super().forward(x)

    def _run_op(self, x, weight, bias, name):
        c = self.base_layer
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        if self._owned(x, weight, A, B) and x.dim() == 4 and x.shape[1] == weight.shape[1] * c.groups:
            stride, padding, dilation, min_hw = self._geometry(c)
            if x.shape[2] >= min_hw[0] and x.shape[3] >= min_hw[1]:
                return conv2d_checked(x, weight, bias, A, B, self._wire(name), self.scaling[name],
                                      stride, padding, dilation, c.groups)
        return masked_lora_conv2d(x, weight, bias, A, B, self.masks[name], self.scaling[name],
                                  c.stride, c.padding, c.dilation, c.groups)


def factor_shapes(base_layer: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of ``(lora_A, lora_B)`` of rank ``rank`` on ``base_layer`` (peft's layout)."""
    if isinstance(base_layer, nn.Conv2d):
        c = base_layer
        return (rank, c.in_channels // c.groups, *c.kernel_size), (c.out_channels, rank, 1, 1)
    return (rank, base_layer.in_features), (base_layer.out_features, rank)


def check_base(base_layer: nn.Module) -> None:
    """Raise what :func:`wrap` would for ``base_layer``, building nothing."""
    if not isinstance(base_layer, (nn.Linear, nn.Conv2d)):
        raise TypeError(f"base_layer: expected nn.Linear or nn.Conv2d, got {type(base_layer).__name__}")
    if isinstance(base_layer, nn.Conv2d) and base_layer.padding_mode != "zeros":
        raise ValueError(f"base_layer: padding_mode={base_layer.padding_mode!r} is not supported "
                         "(expected 'zeros')")


def wrap(base_layer: nn.Module) -> _MaskedLoRALayer:
    if isinstance(base_layer, nn.Linear):
        return MaskedLoRALinear(base_layer)
    if isinstance(base_layer, nn.Conv2d):
        return MaskedLoRAConv2d(base_layer)
    raise TypeError(f"base_layer: expected nn.Linear or nn.Conv2d, got {type(base_layer).__name__}")


def iter_patched(module: nn.Module) -> Iterator[tuple[str, _MaskedLoRALayer]]:
    for name, m in module.named_modules():
        if isinstance(m, _MaskedLoRALayer):
            yield name, m
