"""Attribution graphs on the random tiny LLaVA with a random CLT: the identities hold for any weights."""

import dataclasses
import json

import matplotlib
import pytest
import torch

from clt_lite import attribution as A
from clt_lite import data, sites
from clt_lite.clt import CLTConfig, CrossLayerTranscoder

matplotlib.use("Agg")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def samples():
    return data.shapes_world(3, "test", seed=1, family="describe")


def random_clt(tiny, samples, **options) -> CrossLayerTranscoder:
    """A random CLT with scales and biases set from the model's own activations."""
    config = CLTConfig(n_layers=tiny.n_layers, d_model=tiny.d_model, expansion_factor=4, k=8, **options)
    encoded = data.encode_batch(tiny.processor, samples)
    with torch.no_grad(), sites.capture(tiny.model, sites=(config.input_site, "mlp_out")) as captured:
        tiny.model(**encoded.model_inputs(tiny.model))
    mask = encoded.attention_mask.bool()
    x, y = captured.stack(config.input_site)[mask], captured.stack("mlp_out")[mask]
    torch.manual_seed(0)
    model = CrossLayerTranscoder(config)
    s_in, s_out = ((tiny.d_model / t.pow(2).sum(-1).mean(0)).sqrt() for t in (x, y))
    model.set_scales(s_in, s_out)
    model.initialize_from_batch(x * s_in[:, None], y * s_out[:, None])
    return model


@pytest.fixture(scope="module")
def clt(tiny, samples):
    return random_clt(tiny, samples)


@pytest.fixture(scope="module")
def local(tiny, clt, samples):
    return A.LocalReplacement(tiny, clt, samples[0])


@pytest.fixture(scope="module")
def graph(tiny, clt, samples):
    return A.attribute(tiny, clt, samples[0])


def _real_logits(tiny, sample):
    with torch.no_grad():
        return tiny.model(**data.encode_batch(tiny.processor, [sample]).model_inputs(tiny.model)).logits[0]


def test_local_replacement_reproduces_the_model(tiny, local, samples):
    with torch.no_grad():
        out = local.run()
    assert torch.allclose(out.logits, _real_logits(tiny, samples[0]), atol=1e-4)
    assert torch.allclose(torch.stack(out.inputs), local.recorded.inputs, atol=1e-4)


def _constant(local, graph) -> torch.Tensor:
    """What the uncredited constant (b_dec, BOS) contributes to each feature and logit target: all sources off."""
    L, S = graph.n_layers, graph.n_positions
    return _frozen_targets(local, graph, feature_scale=torch.zeros(len(local.features)), error_scale=torch.zeros(L, S),
                           embed_scale=torch.zeros(S))


def test_preactivation_is_sum_of_incoming_edges_plus_bias(graph, local, clt):
    """pre-activation = incoming edges + b_enc + the uncredited constant (b_dec and BOS, circuit-tracer's rule)."""
    layer, pos, latent = graph.features.unbind(1)
    assert torch.equal(graph.features, local.features) and (pos > 0).all()  # no cap reached; nothing at BOS
    x = local.recorded.inputs[:, pos].transpose(0, 1) * clt.input_scale[:, None]  # [n_f, L, d]
    with torch.no_grad():
        pre = clt.encode(x).pre_acts[torch.arange(len(pos)), layer, latent]
    constant = _constant(local, graph)[: graph.n_features]
    incoming = graph.adjacency[: graph.n_features].sum(1) + clt.b_enc.detach()[layer, latent]
    assert torch.allclose(incoming + constant, pre, atol=1e-4)
    assert constant.abs().max() > 1e-3  # b_dec really is left out of the errors
    assert torch.allclose(A.uncredited(local, graph)[: graph.n_features], constant, atol=1e-5)
    assert torch.allclose(A.target_values(local, graph)[: graph.n_features], pre - clt.b_enc.detach()[layer, latent], atol=1e-4)
    assert graph.adjacency[graph.error_start : graph.logit_start].abs().sum() == 0  # sources have no inputs
    assert graph.adjacency[:, [graph.error_index(layer, 0) for layer in range(graph.n_layers)]].abs().sum() == 0


def test_clt_lite_convention_needs_no_constant(tiny, clt, samples):
    """Errors absorb b_dec and BOS keeps its features and errors: the edges alone sum to each target."""
    graph = A.attribute(tiny, clt, samples[0], convention="clt-lite")
    local = A.LocalReplacement(tiny, clt, samples[0], convention="clt-lite")
    assert (graph.features[:, 1] == 0).any() and local.constant.abs().sum() == 0
    incoming = graph.adjacency[: graph.n_features].sum(1) + clt.b_enc.detach()[graph.features[:, 0], graph.features[:, 2]]
    assert torch.allclose(incoming, local.pre_acts, atol=1e-4)
    last = _real_logits(tiny, samples[0])[-1]
    assert torch.allclose(graph.adjacency[graph.logit_start :].sum(1), (last - last.mean())[graph.logit_tokens], atol=1e-4)
    with pytest.raises(ValueError, match="unknown convention 'paper'; use one of circuit-tracer, clt-lite"):
        A.attribute(tiny, clt, samples[0], convention="paper")


def test_identities_hold_for_every_clt_option(tiny, samples):
    """Partial cross-layer span, a skip connection, mlp_in as input site, post-encoder scales."""
    clt = random_clt(tiny, samples, cross_layer=2, skip_connection=True, input_site="mlp_in", post_encoder_scale=True)
    with torch.no_grad():
        clt.W_skip.normal_(0, 0.05)
        clt.post_enc_scale.uniform_(0.5, 1.5)
    graph = A.attribute(tiny, clt, samples[0], max_n_logits=3)
    local = A.LocalReplacement(tiny, clt, samples[0])
    with torch.no_grad():
        assert torch.allclose(local.run().logits, _real_logits(tiny, samples[0]), atol=1e-4)
    constant = _constant(local, graph)
    incoming = graph.adjacency[: graph.n_features].sum(1) + clt.b_enc.detach()[graph.features[:, 0], graph.features[:, 2]]
    assert torch.allclose(incoming + constant[: graph.n_features], local.pre_acts, atol=1e-4)
    assert torch.allclose(graph.adjacency[graph.logit_start :].sum(1) + constant[graph.n_features :],
                          _frozen_targets(local, graph)[graph.n_features :], atol=1e-4)


def test_demeaned_logit_is_sum_of_incoming_edges(graph, local, tiny, samples):
    last = _real_logits(tiny, samples[0])[-1]
    constant = _constant(local, graph)[graph.n_features :]
    assert torch.allclose(graph.adjacency[graph.logit_start :].sum(1) + constant, (last - last.mean())[graph.logit_tokens],
                          atol=1e-4)
    assert graph.logit_tokens[0] == last.argmax()
    assert 1 <= len(graph.logit_tokens) <= 10


def _frozen_targets(local, graph, **scales) -> torch.Tensor:
    with torch.no_grad():
        out = local.run(**scales)
    last = out.logits[-1]
    return torch.cat([local.feature_reads(out.inputs), (last - last.mean())[graph.logit_tokens]])


def test_adjacency_column_is_a_linear_intervention(graph, local):
    rows = torch.cat([torch.arange(graph.n_features), torch.arange(graph.logit_start, graph.n_nodes)])
    base = _frozen_targets(local, graph)
    feature = int(graph.adjacency[:, : graph.n_features].abs().sum(0).argmax())
    feature_scale = torch.ones(graph.n_features)
    feature_scale[feature] = 0
    change = _frozen_targets(local, graph, feature_scale=feature_scale) - base
    assert torch.allclose(change, -graph.adjacency[rows, feature], atol=1e-4)
    assert change.abs().max() > 1e-3  # the test would be vacuous otherwise

    patch = int(graph.patch_nodes()[5])
    embed_scale = torch.ones(graph.n_positions)
    embed_scale[patch - graph.embed_start] = 0
    change = _frozen_targets(local, graph, embed_scale=embed_scale) - base
    assert torch.allclose(change, -graph.adjacency[rows, patch], atol=1e-4)

    error_scale = torch.ones(graph.n_layers, graph.n_positions)
    error_scale[1, graph.n_positions - 1] = 0
    change = _frozen_targets(local, graph, error_scale=error_scale) - base
    assert torch.allclose(change, -graph.adjacency[rows, graph.error_index(1, graph.n_positions - 1)], atol=1e-4)


def test_prune_keeps_the_asked_fraction_and_all_logits(graph):
    result = A.prune(graph, node_threshold=0.8, edge_threshold=1.0)
    assert result.influence[result.node_mask].sum() >= 0.8 * result.influence.sum() - 1e-6
    inner = slice(0, graph.embed_start)  # features and errors: kept by influence alone
    dropped = result.influence[inner][~result.node_mask[inner]]
    assert len(dropped) == 0 or dropped.max() <= result.influence[inner][result.node_mask[inner]].min()
    assert result.node_mask[graph.embed_start :].all()
    default = A.prune(graph)
    assert default.node_mask[graph.logit_start :].all()
    everything = A.prune(graph, node_threshold=1.0, edge_threshold=1.0)
    assert default.node_mask.sum() <= result.node_mask.sum() < everything.node_mask.sum()
    with pytest.raises(ValueError, match="node_threshold"):
        A.prune(graph, node_threshold=1.5)


def test_scores_and_patch_influence(graph):
    scores = A.graph_scores(graph)
    assert 0 < scores.replacement < 1 and 0 < scores.completeness < 1  # a random CLT leaves real errors
    errors = slice(graph.error_start, graph.embed_start)
    without_errors = dataclasses.replace(graph, adjacency=graph.adjacency.clone())
    without_errors.adjacency[:, errors] = 0  # nothing flows through error nodes: both scores are perfect
    assert A.graph_scores(without_errors) == pytest.approx((1.0, 1.0))
    only_errors = dataclasses.replace(graph, adjacency=graph.adjacency.clone())
    only_errors.adjacency[:, graph.embed_start : graph.logit_start] = 0  # no input reaches anything: replacement 0
    assert A.graph_scores(only_errors).replacement == 0.0
    patches = A.patch_influence(graph)
    assert patches.shape == (36,) and (patches >= 0).all() and patches.sum() > 0


def test_export_json_round_trips(graph, tmp_path):
    path = tmp_path / "graph.json"
    written = A.export_json(graph, path, node_threshold=0.95)
    loaded = json.loads(path.read_text())
    assert loaded == json.loads(json.dumps(written))
    assert set(loaded) == {"metadata", "qParams", "nodes", "links"}
    assert {"slug", "scan", "prompt_tokens", "prompt"} <= set(loaded["metadata"])
    assert loaded["metadata"]["slug"] == "graph" and len(loaded["metadata"]["prompt_tokens"]) == graph.n_positions
    required = {"node_id", "feature", "layer", "ctx_idx", "feature_type", "influence", "activation", "clerp",
                "token_prob", "is_target_logit"}
    assert all(required <= set(node) for node in loaded["nodes"])
    kinds = {node["feature_type"] for node in loaded["nodes"]}
    assert {"embedding", "logit", "cross layer transcoder"} <= kinds
    assert kinds <= {"embedding", "logit", "cross layer transcoder", "mlp reconstruction error"}
    ids = {node["node_id"] for node in loaded["nodes"]}
    assert len(ids) == len(loaded["nodes"])
    errors = [node for node in loaded["nodes"] if node["feature_type"] == "mlp reconstruction error"]
    assert errors and all(node["node_id"] == f"0_{node['layer']}_{node['ctx_idx']}" for node in errors)  # circuit-tracer's ids
    assert loaded["links"] and all(link["source"] in ids and link["target"] in ids for link in loaded["links"])
    assert sum(node["is_target_logit"] for node in loaded["nodes"]) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["graph.json"]  # no temporary left behind


def test_bad_inputs(tiny, clt, samples):
    sample = samples[0]
    two_images = data.Sample(sample.image, "USER: <image> <image>\nWhat is this? ASSISTANT:", "", "prompt")
    with pytest.raises(ValueError, match="<image>"):
        A.attribute(tiny, clt, two_images)
    with pytest.raises(ValueError, match="contains <image> but no image was given"):
        A.attribute(tiny, clt, data.Sample(None, sample.prompt, "", "prompt"))
    with pytest.raises(ValueError, match="feature 999 out of range"):
        A.intervene(tiny, clt, sample, 1, 5, 999, 0.0)
    with pytest.raises(ValueError, match="layer 7 out of range"):
        A.intervene(tiny, clt, sample, 7, 5, 3, 0.0)
    with pytest.raises(ValueError, match="position 500 out of range"):
        A.intervene(tiny, clt, sample, 1, 500, 3, 0.0)
    with pytest.raises(ValueError, match="max_feature_nodes"):
        A.attribute(tiny, clt, sample, max_feature_nodes=0)
    wrong = CrossLayerTranscoder(CLTConfig(n_layers=2, d_model=64, expansion_factor=1, k=4))
    with pytest.raises(ValueError, match="2 layers"):
        A.attribute(tiny, clt=wrong, sample=sample)


def test_other_image_sizes_are_resized(tiny, clt, samples):
    """The processor resizes a 64x64 image to the 48px vision input: still 36 patch nodes."""
    sample = samples[1]
    bigger = data.Sample(sample.image.resize((64, 64)), sample.question, sample.answer, sample.family, sample.target_cells)
    graph = A.attribute(tiny, clt, bigger, max_n_logits=2)
    assert len(graph.patch_nodes()) == 36


def test_text_only_prompt(tiny, clt, samples):
    """No image: LLaVA's text-only chat form, no patch nodes, the same identities."""
    sample = data.Sample(None, samples[0].question, "", "prompt")
    graph = A.attribute(tiny, clt, sample, max_n_logits=3)
    local = A.LocalReplacement(tiny, clt, sample)
    assert graph.prompt == f"USER: {samples[0].question} ASSISTANT:" and len(graph.patch_nodes()) == 0
    assert graph.n_positions == len(tiny.processor.tokenizer(graph.prompt).input_ids)
    last = _real_logits(tiny, sample)[-1]
    constant = _constant(local, graph)[graph.n_features :]
    assert torch.allclose(graph.adjacency[graph.logit_start :].sum(1) + constant, (last - last.mean())[graph.logit_tokens],
                          atol=1e-4)


def test_feature_cap_by_influence_keeps_a_submatrix_of_the_full_graph(tiny, clt, samples, graph, monkeypatch):
    """circuit-tracer's cap: with one batch, the features of largest influence through the logit rows alone; their rows
    and columns are exactly those of the uncapped graph, every other feature is dropped."""
    capped = A.attribute(tiny, clt, samples[0], max_feature_nodes=50, batch_size=50)
    assert capped.n_features == 50 and capped.n_active_features == graph.n_features > 50
    logit_rows = graph.adjacency[graph.logit_start :, : graph.logit_start]
    first_hop = capped.logit_probs @ A.normalize_rows(logit_rows)
    expected = first_hop[: graph.n_features].topk(50).indices.sort().values
    assert torch.equal(capped.features, graph.features[expected])
    keep = torch.cat([expected, torch.arange(graph.n_features, graph.n_nodes)])
    assert torch.allclose(capped.adjacency, graph.adjacency[keep][:, keep], atol=1e-5)
    local = A.LocalReplacement(tiny, clt, samples[0])
    rows = torch.cat([torch.arange(capped.n_features), torch.arange(capped.logit_start, capped.n_nodes)])
    uncredited = A.uncredited(local, capped)  # the constant and the dropped features
    assert torch.allclose(capped.adjacency[rows].sum(1) + uncredited, A.target_values(local, capped), atol=1e-4)
    constant = _constant(local, graph)[torch.cat([expected, graph.n_features + torch.arange(len(graph.logit_tokens))])]
    assert (uncredited - constant).abs().max() > 1e-3  # the dropped features are in it
    from clt_lite.attribution import graph as graph_module

    rankings = []
    ranked = graph_module._partial_influence
    monkeypatch.setattr(graph_module, "_partial_influence", lambda *a: rankings.append(1) or ranked(*a))
    several = A.attribute(tiny, clt, samples[0], max_feature_nodes=50, batch_size=8)  # re-ranked as rows arrive
    assert len(rankings) == 2  # 32 rows (4 batches of 8), re-rank, the last 18
    assert several.n_features == 50 and len({tuple(f) for f in several.features.tolist()} & {tuple(f) for f in capped.features.tolist()}) >= 25


def test_feature_cap_folds_the_rest_under_the_clt_lite_convention(tiny, clt, samples):
    local = A.LocalReplacement(tiny, clt, samples[0], convention="clt-lite")
    graph = A.attribute(tiny, clt, samples[0], max_feature_nodes=50, max_n_logits=2, convention="clt-lite")
    assert graph.n_features == 50 and graph.n_active_features > 50
    capped = A.LocalReplacement(tiny, clt, samples[0], max_feature_nodes=50, convention="clt-lite")
    layer, _, latent = local.features.unbind(1)
    strongest = (local.activations * local._raw_decoder_norms(layer, latent)).topk(50).indices
    assert {tuple(f) for f in local.features[strongest].tolist()} == {tuple(f) for f in capped.features.tolist()}
    incoming = graph.adjacency[:50].sum(1) + clt.b_enc.detach()[graph.features[:, 0], graph.features[:, 2]]
    assert torch.allclose(incoming, capped.pre_acts, atol=1e-4)
    with torch.no_grad():
        assert torch.allclose(capped.run().logits, local.recorded.logits, atol=1e-4)


def test_ground_truth_hit_rate(tiny, clt, samples):
    result = A.ground_truth_hit_rate(tiny, clt, samples, max_n_logits=2)
    assert result.n == 3 and set(result.per_family) == {"describe"}
    hits = []  # recomputed here: the most influential patch of each sample's graph lies in its object's cell
    for sample in samples:
        graph = A.attribute(tiny, clt, sample, target_token=A.answer_token(tiny, sample.answer), max_n_logits=2)
        top_patch = int(A.patch_influence(graph).argmax())
        hits.append(top_patch in {p for cell in sample.target_cells for p in tiny.world.cell_patches(cell)})
    assert result.graph_hit_rate == pytest.approx(sum(hits) / len(hits))
    assert result.per_family["describe"].graph == pytest.approx(result.graph_hit_rate)
    with pytest.raises(ValueError, match="single-object"):
        A.ground_truth_hit_rate(tiny, clt, data.shapes_world(1, "test", family="count"))


def test_interventions(tiny, clt, samples, graph):
    layer, position, latent = graph.features[int(A.feature_influence(graph).argmax())].tolist()
    same = A.intervene(tiny, clt, samples[0], layer, position, latent, 1.0)
    assert same.after == same.before == graph.logit_strings[0] and same.activation > 0
    ablated = A.intervene(tiny, clt, samples[0], layer, position, latent, 0.0)
    assert ablated.after == A.ablation_curve(tiny, clt, samples[0], graph, max_features=1).answers[0]  # the graph's top feature
    flips = A.ablation_flip_rate(tiny, clt, samples[:2], max_features=3, max_n_logits=2)
    curves = [A.ablation_curve(tiny, clt, s, A.attribute(tiny, clt, s, max_n_logits=2), max_features=3) for s in samples[:2]]
    assert flips.first_flips == [c.first_flip for c in curves]
    assert flips.rate == sum(c.first_flip == 1 for c in curves) / 2
    assert flips.within(3) == sum(c.first_flip is not None for c in curves) / 2


def test_joint_ablation(tiny, clt, samples, graph):
    ranked = A.ranked_features(graph)
    assert len(ranked) == graph.n_features
    assert ranked[0] == tuple(graph.features[int(A.feature_influence(graph).argmax())].tolist())
    # one feature through intervene_many is exactly intervene
    assert A.intervene_many(tiny, clt, samples[0], ranked[:1], 0.0) == A.intervene(tiny, clt, samples[0], *ranked[0], 0.0)
    unchanged = A.intervene_many(tiny, clt, samples[0], ranked[:5], 1.0)
    assert unchanged.after == unchanged.before and unchanged.activation > 0
    curve = A.ablation_curve(tiny, clt, samples[0], graph, max_features=4)
    assert len(curve.answers) == 4 and curve.before == unchanged.before
    if curve.first_flip is None:
        assert all(answer == curve.before for answer in curve.answers)
    else:
        assert curve.answers[curve.first_flip - 1] != curve.before
        assert all(answer == curve.before for answer in curve.answers[: curve.first_flip - 1])
    with pytest.raises(ValueError, match="at least one"):
        A.intervene_many(tiny, clt, samples[0], [], 0.0)


def test_figures(graph):
    from matplotlib.figure import Figure

    from clt_lite import graph_viz

    for fig in (graph_viz.draw_graph(graph), graph_viz.patch_heatmap(graph), graph_viz.top_features(graph)):
        assert isinstance(fig, Figure)
        matplotlib.pyplot.close(fig)


def test_flip_rate_counts_prompts_within_a_feature_budget():
    flips = A.FlipRate(rate=1 / 3, n=3, first_flips=[1, None, 5])
    assert [flips.count_within(n) for n in (1, 4, 5, 32)] == [1, 1, 2, 2]
    assert flips.within(5) == 2 / 3


def test_interventions_report_how_far_the_answer_moved(tiny, clt, samples, graph):
    layer, position, latent = A.ranked_features(graph)[0]
    same = A.intervene(tiny, clt, samples[0], layer, position, latent, 1.0)
    assert abs(same.logit_change) < 1e-4 and same.prob_after == pytest.approx(same.prob_before, abs=1e-5)
    assert same.prob_before == pytest.approx(float(_real_logits(tiny, samples[0])[-1].softmax(-1).max()), abs=1e-5)
    boosted = A.intervene(tiny, clt, samples[0], layer, position, latent, 20.0)
    assert same.activation > 0 and abs(boosted.logit_change) > 1e-3  # an active feature x20 moves the answer's logit


def test_ablation_effects_compare_the_graph_with_random_features(tiny, clt, samples):
    one, two = A.ablation_effects(tiny, clt, samples[:2], ks=(1, 2), max_n_logits=2)
    assert (one.k, two.k) == (1, 2) and len(two.graph) == len(two.random) == len(two.largest) == 2
    top = A.ranked_features(A.attribute(tiny, clt, samples[0], max_n_logits=2))[:2]
    assert two.graph[0] == pytest.approx(A.intervene_many(tiny, clt, samples[0], top, 0.0).logit_change, abs=1e-6)
    assert one.graph[0] == pytest.approx(A.intervene_many(tiny, clt, samples[0], top[:1], 0.0).logit_change, abs=1e-6)
    assert two.ratio == pytest.approx(two.mean_abs("graph") / two.mean_abs("random"))
    with pytest.raises(ValueError, match="k >= 1"):
        A.ablation_effects(tiny, clt, samples[:1], ks=(0,))


def test_edited_logits_add_every_edit_to_every_target_it_writes(tiny, clt, samples):
    """The batched edit (one index_add per source layer) equals adding edits one at a time: repeated (layer, position,
    latent) edits accumulate, and each edit reaches every target its feature writes, divided by that target's scale."""
    from clt_lite.attribution.interventions import edited_logits
    from clt_lite.attribution.local import record

    rec = record(tiny, clt, samples[0])
    S, d = len(rec.input_ids), tiny.d_model
    edits = [(0, 3, 5, 70.0), (0, 3, 5, -20.0), (1, 2, 7, 150.0), (0, 4, 9, 30.0), (tiny.n_layers - 1, 1, 2, 200.0)]
    delta = {}
    for layer, position, latent, change in edits:
        for target in range(layer, layer + clt.config.n_targets(layer)):
            one = delta.setdefault(target, torch.zeros(S, d))
            one[position] += change * clt.W_dec[layer][latent, target - layer].float() / clt.target_scale[target].float()
    encoded = data.encode_batch(tiny.processor, [samples[0]])
    patch = lambda l, mlp_out, resid_mid, mlp_in: mlp_out + delta[l].to(mlp_out)  # noqa: E731
    with torch.no_grad(), sites.patch_mlp_out(tiny.model, patch, layers=sorted(delta)):
        expected = tiny.model(**encoded.model_inputs(tiny.model)).logits[0, -1].float()
    got = edited_logits(tiny, clt, samples[0], rec, edits)
    assert torch.allclose(got, expected, atol=1e-5) and (got - rec.logits[-1].float()).abs().max() > 1e-3
