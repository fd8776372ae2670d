"""The MiniCanvas classifier: a small CNN with a style head and an object head (input [0, 1] images).
Shipped weights: ``weights/classifier.safetensors`` + ``weights/classifier.json``."""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn

from ..utils.io import atomic_path, write_json
from .data import OBJECTS, STYLES
from .model import WEIGHTS_DIR, _weights_dir

CLASSIFIER_CONFIG = dict(width=32, hidden=128)


class Classifier(nn.Module):
    def __init__(self, width: int = 32, hidden: int = 128, n_styles: int = len(STYLES),
                 n_objects: int = len(OBJECTS)):
        super().__init__()
        w = width

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(3, w), *block(w, w), nn.MaxPool2d(2),            # 16x16
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),  # 8x8
            *block(2 * w, 4 * w), nn.MaxPool2d(2),                  # 4x4
        )
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, hidden), nn.ReLU(inplace=True))
        self.style_head = nn.Linear(hidden, n_styles)
        self.object_head = nn.Linear(hidden, n_objects)

    def forward(self, images: torch.Tensor):
        """images (B, 3, 32, 32) in [0, 1] -> (style_logits (B, 6), object_logits (B, 6))."""
        h = self.trunk(self.features((images - 0.5) * 4.0))
        return self.style_head(h), self.object_head(h)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256, tta: bool = True):
        """-> (style_pred, object_pred) int64 tensors; ``batch_size`` images per forward.

        ``tta``: average the class probabilities over the 8 symmetries of the square (4 rotations by
        90 degrees, each with and without a mirror flip), one view per forward. Every MiniCanvas class is
        invariant under them (shapes are drawn at random rotations, textures at random angles), and a
        single view misreads some generated circles as hearts."""
        views = [(k, flip) for k in range(4) for flip in (False, True)] if tta else [(0, False)]
        s, o = [], []
        for i in range(0, images.shape[0], batch_size):
            x = images[i:i + batch_size].float()
            ps = po = 0.0
            for k, flip in views:
                v = torch.rot90(x, k, (2, 3))
                ls, lo = self(v.flip(3) if flip else v)
                ps, po = ps + ls.softmax(1), po + lo.softmax(1)
            s.append(ps.argmax(1))
            o.append(po.argmax(1))
        return torch.cat(s), torch.cat(o)


def load_classifier(path=None, device="cpu") -> Classifier:
    """The trained classifier from folder ``path`` (default: the shipped weights), eval mode, frozen."""
    from safetensors.torch import load_file

    path = _weights_dir(path)
    with open(os.path.join(path, "classifier.json")) as f:
        meta = json.load(f)
    clf = Classifier(**meta["config"])
    clf.load_state_dict(load_file(os.path.join(path, "classifier.safetensors")))
    return clf.to(device).eval().requires_grad_(False)


def save_classifier(clf: Classifier, path, extra: dict | None = None):
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with atomic_path(os.path.join(path, "classifier.safetensors")) as tmp:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in clf.state_dict().items()}, tmp)
    write_json(os.path.join(path, "classifier.json"), {"config": CLASSIFIER_CONFIG, **(extra or {})})


__all__ = ["CLASSIFIER_CONFIG", "Classifier", "WEIGHTS_DIR", "load_classifier", "save_classifier"]
