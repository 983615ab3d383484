"""What one CLT feature does: where it fires, what it writes, how it steers the model.

Pure functions over a model, a CLT and an activation store; the feature explorer widgets
(`clt_lite.widgets`) are thin views over these.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch

from . import attribution, data, models, sites
from .clt import CrossLayerTranscoder
from .store import ActivationStore


class TopActivation(NamedTuple):
    """One store row where the feature fires strongly."""

    row: int  # store row
    sample: int  # dataset index of the sample (ShapesWorld train split)
    position: int  # position in the sequence
    kind: str  # image, text or answer
    patch: int | None  # patch index for image rows
    activation: float  # the feature's activation there


@torch.no_grad()
def top_activations(store: ActivationStore, clt: CrossLayerTranscoder, layer: int, feature: int,
                    n: int = 8, max_rows: int = 50_000, chunk: int = 4096) -> list[TopActivation]:
    """The n store rows (of the first max_rows, BOS excluded) with the highest activation of a feature."""
    clt.check_feature(layer, feature)
    rows = min(max_rows, store.n_tokens)
    values = torch.zeros(rows)
    for start in range(0, rows, chunk):
        raw = store.tokens(slice(start, min(rows, start + chunk)), store.input_site)[:, layer]
        acts, ids = clt.encode_layer(layer, raw.to(clt.b_dec.dtype) * clt.input_scale[layer])
        values[start : start + len(raw)] = (acts * (ids == feature)).sum(-1).float()
    values[torch.from_numpy(store.metadata.bos[:rows])] = 0
    best = values.topk(min(n, rows)).indices.tolist()
    described = store.describe(best)
    return [TopActivation(d["row"], d["sample"], d["position"], d["kind"], d["patch"], float(values[d["row"]]))
            for d in described if values[d["row"]] > 0]


@torch.no_grad()
def activation_over_prompt(loaded: models.LoadedModel, clt: CrossLayerTranscoder, sample: data.Sample,
                           layer: int, feature: int) -> tuple[list[str], torch.Tensor]:
    """The feature's activation at every token of a sample's prompt + answer: (tokens, [seq] values)."""
    clt.check_feature(layer, feature)
    batch = data.encode_batch(loaded.processor, [sample], with_answers=True)
    site = clt.config.input_site
    with sites.capture(loaded.model, sites=[site], layers=[layer]) as captured:
        loaded.model(**batch.model_inputs(loaded.model))
    x = captured[site][layer][0].to(clt.b_dec.device, clt.b_dec.dtype) * clt.input_scale[layer]
    acts, ids = clt.encode_layer(layer, x)
    tokens = loaded.processor.tokenizer.convert_ids_to_tokens(batch.input_ids[0].tolist())
    return tokens, (acts * (ids == feature)).sum(-1).float().cpu()


def decoder_norm_profile(clt: CrossLayerTranscoder, layer: int, feature: int) -> dict[int, float]:
    """Norm of the feature's decoder vector to each target layer it writes (raw units: scales folded in)."""
    clt.check_feature(layer, feature)
    vectors = clt.W_dec[layer][feature].detach().float()  # [n_targets, d]
    scales = clt.target_scale[layer : layer + vectors.shape[0]].float()
    return {layer + j: float(v.norm() / s) for j, (v, s) in enumerate(zip(vectors, scales))}


@contextmanager
def steered(model, clt: CrossLayerTranscoder, layer: int, feature: int, scale: float) -> Iterator[None]:
    """Run the real model with one feature multiplied by `scale` wherever it fires.

    At the feature's layer its activation a is read from the model's own residual stream;
    (scale - 1) * a * its decoder vector is added to every MLP output it writes to.
    scale=0 ablates the feature, scale=1 changes nothing, scale>1 amplifies it.
    """
    clt.check_feature(layer, feature)
    last = layer + clt.config.n_targets(layer) - 1
    delta: dict[str, torch.Tensor] = {}

    def patch(target: int, mlp_out, resid_mid, mlp_in):
        if target == layer:
            x = resid_mid if clt.config.input_site == "resid_mid" else mlp_in
            flat = x.reshape(-1, x.shape[-1]).to(clt.b_dec.dtype) * clt.input_scale[layer]
            acts, ids = clt.encode_layer(layer, flat)
            delta["a"] = ((acts * (ids == feature)).sum(-1) * (scale - 1)).reshape(x.shape[:-1])
        if target < layer or target > last or "a" not in delta:
            return None
        direction = clt.W_dec[layer][feature, target - layer] / clt.target_scale[target]
        return mlp_out + (delta["a"][..., None] * direction).to(mlp_out)

    with torch.no_grad(), sites.patch_mlp_out(model, patch):
        yield


def steered_answer(loaded: models.LoadedModel, clt: CrossLayerTranscoder, sample: data.Sample, layer: int,
                   feature: int, scale: float) -> str:
    """The model's greedy answer with the feature scaled."""
    with steered(loaded.model, clt, layer, feature, scale):
        return models.generate_answers(loaded, [sample])[0]


class SteeredFeature(NamedTuple):
    """A graph feature and the model's answer with it scaled."""

    layer: int
    latent: int
    position: int  # where it fires in the prompt
    rank: int  # its place among all the graph's features by influence on the answer (0 = most influential)
    answers: dict[float, str]  # scale -> greedy answer (scale 1 is the unsteered model)

    @property
    def changes_answer(self) -> bool:
        return len(set(self.answers.values())) > 1


def object_features(loaded: models.LoadedModel, clt: CrossLayerTranscoder, graph: attribution.AttributionGraph,
                    sample: data.Sample, n: int = 8, scales: tuple[float, ...] = (-4.0, 0.0, 1.0, 4.0, 8.0)) -> list[SteeredFeature]:
    """The n most influential graph features at the image patches of the sample's object, each steered by `scales`."""
    image_positions = graph.image_positions.nonzero(as_tuple=True)[0].tolist()
    on_object = {image_positions[p] for cell in sample.target_cells for p in loaded.world.cell_patches(cell)}
    ranked = attribution.feature_influence(graph).argsort(descending=True).tolist()
    found = []
    for rank, index in enumerate(ranked):
        layer, position, latent = graph.features[index].tolist()
        if position in on_object:
            answers = {scale: steered_answer(loaded, clt, sample, layer, latent, scale) for scale in scales}
            found.append(SteeredFeature(layer, latent, position, rank, answers))
            if len(found) == n:
                break
    return found


def store_sample(store: ActivationStore, index: int, world: data.WorldConfig) -> data.Sample:
    """Rebuild the ShapesWorld sample behind a store's sample index (the store keeps activations, not images);
    world: the capturing model's geometry (`LoadedModel.world`)."""
    spec = store.manifest["args"]["data"]
    split_seed = spec.rsplit(":seed", 1)
    if not spec.startswith("shapes:") or len(split_seed) != 2:
        raise ValueError(f"store {store.path} was not captured from ShapesWorld ({spec!r}); its images cannot be rebuilt")
    return data.shapes_sample(index, "train", int(split_seed[1]), world)
