"""Features named from ground truth (clt_lite.labels) and answer swaps built on them (clt_lite.swaps)."""

import pytest
import torch
from test_attribution import random_clt

from clt_lite import attribution as A
from clt_lite import data, labels, swaps

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def scenes(tiny):
    return data.shapes_world(6, "train", seed=3, world=tiny.world)


@pytest.fixture(scope="module")
def clt(tiny, scenes):
    return random_clt(tiny, scenes)


@pytest.fixture(scope="module")
def labelled(tiny, clt, scenes):
    return labels.label_features(tiny, clt, scenes, min_fires=1, progress=False)


def test_position_attributes_follow_the_scene(tiny):
    sample = next(s for s in data.shapes_world(20, "test", seed=0, world=tiny.world, family="colour") if len(s.shapes) >= 2)
    ids = data.encode_batch(tiny.processor, [sample]).input_ids[0]
    found = labels.position_attributes(tiny, sample, ids)
    image = (ids == tiny.image_token_id).nonzero(as_tuple=True)[0].tolist()
    for shape in sample.shapes:
        for patch in tiny.world.cell_patches(shape.cell):
            assert found[image[patch]] == [f"colour={shape.colour}", f"shape={shape.kind}", f"cell={shape.cell}"]
    empty = set(range(tiny.world.grid ** 2)) - {s.cell for s in sample.shapes}
    for cell in empty:
        assert all(found[image[p]][0] == "empty=background" for p in tiny.world.cell_patches(cell))
    assert found[0] == [] and found[-1][-1] == f"answer={sample.answer}"
    assert f"count={len(sample.shapes)}" in found[-1] and any(v.startswith("word=") for v in found[-1])


def test_labels_count_where_features_fire(tiny, clt, scenes, labelled):
    """Brute force: recount one feature's firings on one value from the CLT's activations."""
    column = labelled.values.index("word=color") if "word=color" in labelled.values else 0
    key = labelled.values[column]
    fired = torch.zeros(clt.config.n_layers * clt.config.num_latents)
    hits = torch.zeros_like(fired)
    for sample in scenes:
        rec = A.record(tiny, clt, sample)
        with torch.no_grad():
            enc = clt.encode((rec.inputs * clt.input_scale[:, None, None]).transpose(0, 1))
        where = labels.position_attributes(tiny, sample, rec.input_ids)
        for position in range(len(where)):
            for layer in range(clt.config.n_layers):
                for value, latent in zip(enc.values[position, layer].tolist(), enc.indices[position, layer].tolist()):
                    if value > 0:
                        fired[layer * clt.config.num_latents + latent] += 1
                        hits[layer * clt.config.num_latents + latent] += key in where[position]
    assert torch.equal(fired, labelled.fires)
    assert torch.equal(hits, labelled.hits[:, column])
    i = int(hits.argmax())
    label = labelled.label(*divmod(i, clt.config.num_latents))
    assert label is not None and label.fires == int(fired[i]) and 0 < label.precision <= 1 and 0 < label.recall <= 1


def test_label_is_the_best_f1_and_features_of_filters_by_precision(labelled, clt):
    layer, latent = divmod(int(labelled.fires.argmax()), clt.config.num_latents)
    label = labelled.label(layer, latent)
    for key in labelled.values:
        attribute, value = key.split("=", 1)
        column = labelled.values.index(key)
        precision = float(labelled.hits[layer * clt.config.num_latents + latent, column]) / label.fires
        recall = float(labelled.hits[layer * clt.config.num_latents + latent, column] / labelled.value_counts[column])
        assert 2 * precision * recall / max(precision + recall, 1e-12) <= label.f1 + 1e-6
    attribute, value = label.attribute, label.value
    chosen = labelled.features_of(attribute, value, min_precision=label.precision)
    assert (layer, latent) in chosen
    assert all(labelled.fires[l * clt.config.num_latents + f] >= labelled.min_fires for l, f in chosen)
    names = labelled.names([(layer, latent)])
    assert names[(layer, latent)].startswith(label.name)
    assert sum(labelled.summary().values()) == int((labelled.fires >= labelled.min_fires).sum())


def test_labels_reject_unknown_values_and_non_shapes_world_prompts(tiny, clt, labelled):
    with pytest.raises(ValueError, match="known colour values"):
        labelled.features_of("colour", "orange")
    text_only = data.Sample(None, "Hello?", "", "text")
    with pytest.raises(ValueError, match="ShapesWorld"):
        labels.label_features(tiny, clt, [text_only], progress=False)
    with pytest.raises(ValueError, match="at least one"):
        labels.label_features(tiny, clt, [], progress=False)


def test_edited_logits_match_a_scaled_intervention(tiny, clt, scenes):
    sample = scenes[0]
    rec = A.record(tiny, clt, sample)
    graph = A.attribute(tiny, clt, sample, max_feature_nodes=64)
    feature = A.ranked_features(graph)[0]
    (activation,) = A.feature_activations(clt, rec, [feature])
    assert activation > 0
    unchanged = A.edited_logits(tiny, clt, sample, rec, [(*feature, 0.0)])
    assert torch.allclose(unchanged, rec.logits[-1], atol=1e-4)
    doubled = A.intervene(tiny, clt, sample, *feature, 2.0)
    logits = A.edited_logits(tiny, clt, sample, rec, [(*feature, activation)])
    assert doubled.logit_change == pytest.approx(float(logits[rec.logits[-1].argmax()] - rec.logits[-1].max()), abs=1e-4)


def test_intervening_on_an_inactive_feature_is_an_error(tiny, clt, scenes):
    rec = A.record(tiny, clt, scenes[0])
    x = rec.inputs * clt.input_scale[:, None, None]
    with torch.no_grad():
        _, active = clt.encode_layer(0, x[0, 1][None])
    inactive = next(f for f in range(clt.config.num_latents) if f not in active[0].tolist())
    with pytest.raises(ValueError, match="not active"):
        A.intervene(tiny, clt, scenes[0], 0, 1, inactive, 0.0)


def test_swaps_reject_bad_requests(tiny, clt, labelled):
    colour = next(s for s in data.shapes_world(10, "test", seed=0, world=tiny.world, family="colour"))
    with pytest.raises(ValueError, match="does not know the colour 'orange'"):
        swaps.swap(tiny, clt, labelled, colour, "orange")
    count = data.shapes_world(1, "test", seed=0, world=tiny.world, family="count")[0]
    with pytest.raises(ValueError, match="family 'count'"):
        swaps.swap(tiny, clt, labelled, count, "red")
    seen = tiny.processor.tokenizer.decode([int(A.record(tiny, clt, colour).logits[-1].argmax())]).strip()
    if seen in data.COLOURS:  # random weights may answer anything
        with pytest.raises(ValueError, match="already answers"):
            swaps.swap(tiny, clt, labelled, colour, seen)


def test_supernodes_partition_the_graph_features(tiny, clt, scenes, labelled):
    graph = A.attribute(tiny, clt, scenes[0], max_feature_nodes=64)
    nodes = labels.supernodes(graph, labelled)
    assert sum(n.n_features for n in nodes) == graph.n_features
    assert sum(n.influence for n in nodes) == pytest.approx(float(A.feature_influence(graph).sum()), rel=1e-5)
    assert [n.influence for n in nodes] == sorted((n.influence for n in nodes), reverse=True)


def test_swap_rate_needs_swappable_questions(tiny, clt, labelled):
    count = data.shapes_world(1, "test", seed=0, world=tiny.world, family="count")[0]
    with pytest.raises(ValueError, match="family 'count'"):
        swaps.swap_rate(tiny, clt, labelled, [count])
    with pytest.raises(ValueError, match="at least one"):
        swaps.swap_rate(tiny, clt, labelled, [])
