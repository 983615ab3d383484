"""Figures of attribution graphs (each function returns a matplotlib Figure; saving is viz.save_figure's job)."""

from __future__ import annotations

from collections import defaultdict

import matplotlib.pyplot as plt
import torch
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.transforms import Bbox, ScaledTranslation

from .attribution import AttributionGraph, Pruned, feature_influence, patch_influence, prune
from .data import WorldConfig

KIND_COLOURS = {"feature": "#4c72b0", "error": "#8c8c8c", "embedding": "#55a868", "logit": "#c44e52"}
EDGE_COLOURS = {"positive": "#1f77b4", "negative": "#d62728"}
# Where a label may go, in points from its node (dx, dy, ha, va): above, below, beside, then shifted sideways and a row
# further out (a 16-layer model's rows are ~50 points apart: two rows of labels fit between). Tried in this order.
_SPOTS = [(0, 3, "center", "bottom"), (0, -3, "center", "top"), (5, 0, "left", "center"), (-5, 0, "right", "center")]
_SPOTS += [(dx, dy * side, {0: "center", 16: "left", -16: "right"}[dx], "bottom" if side > 0 else "top")
           for dy in (3, 11, 19) for dx in (0, 16, -16) for side in (1, -1) if (dx, dy) != (0, 3)]


def shown_nodes(graph: AttributionGraph, pruned: Pruned, max_nodes: int = 60) -> list[int]:
    """The pruned graph's feature and error nodes worth drawing: the `max_nodes` most influential, most first."""
    inner = pruned.node_mask[: graph.embed_start].nonzero(as_tuple=True)[0]
    return inner[pruned.influence[inner].argsort(descending=True)[:max_nodes]].tolist()


def drawn_edges(graph: AttributionGraph, pruned: Pruned, inner: list[int], max_edges: int = 400):
    """(targets, sources, weights) of the strongest `max_edges` kept edges into shown nodes (the `inner` ones and the
    logits) from shown nodes or embeddings: edges of nodes not shown would end in mid-air."""
    shown = torch.zeros(graph.n_nodes, dtype=torch.bool)
    shown[inner] = True
    shown[graph.logit_start :] = True
    source = shown.clone()
    source[graph.embed_start : graph.logit_start] = True
    targets, sources = (pruned.edge_mask & shown[:, None] & source[None, :]).nonzero(as_tuple=True)
    weights = graph.adjacency[targets, sources]
    strongest = weights.abs().argsort(descending=True)[:max_edges]
    return targets[strongest], sources[strongest], weights[strongest]


def _layout(graph: AttributionGraph, nodes: list[int]):
    """x: one column group per text position that holds nodes, one for all image patches (patch order means little
    once most patches are empty), each as wide as its fullest layer; y: layer (embeddings -1, logits L).
    Returns {node: (x, y)}, x ticks [(x, token)], the image group's x span (or None) and the total width."""
    slots: dict[tuple[int, int], list[int]] = defaultdict(list)
    for node in nodes:
        pos, layer = graph.node_position(node)
        slots[(-1 if graph.image_positions[pos] else pos, layer)].append(node)
    # Labelled nodes (features, logits) get a column each; errors (no label) and embeddings ("2,3") half of one.
    step = {key: 1.0 if any(graph.node_kind(n) in ("feature", "logit") for n in members) else 0.5 for key, members in slots.items()}
    widths: dict[int, float] = defaultdict(float)
    for (group, layer), members in slots.items():
        widths[group] = max(widths[group], step[group, layer] * (len(members) - 1))
    image = graph.image_positions.nonzero(as_tuple=True)[0]
    first_image = int(image[0]) if len(image) else -1
    starts, x, ticks, span = {}, 0.0, [], None
    for group in sorted(widths, key=lambda g: first_image if g == -1 else g):
        starts[group] = x
        if group == -1:
            name, span = f"image @{int(image[0])}-{int(image[-1])}", (x - 0.5, x + widths[group] + 0.5)
        else:
            name = graph.tokens[group].replace("\n", "\\n") + f" @{group}"
        ticks.append((x + widths[group] / 2, name))  # positions as the labels give them ("L2 #17 @5")
        x += widths[group] + 1.6  # one column to the next group, and a gap
    xy = {}
    for (group, layer), members in slots.items():
        offset = starts[group] + (widths[group] - step[group, layer] * (len(members) - 1)) / 2
        for i, node in enumerate(sorted(members, key=graph.node_position)):
            xy[node] = (offset + step[group, layer] * i, layer)
    return xy, ticks, span, x - 1.6


def node_name(graph: AttributionGraph, node: int, labels: dict | None = None) -> str:
    """graph.node_label, plus where the node is when the label hides it: 'red circle (L3 @41)', "'circle' @43"."""
    text = graph.node_label(node, labels)
    if graph.node_kind(node) == "embedding" and not graph.image_positions[node - graph.embed_start]:
        return f"{text!r} @{node - graph.embed_start}"
    if node < graph.n_features:
        layer, pos, latent = graph.features[node].tolist()
        if (layer, latent) in (labels or {}):
            return f"{text} (L{layer} @{pos})"
    return text


def _label_items(graph: AttributionGraph, inner: list[int], embeddings: list[int], labels: dict | None):
    """(node, text on the plot, text in the list if it finds no room there, or None if it may just be left out):
    logits and features first (most influential first, so they get the closest spots), then image patches ("2,3")."""
    items = [(n, graph.logit_strings[n - graph.logit_start], graph.node_label(n)) for n in range(graph.logit_start, graph.n_nodes)]
    items += [(n, graph.node_label(n, labels), node_name(graph, n, labels)) for n in inner if n < graph.n_features]
    patches = [n for n in embeddings if graph.image_positions[n - graph.embed_start]]
    return items + [(n, graph.node_label(n).removeprefix("patch "), None) for n in patches]


def _place_labels(ax, items: list[tuple[tuple[float, float], str, str | None]], taken: list[Bbox]) -> list[str]:
    """Put each (xy, text, listing) label at the first spot near its node where it stays inside the axes and overlaps
    no label or node marker already there (the boxes in `taken`, which grows). A label that finds no spot is left out,
    or, when it has a listing, numbered on the plot; returns those listings in number order."""
    renderer = ax.figure.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)

    def put(xy, text, size) -> bool:
        for dx, dy, ha, va in _SPOTS:
            offset = ScaledTranslation(dx / 72, dy / 72, ax.figure.dpi_scale_trans)
            label = ax.text(*xy, text, fontsize=size, ha=ha, va=va, transform=ax.transData + offset, gid="node-label", zorder=4,
                            bbox={"boxstyle": "square,pad=0.05", "fc": "white", "ec": "none", "alpha": 0.7})
            box = label.get_window_extent(renderer).padded(1)
            if inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1) and not any(box.overlaps(o) for o in taken):
                taken.append(box)
                if abs(dx) > 5 or abs(dy) > 3:  # away from its node: a leader line says whose it is
                    ax.annotate("", xy, xytext=(dx, dy), textcoords="offset points", zorder=2,
                                arrowprops={"arrowstyle": "-", "color": "0.35", "lw": 0.4, "shrinkA": 0, "shrinkB": 2})
                return True
            label.remove()
        return False

    listed = []
    for xy, text, listing in items:
        if not put(xy, text, 6.5) and listing:
            listed.append(listing)
            put(xy, str(len(listed)), 6)  # no room even for the number: the listing still says where the node is
    return listed


def _list_labels(side, listed: list[str], top: float) -> None:
    """The numbered labels under the legend, in as many columns as the panel's height needs."""
    renderer = side.figure.canvas.get_renderer()
    per_column = max(1, int(top * side.bbox.height / (6 * 1.3 * side.figure.dpi / 72)))
    x = 0.0
    for start in range(0, len(listed), per_column):
        lines = [f"{i}: {t}" for i, t in enumerate(listed[start : start + per_column], start + 1)]
        text = side.text(x, top, "\n".join(lines), va="top", fontsize=6, transform=side.transAxes)
        x += text.get_window_extent(renderer).width / side.bbox.width + 0.05


def draw_graph(graph: AttributionGraph, pruned: Pruned | None = None, max_edges: int = 400, labels: dict | None = None,
               max_nodes: int = 60):
    """Layered drawing of the pruned graph, as circuit-tracer's viewer lays it out: token position across (only the
    positions holding shown nodes, image patches in one group), layer up, embeddings at the bottom, logits on top.

    Shows the `max_nodes` most influential feature / error nodes, every logit and the embeddings with drawn edges;
    the strongest `max_edges` edges between them are drawn, wider for larger |weight|, blue positive, red negative.
    Every feature and logit is labelled (`labels`: {(layer, latent): name}, else "L2 #17 @5"); a label with no free
    spot beside its node is numbered there and listed on the right.
    """
    pruned = pruned or prune(graph)
    inner = shown_nodes(graph, pruned, max_nodes)
    targets, sources, weights = drawn_edges(graph, pruned, inner, max_edges)
    embeddings = sorted({s for s in sources.tolist() if graph.embed_start <= s < graph.logit_start})
    nodes = inner + embeddings + list(range(graph.logit_start, graph.n_nodes))
    xy, ticks, span, width = _layout(graph, nodes)
    # At most ~1550 x 1150 px at save_figure's 110 dpi: the axes get the room the columns need, the list 2.4 inches.
    plot_width, height = min(11.0, max(5.0, 0.5 * width + 1)), min(10.3, max(4.0, 0.6 * (graph.n_layers + 2) + 1.6))
    fig, (ax, side) = plt.subplots(1, 2, figsize=(plot_width + 2.4, height), gridspec_kw={"width_ratios": [plot_width, 2.4]})
    scale = float(weights.abs().max()) if len(weights) else 1.0
    for t, s, w in zip(targets.flip(0).tolist(), sources.flip(0).tolist(), weights.flip(0).tolist()):  # strongest on top
        (x0, y0), (x1, y1) = xy[s], xy[t]
        ax.plot([x0, x1], [y0, y1], color=EDGE_COLOURS["positive" if w > 0 else "negative"], lw=0.3 + 2.5 * abs(w) / scale,
                alpha=0.2 + 0.5 * abs(w) / scale, zorder=1)
    share = pruned.influence / pruned.influence.max().clamp(min=1e-30)
    sizes = {n: 30.0 if n >= graph.embed_start else 15 + 60 * float(share[n]) for n in nodes}  # area grows with influence
    for kind, colour in KIND_COLOURS.items():
        members = [n for n in nodes if graph.node_kind(n) == kind]
        if members:
            ax.scatter(*zip(*(xy[n] for n in members)), s=[sizes[n] for n in members], color=colour, label=kind, zorder=3,
                       marker="s" if kind in ("embedding", "logit") else "o", gid=kind, edgecolors="white", linewidths=0.5)
    if span:
        ax.axvspan(*span, color="#f0e68c", alpha=0.3, zorder=0, label="image patches")
    ax.set_xticks([x for x, _ in ticks], [t for _, t in ticks], rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(-1, graph.n_layers + 1), ["emb"] + [f"L{l}" for l in range(graph.n_layers)] + ["logits"], fontsize=7)
    ax.set(xlim=(-1, width + 1), ylim=(-1.6, graph.n_layers + 0.7), xlabel="token position (shown ones only)")
    ax.set_title(f"{graph.prompt.splitlines()[-1]!r} -> {graph.logit_strings[0]!r}: {len(inner)} of "
                 f"{int(pruned.node_mask[: graph.embed_start].sum())} feature/error nodes, {len(weights)} of "
                 f"{int(pruned.edge_mask.sum())} edges", fontsize=8)
    for spine in ("top", "right"):
        ax.spines[spine].set_visible(False)
    side.axis("off")
    handles = ax.get_legend_handles_labels()[0] + [Line2D([], [], color=c, label=f"{k} edge") for k, c in EDGE_COLOURS.items()]
    legend = side.legend(handles=handles, loc="upper left", fontsize=7, frameon=False, markerscale=0.8)
    fig.tight_layout()  # the layout is final before labels are placed: they are checked in display coordinates
    markers = []  # labels keep off the nodes too: a scatter size is an area in points^2
    for n in nodes:
        (x, y), d = ax.transData.transform(xy[n]), sizes[n] ** 0.5 * fig.dpi / 72
        markers.append(Bbox.from_bounds(x - d / 2, y - d / 2, d, d))
    items = [(xy[n], text, listing) for n, text, listing in _label_items(graph, inner, embeddings, labels)]
    listed = _place_labels(ax, items, markers)
    if listed:
        _list_labels(side, listed, side.transAxes.inverted().transform(legend.get_window_extent())[0, 1] - 0.02)
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


def route_share_plot(routes: dict):
    """Mean share of the object's contribution to the answer passing through each layer's attention, one line per
    question family (routes: family -> list of attribution.RouteShares), the known heads marked (a star at their
    last layer: their share, cut together)."""
    first = next(iter(routes.values()))[0]
    heads, layers = first.heads, sorted({layer for layer, _ in first.heads})
    named = ", ".join(f"head {head} of layer {layer}" for layer, head in heads)
    fig, ax = plt.subplots(figsize=(6.5 if len(first.per_layer) <= 16 else 9, 3.2))  # wider for 32 layers
    for family, shares in routes.items():
        per_layer = torch.tensor([r.per_layer for r in shares]).mean(0).tolist()
        ax.plot(range(len(per_layer)), per_layer, marker="o", ms=3, label=family)
        ax.scatter([layers[-1]], [sum(r.through_heads for r in shares) / len(shares)], marker="*", s=90, zorder=3)
    for layer in layers:
        ax.axvline(layer, color="#999999", lw=0.8, ls="--")
    ax.set(xlabel="layer whose attention from the object's patches is cut", ylabel="share of the object's contribution")
    ax.set_title(f"routes from the object to the answer (stars: {named}{' together' if len(heads) > 1 else ''})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
