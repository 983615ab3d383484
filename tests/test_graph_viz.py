"""The graph figure stays readable (bounded size, no label on another) and the graph explorer shows true edges."""

import dataclasses
import html
import re

import matplotlib
import pytest
import torch
from PIL import Image

matplotlib.use("Agg")

from test_attribution import random_clt  # noqa: E402

from clt_lite import attribution as A  # noqa: E402
from clt_lite import data, graph_viz, viz  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def graph(tiny):
    """An attribution graph of the random tiny LLaVA through test_attribution's random CLT: ~50 positions, image
    patches and a few hundred active features."""
    samples = data.shapes_world(3, "test", seed=1, family="describe")
    clt = random_clt(tiny, samples)
    return A.attribute(tiny, clt, samples[0])


@pytest.fixture(scope="module")
def pruned(graph):
    return A.prune(graph, node_threshold=0.99)  # random features carry little: 0.8 keeps only a few error nodes


def _node_labels(fig) -> list[matplotlib.text.Text]:
    return [t for t in fig.axes[0].texts if t.get_gid() == "node-label"]


# Long names crowd the labels until some must go to the list beside the plot: both paths are checked.
@pytest.mark.parametrize("named", [False, True])
def test_the_graph_figure_is_bounded_and_no_label_lies_on_another(graph, pruned, tmp_path, named):
    labels = {(l, f): f"a long feature name {l}.{f}" for l, _, f in graph.features.tolist()} if named else None
    fig = graph_viz.draw_graph(graph, pruned, labels=labels)
    width, height = Image.open(viz.save_figure(fig, tmp_path, "graph")).size
    assert height <= 1200 and width <= 1600
    renderer = fig.canvas.get_renderer()
    texts = _node_labels(fig)
    boxes = [t.get_window_extent(renderer) for t in texts]
    overlapping = [(texts[i].get_text(), texts[j].get_text()) for i in range(len(boxes)) for j in range(i) if boxes[i].overlaps(boxes[j])]
    assert overlapping == []
    # every shown feature is named: beside its node, or numbered there and listed on the right
    written = {t.get_text() for t in texts} | {line.split(": ", 1)[1] for t in fig.axes[1].texts for line in t.get_text().splitlines()}
    features = [n for n in graph_viz.shown_nodes(graph, pruned) if n < graph.n_features]
    assert features and all({graph.node_label(n, labels), graph_viz.node_name(graph, n, labels)} & written for n in features)
    matplotlib.pyplot.close(fig)


def test_at_most_max_nodes_feature_and_error_nodes_are_drawn(graph, pruned):
    kept = int(pruned.node_mask[: graph.embed_start].sum())
    assert kept > 5
    for max_nodes in (5, 10_000):
        fig = graph_viz.draw_graph(graph, pruned, max_nodes=max_nodes)
        drawn = sum(len(c.get_offsets()) for c in fig.axes[0].collections if c.get_gid() in ("feature", "error"))
        assert drawn == min(max_nodes, kept)
        matplotlib.pyplot.close(fig)


def test_a_threshold_that_keeps_no_feature_or_error_node_says_what_to_do(graph):
    # Edges from features and errors shrunk a hundredfold: embeddings carry nearly all the influence on the logits.
    drowned = dataclasses.replace(graph, adjacency=graph.adjacency.clone())
    drowned.adjacency[:, : graph.embed_start] *= 1e-2
    with pytest.raises(ValueError, match=r"node_threshold=0.5 keeps no feature or error node .* raise it to") as caught:
        A.prune(drowned, node_threshold=0.5)
    assert "\n" not in str(caught.value)
    advised = float(re.search(r"raise it to ([0-9.]+) or more", str(caught.value)).group(1))
    # the advice works (every edge kept: at the default edge_threshold this graph's shrunk edges all go)
    assert A.prune(drowned, node_threshold=advised, edge_threshold=1.0).node_mask[: graph.embed_start].any()


def test_the_graph_explorer_shows_the_chosen_nodes_true_top_edges(graph, pruned):
    from clt_lite.widgets import GraphExplorer

    cards = []
    explorer = GraphExplorer(graph, pruned, card=lambda layer, latent: cards.append((layer, latent)) or matplotlib.pyplot.figure())
    n_logits = graph.n_nodes - graph.logit_start
    inner = explorer.nodes[n_logits:]
    assert explorer.nodes[:n_logits] == list(range(graph.logit_start, graph.n_nodes))  # the answer first, then by influence
    influence = [float(pruned.influence[n]) for n in inner]
    assert influence[: len(graph_viz.shown_nodes(graph, pruned))] == sorted(influence[: len(graph_viz.shown_nodes(graph, pruned))], reverse=True)
    feature = next(n for n in inner if n < graph.n_features)
    explorer.picker.value = feature
    for shown, weights in ((explorer.incoming, graph.adjacency[feature]), (explorer.outgoing, graph.adjacency[:, feature])):
        top = weights.abs().topk(explorer.n_edges).indices.tolist()
        assert [n for n, _, _ in shown] == [n for n in top if weights[n] != 0] and shown
        assert [w for _, _, w in shown] == pytest.approx([float(weights[n]) for n, _, _ in shown])
        assert all(html.escape(graph_viz.node_name(graph, n)) in explorer.edges.value for n, _, _ in shown)
    layer, _, latent = graph.features[feature].tolist()
    assert cards[-1] == (layer, latent) and graph.node_label(feature) in explorer.summary.value
    explorer.picker.value = graph.logit_start  # a logit: edges in, none out, no card
    assert explorer.outgoing == [] and explorer.incoming[0][0] == int(graph.adjacency[graph.logit_start].abs().argmax())
    assert len(cards) == 1 and "probability" in explorer.summary.value
    assert explorer.view._repr_mimebundle_()["text/plain"].startswith("[graph explorer: run the notebook's cells")
