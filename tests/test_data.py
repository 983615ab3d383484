"""ShapesWorld: determinism, splits, well-posed questions, ground truth, user data errors."""

import json
import random

import numpy as np
import pytest
from PIL import Image

from clt_lite import data, datasets


def test_samples_are_deterministic_and_splits_differ():
    a, b = data.shapes_world(20, "train", seed=1), data.shapes_world(20, "train", seed=1)
    assert [s.question for s in a] == [s.question for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    test = data.shapes_world(20, "test", seed=1)
    assert sum(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, test)) == 0


def test_image_geometry_and_all_families_appear():
    samples = data.shapes_world(200, "val")
    assert {s.family for s in samples} == set(data.FAMILIES)
    assert all(s.image.size == (48, 48) and s.image.mode == "RGB" for s in samples)
    assert all(s.answer and s.target_cells for s in samples)


@pytest.mark.parametrize("family", data.FAMILIES)
def test_answers_agree_with_the_scene(family):
    for s in data.shapes_world(50, "train", family=family):
        kinds = [t.kind for t in s.shapes]
        if family == "colour":
            (target,) = [t for t in s.shapes if t.cell == s.target_cells[0]]
            assert kinds.count(target.kind) == 1 and s.answer == target.colour
        elif family == "count":
            assert s.answer == data.NUMBERS[len(s.shapes)]
        elif family in ("shape", "describe"):
            (target,) = [t for t in s.shapes if t.cell == s.target_cells[0]]
            assert data.POSITIONS[target.cell] in s.question
            assert s.answer == (target.kind if family == "shape" else f"{target.colour} {target.kind}")


def test_existence_negatives_are_hard():
    """A 'no' must not be answerable from colour presence and shape presence alone."""
    negatives = [s for s in data.shapes_world(300, "train", family="exists") if s.answer == "no"]
    assert len(negatives) > 100
    for s in negatives:
        colour, kind = s.question.removeprefix("Is there a ").removesuffix("?").split()
        assert (colour, kind) not in {(t.colour, t.kind) for t in s.shapes}
        assert colour in {t.colour for t in s.shapes} and kind in {t.kind for t in s.shapes}


def test_easy_negatives_miss_a_colour_or_a_shape():
    """The curriculum's easy 'no': the colour or the shape asked about is absent from the image."""
    rng = random.Random(0)
    for s in data.shapes_world(60, "train", family="exists"):
        easy = data.easy_negative(s, rng)
        colour, kind = easy.question.removeprefix("Is there a ").removesuffix("?").split()
        assert easy.answer == "no" and easy.image is s.image
        assert colour not in {t.colour for t in s.shapes} or kind not in {t.kind for t in s.shapes}


def test_ground_truth_cells_map_to_patches():
    world = data.WorldConfig()
    assert world.cell_patches(0) == [0, 1, 6, 7]
    assert world.cell_patches(8) == [28, 29, 34, 35]
    assert sorted(p for c in range(9) for p in world.cell_patches(c)) == list(range(36))


def test_chat_format_is_llava_1_5():
    s = data.shapes_world(1)[0]
    assert s.prompt == f"USER: <image>\n{s.question} ASSISTANT:"


def _write(path, lines):
    path.write_text("\n".join(json.dumps(line) if isinstance(line, dict) else line for line in lines))
    return path


def test_jsonl_loads_and_converts_modes(tmp_path):
    Image.new("L", (20, 10)).save(tmp_path / "gray.png")
    Image.new("RGBA", (10, 10), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    samples = datasets.load_jsonl(_write(tmp_path / "d.jsonl", [
        {"image": "gray.png", "prompt": "What is it?", "answer": "dark"},
        {"image": "clear.png", "prompt": "USER: <image>\nColour? ASSISTANT:", "answer": "white"},
    ]))
    assert [s.image.mode for s in samples] == ["RGB", "RGB"]
    assert samples[1].image.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white, not black
    assert data.sample_prompt(samples[0]) == "USER: <image>\nWhat is it? ASSISTANT:"
    assert data.sample_prompt(samples[1]) == samples[1].question


@pytest.mark.parametrize("line, message", [
    ('{"image": "x.png", "prompt": "p"}', "d.jsonl:2: missing field(s) answer"),
    ("not json", "d.jsonl:2: not valid JSON"),
    ('{"image": "missing.png", "prompt": "p", "answer": "a"}', "d.jsonl:2: image"),
    ('{"image": "broken.png", "prompt": "p", "answer": "a"}', "corrupt or not an image"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    path = _write(tmp_path / "d.jsonl", [{"image": "ok.png", "prompt": "p", "answer": "a"}, line])
    with pytest.raises(ValueError) as error:
        datasets.load_jsonl(path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_huge_images_are_refused(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(datasets, "MAX_IMAGE_PIXELS", 5000)
    with pytest.raises(ValueError, match="downscale it first"):
        datasets.load_image(tmp_path / "big.png")


def test_data_spec_parsing():
    assert len(datasets.parse_data_spec("shapes:3")) == 3
    with pytest.raises(ValueError, match="use shapes:N"):
        datasets.parse_data_spec("shapes:zero")


def test_bundled_photos_include_grace_hopper():
    photos = data.bundled_photos()
    assert "grace_hopper" in photos
    assert datasets.load_image(photos["grace_hopper"]).mode == "RGB"


def test_prompt_longer_than_context_is_refused(tiny):
    sample = data.shapes_world(1)[0]
    sample.question = "What color is the circle ? " * 60
    with pytest.raises(ValueError, match="longer than the model's context"):
        data.encode_batch(tiny.processor, [sample], with_answers=True, max_length=256)


def test_data_specs_are_lazy_so_a_huge_n_starts_at_once(tmp_path):
    """shapes:N renders a sample when it is read; jsonl:PATH parses a line when it is read (errors name the line)."""
    huge = datasets.parse_data_spec("shapes:1000000000", "train", seed=3)
    assert len(huge) == 10**9 and huge[7] == data.shapes_sample(7, "train", 3) and len(huge[2:5]) == 3
    lines = [{"image": "a.png", "prompt": "What?", "answer": "red"}, "broken"]
    data.shapes_world(1)[0].image.save(tmp_path / "a.png")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n")
    lazy = datasets.parse_data_spec(f"jsonl:{path}")
    assert len(lazy) == 2 and lazy[0].answer == "red"
    with pytest.raises(ValueError, match=r"d.jsonl:3: expected an object"):
        lazy[1]
