"""Interventions in the real model: scale or ablate a graph's features and read the new answer token."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .. import data, sites
from ..clt import CrossLayerTranscoder
from ..models import LoadedModel
from ..replacement import check_compatible
from .graph import AttributionGraph, attribute
from .local import Recorded, encode_recorded, record
from .pruning import feature_influence


class Intervention(NamedTuple):
    """Teacher-forced top token at the answer position before and after an intervention, and by how much the
    original top token's logit and probability moved."""

    before: str  # the original model's top token
    after: str  # with the feature's activation scaled
    activation: float  # the feature's activation in the original pass (0: inactive, no effect)
    logit_change: float = 0.0  # the original top token's logit after minus before
    prob_before: float = 0.0  # its probability in the original model
    prob_after: float = 0.0  # and with the intervention


def intervene(loaded: LoadedModel, clt: CrossLayerTranscoder, sample: data.Sample, layer: int, position: int,
              feature: int, scale: float) -> Intervention:
    """Scale one feature's activation in the real (unfrozen) model and read the new top answer token."""
    return intervene_many(loaded, clt, sample, [(layer, position, feature)], scale)


def intervene_many(loaded: LoadedModel, clt: CrossLayerTranscoder, sample: data.Sample,
                   features: Sequence[tuple[int, int, int]], scale: float) -> Intervention:
    """Scale several features (layer, position, latent) at once in the real model; read the new answer token.

    For each feature, adds (scale - 1) a W_dec[layer->t] / target_scale[t] to mlp_out[t] at its
    position for every target t it writes, a being its activation in the original pass; everything
    downstream is recomputed by the real model. The answer is the argmax at the last prompt position
    (the first answer token). `activation` in the result is the summed activation of the features.
    """
    check_compatible(clt, loaded.model)
    return _intervene_recorded(loaded, clt, sample, record(loaded, clt, sample), features, scale)


def _intervene_recorded(loaded: LoadedModel, clt: CrossLayerTranscoder, sample: data.Sample, rec: Recorded,
                        features: Sequence[tuple[int, int, int]], scale: float) -> Intervention:
    """intervene_many given the sample's recorded original pass (so a sweep records it once)."""
    if not features:
        raise ValueError("intervene_many needs at least one (layer, position, latent) feature")
    activations = feature_activations(clt, rec, features)
    inactive = [f for f, a in zip(features, activations) if a == 0]
    if inactive:
        layer, position, latent = inactive[0]
        raise ValueError(f"feature L{layer} #{latent} is not active at position {position} (activation 0), so scaling it "
                         f"changes nothing; pick active features, e.g. from graph.features or ranked_features(graph)")
    edits = [(layer, position, latent, (scale - 1) * a) for (layer, position, latent), a in zip(features, activations)]
    logits = edited_logits(loaded, clt, sample, rec, edits)
    original = rec.logits[-1].float().to(logits.device)
    top = int(original.argmax())
    decode = loaded.processor.tokenizer.decode
    return Intervention(decode([top]).strip(), decode([int(logits.argmax())]).strip(), sum(activations),
                        float(logits[top] - original[top]), float(original.softmax(-1)[top]), float(logits.softmax(-1)[top]))


def feature_activations(clt: CrossLayerTranscoder, rec: Recorded, features: Sequence[tuple[int, int, int]]) -> list[float]:
    """Each (layer, position, latent) feature's activation in the recorded pass (0 where it is not active)."""
    encoding = encode_recorded(clt, rec)
    out = []
    for layer, position, feature in features:
        clt.check_feature(layer, feature)
        if not 0 <= position < len(rec.input_ids):
            raise ValueError(f"position {position} out of range: the prompt has {len(rec.input_ids)} tokens "
                             f"(0..{len(rec.input_ids) - 1})")
        chosen = encoding.indices[position, layer] == feature
        out.append(float((encoding.values[position, layer].float() * chosen).sum()))
    return out


def edited_logits(loaded: LoadedModel, clt: CrossLayerTranscoder, sample: data.Sample, rec: Recorded,
                  edits: Sequence[tuple[int, int, int, float]]) -> Tensor:
    """Final-position logits of the real model with feature activations changed: each edit (layer, position, latent,
    change) adds change * W_dec[layer->t] / target_scale[t] to mlp_out[t] at that position for every target t the
    feature writes; everything downstream is recomputed by the real (unfrozen) model."""
    cfg = clt.config
    by_layer: dict[int, list[tuple[int, int, float]]] = {}
    for layer, position, feature, change in edits:
        by_layer.setdefault(layer, []).append((position, feature, float(change)))
    delta: dict[int, Tensor] = {}
    with torch.no_grad():  # one index_add per source layer: a swap edits thousands of features
        for layer, rows in by_layer.items():
            positions, features, changes = (torch.tensor(column) for column in zip(*rows))
            W = clt.W_dec[layer][features.to(clt.b_dec.device)].float().cpu()  # [edits, targets, d]
            W = W / clt.target_scale[layer : layer + cfg.n_targets(layer), None].float().cpu()
            added = torch.zeros(len(rec.input_ids), *W.shape[1:]).index_add_(0, positions, changes[:, None, None] * W)
            for offset in range(W.shape[1]):
                delta[layer + offset] = delta[layer + offset] + added[:, offset] if layer + offset in delta else added[:, offset]

    def patch(l: int, mlp_out: Tensor, resid_mid: Tensor, mlp_in: Tensor) -> Tensor:
        return mlp_out + delta[l].to(mlp_out)

    model = loaded.model
    encoded = data.encode_batch(loaded.processor, [sample])
    with torch.no_grad(), sites.patch_mlp_out(model, patch, layers=sorted(delta)):
        return model(**encoded.model_inputs(model)).logits[0, -1].float()


def ranked_features(graph: AttributionGraph, logit: int = 0) -> list[tuple[int, int, int]]:
    """The graph's features as (layer, position, latent), most influential on the logit first."""
    order = feature_influence(graph, logit).argsort(descending=True)
    return [tuple(graph.features[i].tolist()) for i in order]


class AblationCurve(NamedTuple):
    """The answer as the graph's top-n features are ablated together, n = 1..len(answers)."""

    before: str  # the original answer token
    answers: list[str]  # answers[n - 1]: the answer with the top n features ablated
    first_flip: int | None  # smallest n whose ablation changes the answer (None: none up to the end)


def ablation_curve(loaded: LoadedModel, clt: CrossLayerTranscoder, sample: data.Sample, graph: AttributionGraph,
                   max_features: int = 32) -> AblationCurve:
    """Ablate the top 1, 2, ..., max_features features of the graph jointly in the real model.

    One feature rarely decides an answer on its own (the model is redundant); the curve shows how
    many of the graph's most influential features must go before the answer changes.
    """
    ranked = ranked_features(graph)[:max_features]
    if not ranked:
        raise ValueError("the graph has no feature nodes to ablate")
    check_compatible(clt, loaded.model)
    rec = record(loaded, clt, sample)
    results = [_intervene_recorded(loaded, clt, sample, rec, ranked[:n], 0.0) for n in range(1, len(ranked) + 1)]
    answers = [r.after for r in results]
    first = next((n for n, answer in enumerate(answers, 1) if answer != results[0].before), None)
    return AblationCurve(results[0].before, answers, first)


class FlipRate(NamedTuple):
    rate: float  # fraction of samples whose answer token changed when the top feature alone was ablated
    n: int  # samples evaluated
    first_flips: list[int | None]  # per sample: fewest top features whose joint ablation changes the answer

    def count_within(self, n_features: int) -> int:
        """Samples whose answer changes once their top n_features are ablated together."""
        return sum(f is not None and f <= n_features for f in self.first_flips)

    def within(self, n_features: int) -> float:
        """Fraction of samples whose answer changes once their top n_features are ablated together."""
        return self.count_within(n_features) / self.n


def ablation_flip_rate(loaded: LoadedModel, clt: CrossLayerTranscoder, samples: Sequence[data.Sample],
                       max_features: int = 16, **attribute_kwargs) -> FlipRate:
    """For each sample, ablate the graph's most influential features on the model's own answer token
    (the top one, then the top 2, ... up to max_features, jointly) and record when the answer first
    changes: a causal check that graph influence means something in the real model."""
    if not samples:
        raise ValueError("ablation_flip_rate needs at least one sample")
    first_flips: list[int | None] = []
    for sample in samples:
        graph = attribute(loaded, clt, sample, **attribute_kwargs)
        first_flips.append(ablation_curve(loaded, clt, sample, graph, max_features).first_flip if graph.n_features else None)
    return FlipRate(sum(f == 1 for f in first_flips) / len(samples), len(samples), first_flips)


class AblationEffects(NamedTuple):
    """Change of the answer's logit when k features are ablated together, chosen three ways, per sample."""

    k: int  # features ablated together
    graph: list[float]  # the graph's k most influential features
    random: list[float]  # k random active features at the same positions as the graph's (the baseline)
    largest: list[float]  # the k active features of largest activation
    leads: list[float]  # the answer's logit minus the runner-up's in the original model: how far it must fall to flip

    def mean_abs(self, which: str) -> float:
        values = getattr(self, which)
        return sum(abs(v) for v in values) / len(values)

    @property
    def ratio(self) -> float:
        """How many times more the graph's top features move the answer logit than random ones do."""
        return self.mean_abs("graph") / max(self.mean_abs("random"), 1e-12)


def ablation_effects(loaded: LoadedModel, clt: CrossLayerTranscoder, samples: Sequence[data.Sample],
                     ks: Sequence[int] = (1, 4, 16), seed: int = 0, **attribute_kwargs) -> list[AblationEffects]:
    """For each k in ks, ablate (scale 0) k features of each sample's graph in the real model and record the answer
    logit's change: the graph's top k by influence, k random active features at the same positions, and the k most
    active. One graph per sample serves every k.

    If influence means something causal, the graph's choice moves the answer far more than random features do.
    """
    if not ks or min(ks) < 1 or not samples:
        raise ValueError(f"ablation_effects needs every k >= 1 and at least one sample (got ks={tuple(ks)}, {len(samples)} samples)")
    generator = torch.Generator().manual_seed(seed)
    effects = {k: {"graph": [], "random": [], "largest": []} for k in ks}
    leads = []
    for sample in samples:
        graph = attribute(loaded, clt, sample, **attribute_kwargs)
        if graph.n_features < 2 * max(ks):
            raise ValueError(f"the graph of {sample.question!r} has {graph.n_features} features; k={max(ks)} needs {2 * max(ks)}")
        ranked, features = ranked_features(graph), [tuple(f) for f in graph.features.tolist()]
        by_activation = graph.activations.argsort(descending=True).tolist()
        rec = record(loaded, clt, sample)
        first, second = rec.logits[-1].float().topk(2).values.tolist()
        leads.append(first - second)
        for k in ks:
            top = ranked[:k]
            chosen, random = set(top), []
            for _, position, _ in top:  # a random other active feature at each top feature's position (any, if none left)
                pool = [f for f in features if f[1] == position and f not in chosen] or [f for f in features if f not in chosen]
                random.append(pool[int(torch.randint(len(pool), (1,), generator=generator))])
                chosen.add(random[-1])
            largest = [features[i] for i in by_activation[:k]]
            for name, picked in (("graph", top), ("random", random), ("largest", largest)):
                effects[k][name].append(_intervene_recorded(loaded, clt, sample, rec, picked, 0.0).logit_change)
    return [AblationEffects(k, **effects[k], leads=leads) for k in ks]
