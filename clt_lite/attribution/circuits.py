"""The known circuit: how much of the answer travels from the object's patches through given attention heads.

In the local replacement model attention patterns are frozen, so the model is linear in its sources and
information leaves a position only through attention. The contribution of the sources at the object's image
patches (their embeddings, features and errors) to the answer's logit is what those sources add to it; cut
the attention that reads from the object's patches at one layer (one head, or all of them) and the part of
that contribution which passed through it disappears, exactly. Its share is the route's share:

    share(layer, heads) = 1 - contribution with that attention cut / contribution

Cutting the attention from the object's patches at every layer leaves nothing (share 1): the tests use that.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .. import data
from ..clt import CrossLayerTranscoder
from ..models import LoadedModel
from .local import LocalReplacement


class RouteShares(NamedTuple):
    """Shares of the object's contribution to the answer logit that pass through attention from its patches."""

    per_layer: list[float]  # through each layer's attention (every head)
    heads: list[tuple[int, int]]  # the (layer, head) pairs asked about
    through_heads: float  # through those heads, cut together
    through_their_layers: float  # through every head of their layers, cut together
    contribution: float  # the object's sources' total contribution to the answer logit (minus the mean logit)


def object_positions(loaded: LoadedModel, sample: data.Sample, input_ids: Tensor) -> list[int]:
    """Prompt positions of the image patches covering the sample's asked-about cells."""
    if not sample.target_cells:
        raise ValueError(f"{sample.question!r} names no object (no target cells): route shares need a ShapesWorld question about one")
    image = (input_ids == loaded.image_token_id).nonzero(as_tuple=True)[0].tolist()
    return [image[p] for cell in sample.target_cells for p in loaded.world.cell_patches(cell)]


def _object_contribution(local: LocalReplacement, positions: list[int], token: int, cut: Sequence[tuple[int, Sequence[int]]]) -> float:
    """The object's sources' contribution to token's demeaned logit, with the attention from `positions` removed at each
    (layer, heads) in cut."""
    frozen = local.frozen
    patterns = list(frozen.patterns)
    inside = set(positions)
    device = frozen.patterns[0].device
    rows = torch.tensor([q for q in range(len(local.recorded.input_ids)) if q not in inside], device=device)[:, None]
    columns = torch.tensor(positions, device=device)[None, :]
    for layer, heads in cut:  # every other position stops reading from the object's patches through these heads
        pattern = patterns[layer].clone()
        for h in heads:
            pattern[h][rows, columns] = 0.0
        patterns[layer] = pattern
    local.frozen = frozen._replace(patterns=patterns)
    try:
        S = len(local.recorded.input_ids)
        where = torch.zeros(S, dtype=torch.bool, device=local.device)
        where[positions] = True
        with torch.no_grad():
            full = local.run().logits[-1]
            without = local.run(feature_scale=(~where[local.features[:, 1].to(local.device)]).float(),
                                error_scale=(~where).float().expand(len(local.blocks), S),
                                embed_scale=(~where).float()).logits[-1]
    finally:
        local.frozen = frozen
    difference = full - without
    return float(difference[token] - difference.mean())


def route_shares(loaded: LoadedModel, clt: CrossLayerTranscoder, sample: data.Sample, heads: Sequence[tuple[int, int]],
                 token: int | None = None, max_feature_nodes: int = 4096) -> RouteShares:
    """Share of the asked-about object's contribution to the answer logit (the model's top token unless `token`) that
    passes through attention reading from its patches: at each layer (all heads), through the (layer, head) pairs in
    `heads` together (a grown toy's known circuit is a head copied into adjacent layers), and through all heads of
    their layers together."""
    local = LocalReplacement(loaded, clt, sample, max_feature_nodes=max_feature_nodes)
    n_layers, n_heads = len(local.blocks), local.frozen.patterns[0].shape[0]
    heads = [(int(layer), int(head)) for layer, head in heads]
    if not heads:
        raise ValueError("route_shares needs at least one (layer, head) pair")
    for layer, head in heads:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(f"head {head} of layer {layer} does not exist: the model has {n_layers} layers of {n_heads} heads")
    token = int(local.recorded.logits[-1].argmax()) if token is None else token
    positions = object_positions(loaded, sample, local.recorded.input_ids)
    total = _object_contribution(local, positions, token, [])
    if total == 0:
        raise ValueError(f"the object's patches contribute nothing to the answer of {sample.question!r}")
    every_head = range(n_heads)
    per_layer = [1 - _object_contribution(local, positions, token, [(l, every_head)]) / total for l in range(n_layers)]
    through_heads = 1 - _object_contribution(local, positions, token, [(layer, [head]) for layer, head in heads]) / total
    layers = sorted({layer for layer, _ in heads})
    through_layers = per_layer[layers[0]] if len(layers) == 1 else \
        1 - _object_contribution(local, positions, token, [(layer, every_head) for layer in layers]) / total
    return RouteShares(per_layer, heads, through_heads, through_layers, total)
