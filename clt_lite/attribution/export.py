"""Export a pruned attribution graph as circuit-tracer's frontend JSON."""

from __future__ import annotations

from pathlib import Path

from ..files import write_json
from .graph import AttributionGraph
from .pruning import prune


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def _node_json(graph: AttributionGraph, index: int, influence_score: float, labels: dict | None) -> dict:
    """One node in circuit-tracer's frontend format (graph_models.Node)."""
    kind = graph.node_kind(index)
    node = {"token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "clerp": "",
            "influence": influence_score, "activation": None}
    if kind == "feature":
        layer, pos, latent = graph.features[index].tolist()
        label = (labels or {}).get((layer, latent), "")
        node.update(node_id=f"{layer}_{latent}_{pos}", feature=_cantor(layer, latent), layer=str(layer), ctx_idx=pos,
                    feature_type="cross layer transcoder", jsNodeId=f"{layer}_{latent}-0", clerp=label,
                    activation=float(graph.activations[index]))
    elif kind == "error":
        layer, pos = divmod(index - graph.error_start, graph.n_positions)
        node.update(node_id=f"0_{layer}_{pos}", feature=-1, layer=str(layer), ctx_idx=pos,
                    feature_type="mlp reconstruction error", jsNodeId=f"{layer}_{pos}-0")
    elif kind == "embedding":
        pos = index - graph.embed_start
        vocab = int(graph.input_ids[pos])
        node.update(node_id=f"E_{vocab}_{pos}", feature=pos, layer="E", ctx_idx=pos, feature_type="embedding",
                    jsNodeId=f"E_{vocab}-{pos}", clerp=graph.node_label(index))
    else:
        j = index - graph.logit_start
        vocab, prob, layer = int(graph.logit_tokens[j]), float(graph.logit_probs[j]), str(graph.n_layers + 1)
        pos = graph.n_positions - 1
        node.update(node_id=f"{layer}_{vocab}_{pos}", feature=vocab, layer=layer, ctx_idx=pos, feature_type="logit",
                    jsNodeId=f"L_{vocab}-{pos}", token_prob=prob, is_target_logit=j == 0,
                    clerp=f'Output "{graph.logit_strings[j]}" (p={prob:.3f})')
    return node


def to_circuit_tracer_json(graph: AttributionGraph, slug: str = "clt-lite-graph", scan: str = "clt-lite",
                           node_threshold: float = 0.8, edge_threshold: float = 0.98,
                           labels: dict[tuple[int, int], str] | None = None) -> dict:
    """The pruned graph as circuit-tracer's frontend JSON: metadata, qParams, nodes, links.

    labels: optional {(layer, latent): text} shown as feature clerps.
    """
    pruned = prune(graph, node_threshold, edge_threshold)
    kept = pruned.node_mask.nonzero(as_tuple=True)[0].tolist()
    nodes = {i: _node_json(graph, i, float(pruned.cumulative[i]), labels) for i in kept}
    targets, sources = pruned.edge_mask.nonzero(as_tuple=True)
    links = [{"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": float(graph.adjacency[t, s])}
             for t, s in zip(targets.tolist(), sources.tolist()) if s in nodes and t in nodes]
    linked = {link["source"] for link in links} | {link["target"] for link in links}
    used = [node for node in nodes.values() if node["node_id"] in linked or node["feature_type"] in ("embedding", "logit")]
    metadata = {"slug": slug, "scan": scan, "transcoder_list": [], "prompt_tokens": graph.tokens,
                "prompt": graph.prompt, "node_threshold": node_threshold, "schema_version": 1}
    q_params = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": q_params, "nodes": used, "links": links}


def export_json(graph: AttributionGraph, path: str | Path, **kwargs) -> dict:
    """Write to_circuit_tracer_json(graph, **kwargs) to `path` atomically; returns the dict written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = to_circuit_tracer_json(graph, slug=kwargs.pop("slug", path.stem), **kwargs)
    write_json(path, content, indent=None)
    return content
