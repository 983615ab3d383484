"""The CLI contract: every command takes --json (one object on the last line) and fails in one line."""

import json

import pytest

from clt_lite import cli, data


def _run(capsys, *argv) -> dict:
    assert cli.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_capture_train_evaluate_end_to_end(tmp_path, capsys):
    acts, clt = tmp_path / "acts", tmp_path / "clt"
    captured = _run(capsys, "capture", "--model", "random:tiny", "--data", "shapes:24", "--out", str(acts), "--device", "cpu")
    assert captured["tokens"] > 0 and captured["shards"] >= 1
    trained = _run(capsys, "train", "--acts", str(acts), "--expansion", "2", "--k", "8", "--tokens", "2048",
                   "--batch-size", "256", "--out", str(clt), "--device", "cpu")
    assert 0 < trained["mean_fvu"] < 2 and trained["steps"] == 8
    evaluated = _run(capsys, "evaluate", "--model", "random:tiny", "--clt", str(clt), "--data", "shapes:4", "--device", "cpu")
    assert [row["name"] for row in evaluated["rows"]] == ["CLT", "MLP zero-ablation", "MLP mean-ablation"]
    data.shapes_world(1)[0].image.save(tmp_path / "shapes.png")
    graph = _run(capsys, "attribute", "--model", "random:tiny", "--clt", str(clt), "--image", str(tmp_path / "shapes.png"),
                 "--prompt", "What color is the circle?", "--out", str(tmp_path / "graph.json"), "--device", "cpu")
    assert graph["nodes"] > 36 and json.loads((tmp_path / "graph.json").read_text())["links"]
    text_only = _run(capsys, "attribute", "--model", "random:tiny", "--clt", str(clt), "--prompt", "What color is the circle?",
                     "--out", str(tmp_path / "text.json"), "--convention", "clt-lite", "--device", "cpu")
    tokens = json.loads((tmp_path / "text.json").read_text())["metadata"]["prompt_tokens"]
    assert text_only["nodes"] > 0 and "<image>" not in tokens and 0 <= text_only["replacement_score"] <= 1
    truth = _run(capsys, "attribute", "--model", "random:tiny", "--clt", str(clt), "--ground-truth", "6", "--device", "cpu")
    assert truth["n"] == 6 and abs(truth["graph_hit_rate"] * 6 - round(truth["graph_hit_rate"] * 6)) < 1e-9  # a count of 6


def test_plan_prints_the_llava_7b_numbers(capsys):
    result = _run(capsys, "plan", "--model", "llava-1.5-7b", "--expansion", "2", "--k", "64", "--cross-layer", "0")
    assert result["decoder_matrices"] == 528 and round(result["total_params"] / 1e9, 1) == 18.8


def test_plan_says_the_full_7b_clt_fits_one_h200_with_the_low_memory_recipe(capsys):
    argv = ["plan", "--model", "llava-1.5-7b", "--expansion", "2", "--k", "64", "--cross-layer", "0",
            "--device-preset", "h200"]
    for recipe in ("adam-bf16", "adafactor"):
        result = _run(capsys, *argv, "--optimizer", recipe)
        assert result["fits"] is True and result["optimizer"] == recipe
    assert cli.main(argv) == 0
    assert "fits 1 x h200 with adam: NO" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["plan", "--model", "gpt-9"], "unknown model"),
    (["plan", "--model", "llava-1.5-7b", "--k", "100000"], "k=100000"),
    (["train", "--acts", "/no/such/store", "--out", "/tmp/x"], "no manifest.json"),
    (["plan", "--model", "llava-1.5-7b", "--optimizer", "lion"], "unknown optimizer 'lion'; use one of adam, adam-bf16, adafactor"),
    (["capture", "--model", "random:tiny", "--data", "shapes:0", "--out", "/tmp/x"], "use shapes:N"),
    (["evaluate", "--model", "random:tiny", "--clt", "/no/such/clt"], "not found"),
    (["toy", "train", "--out", "/tmp/never-written", "--steps", "0"], "ToyConfig needs positive sizes and counts; got steps=0"),
    (["toy", "train", "--out", "/tmp/never-written", "--steps", "-5"], "steps=-5"),
    (["toy", "train", "--out", "/tmp/never-written", "--layers", "0"], "n_layers=0"),
    (["toy", "eval", "--per-family", "0"], "--per-family 0"),
])
def test_bad_input_is_one_line_and_non_zero(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("raised, message", [
    (ValueError("bad spec 'x'; use shapes:N"), "error: bad spec 'x'; use shapes:N"),
    (KeyError("n_layers"), "error: KeyError: 'n_layers' (unexpected: rerun with --debug"),
    (ZeroDivisionError("division by zero\nmore"), "error: ZeroDivisionError: division by zero (unexpected"),
])
def test_every_error_is_one_line_and_debug_shows_the_traceback(capsys, monkeypatch, raised, message):
    from clt_lite import cli

    def fail(args):
        raise raised

    monkeypatch.setattr(cli, "_cmd_notebooks", fail)
    assert cli.main(["notebooks", "--only", "01"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    with pytest.raises(type(raised)):
        cli.main(["notebooks", "--only", "01", "--debug"])


def test_cli_defaults_are_the_dataclasses_defaults():
    from clt_lite import cli
    from clt_lite.clt import CLTConfig
    from clt_lite.store import CaptureConfig
    from clt_lite.train import TrainConfig

    parser = cli.build_parser()
    train = parser.parse_args(["train", "--acts", "a", "--out", "o"])
    assert (train.expansion, train.k, train.cross_layer, train.activation) == (
        CLTConfig.expansion_factor, CLTConfig.k, CLTConfig.cross_layer, CLTConfig.activation)
    assert (train.tokens, train.batch_size, train.optimizer, train.device, train.seed, train.parallel) == (
        TrainConfig.tokens, TrainConfig.batch_size, TrainConfig.optimizer, TrainConfig.device, TrainConfig.seed, TrainConfig.parallel)
    assert parser.parse_args(["capture", "--data", "shapes:1", "--out", "o"]).dtype == CaptureConfig.dtype
