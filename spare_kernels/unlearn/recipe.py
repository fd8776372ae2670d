"""The SPARE recipe and its baselines, in one harness (same task, seeds and step budget).

``run(unet, task, config)`` runs one method end to end and returns a result dict; ``Trainer`` is its
loop one step at a time. The recipe lives in one module per concern:

- :mod:`.config`: :class:`Config` and the names it accepts;
- :mod:`.methods`: the methods (``spare``, ``spare-reference``, ``lora``, ``salun``, ``esd``), each
  one's setup and per-step losses;
- :mod:`.trainer`: :class:`Trainer` and :func:`run`;
- :mod:`.checkpoints`: checkpoint files;
- :mod:`.distributed`: the same recipe across ranks of ``torch.distributed``.

This module re-exports them under their earlier home.
"""
from .checkpoints import _load_checkpoint, _save_checkpoint  # noqa: F401
from .config import _DEFAULT_LR, METHODS, PRECISIONS, TARGETS, TIMESTEPS, Config  # noqa: F401
from .methods import _IMPL  # noqa: F401
from .trainer import Trainer, _adam, _Overlap, run  # noqa: F401
