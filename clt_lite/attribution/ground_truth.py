"""Ground truth on ShapesWorld: does the most influential image patch lie on the object asked about?"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .. import data
from ..clt import CrossLayerTranscoder
from ..models import LoadedModel
from .graph import attribute
from .local import _language_model
from .pruning import patch_influence

SINGLE_OBJECT_FAMILIES = ("colour", "shape", "describe")  # questions about exactly one object


def answer_token(loaded: LoadedModel, answer: str) -> int:
    """First token of ' answer' as the model is trained to produce it (as data.encode_batch tokenises answers)."""
    return loaded.processor.tokenizer(" " + answer, add_special_tokens=False)["input_ids"][0]


def gradient_x_input(loaded: LoadedModel, sample: data.Sample, token: int) -> Tensor:
    """[n_patches] |gradient x input| of the original model's logit for `token`, summed over the embedding dimension."""
    model = loaded.model
    encoded = data.encode_batch(loaded.processor, [sample])
    kept: dict[str, Tensor] = {}

    def leaf_embeds(_module, args, kwargs):
        kept["embeds"] = kwargs["inputs_embeds"].detach().float().requires_grad_()
        return args, {**kwargs, "inputs_embeds": kept["embeds"].to(kwargs["inputs_embeds"].dtype)}

    handle = _language_model(model).register_forward_pre_hook(leaf_embeds, with_kwargs=True)
    try:
        logits = model(**encoded.model_inputs(model)).logits
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits[0, -1, token], kept["embeds"])
    scores = (grad * kept["embeds"]).sum(-1)[0].abs().detach().cpu()
    return scores[encoded.input_ids[0] == loaded.image_token_id]


class FamilyHits(NamedTuple):
    graph: float  # hit rate of the attribution graph's top patch
    gradient: float  # hit rate of gradient x input's top patch
    n: int  # samples of this family


class SampleHit(NamedTuple):
    """One evaluated sample: where each method's top patch fell."""

    index: int  # position in the samples passed to ground_truth_hit_rate
    family: str
    target_cell: int  # the asked-about object's cell
    graph_patch: int  # the graph's most influential patch (row-major)
    gradient_patch: int  # gradient x input's
    graph_cell: int  # the cells those patches lie in
    gradient_cell: int
    graph_shares: tuple[float, ...] = ()  # per grid cell, its share of the graph's total patch influence
    gradient_shares: tuple[float, ...] = ()  # ... of gradient x input's total over the image patches

    @property
    def graph_hit(self) -> bool:
        return self.graph_cell == self.target_cell

    @property
    def gradient_hit(self) -> bool:
        return self.gradient_cell == self.target_cell


class GroundTruth(NamedTuple):
    """How often the most influential image patch lies in the asked-about object's cell."""

    graph_hit_rate: float  # attribution graph (influence of patch embeddings on the answer logit)
    gradient_hit_rate: float  # baseline: gradient x input on the original model
    n: int  # single-object samples evaluated
    per_family: dict[str, FamilyHits]  # the same per question family
    samples: tuple[SampleHit, ...] = ()  # one record per evaluated sample, in order

    def disagreements(self) -> list[SampleHit]:
        """The samples where one method's top patch is on the object and the other's is not."""
        return [s for s in self.samples if s.graph_hit != s.gradient_hit]


def ground_truth_samples(loaded: LoadedModel, n: int, seed: int = 0) -> list[data.Sample]:
    """n held-out (test split) ShapesWorld questions about one object at the model's image geometry, the families taking turns."""
    per_family = [data.shapes_world(-(-n // len(SINGLE_OBJECT_FAMILIES)), "test", seed, loaded.world, family=f)
                  for f in SINGLE_OBJECT_FAMILIES]
    return [s for group in zip(*per_family) for s in group][:n]


def _cell_shares(scores: Tensor, world: data.WorldConfig) -> tuple[float, ...]:
    """Each grid cell's share of the non-negative patch scores' total."""
    per_cell = torch.stack([scores[world.cell_patches(c)].sum() for c in range(world.grid ** 2)]).double()
    return tuple((per_cell / per_cell.sum().clamp_min(1e-30)).tolist())


def hard_ground_truth_samples(loaded: LoadedModel, n: int, seed: int = 0, share: str = "answer", adjacent: bool = True,
                              target_second: bool = True, families: Sequence[str] = SINGLE_OBJECT_FAMILIES,
                              max_draws: int | None = None) -> list[data.Sample]:
    """n held-out (test split) one-object questions whose scene holds a *distractor*: another object sharing an
    attribute with the one asked about (`data.distractors`; share="answer": the attribute the answer names, so a
    patch that merely shows "red" or "a circle" can win the attribution without being on the object), in a cell
    sharing an edge with the object's when `adjacent`, and before it in reading order (row-major, the order of the
    image tokens: the object asked about is the second of the two the model reads) when `target_second`. The
    families take turns, as in ground_truth_samples. The defaults are the kind that best separated the graph from
    gradient x input on the toy (of same-colour, same-shape, either; adjacent or anywhere; first or either order).

    Drawn by filtering the ordinary test stream at the model's geometry (`loaded.world`), so the scenes stay those
    the model was trained on, and deterministic for a seed. Each family gets at most `max_draws` draws (default
    1000 + 200 per sample wanted: some six times what the default kind needs for colour questions, its rarest, where
    1 draw in 30 has a same-colour object just before the one asked about); a ValueError says when they fall short.
    """
    if share not in data.DISTRACTOR_SHARES:
        raise ValueError(f"unknown distractor kind {share!r}; choose from {', '.join(data.DISTRACTOR_SHARES)}")
    unknown = [f for f in families if f not in SINGLE_OBJECT_FAMILIES]
    if unknown or not families:
        raise ValueError(f"families {unknown or families} are not one-object questions; choose from {', '.join(SINGLE_OBJECT_FAMILIES)}")
    if share == "shape" and "colour" in families:
        raise ValueError("a colour question asks about a shape that appears once, so it has no same-shape distractor; "
                         "pass families=('shape', 'describe') or another share")
    world = loaded.world
    per_family = -(-n // len(families))
    draws = max_draws if max_draws is not None else 1000 + 200 * per_family

    def hard(sample: data.Sample) -> bool:
        target = sample.target_cells[0]
        near = data.adjacent_cells(target, world.grid) if adjacent else range(world.grid ** 2)
        return any(d.cell in near and (d.cell < target or not target_second) for d in data.distractors(sample, share))

    groups = []
    for family in families:
        found = [s for s in data.iter_shapes_world(draws, "test", seed, world, family=family) if hard(s)][:per_family]
        if len(found) < per_family:
            raise ValueError(f"only {len(found)} of the {per_family} {family!r} questions with a {share!r} distractor"
                             f"{' in an adjacent cell' if adjacent else ''}{' before it' if target_second else ''} wanted turned up "
                             f"in {draws} test draws at {world}; ask for fewer, raise max_draws, or pass adjacent=False or target_second=False")
        groups.append(found)
    return [s for group in zip(*groups) for s in group][:n]


def ground_truth_hit_rate(loaded: LoadedModel, clt: CrossLayerTranscoder, samples: Sequence[data.Sample],
                          **attribute_kwargs) -> GroundTruth:
    """Attribute each single-object ShapesWorld sample (colour, shape, describe) to its answer's first token
    and check whether the top patch (graph influence; gradient x input baseline) falls in the object's cell
    (cells map to patches by the model's own geometry, `loaded.world`; render the samples with it).

    Other samples (count, exists, user data) are skipped: they have no single ground-truth cell. `samples` holds one
    SampleHit per evaluated sample (top patches, their cells, each cell's share of each method's patch scores), and
    `disagreements()` the samples where the graph and gradient x input part ways.
    """
    hits: dict[str, list[tuple[bool, bool]]] = {}
    records = []
    world = loaded.world
    for index, sample in enumerate(samples):
        if sample.family not in SINGLE_OBJECT_FAMILIES or len(sample.target_cells) != 1:
            continue
        token = answer_token(loaded, sample.answer)
        graph = attribute(loaded, clt, sample, target_token=token, **attribute_kwargs)
        graph_scores, gradient_scores = patch_influence(graph), gradient_x_input(loaded, sample, token)
        by_graph, by_gradient = int(graph_scores.argmax()), int(gradient_scores.argmax())
        record = SampleHit(index, sample.family, sample.target_cells[0], by_graph, by_gradient, world.patch_cell(by_graph),
                           world.patch_cell(by_gradient), _cell_shares(graph_scores, world), _cell_shares(gradient_scores, world))
        records.append(record)
        hits.setdefault(sample.family, []).append((record.graph_hit, record.gradient_hit))
    if not hits:
        raise ValueError("no single-object samples (families colour, shape, describe) to evaluate; pass ShapesWorld samples")

    def rates(pairs: list[tuple[bool, bool]]) -> FamilyHits:
        return FamilyHits(sum(g for g, _ in pairs) / len(pairs), sum(b for _, b in pairs) / len(pairs), len(pairs))

    per_family = {family: rates(pairs) for family, pairs in sorted(hits.items())}
    overall = rates([pair for pairs in hits.values() for pair in pairs])
    return GroundTruth(overall.graph, overall.gradient, overall.n, per_family, tuple(records))
