"""Feature functions and the explorer widgets (driven by setting .value)."""

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from clt_lite import data, features  # noqa: E402
from clt_lite.clt import CLTConfig, CrossLayerTranscoder  # noqa: E402
from clt_lite.store import ActivationStore, CaptureConfig, capture  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("acts")
    capture(tiny, data.shapes_world(12, "train", seed=3), folder, CaptureConfig(dtype="float32"), data_id="shapes:12:seed3",
            progress=False)
    store = ActivationStore(folder)
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(CLTConfig(n_layers=tiny.n_layers, d_model=tiny.d_model, expansion_factor=2, k=8))
    clt.set_scales(store.input_scale.float(), store.target_scale.float())
    batch = next(store.batches(256))
    clt.initialize_from_batch(batch.inputs, batch.targets)
    return store, clt


def _firing_feature(store, clt, layer=1):
    batch = next(store.batches(64))
    values, indices = clt.encode_layer(layer, batch.inputs[:, layer])
    return int(indices[values > 0][0])


def test_top_activations_come_back_to_their_samples(tiny, setup):
    store, clt = setup
    feature = _firing_feature(store, clt)
    top = features.top_activations(store, clt, 1, feature, n=4)
    assert top and all(a.activation >= b.activation for a, b in zip(top, top[1:]))
    rebuilt = features.store_sample(store, top[0].sample, tiny.world)
    assert rebuilt.question == data.shapes_world(12, "train", seed=3)[top[0].sample].question


def test_activation_over_prompt_matches_the_store(tiny, setup):
    store, clt = setup
    feature = _firing_feature(store, clt)
    sample = features.store_sample(store, 0, tiny.world)
    tokens, acts = features.activation_over_prompt(tiny, clt, sample, 1, feature)
    rows = [r for r in range(store.n_tokens) if store.metadata.sample[r] == 0]
    raw = store.tokens(slice(rows[0], rows[-1] + 1), "mlp_in")[:, 1] * clt.input_scale[1]
    values, ids = clt.encode_layer(1, raw)
    torch.testing.assert_close(acts[: len(rows)], (values * (ids == feature)).sum(-1), atol=1e-4, rtol=1e-4)
    assert len(tokens) == len(acts)


def test_decoder_profile_covers_the_targets(setup):
    _, clt = setup
    profile = features.decoder_norm_profile(clt, 2, 5)
    assert list(profile) == [2, 3] and all(v > 0 for v in profile.values())


def test_steering_by_one_changes_nothing_and_by_zero_ablates(tiny, setup):
    store, clt = setup
    feature = _firing_feature(store, clt, layer=0)
    sample = features.store_sample(store, 0, tiny.world)
    batch = data.encode_batch(tiny.processor, [sample], with_answers=True)
    with torch.no_grad():
        reference = tiny.model(**batch.model_inputs(tiny.model)).logits
        with features.steered(tiny.model, clt, 0, feature, 1.0):
            same = tiny.model(**batch.model_inputs(tiny.model)).logits
        with features.steered(tiny.model, clt, 0, feature, 5.0):
            pushed = tiny.model(**batch.model_inputs(tiny.model)).logits
    torch.testing.assert_close(same, reference)
    assert not torch.allclose(pushed, reference)


def test_out_of_range_feature_is_refused(setup):
    _, clt = setup
    with pytest.raises(ValueError, match="feature 999 out of range: layer 0 has features 0..127"):
        features.decoder_norm_profile(clt, 0, 999)
    with pytest.raises(ValueError, match="layer 9 out of range"):
        features.decoder_norm_profile(clt, 9, 0)


def test_explorer_widgets_follow_their_values(tiny, setup):
    from clt_lite.widgets import FeatureExplorer

    store, clt = setup
    feature = _firing_feature(store, clt)
    sample = features.store_sample(store, 0, tiny.world)
    explorer = FeatureExplorer(tiny, clt, store, sample, feature_choices=[(1, feature), (2, 3)])
    explorer.picker.value = (1, feature)
    assert (explorer.layer.value, explorer.feature.value) == (1, feature)
    assert explorer.top and explorer.profile == features.decoder_norm_profile(clt, 1, feature)
    explorer.feature.value = 3
    assert explorer.profile == features.decoder_norm_profile(clt, 1, 3)
    explorer.scale.value = 0.0
    assert explorer.steered == features.steered_answer(tiny, clt, sample, 1, 3, 0.0)
    assert "x0" in explorer.answer.value and explorer.steered in explorer.answer.value
    # what a saved notebook shows in JupyterLab until the cell runs again
    assert explorer.view._repr_mimebundle_()["text/plain"].startswith("[feature explorer: run the notebook's cells")


def test_object_features_sit_on_the_objects_patches_in_influence_order(tiny, setup):
    from clt_lite import attribution

    _, clt = setup
    sample = data.shapes_world(4, "test", seed=0, world=tiny.world, family="colour")[0]
    graph = attribution.attribute(tiny, clt, sample, max_feature_nodes=256)
    found = features.object_features(tiny, clt, graph, sample, n=3, scales=(1.0, 0.0))
    image_positions = graph.image_positions.nonzero(as_tuple=True)[0].tolist()
    on_object = {image_positions[p] for cell in sample.target_cells for p in tiny.world.cell_patches(cell)}
    assert found and all(f.position in on_object for f in found)
    assert [f.rank for f in found] == sorted(f.rank for f in found)
    assert all(set(f.answers) == {1.0, 0.0} and f.changes_answer == (f.answers[1.0] != f.answers[0.0]) for f in found)
