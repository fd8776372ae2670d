"""UnlearnCanvas-style metrics on MiniCanvas (see ``evaluate``)."""
from __future__ import annotations

import os
import time

import torch

from .classifier import load_classifier
from .data import OBJECTS, STYLES, prompt
from .model import DEFAULT_GUIDANCE, DEFAULT_STEPS, WEIGHTS_DIR, _check_int, load_model, sample

DOMAINS = {"style": STYLES, "object": OBJECTS}
DEFAULT_N_PER_PROMPT = 4
_CACHE = {"classifier": None, "reference": None, "generations": {}}


def all_prompts():
    """The 36 prompts, style-major: [(style, object, prompt), ...]."""
    return [(s, o, prompt(s, o)) for s in STYLES for o in OBJECTS]


def _valid_targets():
    return [f"{d}:{n}" for d, names in DOMAINS.items() for n in names]


def parse_target(target, arg="target"):
    """'style:NAME' | 'object:NAME' -> (domain, name). ValueError naming the valid options."""
    if isinstance(target, str) and ":" in target:
        d, n = target.split(":", 1)
        if d in DOMAINS and n in DOMAINS[d]:
            return d, n
    raise ValueError(f"{arg}: expected 'style:NAME' or 'object:NAME', got {target!r}; valid: "
                     f"{', '.join(_valid_targets())}")


def parse_surrogate(surrogate, domain, name):
    """A surrogate is a concept of the target's domain other than the target: 'NAME' or 'domain:NAME'."""
    if surrogate is None:
        return None
    if domain is None:
        raise ValueError("surrogate: given without a target (target=None)")
    s = surrogate
    if isinstance(s, str) and ":" not in s:
        s = f"{domain}:{s}"
    others = [f"{domain}:{n}" for n in DOMAINS[domain] if n != name]
    if not isinstance(s, str) or s not in others:
        raise ValueError(f"surrogate: expected another {domain} than the target {name!r}, got {surrogate!r}; "
                         f"valid: {', '.join(others)}")
    return s.split(":", 1)[1]


def classifier():
    if _CACHE["classifier"] is None:
        _CACHE["classifier"] = load_classifier()
    return _CACHE["classifier"]


def _reference_key(kind="unet"):
    f = os.path.join(WEIGHTS_DIR, f"{kind}.safetensors")
    st = os.stat(f)
    return (f, st.st_mtime_ns, st.st_size)


def reference_generations(prompt_list, n_per_prompt, seed, steps, guidance, batch_size=64, progress=False,
                          kind="unet"):
    """Generations of the shipped (original) model of ``kind`` (``"unet"`` or ``"dit"``),
    (len(prompt_list) * n_per_prompt, 3, 32, 32), prompt-major. Cached in memory per prompt, so only
    missing prompts are ever generated."""
    ref = _reference_key(kind)
    if _CACHE["reference"] is None or _CACHE["reference"][0] != ref:
        if kind == "dit":
            from .dit import load_dit
            model = load_dit()
        else:
            model = load_model()
        _CACHE["reference"] = (ref, model)
        _CACHE["generations"] = {}
    gens = _CACHE["generations"]
    key = lambda p: (p, n_per_prompt, seed, steps, float(guidance))  # noqa: E731
    missing = [p for p in dict.fromkeys(prompt_list) if key(p) not in gens]
    if missing:
        flat = [p for p in missing for _ in range(n_per_prompt)]
        imgs = sample(_CACHE["reference"][1], flat, seed=seed, steps=steps, guidance=guidance,
                      batch_size=batch_size, progress=progress)
        for j, p in enumerate(missing):
            gens[key(p)] = imgs[j * n_per_prompt:(j + 1) * n_per_prompt]
    return torch.cat([gens[key(p)] for p in prompt_list])


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-image PSNR in dB of images in [0, 1] (identical images count as 100 dB)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


def evaluate(unet, target=None, surrogate=None, n_per_prompt: int = DEFAULT_N_PER_PROMPT, seed: int = 0,
             steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, progress: bool = True,
             batch_size: int = 64) -> dict:
    """UnlearnCanvas metrics of ``unet`` on MiniCanvas.

    Generates ``n_per_prompt`` images for each of the 36 prompts "a {object} in {style} style" (DDIM,
    ``steps``, CFG ``guidance``; the noise of the k-th image of a prompt depends only on (seed, prompt,
    k)) and classifies them with the shipped classifier (8-view ``predict``). For ``target="style:S"``
    (domain D = style, other domain = object; symmetrically for ``"object:O"``):

    - ``ua`` = 1 - (fraction of generations of prompts naming S classified as S by the D head);
    - ``ira`` = D-head accuracy on the prompts naming another concept of D (in-domain retention);
    - ``cra`` = other-domain-head accuracy over all 36 prompts (cross-domain retention: for a style
      target the object accuracy, target-style prompts included);
    - ``fidelity_psnr`` = mean PSNR (dB) of the retain prompts' generations (prompts not naming the
      target) against the shipped model's (of the same kind: UNet or DiT) generations with the same
      seeds (cached in memory);
    - ``surrogate_rate`` = fraction of the target prompts' generations classified as ``surrogate``
      by the D head (None without a surrogate);
    - ``per_class`` = {"style": {name: style-head accuracy on the prompts naming that style},
      "object": {name: object-head accuracy on the prompts naming that object}};
    - ``style_acc`` / ``object_acc`` = head accuracy over all prompts.

    ``target=None``: only the plain accuracies (``style_acc``, ``object_acc``, ``per_class``); ``ua``,
    ``ira``, ``cra``, ``fidelity_psnr`` and ``surrogate_rate`` are None.
    """
    domain = name = None
    if target is not None:
        domain, name = parse_target(target)
    sur = parse_surrogate(surrogate, domain, name)
    _check_int(n_per_prompt, "n_per_prompt", 1)
    t0 = time.perf_counter()
    table = all_prompts()
    flat = [p for _, _, p in table for _ in range(n_per_prompt)]
    style_true = torch.tensor([STYLES.index(s) for s, _, _ in table]).repeat_interleave(n_per_prompt)
    obj_true = torch.tensor([OBJECTS.index(o) for _, o, _ in table]).repeat_interleave(n_per_prompt)
    images = sample(unet, flat, seed=seed, steps=steps, guidance=guidance, batch_size=batch_size,
                    progress=progress)
    ps, po = classifier().predict(images)
    s_ok, o_ok = (ps == style_true).float(), (po == obj_true).float()
    per_class = {
        "style": {s: s_ok[style_true == i].mean().item() for i, s in enumerate(STYLES)},
        "object": {o: o_ok[obj_true == i].mean().item() for i, o in enumerate(OBJECTS)},
    }
    out = {"target": target, "surrogate": sur, "ua": None, "ira": None, "cra": None, "fidelity_psnr": None,
           "surrogate_rate": None, "style_acc": s_ok.mean().item(), "object_acc": o_ok.mean().item(),
           "per_class": per_class, "n_per_prompt": n_per_prompt, "n_images": len(flat), "seed": seed,
           "steps": steps, "guidance": float(guidance)}
    if domain is not None:
        names = DOMAINS[domain]
        true, pred, ok, other_ok = ((style_true, ps, s_ok, o_ok) if domain == "style"
                                    else (obj_true, po, o_ok, s_ok))
        ti = names.index(name)
        is_t = true == ti
        out["ua"] = 1.0 - (pred[is_t] == ti).float().mean().item()
        out["ira"] = ok[~is_t].mean().item()
        out["cra"] = other_ok.mean().item()
        if sur is not None:
            out["surrogate_rate"] = (pred[is_t] == names.index(sur)).float().mean().item()
        retain = [p for s, o, p in table if (s if domain == "style" else o) != name]
        from .dit import is_dit
        ref = reference_generations(retain, n_per_prompt, seed, steps, guidance, batch_size, progress,
                                    kind="dit" if is_dit(unet) else "unet")
        out["fidelity_psnr"] = psnr(images[~is_t], ref)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out
