"""Which layers a target spec names: the one matching rule that ``patch_unet``, ``SaliencyCollector``
and the recipe share (peft's semantics)."""
from __future__ import annotations

import re
from typing import Callable, Iterable, List, Optional, Union

from torch import nn

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
PRESETS = ("attention", "all")
Targets = Union[None, str, list, tuple, set, frozenset, Callable[[str, nn.Module], bool]]


def _entry_hit(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def target_predicate(spec: Targets, default: str = "attention", where: str = "target_modules") \
        -> Callable[[str, Optional[nn.Module]], bool]:
    """``pred(qualified_name, module) -> bool`` for ``spec``:

    - ``None``: the preset ``default``;
    - presets ``"attention"`` (``to_q``/``to_k``/``to_v``/``to_out.0``, SPARE's choice) and ``"all"``;
    - any other string: a regex that must ``re.fullmatch`` the whole qualified name;
    - a list/tuple/set of names: a qualified name equal to an entry or ending in ``"." + entry``;
    - a callable ``(name, module) -> bool``, used as it is.

    Bad specs raise with ``where`` (the argument's name, as the caller knows it) in the message."""
    if spec is None:
        spec = default
    if spec == "attention":
        spec = list(ATTENTION_TARGETS)
    if spec == "all":
        return lambda name, m: True
    if callable(spec):
        return spec
    if isinstance(spec, str):
        try:
            rx = re.compile(spec)
        except re.error as e:
            raise ValueError(f"{where}: invalid regex {spec!r}: {e}") from None
        return lambda name, m: rx.fullmatch(name) is not None
    if isinstance(spec, (list, tuple, set, frozenset)) and all(isinstance(t, str) for t in spec):
        entries = tuple(spec)
        return lambda name, m: any(_entry_hit(name, t) for t in entries)
    raise TypeError(f"{where}: expected None, a preset {PRESETS}, a regex string, a list of names or a "
                    f"callable(name, module), got {spec!r}")


def unmatched_entries(spec: Targets, names: Iterable[str]) -> List[str]:
    """The entries of a list spec that match none of ``names`` (empty for other specs)."""
    if not isinstance(spec, (list, tuple, set, frozenset)):
        return []
    names = list(names)
    return [e for e in spec if isinstance(e, str) and not any(_entry_hit(n, e) for n in names)]


__all__ = ["ATTENTION_TARGETS", "PRESETS", "Targets", "target_predicate", "unmatched_entries"]
