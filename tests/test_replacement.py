"""The replacement model and token match: exactness, ordering against baselines, bad input."""

import pytest
import torch

from clt_lite import data, models, sites
from clt_lite import replacement as R
from clt_lite.clt import CLTConfig, CrossLayerTranscoder
from clt_lite.store import StreamingSource
from clt_lite.train import TrainConfig, train

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def samples():
    return data.shapes_world(16, "val")


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    source = StreamingSource(tiny, data.shapes_world(300, "train"))
    config = CLTConfig(n_layers=tiny.n_layers, d_model=tiny.d_model, expansion_factor=4, k=16)
    folder = tmp_path_factory.mktemp("clt")
    train(config, TrainConfig(tokens=60 * 512, batch_size=512, warmup_steps=5, lr=2e-3, device="cpu"),
          source, folder, progress=False)
    return CrossLayerTranscoder.load(folder)


@pytest.fixture(scope="module")
def untrained(trained):
    clt = CrossLayerTranscoder(trained.config)
    clt.set_scales(trained.input_scale, trained.target_scale)
    return clt


def test_exact_error_add_back_reproduces_the_original(tiny, trained, samples):
    match = R.token_match(tiny, R.Replacement("clt", trained, exact=True), samples)
    assert match.top1_text == 1.0 and match.top1_answer == 1.0
    assert abs(match.kl) < 1e-6 and abs(match.ce_increase) < 1e-5
    assert match.accuracy_replacement == match.accuracy_original


def test_trained_clt_beats_ablations_and_a_random_clt(tiny, trained, untrained, samples):
    means = R.mlp_out_means(tiny.model, tiny.processor, data.shapes_world(32, "train"))
    kl = {name: R.token_match(tiny, replacement, samples, generate=False).kl for name, replacement in {
        "clt": R.Replacement("clt", trained), "random": R.Replacement("clt", untrained),
        "zero": R.Replacement("zero"), "mean": R.Replacement("mean", means=means)}.items()}
    assert kl["clt"] < 0.5 * min(kl["zero"], kl["mean"]), kl
    assert kl["random"] > 0.5 * min(kl["zero"], kl["mean"]), kl  # an untrained CLT is no better than ablating


def test_open_loop_fvu_is_the_stores_fvu_and_closed_loop_compounds(tiny, trained, samples):
    closed = R.token_match(tiny, R.Replacement("clt", trained), samples, generate=False)
    opened = R.token_match(tiny, R.Replacement("clt", trained, loop="open"), samples, generate=False)
    assert closed.fvu[0] == pytest.approx(opened.fvu[0], rel=1e-4)  # layer 0 sees the same input either way
    assert len(closed.fvu) == tiny.n_layers and all(f > 0 for f in closed.fvu)


def test_generation_metrics_are_computed(tiny, trained, samples):
    match = R.token_match(tiny, R.Replacement("clt", trained), samples[:4])
    original = models.generate_answers(tiny, samples[:4])
    with R.replaced(tiny.model, R.Replacement("clt", trained)):
        replaced = models.generate_answers(tiny, samples[:4])
    assert match.generated_exact_match == sum(a == b for a, b in zip(original, replaced)) / 4
    assert match.generated_exact_match <= match.generated_token_agreement <= 1
    assert set(match.accuracy_original) >= {"all"}


def test_replacing_some_layers_only(tiny, trained, samples):
    none_replaced = R.token_match(tiny, R.Replacement("clt", trained, layers=[]), samples, generate=False)
    assert none_replaced.top1_text == 1.0 and abs(none_replaced.kl) < 1e-6


def test_a_clt_of_another_model_is_refused(tiny):
    other = CrossLayerTranscoder(CLTConfig(n_layers=tiny.n_layers + 1, d_model=tiny.d_model, expansion_factor=1, k=4))
    with pytest.raises(ValueError, match="trained for 5 layers of width 64, the model has 4 layers"):
        R.token_match(tiny, R.Replacement("clt", other), data.shapes_world(2, "val"))


def test_empty_dataset_and_no_answers_are_refused(tiny, trained):
    with pytest.raises(ValueError, match="dataset is empty"):
        R.token_match(tiny, R.Replacement("clt", trained), [])
    sample = data.shapes_world(1, "val")[0]
    sample.answer = ""
    with pytest.raises(ValueError, match="no answer positions"):
        R.token_match(tiny, R.Replacement("zero"), [sample], generate=False)


def test_bad_replacement_arguments():
    with pytest.raises(ValueError, match="needs a trained CLT"):
        R.Replacement("clt")
    with pytest.raises(ValueError, match="mean ablation needs"):
        R.Replacement("mean")
    with pytest.raises(ValueError, match="unknown loop"):
        R.Replacement("zero", loop="sideways")


def test_hooks_are_gone_after_replacement(tiny, trained, samples):
    batch = data.encode_batch(tiny.processor, samples[:2], with_answers=True)
    with torch.no_grad():
        before = tiny.model(**batch.model_inputs(tiny.model)).logits
        with R.replaced(tiny.model, R.Replacement("clt", trained)):
            tiny.model(**batch.model_inputs(tiny.model))
        after = tiny.model(**batch.model_inputs(tiny.model)).logits
    assert torch.equal(before, after)
    modules = [m for layer in sites.decoder_layers(tiny.model) for m in layer.modules()]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in modules)  # every patch hook was removed


def _row(name: str, **metrics) -> R.TokenMatch:
    values = {field: 0.5 for field in R.TokenMatch._fields}
    values.update(name=name, accuracy_original={"all": 1.0}, accuracy_replacement={"all": 0.9}, fvu=[], **metrics)
    return R.TokenMatch(**values)


def test_versus_sentence_counts_lower_kl_as_better_and_names_ties():
    ours = _row("CLT", top1_text=0.88, top1_answer=0.975, top1_filtered=0.86, kl=1.03)
    theirs = _row("PLT", top1_text=0.865, top1_answer=0.982, top1_filtered=0.86, kl=0.97)
    sentence = R.versus_sentence(ours, theirs, "CLT", "PLT")
    assert sentence == ("CLT − PLT: **CLT** ahead on top1_text (+0.015); **PLT** ahead on top1_answer (-0.007), "
                        "kl (+0.060); tied on top1_filtered (+0.000).")


def test_format_table_columns():
    table = R.format_table([_row("CLT", kl=1.0313)], R.DIVERGENCE_COLUMNS)
    assert table.splitlines()[0].split() == ["replacement", "KL", "dCE", "ans"]
    assert "1.0313" in table and "top1" not in table
    assert len(R.format_table([_row("CLT")]).splitlines()[0].split()) == 1 + 2 * 7 + 3  # every column by default


def test_mlp0_sentence_says_most_or_part_and_whether_the_error_is_amplified():
    most = R.mlp0_sentence(1.0, 0.2, 0.05)
    assert "takes away most of the divergence (80%, KL 1.00 -> 0.20)" in most and "amplified by the layers" in most
    part = R.mlp0_sentence(0.70, 0.43, 0.08)
    assert "takes away part of the divergence (39%" in part and "amplified" in part
    assert "not amplified here" in R.mlp0_sentence(0.5, 0.45, 0.1)


def test_closed_loop_fine_tuning_lowers_the_closed_loop_kl_and_touches_only_the_clt(tiny, trained, samples):
    from clt_lite import closed_loop

    clt = CrossLayerTranscoder(trained.config)
    clt.load_state_dict(trained.state_dict())
    model_before = [p.clone() for p in tiny.model.parameters()]
    before = R.token_match(tiny, R.Replacement("clt", clt), samples, generate=False).kl
    config = closed_loop.ClosedLoopConfig(steps=30, batch_size=8, lr=1e-3)
    history = closed_loop.finetune(tiny, clt, data.shapes_world(64, "train"), config, progress=False)
    after = R.token_match(tiny, R.Replacement("clt", clt), samples, generate=False).kl
    assert len(history) == 30 and after < 0.8 * before, (before, after)
    assert all(torch.equal(a, b) for a, b in zip(model_before, tiny.model.parameters()))
    assert all(p.requires_grad for p in tiny.model.parameters())  # given back as it was
    assert not torch.equal(clt.W_enc[0], trained.W_enc[0])  # layer 0 learns from the errors it causes downstream
    with pytest.raises(ValueError, match="needs training prompts"):
        closed_loop.finetune(tiny, clt, [], config, progress=False)
