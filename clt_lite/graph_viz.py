"""Figures of attribution graphs (each function returns a matplotlib Figure; saving is viz.save_figure's job)."""

from __future__ import annotations

from collections import defaultdict

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Rectangle

from .attribution import AttributionGraph, Pruned, feature_influence, patch_influence, prune
from .data import WorldConfig

KIND_COLOURS = {"feature": "#4c72b0", "error": "#8c8c8c", "embedding": "#55a868", "logit": "#c44e52"}


def _layout(graph: AttributionGraph, nodes: list[int]) -> dict[int, tuple[float, float]]:
    """x = context position, y = layer (embeddings at -1, logits at L); nodes sharing a slot are spread apart."""
    slots: dict[tuple[int, int], list[int]] = defaultdict(list)
    for node in nodes:
        slots[graph.node_position(node)].append(node)
    xy = {}
    for (pos, layer), members in slots.items():
        width = 1.5 * (len(members) - 1) if layer == graph.n_layers else 0.7  # logits get room for their labels
        offsets = np.linspace(-width, 0, len(members)) if layer == graph.n_layers else np.linspace(-width / 2, width / 2, len(members))
        for node, dx in zip(members, offsets if len(members) > 1 else [0.0]):
            xy[node] = (pos + dx, layer)
    return xy


def draw_graph(graph: AttributionGraph, pruned: Pruned | None = None, max_edges: int = 400, labels: dict | None = None):
    """Layered drawing of the pruned graph: position across, layer up, embeddings at the bottom, logits on top.

    Edge width grows with |weight| (the strongest `max_edges` edges are drawn), blue for positive,
    red for negative effects. Nodes are coloured by kind; logits and the strongest features are labelled.
    """
    pruned = pruned or prune(graph)
    nodes = pruned.node_mask.nonzero(as_tuple=True)[0].tolist()
    xy = _layout(graph, nodes)
    targets, sources = pruned.edge_mask.nonzero(as_tuple=True)
    weights = graph.adjacency[targets, sources]
    strongest = weights.abs().argsort(descending=True)[:max_edges]
    fig, ax = plt.subplots(figsize=(max(8.0, graph.n_positions * 0.22), 1.1 * graph.n_layers + 3))
    scale = float(weights.abs().max()) if len(weights) else 1.0
    for e in strongest.flip(0).tolist():
        (x0, y0), (x1, y1) = xy[int(sources[e])], xy[int(targets[e])]
        w = float(weights[e])
        ax.plot([x0, x1], [y0, y1], color="#1f77b4" if w > 0 else "#d62728", lw=0.3 + 3.0 * abs(w) / scale,
                alpha=0.25 + 0.5 * abs(w) / scale, zorder=1)
    for kind, colour in KIND_COLOURS.items():
        members = [n for n in nodes if graph.node_kind(n) == kind]
        if members:
            ax.scatter(*zip(*(xy[n] for n in members)), s=28, color=colour, label=kind, zorder=2,
                       marker="s" if kind in ("embedding", "logit") else "o")
    top_features = [n for n in pruned.influence[: graph.n_features].argsort(descending=True)[:8].tolist() if n in xy]
    for node in top_features + list(range(graph.logit_start, graph.n_nodes)):
        if node in xy:
            text = graph.logit_strings[node - graph.logit_start] if node >= graph.logit_start else graph.node_label(node, labels)
            ax.annotate(text, xy[node], fontsize=6, xytext=(2, 4), textcoords="offset points", rotation=35)
    ax.set_yticks(range(-1, graph.n_layers + 1), ["emb"] + [f"L{l}" for l in range(graph.n_layers)] + ["logits"])
    image = graph.image_positions.nonzero(as_tuple=True)[0]
    if len(image):
        ax.axvspan(int(image[0]) - 0.5, int(image[-1]) + 0.5, color="#f0e68c", alpha=0.25, zorder=0, label="image patches")
    ax.set(xlabel="context position", xlim=(-1, graph.n_positions + 1), ylim=(-1.5, graph.n_layers + 0.8),
           title=f"attribution graph: {len(nodes)} nodes, {int(pruned.edge_mask.sum())} edges (drawn: {len(strongest)})")
    ax.legend(loc="upper left", fontsize=7, ncol=5)
    fig.tight_layout()
    return fig


def patch_heatmap(graph: AttributionGraph, scores: torch.Tensor | None = None, title: str | None = None):
    """Influence of each image patch (default: on the target logit) over the image, ground-truth cell outlined.

    The grid side comes from the number of patch scores (6x6 on the toy, 24x24 on LLaVA-1.5-7B); the image
    is center-cropped to a square as the CLIP processor does, and the grid is stretched over it.
    """
    if graph.sample is None or graph.sample.image is None:
        raise ValueError("the graph has no image: build it with attribution.attribute from a sample with an image")
    scores = patch_influence(graph) if scores is None else scores
    side = round(len(scores) ** 0.5)
    if side * side != len(scores):
        raise ValueError(f"{len(scores)} patch scores do not form a square grid")
    image = graph.sample.image
    size = min(image.size)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.imshow(image, interpolation="nearest")
    extent = (-0.5, size - 0.5, size - 0.5, -0.5)
    shown = ax.imshow(scores.reshape(side, side).float().numpy(), cmap="magma", alpha=0.55, extent=extent,
                      interpolation="nearest")
    if len(graph.sample.target_cells) == 1:  # ShapesWorld: cells of a grid x grid layout over the whole image
        grid = WorldConfig.grid
        row, col = divmod(graph.sample.target_cells[0], grid)
        cell = size / grid
        ax.add_patch(Rectangle((col * cell - 0.5, row * cell - 0.5), cell, cell, fill=False, edgecolor="cyan", lw=2))
    fig.colorbar(shown, ax=ax, fraction=0.046, label="influence")
    ax.set_title(title or f"{graph.sample.question}\n→ {graph.logit_strings[0]!r}", fontsize=8)
    ax.axis("off")
    fig.tight_layout()
    return fig


def top_features(graph: AttributionGraph, n: int = 15, labels: dict | None = None, logit: int = 0):
    """Horizontal bars: the n features with the most influence on a logit node (0 = the target)."""
    scores = feature_influence(graph, logit)
    order = scores.argsort(descending=True)[:n].tolist()
    fig, ax = plt.subplots(figsize=(6, 0.3 * max(len(order), 3) + 1))
    ax.barh(range(len(order)), [float(scores[i]) for i in order], color=KIND_COLOURS["feature"])
    ax.set_yticks(range(len(order)), [graph.node_label(i, labels) for i in order], fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel=f"influence on {graph.logit_strings[logit]!r}", title=f"top {len(order)} features")
    fig.tight_layout()
    return fig
