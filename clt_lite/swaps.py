"""Interventions that change the answer on purpose: swap the colour (or shape) the model sees.

Ablating a graph's top features rarely changes the toy's answer: it is computed redundantly, and much of
it travels straight from the image-patch embeddings through attention. A *swap* uses the features named
from ground truth (`clt_lite.labels`) instead. For a question about one object, at the object's image
patches it switches off every active feature that predicts the seen value (colour=red) and adds the
features that predict the chosen one (colour=blue) at `gain` times their mean activation; at the last
prompt position, where the answer is produced, it does the same with the features that predict the
answer. The real model recomputes everything downstream. If the labels mean what they say, the answer
becomes the chosen value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from . import data
from .attribution import answer_token, edited_logits, encode_recorded, record
from .clt import CrossLayerTranscoder
from .labels import FeatureLabels
from .models import LoadedModel
from .replacement import check_compatible

SWAPPABLE = {"colour": "colour", "shape": "shape"}  # question family -> the attribute its answer names
DEFAULT_GAIN = 8.0  # added features at 8x their mean activation: on 30 held-out prompts gains 2 / 4 / 8 flipped
#                   colour answers 0.57 / 0.93 / 1.00 of the time and shape answers 0.63 / 0.63 / 1.00
DEFAULT_MIN_PRECISION = 0.3  # a feature "predicts" a value if >= 30% of its firings are on positions holding it


class Swap(NamedTuple):
    question: str
    seen: str  # the model's answer before the swap
    chosen: str  # the value swapped in
    after: str  # the model's answer after it
    prob_before: float  # probability of the chosen value's token before
    prob_after: float  # ... and after
    seen_prob_after: float  # probability left on the seen answer's token
    n_edits: int  # features switched off or added

    @property
    def flipped(self) -> bool:
        return self.after == self.chosen


def swap(loaded: LoadedModel, clt: CrossLayerTranscoder, labels: FeatureLabels, sample: data.Sample, to: str,
         gain: float = DEFAULT_GAIN, min_precision: float = DEFAULT_MIN_PRECISION) -> Swap:
    """Swap the asked-about object's colour (colour questions) or shape (shape questions) for `to`."""
    attribute = SWAPPABLE.get(sample.family)
    if attribute is None or len(sample.target_cells) != 1:
        raise ValueError(f"a swap needs a question about one object's {' or '.join(SWAPPABLE)} "
                         f"(families {', '.join(SWAPPABLE)}); got family {sample.family!r}")
    known = data.COLOURS if attribute == "colour" else data.SHAPES
    if to not in known:
        raise ValueError(f"the model does not know the {attribute} {to!r}; choose one of {', '.join(known)}")
    check_compatible(clt, loaded.model)
    return _swap_recorded(loaded, clt, labels, sample, record(loaded, clt, sample), to, gain, min_precision)


def _swap_recorded(loaded: LoadedModel, clt: CrossLayerTranscoder, labels: FeatureLabels, sample: data.Sample, rec, to: str,
                   gain: float, min_precision: float) -> Swap:
    """swap given the sample's recorded original pass."""
    attribute = SWAPPABLE[sample.family]
    decode = loaded.processor.tokenizer.decode
    seen = decode([int(rec.logits[-1].argmax())]).strip()
    if to == seen:
        raise ValueError(f"the model already answers {seen!r}; choose another {attribute} to swap in")
    image = (rec.input_ids == loaded.image_token_id).nonzero(as_tuple=True)[0].tolist()
    last = len(rec.input_ids) - 1
    where = [(image[p], attribute) for p in loaded.world.cell_patches(sample.target_cells[0])] + [(last, "answer")]
    edits = _swap_edits(clt, labels, rec, where, seen, to, gain, min_precision)
    logits = edited_logits(loaded, clt, sample, rec, edits)
    before, after = rec.logits[-1].float().softmax(-1), logits.softmax(-1)
    chosen, seen_token = answer_token(loaded, to), int(rec.logits[-1].argmax())
    return Swap(sample.question, seen, to, decode([int(logits.argmax())]).strip(), float(before[chosen]),
                float(after[chosen]), float(after[seen_token]), len(edits))


def _swap_edits(clt: CrossLayerTranscoder, labels: FeatureLabels, rec, where: list[tuple[int, str]], seen: str, to: str,
                gain: float, min_precision: float) -> list[tuple[int, int, int, float]]:
    """(layer, position, latent, activation change): off for active features of the seen value, on for the chosen's."""
    encoding = encode_recorded(clt, rec)
    edits = []
    for position, attribute in where:
        away = set(labels.features_of(attribute, seen, min_precision))
        toward = labels.features_of(attribute, to, min_precision)
        if not toward:
            raise ValueError(f"no feature predicts {attribute}={to} with precision >= {min_precision}; "
                             f"lower min_precision or label more prompts")
        for layer in range(clt.config.n_layers):
            for value, latent in zip(encoding.values[position, layer].tolist(), encoding.indices[position, layer].tolist()):
                if value > 0 and (layer, latent) in away:
                    edits.append((layer, position, latent, -value))
        edits += [(layer, position, latent, gain * labels.mean_activation(layer, latent, attribute, to))
                  for layer, latent in toward]
    return edits


class SwapRate(NamedTuple):
    rate: float  # share of samples whose answer became the chosen value
    swaps: list[Swap]

    @property
    def n(self) -> int:
        return len(self.swaps)


def swap_rate(loaded: LoadedModel, clt: CrossLayerTranscoder, labels: FeatureLabels, samples: Sequence[data.Sample],
              gain: float = DEFAULT_GAIN, min_precision: float = DEFAULT_MIN_PRECISION) -> SwapRate:
    """Swap each sample's object to another value (taking turns through the values that are not its answer)."""
    if not samples:
        raise ValueError("swap_rate needs at least one colour or shape question")
    swaps = []
    for i, sample in enumerate(samples):
        if SWAPPABLE.get(sample.family) is None:
            swap(loaded, clt, labels, sample, "", gain, min_precision)  # raises the error that says what a swap needs
        values = data.COLOURS if SWAPPABLE[sample.family] == "colour" else data.SHAPES
        rec = record(loaded, clt, sample)
        seen = loaded.processor.tokenizer.decode([int(rec.logits[-1].argmax())]).strip()
        others = [v for v in values if v != seen]
        swaps.append(_swap_recorded(loaded, clt, labels, sample, rec, others[i % len(others)], gain, min_precision))
    return SwapRate(sum(s.flipped for s in swaps) / len(swaps), swaps)
