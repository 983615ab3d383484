"""Influence through an attribution graph: pruning, replacement and completeness scores, patch and feature influence."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .graph import AttributionGraph


def normalize_rows(matrix: Tensor) -> Tensor:
    """|A| with each row scaled to sum 1 (rows of zeros stay zero): each target's share from each source."""
    absolute = matrix.abs()
    return absolute / absolute.sum(1, keepdim=True).clamp(min=1e-10)


def influence(adjacency: Tensor, weights: Tensor) -> Tensor:
    """Total influence of every node on the weighted targets: w (A + A^2 + ...) = w ((I - A)^-1 - I), A row-normalised.

    The graph is acyclic (features only read earlier layers), so the series ends after at most
    depth-many terms; it is summed term by term like circuit-tracer.
    """
    A = normalize_rows(adjacency)
    current = weights @ A
    total = current.clone()
    for _ in range(len(A)):
        if not current.any():
            return total
        current = current @ A
        total += current
    raise RuntimeError("influence did not converge: the adjacency matrix has a cycle")


def _logit_weights(graph: AttributionGraph) -> Tensor:
    weights = torch.zeros(graph.n_nodes)
    weights[graph.logit_start :] = graph.logit_probs
    return weights


def _threshold(scores: Tensor, fraction: float) -> Tensor:
    """Smallest score among the top scores whose sum reaches `fraction` of the total."""
    ordered = scores.flatten().sort(descending=True).values
    cumulative = ordered.cumsum(0) / ordered.sum().clamp(min=1e-30)
    return ordered[min(int(torch.searchsorted(cumulative, torch.tensor(fraction))), len(ordered) - 1)]


class Pruned(NamedTuple):
    """Result of prune()."""

    node_mask: Tensor  # [N] nodes kept
    edge_mask: Tensor  # [N, N] edges kept (row = target, column = source)
    influence: Tensor  # [N] each node's influence on the logits (probability-weighted)
    cumulative: Tensor  # [N] fraction of total influence carried by nodes at least as influential


def prune(graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """circuit-tracer's pruning: keep the most influential nodes, then edges, then drop dangling nodes.

    Node influence on the logits (weighted by their probabilities) through the row-normalised
    |adjacency|; keep nodes carrying `node_threshold` of it (embeddings and logits are always kept,
    they are the graph's ends); among edges between kept nodes keep those carrying
    `edge_threshold` of edge influence; finally drop feature / error nodes left without outgoing
    edges, and features without incoming ones, until nothing changes.
    """
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, got {value}")
    weights = _logit_weights(graph)
    node_influence = influence(graph.adjacency, weights)
    ordered, order = node_influence.sort(descending=True)
    cumulative = torch.empty_like(node_influence)
    cumulative[order] = ordered.cumsum(0) / ordered.sum().clamp(min=1e-30)
    node_mask = node_influence >= _threshold(node_influence, node_threshold)
    inner = slice(0, graph.embed_start)  # features and errors
    if not node_mask[inner].any():
        # Embeddings rank with the rest (on the toy they carry the top third), so a low threshold keeps only them.
        first = int((order < graph.embed_start).nonzero()[0])  # the most influential feature / error node, in rank order
        above = float(cumulative[order[first - 1]]) if first else 0.0  # the share a threshold must exceed to keep it
        need = (int(above * 1000) + 1) / 1000
        advice = f"raise it to {need:.3f} or more" if need <= 1 else "no threshold can: they carry no influence"
        raise ValueError(f"node_threshold={node_threshold} keeps no feature or error node of the graph's {graph.embed_start:,} "
                         f"(embeddings carry the top {above:.1%} of the influence on the logits); {advice} "
                         "(0.8 is circuit-tracer's default)")
    node_mask[graph.embed_start :] = True
    pruned = graph.adjacency.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    normalized = normalize_rows(pruned)
    edge_scores = normalized * (influence(pruned, weights) + weights)[:, None]
    edge_mask = edge_scores >= _threshold(edge_scores, edge_threshold)
    while True:
        edge_mask &= node_mask[:, None] & node_mask[None, :]
        before = node_mask.clone()
        node_mask[inner] &= edge_mask[:, inner].any(0)
        node_mask[: graph.n_features] &= edge_mask[: graph.n_features].any(1)
        if torch.equal(before, node_mask):
            break
    return Pruned(node_mask, edge_mask, node_influence, cumulative)


class GraphScores(NamedTuple):
    """How much of the computation the graph explains with features (1 = no error nodes needed)."""

    replacement: float  # influence from embeddings / (from embeddings + from error nodes)
    completeness: float  # influence-weighted fraction of incoming edge weight that is not from error nodes


def graph_scores(graph: AttributionGraph) -> GraphScores:
    """Replacement and completeness scores of Ameisen et al. (2025), as circuit-tracer computes them.

    Replacement: of the end-to-end influence on the logits that starts at embeddings or error
    nodes, the fraction starting at embeddings (paths end-to-end through features). Completeness:
    for every node, the fraction of its normalised incoming weight not from error nodes,
    averaged with weights = the node's influence on the logits (logits weighted by probability).
    """
    weights = _logit_weights(graph)
    node_influence = influence(graph.adjacency, weights)
    errors = slice(graph.error_start, graph.embed_start)
    from_errors = node_influence[errors].sum()
    from_embeddings = node_influence[graph.embed_start : graph.logit_start].sum()
    non_error = 1 - normalize_rows(graph.adjacency)[:, errors].sum(1)
    output = node_influence + weights
    return GraphScores(float(from_embeddings / (from_embeddings + from_errors)),
                       float((non_error * output).sum() / output.sum()))


def patch_influence(graph: AttributionGraph, logit: int = 0) -> Tensor:
    """[n_patches] influence of each image-patch embedding on one logit node (0 = the target), row-major."""
    weights = torch.zeros(graph.n_nodes)
    weights[graph.logit_start + logit] = 1.0
    return influence(graph.adjacency, weights)[graph.patch_nodes()]


def feature_influence(graph: AttributionGraph, logit: int = 0) -> Tensor:
    """[n_f] influence of each feature on one logit node (0 = the target)."""
    weights = torch.zeros(graph.n_nodes)
    weights[graph.logit_start + logit] = 1.0
    return influence(graph.adjacency, weights)[: graph.n_features]
