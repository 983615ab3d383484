"""The shipped toys meet their quality bar; the trainer resumes exactly and grows a deeper toy from a shallower one."""

import json

import pytest
import torch
from safetensors.torch import load_file

from clt_lite import cli, data, model_card, models, toy
from clt_lite.files import latest_version

BAR = 0.95  # held-out exact-match accuracy required on every question family


@pytest.fixture(scope="module", params=list(toy.SHIPPED))
def each_shipped(request):
    return request.param, models.load(request.param, device="cpu")


def test_shipped_toys_meet_the_bar_on_held_out_questions(each_shipped):
    # Measured on the shipped float16 files (their model cards render the same numbers)
    name, loaded = each_shipped
    accuracy = toy.evaluate(loaded.model, loaded.processor, toy.eval_set(100, "test"))
    failing = {family: value for family, value in accuracy.items() if value < BAR}
    assert not failing, f"{name}: families below {BAR}: {failing}"
    card = (toy.SHIPPED[name][0] / "README.md").read_text().splitlines()
    row = card[card.index("| " + " | ".join(data.FAMILIES) + " | all |") + 2]
    in_card = [float(value) for value in row.strip("| ").split(" | ")]
    measured = [accuracy[family] for family in [*data.FAMILIES, "all"]]
    assert all(abs(a - b) <= 0.02 for a, b in zip(in_card, measured)), (name, in_card, measured)  # float noise: a question


@pytest.mark.parametrize("name, layers", [("tiny-llava-shapes", 16), ("tiny-llava-shapes-32", 32)])
def test_shipped_toys_are_small_16_bit_and_as_deep_as_named(name, layers):
    folder = toy.SHIPPED[name][0]
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 15 * 2**20
    weights = load_file(folder / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float16}
    assert json.loads((folder / "config.json").read_text())["text_config"]["num_hidden_layers"] == layers


def test_shipped_toys_load_by_the_real_llava_path(each_shipped):
    name, loaded = each_shipped
    config = json.loads((toy.SHIPPED[name][0] / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert loaded.processor.tokenizer.convert_ids_to_tokens(loaded.image_token_id) == "<image>"


def test_toy_eval_command_prints_json(capsys):
    assert cli.main(["toy", "eval", "--per-family", "4", "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["accuracy"]) == {"all", "colour", "count", "describe", "exists", "shape"}


TINY = dict(n_layers=2, d_model=32, n_heads=2, d_mlp=64, vision_width=16, vision_layers=1, steps=4,
            batch_size=4, eval_every=2, eval_per_family=2, warmup=2)


def test_training_resumes_exactly_after_a_kill(tmp_path, monkeypatch):
    config = toy.ToyConfig(**TINY)
    toy.train(config, tmp_path / "straight", device="cpu", progress=False)

    real_save = toy._save_checkpoint

    def save_then_die(*args, **kwargs):  # a kill right after the first checkpoint
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(toy, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        toy.train(config, tmp_path / "killed", device="cpu", progress=False)
    monkeypatch.setattr(toy, "_save_checkpoint", real_save)
    checkpoint = latest_version(tmp_path / "killed" / "checkpoint")
    assert checkpoint.name == "step-00000002" and json.loads((checkpoint / "state.json").read_text())["step"] == 2
    toy.train(config, tmp_path / "killed", device="cpu", progress=False)

    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "killed" / "model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_existence_curriculum_fades_from_easy_to_hard_negatives():
    batch = data.shapes_world(400, "train", family="exists")
    config = toy.ToyConfig(steps=100, easy_negatives_until=0.5)
    swapped = [sum(a.question != b.question for a, b in zip(batch, toy._curriculum(batch, config, step)))
               for step in (0, 25, 50, 99)]
    negatives = sum(s.answer == "no" for s in batch)
    assert swapped[0] == negatives and 0 < swapped[1] < negatives and swapped[2] == swapped[3] == 0
    assert toy._curriculum(batch, config, 25) == toy._curriculum(batch, config, 25)  # seeded: resumable
    assert toy._curriculum(batch, toy.ToyConfig(easy_negatives_until=0.0), 0) == batch


def test_resume_with_another_config_is_refused(tmp_path):
    toy.train(toy.ToyConfig(**TINY), tmp_path, device="cpu", progress=False)
    with pytest.raises(ValueError, match="another ToyConfig"):
        toy.train(toy.ToyConfig(**{**TINY, "lr": 1e-3}), tmp_path, device="cpu", progress=False)


def test_training_stream_is_seeded_and_weights_the_existence_family():
    config = toy.ToyConfig(exists_weight=2.0)
    families = [toy.training_sample(i, config).family for i in range(600)]
    assert [toy.training_sample(i, config).question for i in (0, 7)] == [toy.training_sample(i, config).question for i in (0, 7)]
    assert 0.27 < families.count("exists") / 600 < 0.40  # 2 / 6 expected; uniform would be 0.20
    uniform = [toy.training_sample(i, toy.ToyConfig(exists_weight=1.0)).family for i in range(600)]
    assert 0.14 < uniform.count("exists") / 600 < 0.26


def test_attention_aux_loss_rewards_looking_at_the_asked_object_or_at_bos_for_no():
    processor = toy.build_processor()
    yes = next(s for s in data.shapes_world(20, "train", family="exists") if s.answer == "yes")
    no = next(s for s in data.shapes_world(20, "train", family="exists") if s.answer == "no")
    batch = data.encode_batch(processor, [yes, no], with_answers=True)
    seq = batch.input_ids.shape[1]
    image = (batch.input_ids[0] == processor.tokenizer.convert_tokens_to_ids("<image>")).nonzero()[0].item()
    right = torch.zeros(2, 1, seq, seq)
    right[0, 0, :, image + data.WorldConfig().cell_patches(yes.target_cells[0])[0]] = 1.0
    right[1, 0, :, 0] = 1.0
    assert toy.attention_aux_loss(right, [yes, no], batch, processor).item() < 1e-4
    wrong = right.flip(0)  # the "yes" row looks at <s>, the "no" row at a patch
    assert toy.attention_aux_loss(wrong, [yes, no], batch, processor).item() > 5


def test_toy_train_command_overrides_depth_and_steps(tmp_path, monkeypatch):
    seen = {}

    def record(config, out, **_):
        seen["config"] = config
        return {"steps": 0}

    monkeypatch.setattr(toy, "train", record)
    cli.main(["toy", "train", "--out", str(tmp_path), "--layers", "32", "--steps", "5", "--json"])
    assert (seen["config"].n_layers, seen["config"].steps) == (32, 5)
    assert seen["config"].lr == toy.ToyConfig().lr  # everything else stays the shipped recipe


def test_model_card_reports_the_runs_from_scratch_and_whether_they_passed(tmp_path):
    point = {"colour": 1.0, "count": 1.0, "describe": 0.97, "shape": 1.0, "minutes": 10.0, "loss": 0.1}
    curve = [{**point, "step": 500, "exists": 0.53}, {**point, "step": 1000, "exists": 0.96}]
    config = {"n_layers": 32, "steps": 7000, "seed": 0}
    path = tmp_path / model_card.FROM_SCRATCH_FILE
    path.write_text(json.dumps([{"config": config, "curve": curve, "note": "a"}, {"config": config, "curve": curve[:1], "note": "b"}]))
    text = "\n".join(model_card.from_scratch_section(path, list(data.FAMILIES)))
    assert "passed 0.95 on every family at step 1000" in text
    assert "had not passed 0.95 on every family by step 500 of the planned 7000" in text
    assert "No run" in model_card.from_scratch_section(tmp_path / "absent.json", list(data.FAMILIES))[0]


def test_deepen_splits_each_layer_into_copies_that_each_write_a_share_of_its_update():
    config = toy.ToyConfig(**TINY)
    model = toy.build_model(config, toy.build_processor())
    with torch.no_grad():  # small residual updates: splitting is then exact to first order
        for layer in model.model.language_model.layers:
            layer.self_attn.o_proj.weight.mul_(1e-3)
            layer.mlp.down_proj.weight.mul_(1e-3)
    batch = data.encode_batch(toy.build_processor(), data.shapes_world(3, "val", 0), with_answers=True)
    before = model(**batch.model_inputs(model)).logits.detach()
    original = [layer.self_attn.o_proj.weight.clone() for layer in model.model.language_model.layers]
    skip_last = model.model.language_model.layers[-1].mlp.down_proj.weight.clone()

    toy.deepen(model, 2)
    layers = model.model.language_model.layers
    assert len(layers) == model.config.text_config.num_hidden_layers == 2 * config.n_layers
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(2 * config.n_layers))
    assert torch.equal(layers[2].self_attn.o_proj.weight, original[1] / 2)
    assert torch.equal(layers[3].self_attn.q_proj.weight, layers[2].self_attn.q_proj.weight)
    after = model(**batch.model_inputs(model)).logits.detach()
    with torch.no_grad():  # the size of one MLP's update, for scale: the split must change far less than that
        layers[-1].mlp.down_proj.weight.zero_()
        layers[-2].mlp.down_proj.weight.zero_()
        without_last_mlp = model(**batch.model_inputs(model)).logits
    assert skip_last.abs().sum() > 0
    assert (after - before).abs().max() < 0.05 * (without_last_mlp - after).abs().max()


def test_grown_toy_trains_its_base_then_the_deepened_model_and_a_finished_run_returns_at_once(tmp_path):
    config = toy.ToyConfig(**{**TINY, "grow_from": 1, "grow_steps": 4})
    result = toy.train(config, tmp_path, device="cpu", progress=False)
    base = json.loads((tmp_path / "base" / "training.json").read_text())
    assert base["config"]["n_layers"] == 1 and base["config"]["grow_from"] == 0
    assert [(c["step"], c["layers"]) for c in result["curve"]] == [(2, 1), (4, 1), (6, 2), (8, 2)]
    assert json.loads((tmp_path / "config.json").read_text())["text_config"]["num_hidden_layers"] == 2
    assert models.load(str(tmp_path), device="cpu").model.config.text_config.num_hidden_layers == 2
    written = (tmp_path / "model.safetensors").stat().st_mtime_ns
    assert toy.train(config, tmp_path, device="cpu", progress=False) == result
    assert (tmp_path / "model.safetensors").stat().st_mtime_ns == written

    card = model_card.model_card(tmp_path, {f: 1.0 for f in [*data.FAMILIES, "all"]}, 2)
    assert "## How 2 layers were trained: grown from 1" in card and "--layers 2 --grow-from 1" in card
    drift = model_card.copy_drift(tmp_path, 2)
    assert len(drift) == 1 and 0 < drift[0] < 1  # the twins were trained apart, not far
    assert f"is {drift[0]:.3f} (median over the 1 pairs" in card


@pytest.mark.parametrize("grow_from", [-1, 2, 3])
def test_grow_from_must_be_a_proper_divisor_of_the_depth(grow_from):
    with pytest.raises(ValueError, match="proper divisor"):
        toy.ToyConfig(**{**TINY, "n_layers": 4 if grow_from == 3 else 2, "grow_from": grow_from})
