"""Features named from ground truth: ShapesWorld knows what every prompt position holds.

An image patch lies in a grid cell that holds an object of some colour and shape, or nothing; a text
position holds a word; the last prompt position is where the answer is produced. Run the CLT over many
prompts, and for each feature (layer, latent) count where it fires. Its label is the attribute value it
predicts best, by F1 of "fires" against "the position has this value":

    precision = fires on positions with the value / fires           (when it fires, is the value there?)
    recall    = fires on positions with the value / positions with it (when the value is there, does it fire?)

Attributes: `colour` and `shape` (patches of an object), `empty` (patches of an empty cell), `cell` (every
patch), `word` (text positions), `count` (text positions after the image: how many objects the image holds)
and `answer` (the last prompt position: the answer's first word).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import data
from .attribution import AttributionGraph, encode_recorded, feature_influence, record
from .clt import CrossLayerTranscoder
from .models import LoadedModel
from .progress import progress_bar

ATTRIBUTES = ("colour", "shape", "empty", "cell", "word", "count", "answer")


class FeatureLabel(NamedTuple):
    attribute: str  # one of ATTRIBUTES
    value: str  # e.g. "red", "circle", "4", "color"
    precision: float  # share of the feature's firings at positions with this value
    recall: float  # share of the positions with this value where the feature fires
    fires: int  # positions where the feature fired

    @property
    def f1(self) -> float:
        return 2 * self.precision * self.recall / max(self.precision + self.recall, 1e-12)

    @property
    def name(self) -> str:
        """Short display name, e.g. 'colour=red'."""
        return f"{self.attribute}={self.value}"


def position_attributes(loaded: LoadedModel, sample: data.Sample, input_ids: Tensor) -> list[list[str]]:
    """Per prompt position, its ground-truth 'attribute=value' strings (BOS gets none)."""
    world, tokenizer = loaded.world, loaded.processor.tokenizer
    per_cell = world.cell_size // world.patch_size
    objects = {shape.cell: shape for shape in sample.shapes}
    count = f"count={len(sample.shapes)}"
    out: list[list[str]] = []
    patch = 0
    seen_image = False
    for position, token in enumerate(input_ids.tolist()):
        if position == 0:
            out.append([])
        elif token == loaded.image_token_id:
            row, col = divmod(patch, world.patches_per_side)
            cell = (row // per_cell) * world.grid + col // per_cell
            shape = objects.get(cell)
            found = [f"colour={shape.colour}", f"shape={shape.kind}"] if shape else ["empty=background"]
            out.append(found + [f"cell={cell}"])
            patch, seen_image = patch + 1, True
        else:
            word = tokenizer.decode([token]).strip() or repr(tokenizer.decode([token]))
            out.append([f"word={word}"] + ([count] if seen_image and sample.shapes else []))
    if sample.answer:
        out[-1].append(f"answer={sample.answer.split()[0]}")
    return out


class FeatureLabels:
    """Counts of where each feature fires, and the label each feature earns from them."""

    def __init__(self, values: list[str], hits: Tensor, activation_sums: Tensor, fires: Tensor, value_counts: Tensor,
                 n_latents: int, min_fires: int):
        self.values = values  # 'attribute=value' strings, the columns of hits
        self.hits = hits  # [L * n, V] firings at positions holding each value
        self.activation_sums = activation_sums  # [L * n, V] summed activations there
        self.fires = fires  # [L * n] firings in all
        self.value_counts = value_counts  # [V] positions holding each value
        self.n_latents, self.min_fires = n_latents, min_fires

    def _id(self, layer: int, latent: int) -> int:
        return layer * self.n_latents + latent

    def label(self, layer: int, latent: int) -> FeatureLabel | None:
        """The value this feature predicts best (by F1), or None if it fired fewer than min_fires times."""
        i = self._id(layer, latent)
        fires = int(self.fires[i])
        if fires < self.min_fires:
            return None
        f1 = 2 * self.hits[i] / (fires + self.value_counts)
        best = int(f1.argmax())
        attribute, value = self.values[best].split("=", 1)
        return FeatureLabel(attribute, value, float(self.hits[i, best]) / fires,
                            float(self.hits[i, best] / self.value_counts[best]), fires)

    def names(self, features: Sequence[tuple[int, int]]) -> dict[tuple[int, int], str]:
        """{(layer, latent): 'colour=red L3 #17'} for the features given: what graph figures and tables print."""
        out = {}
        for layer, latent in features:
            found = self.label(layer, latent)
            out[(layer, latent)] = f"{found.name if found else '?'} L{layer} #{latent}"
        return out

    def features_of(self, attribute: str, value: str, min_precision: float = 0.8) -> list[tuple[int, int]]:
        """Features whose firings fall on positions holding attribute=value at least min_precision of the time
        (and that fired at least min_fires times), most precise first."""
        key = f"{attribute}={value}"
        if key not in self.values:
            known = sorted({v.split("=", 1)[1] for v in self.values if v.startswith(attribute + "=")})
            raise ValueError(f"no position in the labelled prompts holds {key}; known {attribute} values: {', '.join(known) or 'none'}")
        column = self.values.index(key)
        precision = self.hits[:, column] / self.fires.clamp(min=1)
        chosen = ((precision >= min_precision) & (self.fires >= self.min_fires)).nonzero(as_tuple=True)[0]
        chosen = chosen[precision[chosen].argsort(descending=True)]
        return [divmod(int(i), self.n_latents) for i in chosen]

    def mean_activation(self, layer: int, latent: int, attribute: str, value: str) -> float:
        """The feature's mean activation where it fires on positions holding attribute=value (0 if never)."""
        i, column = self._id(layer, latent), self.values.index(f"{attribute}={value}")
        return float(self.activation_sums[i, column] / self.hits[i, column].clamp(min=1))

    def summary(self) -> dict[str, int]:
        """How many labelled features each attribute names (features that fired at least min_fires times)."""
        out = dict.fromkeys(ATTRIBUTES, 0)
        best = (2 * self.hits / (self.fires[:, None] + self.value_counts)).argmax(1)
        for i in (self.fires >= self.min_fires).nonzero(as_tuple=True)[0].tolist():
            out[self.values[int(best[i])].split("=", 1)[0]] += 1
        return out


def label_features(loaded: LoadedModel, clt: CrossLayerTranscoder, samples: Sequence[data.Sample], min_fires: int = 5,
                   progress: bool = True) -> FeatureLabels:
    """Run the model and the CLT over ShapesWorld samples and count where every feature fires."""
    if not samples:
        raise ValueError("label_features needs at least one ShapesWorld sample")
    if any(not s.shapes for s in samples):
        raise ValueError("label_features needs ShapesWorld samples (their scenes are the ground truth); "
                         "got a sample without shapes")
    cfg = clt.config
    n_features = cfg.n_layers * cfg.num_latents
    columns: dict[str, int] = {}
    hits = []  # per prompt position: (features that fired, its value ids, their activations)
    value_counts: dict[int, int] = {}
    for sample in progress_bar(samples, desc="labelling features", disable=not progress):
        rec = record(loaded, clt, sample)
        encoding = encode_recorded(clt, rec)  # [S, L, k']
        attributes = position_attributes(loaded, sample, rec.input_ids)
        value_ids = [[columns.setdefault(v, len(columns)) for v in found] for found in attributes]
        for ids in value_ids:
            for v in ids:
                value_counts[v] = value_counts.get(v, 0) + 1
        layers = torch.arange(cfg.n_layers, device=encoding.indices.device)[None, :, None]
        feature = (layers * cfg.num_latents + encoding.indices).cpu()  # [S, L, k']
        active = (encoding.values > 0).cpu()
        for position, ids in enumerate(value_ids):
            fired, acts = feature[position][active[position]], encoding.values[position].cpu()[active[position]].float()
            hits.append((fired, torch.tensor(ids, dtype=torch.long), acts))
    values = list(columns)
    V = len(values)
    hit_counts, activation_sums = torch.zeros(n_features, V), torch.zeros(n_features, V)
    fires = torch.zeros(n_features)
    for fired, ids, acts in hits:
        fires.index_add_(0, fired, torch.ones(len(fired)))
        for v in ids.tolist():
            hit_counts[:, v].index_add_(0, fired, torch.ones(len(fired)))
            activation_sums[:, v].index_add_(0, fired, acts)
    counts = torch.tensor([value_counts[i] for i in range(V)], dtype=torch.float32)
    return FeatureLabels(values, hit_counts, activation_sums, fires, counts, cfg.num_latents, min_fires)


class Supernode(NamedTuple):
    name: str  # the label its features share, e.g. 'colour=green' ('unlabelled': fired too rarely to name)
    n_features: int
    influence: float  # summed influence of its features on the logit


def supernodes(graph: AttributionGraph, labels: FeatureLabels, logit: int = 0) -> list[Supernode]:
    """Group the graph's features by label and add up their influence on a logit node, largest first."""
    scores = feature_influence(graph, logit)
    groups: dict[str, list[float]] = {}
    for (layer, _, latent), score in zip(graph.features.tolist(), scores.tolist()):
        found = labels.label(layer, latent)
        groups.setdefault(found.name if found else "unlabelled", []).append(score)
    nodes = [Supernode(name, len(members), sum(members)) for name, members in groups.items()]
    return sorted(nodes, key=lambda node: -node.influence)
