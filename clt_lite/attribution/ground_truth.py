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


class GroundTruth(NamedTuple):
    """How often the most influential image patch lies in the asked-about object's cell."""

    graph_hit_rate: float  # attribution graph (influence of patch embeddings on the answer logit)
    gradient_hit_rate: float  # baseline: gradient x input on the original model
    n: int  # single-object samples evaluated
    per_family: dict[str, FamilyHits]  # the same per question family


def ground_truth_samples(loaded: LoadedModel, n: int, seed: int = 0) -> list[data.Sample]:
    """n held-out (test split) ShapesWorld questions about one object at the model's image geometry, the families taking turns."""
    per_family = [data.shapes_world(-(-n // len(SINGLE_OBJECT_FAMILIES)), "test", seed, loaded.world, family=f)
                  for f in SINGLE_OBJECT_FAMILIES]
    return [s for group in zip(*per_family) for s in group][:n]


def ground_truth_hit_rate(loaded: LoadedModel, clt: CrossLayerTranscoder, samples: Sequence[data.Sample],
                          **attribute_kwargs) -> GroundTruth:
    """Attribute each single-object ShapesWorld sample (colour, shape, describe) to its answer's first token
    and check whether the top patch (graph influence; gradient x input baseline) falls in the object's cell
    (cells map to patches by the model's own geometry, `loaded.world`; render the samples with it).

    Other samples (count, exists, user data) are skipped: they have no single ground-truth cell.
    """
    hits: dict[str, list[tuple[bool, bool]]] = {}
    for sample in samples:
        if sample.family not in SINGLE_OBJECT_FAMILIES or len(sample.target_cells) != 1:
            continue
        token = answer_token(loaded, sample.answer)
        graph = attribute(loaded, clt, sample, target_token=token, **attribute_kwargs)
        cell = set(loaded.world.cell_patches(sample.target_cells[0]))
        by_graph = int(patch_influence(graph).argmax()) in cell
        by_gradient = int(gradient_x_input(loaded, sample, token).argmax()) in cell
        hits.setdefault(sample.family, []).append((by_graph, by_gradient))
    if not hits:
        raise ValueError("no single-object samples (families colour, shape, describe) to evaluate; pass ShapesWorld samples")

    def rates(pairs: list[tuple[bool, bool]]) -> FamilyHits:
        return FamilyHits(sum(g for g, _ in pairs) / len(pairs), sum(b for _, b in pairs) / len(pairs), len(pairs))

    per_family = {family: rates(pairs) for family, pairs in sorted(hits.items())}
    overall = rates([pair for pairs in hits.values() for pair in pairs])
    return GroundTruth(overall.graph, overall.gradient, overall.n, per_family)
