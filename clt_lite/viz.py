"""Matplotlib figures for the notebooks (each returns the Figure; saving is separate)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import torch

from .files import atomic_write
from .store import KINDS


def save_figure(fig, figure_dir: str | Path, name: str) -> Path:
    """Save as PNG under figure_dir (created if needed); returns the path."""
    folder = Path(figure_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None}))
    return path


def site_norms(per_site: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Mean L2 norm per layer, per site ([..., layers, d] tensors), per token kind (bool [...] masks)."""
    return {site: {kind: acts[mask].norm(dim=-1).mean(0) for kind, mask in masks.items()} for site, acts in per_site.items()}


def plot_site_norms(norms: dict[str, dict[str, torch.Tensor]], title: str = "activation norms by layer"):
    """One panel per site, one line per token kind."""
    fig, axes = plt.subplots(1, len(norms), figsize=(4.2 * len(norms), 3.2), squeeze=False)
    for ax, (site, by_kind) in zip(axes[0], norms.items()):
        for kind, values in by_kind.items():
            ax.plot(range(len(values)), values.float().numpy(), marker="o", markersize=3, label=f"{kind} tokens")
        # log scale where norms span decades (resid_mid: image vs text tokens at layer 0, notebook 02's point)
        spread = max(float(v.max()) for v in by_kind.values()) / max(min(float(v.min()) for v in by_kind.values()), 1e-12)
        ax.set(title=site, xlabel="decoder layer", ylabel="mean L2 norm", yscale="log" if spread > 10 else "linear")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def show_samples(samples, answers: list[str] | dict[str, list[str]] | None = None, columns: int = 4):
    """Images with their question, the reference answer and (optionally) models' answers.

    answers: one list (the model's) or {model name: list} to compare several side by side.
    """
    if isinstance(answers, list):
        answers = {"model": answers}
    rows = (len(samples) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.1 * columns, 3.4 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= len(samples):
            continue
        sample = samples[i]
        ax.imshow(sample.image, interpolation="nearest")
        lines = [sample.question, f"truth: {sample.answer}"]
        for name, given in (answers or {}).items():
            lines.append(f"{name}: {given[i]} ({'ok' if given[i] == sample.answer else 'WRONG'})")
        ax.set_title("\n".join(lines), fontsize=8)
    fig.tight_layout()
    return fig


def plot_by_layer(series: dict[str, list[float]], ylabel: str, title: str, xlabel: str = "layer", logy: bool = False):
    """Several per-layer curves on one axis (agreement by depth, FVU by layer, ...)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for name, values in series.items():
        ax.plot(range(len(values)), values, marker="o", markersize=3, label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, yscale="log" if logy else "linear")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def store_site_norms(store, max_rows: int = 20000) -> dict[str, dict[str, torch.Tensor]]:
    """Like site_norms, from an activation store's first rows, split by the kind of position."""

    rows = min(max_rows, store.n_tokens)
    kinds = torch.from_numpy(store.metadata.kind[:rows].astype("int64"))
    bos = torch.from_numpy(store.metadata.bos[:rows])
    return site_norms(store.tokens(slice(0, rows)), {kind: (kinds == KINDS.index(kind)) & ~bos for kind in KINDS})


def plot_clt_structure(n_layers: int, cross_layers: dict[str, int]):
    """Which source layer writes to which target layer, one panel per cross_layer setting (0 = full)."""
    fig, axes = plt.subplots(1, len(cross_layers), figsize=(3.6 * len(cross_layers), 3.4), squeeze=False)
    for ax, (title, cross) in zip(axes[0], cross_layers.items()):
        span = n_layers if cross == 0 else cross
        grid = torch.tensor([[1.0 if s <= t < s + span else 0.0 for t in range(n_layers)] for s in range(n_layers)])
        ax.imshow(grid, cmap="Blues", vmin=0, vmax=1.3)
        ax.set(title=f"{title}\n{int(grid.sum())} decoder matrices", xlabel="target layer (MLP output)", ylabel="source layer (latents)")
    fig.tight_layout()
    return fig


def plot_training(histories: dict[str, list[dict]]):
    """Training loss (mean FVU over layers) against tokens seen, one line per run."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for name, history in histories.items():
        ax.plot([h["tokens"] for h in history], [h["loss"] for h in history], label=name)
    ax.set(xlabel="training tokens", ylabel="loss (mean FVU + aux)", yscale="log", title="training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_layer_metrics(results: dict[str, object]):
    """Validation FVU, dead-latent fraction and (when it varies: not under TopK, where it is k) L0 per layer
    for each trained run (TrainResult-like)."""
    panels = {"validation FVU": "fvu", "dead latent fraction": "dead_fraction"}
    l0 = [v for result in results.values() for v in result.l0]
    if max(l0) - min(l0) > 0.01 * max(abs(v) for v in l0):  # a flat line at k would say nothing
        panels["L0 (active latents / token)"] = "l0"
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.4))
    for ax, (title, field) in zip(axes, panels.items()):
        for name, result in results.items():
            values = getattr(result, field)
            ax.plot(range(len(values)), values, marker="o", markersize=3, label=name)
        ax.set(xlabel="layer", title=title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    return fig


def feature_card(top, samples, tokens: list[str], prompt_acts: torch.Tensor, profile: dict[int, float],
                 world, columns: int = 6):
    """One feature at a glance: top-activating samples (patch outlined), activation over a prompt, decoder norms."""
    from matplotlib.patches import Rectangle

    fig = plt.figure(figsize=(13, 5.6))
    grid = fig.add_gridspec(2, columns, height_ratios=[1, 1.1])
    for i in range(columns):
        ax = fig.add_subplot(grid[0, i])
        ax.axis("off")
        if i >= len(top):
            continue
        ax.imshow(samples[i].image, interpolation="nearest")
        if top[i].patch is not None:
            row, col = divmod(top[i].patch, world.patches_per_side)
            size = world.patch_size
            ax.add_patch(Rectangle((col * size - 0.5, row * size - 0.5), size, size, fill=False, edgecolor="black", linewidth=2))
        where = f"patch {top[i].patch}" if top[i].patch is not None else f"{top[i].kind} pos {top[i].position}"
        ax.set_title(f"{top[i].activation:.2f} at {where}\n{samples[i].question}", fontsize=7)
    ax = fig.add_subplot(grid[1, : columns - 2])
    keep = [i for i, t in enumerate(tokens) if t not in ("<pad>",)]
    ax.bar(range(len(keep)), prompt_acts[keep].numpy(), color="tab:orange")
    labels = [tokens[i] if tokens[i] != "<image>" else "" for i in keep]
    ax.set_xticks(range(len(keep)), labels, rotation=90, fontsize=6)
    ax.set(title="activation over the prompt (image tokens unlabelled)", ylabel="activation")
    ax = fig.add_subplot(grid[1, columns - 2 :])
    ax.bar(list(profile), list(profile.values()), color="tab:blue")
    ax.set(title="decoder norm per target layer", xlabel="target layer")
    fig.tight_layout()
    return fig
