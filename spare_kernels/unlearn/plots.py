"""PNG plots of a run (matplotlib, Agg; written atomically)."""
from __future__ import annotations

import os

from ..utils.io import atomic_path


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def loss_curves(results: dict, path: str) -> str:
    """``results``: ``{label: run() result}``: forget and retain loss per step."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for label, r in results.items():
        h = r["history"]
        axes[0].plot([a for a, _ in h], label=label, lw=1)
        axes[1].plot([b for _, b in h], label=label, lw=1)
    for ax, title in zip(axes, ("forget loss (distillation to surrogate / ESD target)", "retain loss")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def timestep_curve(curve: dict, density: list, path: str) -> str:
    plt = _plt()
    e = curve["edges"]
    mids = [(a + b) / 2 for a, b in zip(e[:-1], e[1:])]
    width = (e[1] - e[0]) * 0.9
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(mids, curve["score"], width=width, color="#4c72b0", label="‖ε(c_forget) − ε(c_surrogate)‖²")
    ax.set_xlabel("timestep")
    ax.set_ylabel("concept dependence")
    if density:
        ax2 = ax.twinx()
        ax2.plot(mids, density, "o-", color="#dd8452", label="training t distribution")
        ax2.set_ylabel("P(bin)")
        ax2.legend(loc="center right", fontsize=7)
    ax.legend(loc="upper right", fontsize=7)
    return _save(fig, path)


def mask_density(density: dict, path: str) -> str:
    plt = _plt()
    names = list(density)
    fig, ax = plt.subplots(figsize=(max(5, len(names) * 0.12), 3))
    ax.bar(range(len(names)), [density[n] for n in names], color="#55a868")
    ax.set_xlabel(f"layer ({len(names)} weights, UNet order)")
    ax.set_ylabel("mask density")
    ax.set_ylim(0, 1)
    return _save(fig, path)


def write_all(out_dir: str, results: dict, grids: dict | None = None) -> list:
    """Every plot of ``results`` (``{method: result}``) and sample ``grids`` (``{name: (images, nrow)}``)."""
    from ..canvas import save_grid

    os.makedirs(out_dir, exist_ok=True)
    paths = [loss_curves(results, os.path.join(out_dir, "loss_curves.png"))]
    for label, r in results.items():
        if r.get("curve"):
            paths.append(timestep_curve(r["curve"], r.get("timestep_density"),
                                        os.path.join(out_dir, f"timesteps_{label}.png")))
        if r.get("mask_density"):
            paths.append(mask_density(r["mask_density"], os.path.join(out_dir, f"mask_density_{label}.png")))
    for name, (imgs, nrow) in (grids or {}).items():
        paths.append(save_grid(imgs, os.path.join(out_dir, f"{name}.png"), nrow=nrow))
    return paths
