"""What `--data` names, read lazily: `shapes:N` (ShapesWorld samples rendered as they are read) and `jsonl:PATH`
(your own images and prompts, one JSON object per line, parsed as it is read). A huge N or file starts at once,
and `--tokens` bounds the work: a capture that stops early never renders or opens the rest.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from .data import Sample, WorldConfig, shapes_sample

MAX_IMAGE_PIXELS = 40_000_000  # refuse larger images: they are almost surely a mistake


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB; grayscale/RGBA/palette are converted, broken files refused."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image {path} does not exist; check the path in your dataset")
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ValueError(
                    f"image {path} is {image.width}x{image.height}, over {MAX_IMAGE_PIXELS:,} pixels; "
                    "downscale it first (LLaVA sees 336x336 anyway)"
                )
            image.load()
            if image.mode == "RGBA":  # composite on white so transparent areas don't turn black
                background = Image.new("RGB", image.size, (255, 255, 255))
                background.paste(image, mask=image.getchannel("A"))
                return background
            return image.convert("RGB")
    except Image.DecompressionBombError:  # PIL refuses to even open images this large (a decompression bomb?)
        raise ValueError(f"image {path} is over {2 * Image.MAX_IMAGE_PIXELS:,} pixels; downscale it first (LLaVA sees "
                         "336x336 anyway)") from None
    except (OSError, SyntaxError) as error:
        raise ValueError(f"image {path} is corrupt or not an image ({error}); replace or remove it") from None


class ShapesWorldSamples(Sequence):
    """n ShapesWorld samples of a split; sample i is rendered when read (data.shapes_sample is a pure function)."""

    def __init__(self, n: int, split: str = "train", seed: int = 0, world: WorldConfig = WorldConfig()):
        self.n, self.split, self.seed, self.world = n, split, seed, world

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.n))]
        if not -self.n <= index < self.n:
            raise IndexError(index)
        return shapes_sample(index % self.n, self.split, self.seed, self.world)


class JSONLSamples(Sequence):
    """The samples of a JSONL file, {"image": path, "prompt": text, "answer": text} per line (image paths relative to
    the file). Opening it only finds where the non-empty lines start; each line is parsed, checked and its image
    opened when read. "prompt" is the question; it is wrapped in the chat format unless it holds <image>. Errors
    name the file and line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"dataset {self.path} does not exist")
        self._starts, offset = [], 0  # (byte offset, line number) of each non-empty line
        with open(self.path, "rb") as lines:
            for lineno, line in enumerate(lines, start=1):
                if line.strip():
                    self._starts.append((offset, lineno))
                offset += len(line)
        if not self._starts:
            raise ValueError(f"dataset {self.path} has no samples")

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        start, lineno = self._starts[index]
        with open(self.path, "rb") as lines:
            lines.seek(start)
            line = lines.readline().decode()
        return _parse_line(self.path, lineno, line)


def _parse_line(path: Path, lineno: int, line: str) -> Sample:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{lineno}: expected an object with image, prompt, answer; got {type(record).__name__}")
    missing = [key for key in ("image", "prompt", "answer") if key not in record]
    if missing:
        raise ValueError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}; each line needs image, prompt, answer")
    wrong = [key for key in ("image", "prompt") if not isinstance(record[key], str) or not record[key]]
    if wrong or not isinstance(record["answer"], (str, int, float)):
        raise ValueError(f"{path}:{lineno}: {', '.join(wrong) or 'answer'} must be a non-empty string (image: a path "
                         "relative to the file)")
    try:
        image = load_image(path.parent / record["image"])
    except (FileNotFoundError, ValueError) as error:
        raise ValueError(f"{path}:{lineno}: {error}") from None
    return Sample(image, record["prompt"], str(record["answer"]), record.get("family", "jsonl"))


def load_jsonl(path: str | Path) -> list[Sample]:
    """Every sample of a JSONL file, read now (JSONLSamples reads them as they are needed)."""
    return list(JSONLSamples(path))


def parse_data_spec(spec: str, split: str = "train", seed: int = 0, world: WorldConfig = WorldConfig()) -> Sequence[Sample]:
    """'shapes:N' (rendered with `world`: pass the model's, `LoadedModel.world`) or 'jsonl:PATH' as used on the command
    line; both lazy sequences."""
    kind, _, value = spec.partition(":")
    if kind == "shapes" and value.isdigit() and int(value) > 0:
        return ShapesWorldSamples(int(value), split, seed, world)
    if kind == "jsonl" and value:
        return JSONLSamples(value)
    raise ValueError(f"bad data spec {spec!r}; use shapes:N (N > 0) or jsonl:PATH")
