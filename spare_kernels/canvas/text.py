"""The tiny frozen text encoder: a fixed seeded token-embedding table over the MiniCanvas vocabulary
plus fixed positional embeddings (shipped with the weights in ``weights/text.safetensors``).

``encode(prompts)`` -> encoder_hidden_states (B, MAX_LEN, DIM). A prompt is lower-cased and split on
whitespace; it is encoded as ``<bos> w1 ... wk <pad> ...``. The empty prompt ``""`` is the null
prompt used for classifier-free guidance.
"""
from __future__ import annotations

import math

import torch

from .data import OBJECTS, STYLES

VOCAB = ("<pad>", "<bos>", "a", "in", "style") + OBJECTS + STYLES
MAX_LEN = 8          # <bos> + up to 7 words
DIM = 32             # = the UNet's cross_attention_dim
TEXT_SEED = 1234


def make_tables(seed: int = TEXT_SEED, dim: int = DIM, max_len: int = MAX_LEN) -> dict:
    """The encoder's tables, a pure function of ``seed``: token ~ N(0, 1), positions sinusoidal * 0.5."""
    g = torch.Generator().manual_seed(seed)
    tok = torch.randn(len(VOCAB), dim, generator=g)
    pos = torch.zeros(max_len, dim)
    p = torch.arange(max_len, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(100.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    pos[:, 0::2] = torch.sin(p * freq)
    pos[:, 1::2] = torch.cos(p * freq)
    return {"token_embedding": tok, "position_embedding": 0.5 * pos}


def tokenize(prompts) -> torch.Tensor:
    """list of str -> (B, MAX_LEN) int64 token ids."""
    if isinstance(prompts, str):
        raise ValueError("prompts: expected a list of strings, got a single str (wrap it in a list)")
    prompts = list(prompts)
    ids = torch.zeros(len(prompts), MAX_LEN, dtype=torch.long)
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompts: element {i} is {type(p).__name__}, expected str")
        words = p.lower().split()
        if len(words) > MAX_LEN - 1:
            raise ValueError(f"prompts: {p!r} has {len(words)} words, at most {MAX_LEN - 1} allowed")
        ids[i, 0] = VOCAB.index("<bos>")
        for j, w in enumerate(words):
            if w not in VOCAB or w.startswith("<"):
                raise ValueError(f"prompts: unknown word {w!r} in {p!r}; vocabulary: "
                                 f"{', '.join(v for v in VOCAB if not v.startswith('<'))}")
            ids[i, j + 1] = VOCAB.index(w)
    return ids


class TextEncoder(torch.nn.Module):
    """Frozen: token embedding + positional embedding, no trainable parameters (buffers only)."""

    def __init__(self, tables: dict | None = None):
        super().__init__()
        tables = tables or make_tables()
        self.register_buffer("token_embedding", tables["token_embedding"].float().clone())
        self.register_buffer("position_embedding", tables["position_embedding"].float().clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding[ids] + self.position_embedding[: ids.shape[1]]

    def encode(self, prompts) -> torch.Tensor:
        return self(tokenize(prompts))
