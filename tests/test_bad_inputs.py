"""Bad inputs, as a hostile but realistic user gives them: each gets one clear line (CLI: exit 2, one line on stderr;
API: a ValueError whose message names what was wrong and what to do), and nothing already written is lost.

docs/bad_inputs.md lists this table; a test keeps the two in step.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from clt_lite import cli, data, datasets, models, plan, toy
from clt_lite.clt import CLTConfig, CrossLayerTranscoder
from clt_lite.store import ActivationStore
from clt_lite.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A store captured from random:tiny and a CLT trained on it, through the CLI."""
    root = tmp_path_factory.mktemp("bad-inputs")
    assert cli.main(["capture", "--model", "random:tiny", "--data", "shapes:24", "--out", str(root / "acts"),
                     "--device", "cpu"]) == 0
    assert cli.main(["train", "--acts", str(root / "acts"), "--expansion", "1", "--k", "4", "--tokens", "512",
                     "--batch-size", "256", "--out", str(root / "clt"), "--device", "cpu"]) == 0
    return root


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _copy_clt(made: Path, tmp: Path) -> Path:
    out = tmp / "clt-copy"
    CrossLayerTranscoder.load(made / "clt").save(out)
    return out


def _flip_a_byte(folder: Path) -> Path:
    weights = folder / "clt.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0x40  # a weight's byte, past the header
    weights.write_bytes(bytes(raw))
    return folder


def _other_tiny(tmp: Path) -> Path:
    """random:tiny's architecture with other weights (seed 1), saved as a model folder."""
    other = models.load("random:tiny", device="cpu", seed=1)
    other.model.save_pretrained(tmp / "other-tiny")
    other.processor.save_pretrained(tmp / "other-tiny")
    return tmp / "other-tiny"


def _config_only(tmp: Path) -> Path:
    """A model folder with the toy's config.json and nothing else (no weights, no processor)."""
    folder = tmp / "config-only"
    folder.mkdir()
    shutil.copy(toy.ASSET_DIR / "config.json", folder)
    return folder


def _shapes_png(tmp: Path) -> Path:
    datasets_image = tmp / "shapes.png"
    data.shapes_world(1)[0].image.save(datasets_image)
    return datasets_image


def _huge_image(tmp: Path) -> Path:
    path = tmp / "huge.png"
    Image.new("1", (14_000, 14_000)).save(path)  # 196 megapixels: PIL's decompression-bomb limit refuses it
    return path


# (id, argv built from (made, tmp), message the one line must contain, files that must survive unchanged)
CLI_CASES = [
    ("plan_unknown_model", lambda m, t: ["plan", "--model", "gpt-9"], "unknown model 'gpt-9'"),
    ("plan_k_above_latents", lambda m, t: ["plan", "--model", "llava-1.5-7b", "--k", "100000"], "k=100000"),
    ("plan_unknown_optimizer", lambda m, t: ["plan", "--model", "llava-1.5-7b", "--optimizer", "lion"],
     "unknown optimizer 'lion'; use one of adam, adam-bf16, adafactor"),
    ("plan_gpus_not_dividing_batch", lambda m, t: ["plan", "--model", "llava-1.5-7b", "--gpus", "3"],
     "gpus=3 must be >= 1 and divide batch_size=4096"),
    ("capture_zero_samples", lambda m, t: ["capture", "--model", "random:tiny", "--data", "shapes:0", "--out", str(t / "o")],
     "use shapes:N (N > 0)"),
    ("capture_unknown_data_kind", lambda m, t: ["capture", "--model", "random:tiny", "--data", "pictures:3",
                                                "--out", str(t / "o")], "bad data spec 'pictures:3'"),
    ("capture_missing_jsonl", lambda m, t: ["capture", "--model", "random:tiny", "--data", f"jsonl:{t}/nope.jsonl",
                                            "--out", str(t / "o")], "nope.jsonl does not exist"),
    ("capture_jsonl_line_not_json", lambda m, t: ["capture", "--model", "random:tiny", "--data",
                                                  "jsonl:" + str(_write(t / "a.jsonl", '{"prompt": 1')), "--out", str(t / "o")],
     "a.jsonl:1: not valid JSON"),
    ("capture_jsonl_line_a_bare_string", lambda m, t: ["capture", "--model", "random:tiny", "--data",
                                                       "jsonl:" + str(_write(t / "a.jsonl", '"just text"')), "--out", str(t / "o")],
     "a.jsonl:1: expected an object with image, prompt, answer; got str"),
    ("capture_jsonl_prompt_null", lambda m, t: ["capture", "--model", "random:tiny", "--data", "jsonl:" + str(_write(
        t / "a.jsonl", '{"image": "x.png", "prompt": null, "answer": "red"}')), "--out", str(t / "o")],
     "a.jsonl:1: prompt must be a non-empty string"),
    ("capture_jsonl_missing_field", lambda m, t: ["capture", "--model", "random:tiny", "--data", "jsonl:" + str(_write(
        t / "a.jsonl", '{"image": "x.png", "answer": "red"}')), "--out", str(t / "o")], "missing field(s) prompt"),
    ("capture_jsonl_missing_image", lambda m, t: ["capture", "--model", "random:tiny", "--data", "jsonl:" + str(_write(
        t / "a.jsonl", '{"image": "gone.png", "prompt": "What?", "answer": "red"}')), "--out", str(t / "o")],
     "a.jsonl:1:"),
    ("capture_into_a_folder_of_other_files", lambda m, t: ["capture", "--model", "random:tiny", "--data", "shapes:4",
                                                           "--out", str(_write(t / "mine" / "notes.txt", "keep").parent)],
     "is not empty and holds no manifest.json"),
    ("capture_unknown_random_preset", lambda m, t: ["capture", "--model", "random:gpt", "--data", "shapes:4",
                                                    "--out", str(t / "o")], "unknown random preset 'gpt'"),
    ("capture_model_folder_without_config", lambda m, t: ["capture", "--model", str(_write(t / "m" / "w.bin", "x").parent),
                                                          "--data", "shapes:4", "--out", str(t / "o")], "has no config.json"),
    ("capture_model_folder_without_weights", lambda m, t: ["capture", "--model", str(_config_only(t)), "--data", "shapes:4",
                                                           "--out", str(t / "o")], "cannot load the model folder"),
    ("capture_out_is_a_file", lambda m, t: ["capture", "--model", "random:tiny", "--data", "shapes:4",
                                            "--out", str(_write(t / "out.txt", "keep"))], "is a file; capture into a new"),
    ("train_missing_store", lambda m, t: ["train", "--acts", str(t / "none"), "--out", str(t / "o")], "no manifest.json"),
    ("train_out_is_a_file", lambda m, t: ["train", "--acts", str(m / "acts"), "--tokens", "512", "--batch-size", "256",
                                          "--out", str(_write(t / "out.txt", "keep"))], "is a file; pass a folder"),
    ("train_out_holds_a_model", lambda m, t: ["train", "--acts", str(m / "acts"), "--tokens", "512", "--batch-size", "256",
                                              "--out", str(_write(t / "model" / "config.json", "{}").parent)],
     "is not empty and holds no training run (no run.json); nothing was written"),
    ("train_batch_size_zero", lambda m, t: ["train", "--acts", str(m / "acts"), "--batch-size", "0", "--out", str(t / "o")],
     "need tokens >= batch_size >= 1"),
    ("train_fewer_tokens_than_a_batch", lambda m, t: ["train", "--acts", str(m / "acts"), "--tokens", "10",
                                                      "--out", str(t / "o")], "need tokens >= batch_size >= 1"),
    ("train_cross_layer_beyond_depth", lambda m, t: ["train", "--acts", str(m / "acts"), "--cross-layer", "99",
                                                     "--out", str(t / "o")], "cross_layer=99 must be in 0..4"),
    ("train_k_zero", lambda m, t: ["train", "--acts", str(m / "acts"), "--k", "0", "--out", str(t / "o")],
     "k=0 must be between 1 and the latents per layer"),
    ("train_negative_checkpoint_every", lambda m, t: ["train", "--acts", str(m / "acts"), "--checkpoint-every", "-1",
                                                      "--out", str(t / "o")], "need checkpoint_every >= 0"),
    ("train_resume_with_another_config", lambda m, t: ["train", "--acts", str(m / "acts"), "--expansion", "2", "--k", "4",
                                                       "--tokens", "512", "--batch-size", "256", "--out", str(m / "clt")],
     "was trained with a different CLT config"),
    ("evaluate_missing_clt", lambda m, t: ["evaluate", "--model", "random:tiny", "--clt", str(t / "none")], "not found"),
    ("evaluate_flipped_byte", lambda m, t: ["evaluate", "--model", "random:tiny", "--clt", str(_flip_a_byte(_copy_clt(m, t))),
                                            "--data", "shapes:2"], "checksum mismatch"),
    ("evaluate_another_model", lambda m, t: ["evaluate", "--model", str(_other_tiny(t)), "--clt", str(m / "clt"),
                                             "--data", "shapes:2", "--device", "cpu"], "pass --allow-other-model"),
    ("evaluate_zero_samples", lambda m, t: ["evaluate", "--model", "random:tiny", "--clt", str(m / "clt"),
                                            "--data", "shapes:0"], "use shapes:N (N > 0)"),
    ("attribute_unreadable_image", lambda m, t: ["attribute", "--model", "random:tiny", "--clt", str(m / "clt"),
                                                 "--image", str(_write(t / "fake.png", "not an image")), "--prompt", "What?",
                                                 "--out", str(t / "g.json")],
     "fake.png"),
    ("attribute_huge_image", lambda m, t: ["attribute", "--model", "random:tiny", "--clt", str(m / "clt"),
                                           "--image", str(_huge_image(t)), "--prompt", "What?", "--out", str(t / "g.json")],
     "huge.png"),
    ("attribute_chat_prompt_without_image", lambda m, t: ["attribute", "--model", "random:tiny", "--clt", str(m / "clt"),
                                                          "--image", str(_shapes_png(t)), "--prompt",
                                                          "USER: What color is it? ASSISTANT:", "--out", str(t / "g.json")],
     "is in the chat format but has no <image>"),
    ("toy_train_zero_steps", lambda m, t: ["toy", "train", "--out", str(t / "toy"), "--steps", "0"], "steps=0"),
    ("toy_train_negative_steps", lambda m, t: ["toy", "train", "--out", str(t / "toy"), "--steps", "-5"], "steps=-5"),
    ("toy_train_zero_layers", lambda m, t: ["toy", "train", "--out", str(t / "toy"), "--layers", "0"], "n_layers=0"),
    ("toy_eval_zero_per_family", lambda m, t: ["toy", "eval", "--per-family", "0"], "--per-family 0"),
    ("notebooks_missing_config", lambda m, t: ["notebooks", "--config", str(t / "nope.yaml")], "does not exist"),
    ("notebooks_config_not_yaml", lambda m, t: ["notebooks", "--config", str(_write(t / "bad.yaml", "a: [1, 2\n"))],
     "is not valid YAML"),
    ("notebooks_config_a_list", lambda m, t: ["notebooks", "--config", str(_write(t / "list.yaml", "- 1\n- 2\n"))],
     "must be a mapping of parameter: value"),
    ("notebooks_unknown_number", lambda m, t: ["notebooks", "--only", "99"], "no notebook numbered 99"),
]


@pytest.mark.parametrize("build, message", [c[1:] for c in CLI_CASES], ids=[f"bad_input_cli_{c[0]}" for c in CLI_CASES])
def test_cli(build, message, made, tmp_path, capsys):
    argv = build(made, tmp_path)
    kept = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} | {
        p: p.read_bytes() for p in (made / "clt").rglob("*") if p.is_file()}
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and message in err, err
    assert "unexpected: rerun with --debug" not in err, err  # a known bad input, not a crash
    for path, content in kept.items():  # nothing already written is lost
        if path.parent.name != "clt-copy":  # the copy whose byte was flipped on purpose
            assert path.read_bytes() == content, path


def _source(made: Path) -> ActivationStore:
    return ActivationStore(made / "acts")


def _clt_config(made: Path, **overrides) -> CLTConfig:
    return CLTConfig(**{**json.loads((made / "clt" / "config.json").read_text()), **overrides})


def _truncated(made: Path, tmp: Path) -> Path:
    copy = _copy_clt(made, tmp)
    weights = copy / "clt.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    return copy


def _pickled_optimizer(made: Path, tmp: Path) -> Path:
    """A training run whose checkpoint's optimizer.pt is a pickle of an arbitrary object (it would run code)."""
    out = tmp / "run"
    train(_clt_config(made), TrainConfig(tokens=512, batch_size=256, checkpoint_every=1, device="cpu"), _source(made), out,
          progress=False)  # a finished run: calling train again reloads its last checkpoint
    torch.save(Path("/etc/passwd"), out / "checkpoints" / "step-00000002" / "optimizer.pt")  # any object, pickled
    (out / "checkpoints" / "latest.json").write_text(json.dumps({"step": 2, "dir": "step-00000002"}))
    return out


API_CASES = [
    ("clt_config_unknown_activation", lambda m, t: CLTConfig(4, 8, activation="gelu"), "unknown activation 'gelu'"),
    ("clt_config_unknown_dtype", lambda m, t: CLTConfig(4, 8, dtype="int8"), "unknown dtype 'int8'"),
    ("clt_config_no_layers", lambda m, t: CLTConfig(0, 8), "n_layers and d_model must be >= 1"),
    ("train_config_unknown_optimizer", lambda m, t: TrainConfig(optimizer="lion"), "unknown optimizer 'lion'"),
    ("train_config_unknown_parallel", lambda m, t: TrainConfig(parallel="zero3"), "unknown parallel 'zero3'"),
    ("train_config_adafactor_sharded", lambda m, t: TrainConfig(parallel="fsdp", optimizer="adafactor"),
     "does not run sharded"),
    ("clt_load_missing_folder", lambda m, t: CrossLayerTranscoder.load(t / "none"), "config.json not found"),
    ("clt_load_truncated_weights", lambda m, t: CrossLayerTranscoder.load(_truncated(m, t)),
     "is not a readable safetensors file"),
    ("clt_load_float_layers", lambda m, t: CrossLayerTranscoder.load(
        _write(t / "c" / "config.json", json.dumps({"n_layers": 2.5, "d_model": 8})).parent), "n_layers"),
    ("clt_load_unknown_config_key", lambda m, t: CrossLayerTranscoder.load(
        _write(t / "c" / "config.json", json.dumps({"n_layers": 2, "d_model": 8, "width": 3})).parent),
     "unknown CLTConfig fields ['width']"),
    ("clt_load_config_not_json", lambda m, t: CrossLayerTranscoder.load(_write(t / "c" / "config.json", "{").parent),
     "is not a valid CLT config"),
    ("clt_another_model", lambda m, t: CrossLayerTranscoder.load(m / "clt").check_model(models.load("tiny-llava-shapes", "cpu")),
     "but the model is tiny-llava-shapes"),
    ("clt_feature_out_of_range", lambda m, t: CrossLayerTranscoder.load(m / "clt").check_feature(0, 10**6),
     "feature 1000000 out of range"),
    ("store_manifest_not_json", lambda m, t: ActivationStore(_write(t / "s" / "manifest.json", "{").parent),
     "manifest.json is not valid JSON"),
    ("store_of_another_format", lambda m, t: ActivationStore(_write(t / "s" / "manifest.json", '{"format": "x"}').parent),
     "is not a clt-lite activation store"),
    ("train_source_of_another_width", lambda m, t: train(_clt_config(m, d_model=32), TrainConfig(tokens=512, batch_size=256,
                                                         device="cpu"), _source(m), t / "o", progress=False),
     "activation source has 4 layers of width 64 but the CLT config expects 4 x 32"),
    ("train_source_of_another_site", lambda m, t: train(_clt_config(m, input_site="resid_mid"), TrainConfig(
        tokens=512, batch_size=256, device="cpu"), _source(m), t / "o", progress=False), "set the config's input_site"),
    ("train_pickle_for_optimizer_states", lambda m, t: train(_clt_config(m), TrainConfig(
        tokens=512, batch_size=256, checkpoint_every=1, device="cpu"), _source(m), _pickled_optimizer(m, t), progress=False),
     "holds objects other than tensors; refusing to load it (nothing is unpickled)"),
    ("plan_config_of_another_model", lambda m, t: plan.plan(plan.model_dims("llava-1.5-7b"), CLTConfig(4, 8)),
     "config is 4 x 8 but llava-1.5-7b is 32 x 4096"),
    ("data_spec_not_a_number", lambda m, t: datasets.parse_data_spec("shapes:abc"), "bad data spec 'shapes:abc'"),
]


@pytest.mark.parametrize("call, message", [c[1:] for c in API_CASES], ids=[f"bad_input_api_{c[0]}" for c in API_CASES])
def test_api(call, message, made, tmp_path):
    with pytest.raises(ValueError) as error:
        call(made, tmp_path)
    text = str(error.value)
    assert "\n" not in text and message in text, text


def test_the_docs_list_every_case():
    listed = (ROOT / "docs" / "bad_inputs.md").read_text()
    names = [c[0] for c in CLI_CASES + API_CASES]
    assert len(names) >= 40 and len(set(names)) == len(names)
    assert f"({len(names)} cases, all tested)" in (ROOT / "README.md").read_text()
    assert re.findall(r"^\| `(\w+)` \|", listed, flags=re.M) == names


def test_the_disk_check_runs_before_anything_is_written(made, tmp_path, monkeypatch):
    monkeypatch.setattr("clt_lite.checkpoints.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 0, 1000))
    with pytest.raises(ValueError, match="GB free but this run writes up to"):
        train(_clt_config(made), TrainConfig(tokens=512, batch_size=256, device="cpu"), _source(made), tmp_path / "o",
              progress=False)
    assert not (tmp_path / "o").exists()
    assert torch.equal(CrossLayerTranscoder.load(made / "clt").b_dec, CrossLayerTranscoder.load(made / "clt").b_dec)
