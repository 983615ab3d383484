"""The feature and graph explorers: thin ipywidgets views over `clt_lite.features` and attribution graphs.

Every callback calls a pure function and renders its result; tests drive the widgets by
setting `.value` and reading the outputs' state.
"""

from __future__ import annotations

import html
from typing import NamedTuple

import ipywidgets as w
import matplotlib.pyplot as plt
from IPython.display import display
from torch import Tensor

from . import features, graph_viz, viz


class _ExplorerView(w.VBox):
    """The explorer's box. Its text repr is what a notebook shows until the cell runs again: JupyterLab 4 does not
    redraw widgets from a notebook's saved widget state (jupyterlab/jupyterlab#15361), so say what to do."""

    name = "feature explorer"

    def __init__(self, children):
        super().__init__(children)
        # A CSS class of its own, so a page (and tests/ui_lab.py) can tell it from tqdm's progress-bar widgets.
        self.add_class("clt-lite-" + self.name.replace(" ", "-"))

    def __repr__(self) -> str:  # ipywidgets cuts the text form at 110 characters
        return f"[{self.name}: run the notebook's cells (Run > Run All Cells) to use it here]"


class _GraphView(_ExplorerView):
    name = "graph explorer"


class FeatureViews(NamedTuple):
    """What a feature card shows."""

    top: list  # features.TopActivation rows: where the feature fires most in the store
    tokens: list[str]  # the prompt's tokens
    prompt_acts: Tensor  # the feature's activation at each of them
    profile: dict[int, float]  # decoder norm per layer it writes to


def feature_views(loaded, clt, store, sample, layer: int, feature: int) -> FeatureViews:
    return FeatureViews(features.top_activations(store, clt, layer, feature),
                        *features.activation_over_prompt(loaded, clt, sample, layer, feature),
                        features.decoder_norm_profile(clt, layer, feature))


def feature_card(loaded, store, views: FeatureViews):
    """The card figure (viz.feature_card) of a feature's views; store samples are redrawn at the model's geometry."""
    samples = [features.store_sample(store, t.sample, loaded.world) for t in views.top]
    return viz.feature_card(views.top, samples, views.tokens, views.prompt_acts, views.profile, loaded.world)


class FeatureExplorer:
    """Pick a layer and feature -> top activations, activation over a prompt, decoder norms, steering."""

    def __init__(self, loaded, clt, store, prompt_sample, feature_choices: list[tuple[int, int]] | None = None):
        self.loaded, self.clt, self.store, self.sample = loaded, clt, store, prompt_sample
        n_layers, n_latents = clt.config.n_layers, clt.config.num_latents
        first = feature_choices[0] if feature_choices else (0, 0)
        self.layer = w.BoundedIntText(value=first[0], min=0, max=n_layers - 1, description="layer")
        self.feature = w.BoundedIntText(value=first[1], min=0, max=n_latents - 1, description="feature")
        # The graph's first feature starts selected (an empty first option would show a blank drop-down).
        options = [(f"L{l} #{f}", (l, f)) for l, f in feature_choices or []] or [("no graph features given", None)]
        self.picker = w.Dropdown(options=options, value=options[0][1], description="from graph")
        self.scale = w.FloatSlider(value=1.0, min=-2.0, max=6.0, step=0.5, description="steer x", continuous_update=False)
        self.summary, self.answer = w.HTML(), w.HTML()
        self.plots = w.Output()
        self.picker.observe(self._pick, names="value")
        for control in (self.layer, self.feature):
            control.observe(lambda _: self.refresh(), names="value")
        self.scale.observe(lambda _: self.steer(), names="value")
        self.view = _ExplorerView([w.HBox([self.picker, self.layer, self.feature]), self.summary, self.plots,
                                   w.HBox([self.scale, self.answer])])
        self.refresh()

    def _pick(self, change) -> None:
        if change["new"] is not None:
            layer, feature = change["new"]
            with self.layer.hold_trait_notifications(), self.feature.hold_trait_notifications():
                self.layer.value, self.feature.value = layer, feature

    def refresh(self) -> None:
        """Recompute every view for the current layer and feature."""
        layer, feature = self.layer.value, self.feature.value
        self.top, self.tokens, self.prompt_acts, self.profile = feature_views(self.loaded, self.clt, self.store, self.sample, layer, feature)
        fired = f"max activation {self.top[0].activation:.2f} ({len(self.top)} top rows)" if self.top else "never fires in the store"
        self.summary.value = f"<b>layer {layer}, feature {feature}</b>: {fired}; writes to layers {min(self.profile)}..{max(self.profile)}"
        self.plots.clear_output(wait=True)
        with self.plots:
            fig = feature_card(self.loaded, self.store, FeatureViews(self.top, self.tokens, self.prompt_acts, self.profile))
            display(fig)
        plt.close(fig)  # shown once, inside the Output widget
        self.steer()

    def steer(self) -> None:
        """The model's answer to the prompt with the feature scaled by the slider."""
        self.steered = features.steered_answer(self.loaded, self.clt, self.sample, self.layer.value, self.feature.value, self.scale.value)
        self.answer.value = f"answer with feature x{self.scale.value:g}: <b>{self.steered}</b> (truth: {self.sample.answer})"


class GraphExplorer:
    """Pick a node of the drawn graph (graph_viz.draw_graph's nodes: logits first, then by influence) -> what it is,
    its strongest incoming and outgoing edges in the full graph, and for a feature its card (`card(layer, latent)`
    returns a matplotlib Figure, e.g. a lambda over viz.feature_card)."""

    def __init__(self, graph, pruned, labels: dict | None = None, card=None, max_nodes: int = 60, n_edges: int = 8):
        self.graph, self.pruned, self.labels, self.card, self.n_edges = graph, pruned, labels, card, n_edges
        inner = graph_viz.shown_nodes(graph, pruned, max_nodes)
        sources = graph_viz.drawn_edges(graph, pruned, inner)[1].tolist()
        embeddings = sorted({s for s in sources if graph.embed_start <= s < graph.logit_start}, key=lambda n: -float(pruned.influence[n]))
        self.nodes = list(range(graph.logit_start, graph.n_nodes)) + inner + embeddings  # the answer is where reading starts
        self.picker = w.Dropdown(options=[(self._label(n), n) for n in self.nodes], value=self.nodes[0], description="node")
        self.summary, self.edges, self.plots = w.HTML(), w.HTML(), w.Output()
        self.picker.observe(lambda _: self.refresh(), names="value")
        self.view = _GraphView([self.picker, self.summary, self.edges, self.plots])
        self.refresh()

    def _label(self, node: int) -> str:
        return graph_viz.node_name(self.graph, node, self.labels)

    def _top(self, weights) -> list[tuple[int, str, float]]:
        """(node, label, weight) of the n_edges largest |weights|, zeros left out: no edge there."""
        order = weights.abs().argsort(descending=True)[: self.n_edges].tolist()
        return [(n, self._label(n), float(weights[n])) for n in order if weights[n] != 0]

    def _value(self, node: int, kind: str) -> str:
        if kind == "feature":
            return f"activation {float(self.graph.activations[node]):.3g}"
        if kind == "logit":
            return f"probability {float(self.graph.logit_probs[node - self.graph.logit_start]):.3f}"
        return "no activation" if kind == "error" else "an input"

    def refresh(self) -> None:
        """Show the chosen node: what it is, its top edges in and out, and its feature card."""
        graph, node = self.graph, self.picker.value
        kind, (pos, layer) = graph.node_kind(node), graph.node_position(node)
        self.incoming, self.outgoing = self._top(graph.adjacency[node]), self._top(graph.adjacency[:, node])
        where = f"layer {layer}, " if kind in ("feature", "error") else ""
        self.summary.value = (f"<b>{html.escape(self._label(node))}</b>: {kind}, {where}position {pos} ({html.escape(graph.tokens[pos])}), "
                              f"{self._value(node, kind)}, influence on the logits {float(self.pruned.influence[node]):.3g}")
        rows = [f"<tr><td>{way}</td><td>{html.escape(label)}</td><td style='text-align:right'>{weight:+.3g}</td></tr>"
                for way, edges in (("in, from", self.incoming), ("out, to", self.outgoing)) for _, label, weight in edges]
        self.edges.value = "<table><tr><th>edge</th><th>node</th><th>weight</th></tr>" + "".join(rows) + "</table>"
        self.plots.clear_output(wait=True)
        if kind == "feature" and self.card is not None:
            layer, _, latent = graph.features[node].tolist()
            with self.plots:
                fig = self.card(layer, latent)
                display(fig)
            plt.close(fig)  # shown once, inside the Output widget
