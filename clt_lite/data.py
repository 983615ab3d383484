"""ShapesWorld, JSONL datasets and LLaVA-1.5 chat formatting.

ShapesWorld is a synthetic visual world where we know the answer *and where it is*:
every sample records which grid cell (and so which image patches) holds the object its
question is about. That ground truth is what later lets us check attribution graphs.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:  # for annotations only: the functions that use torch import it themselves
    import torch

SHAPES = ("circle", "square", "triangle")
COLOURS = {  # name -> RGB; far apart so light jitter never confuses them
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
}
NUMBERS = ("zero", "one", "two", "three")
POSITIONS = (  # cell index (row-major on a 3x3 grid) -> name used in questions
    "top left", "top middle", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom middle", "bottom right",
)
FAMILIES = ("colour", "shape", "count", "exists", "describe")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class WorldConfig:
    """Geometry of ShapesWorld images. The defaults are the toy's (48 px, 8 px patches: a 6x6 grid); for any
    other model take its own, `LoadedModel.world` (LLaVA-1.5-7B: 336 px, 14 px patches, 24x24)."""

    image_size: int = 48  # pixels per side
    grid: int = 3  # cells per side
    patch_size: int = 8  # vision-tower patch size, to map cells to patch indices
    max_objects: int = 3  # 1..max_objects shapes per image
    noise: float = 6.0  # std of per-pixel Gaussian noise (0-255 scale)

    def __post_init__(self) -> None:
        if self.image_size % self.grid or self.cell_size % self.patch_size:
            raise ValueError(f"a {self.image_size}px image in a {self.grid}x{self.grid} grid of {self.patch_size}px patches "
                             f"does not split into whole patches per cell; use an image size divisible by {self.grid * self.patch_size}")

    @property
    def cell_size(self) -> int:
        return self.image_size // self.grid

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    def cell_patches(self, cell: int) -> list[int]:
        """Row-major indices of the vision patches that cover a grid cell."""
        row, col = divmod(cell, self.grid)
        per_cell = self.cell_size // self.patch_size
        side = self.patches_per_side
        return [
            (row * per_cell + i) * side + col * per_cell + j
            for i in range(per_cell)
            for j in range(per_cell)
        ]

    def patch_cell(self, patch: int) -> int:
        """The grid cell a vision patch (row-major index) lies in: the inverse of cell_patches."""
        row, col = divmod(patch, self.patches_per_side)
        per_cell = self.cell_size // self.patch_size
        return row // per_cell * self.grid + col // per_cell


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    colour: str  # one of COLOURS
    cell: int  # row-major grid cell


@dataclass
class Sample:
    """One image + question + answer, with the ground truth of where the answer lives."""

    image: Image.Image | None  # None: a text-only prompt
    question: str
    answer: str
    family: str
    target_cells: list[int] = field(default_factory=list)  # cells holding the object(s) asked about
    shapes: list[Shape] = field(default_factory=list)

    @property
    def prompt(self) -> str:
        return chat_prompt(self.question)


def chat_prompt(question: str) -> str:
    """LLaVA-1.5's single-turn chat format; the model's answer follows 'ASSISTANT:'."""
    return f"USER: <image>\n{question} ASSISTANT:"


def draw_scene(shapes: list[Shape], rng: random.Random, world: WorldConfig) -> Image.Image:
    """Render shapes on a light noisy background, each jittered inside its cell."""
    size, cell = world.image_size, world.cell_size
    background = tuple(rng.randint(225, 250) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        row, col = divmod(shape.cell, world.grid)
        radius = rng.uniform(0.32, 0.42) * cell
        cx = col * cell + cell / 2 + rng.uniform(-1.5, 1.5)
        cy = row * cell + cell / 2 + rng.uniform(-1.5, 1.5)
        fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[shape.colour])
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if shape.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif shape.kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    if world.noise > 0:
        pixels = np.asarray(image, dtype=np.float32)
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0, world.noise, pixels.shape[:2])
        image = Image.fromarray(np.clip(pixels + noise[..., None], 0, 255).astype(np.uint8))
    return image


def _question(shapes: list[Shape], family: str, rng: random.Random) -> tuple[str, str, list[int]]:
    """Pick a well-posed question of the family: (question, answer, target cells)."""
    by_kind = {k: [s for s in shapes if s.kind == k] for k in SHAPES}
    if family == "colour":
        unique = [s for s in shapes if len(by_kind[s.kind]) == 1]
        if not unique:
            raise ValueError("no shape appears exactly once")
        s = rng.choice(unique)
        return f"What color is the {s.kind}?", s.colour, [s.cell]
    if family == "shape":
        s = rng.choice(shapes)
        return f"What shape is in the {POSITIONS[s.cell]}?", s.kind, [s.cell]
    if family == "describe":
        s = rng.choice(shapes)
        return f"Describe the object in the {POSITIONS[s.cell]}.", f"{s.colour} {s.kind}", [s.cell]
    if family == "count":
        return "How many shapes are there?", NUMBERS[len(shapes)], [s.cell for s in shapes]
    if family == "exists":
        if rng.random() < 0.5:
            s = rng.choice(shapes)
            return f"Is there a {s.colour} {s.kind}?", "yes", [s.cell]
        # Hard negative: colour and shape both present, never together. With uniformly
        # random negatives, "colour present and shape present" alone scores about 95%.
        colour, kind = rng.choice(_binding_negatives(shapes))
        cells = [s.cell for s in shapes if s.colour == colour or s.kind == kind]
        return f"Is there a {colour} {kind}?", "no", cells
    raise ValueError(f"unknown question family {family!r}; choose from {', '.join(FAMILIES)}")


def _binding_negatives(shapes: list[Shape]) -> list[tuple[str, str]]:
    """(colour, shape) pairs whose colour and shape are both present, but never together."""
    present = {(s.colour, s.kind) for s in shapes}
    return sorted((s.colour, t.kind) for s in shapes for t in shapes if (s.colour, t.kind) not in present)


def easy_negative(sample: Sample, rng: random.Random) -> Sample:
    """The same image asked "Is there a <colour> <shape>?" where the colour or the shape is absent ("no").

    A training curriculum aid for the toy, never used in evaluation: answering these only needs
    "is this colour here, is this shape here", a stepping stone to the binding the hard negatives test.
    """
    colours, kinds = {s.colour for s in sample.shapes}, {s.kind for s in sample.shapes}
    colour, kind = rng.choice([(c, k) for c in COLOURS for k in SHAPES if c not in colours or k not in kinds])
    cells = [s.cell for s in sample.shapes if s.colour == colour or s.kind == kind]
    return replace(sample, question=f"Is there a {colour} {kind}?", answer="no", target_cells=cells)


def _well_posed(shapes: list[Shape], family: str) -> bool:
    if family == "colour":  # the asked-about shape must be unique
        return any(sum(t.kind == s.kind for t in shapes) == 1 for s in shapes)
    if family == "exists":  # scenes where only colour-shape binding can answer a 'no'
        return bool(_binding_negatives(shapes))
    return True


def make_sample(rng: random.Random, world: WorldConfig = WorldConfig(), family: str | None = None) -> Sample:
    """Draw a random scene and a question about it (family random unless given)."""
    family = family or rng.choice(FAMILIES)
    while True:
        n = rng.randint(1, world.max_objects)
        cells = rng.sample(range(world.grid * world.grid), n)
        shapes = [Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), c) for c in cells]
        if _well_posed(shapes, family):
            break
    question, answer, target = _question(shapes, family, rng)
    return Sample(draw_scene(shapes, rng, world), question, answer, family, target, shapes)


def shapes_world(
    n: int, split: str = "train", seed: int = 0, world: WorldConfig = WorldConfig(), family: str | None = None
) -> list[Sample]:
    """n deterministic samples; splits draw from disjoint seed streams."""
    return list(iter_shapes_world(n, split, seed, world, family))


def iter_shapes_world(
    n: int | None, split: str = "train", seed: int = 0, world: WorldConfig = WorldConfig(), family: str | None = None
) -> Iterator[Sample]:
    """Like shapes_world but lazy; n=None streams forever (fresh samples for training)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    i = 0
    while n is None or i < n:
        yield shapes_sample(i, split, seed, world, family)
        i += 1


def shapes_sample(index: int, split: str = "train", seed: int = 0, world: WorldConfig = WorldConfig(),
                  family: str | None = None) -> Sample:
    """Sample `index` of a split's stream, rebuilt on its own (a pure function of its arguments)."""
    # A string seed is hashed with SHA-512 by `random`, so streams are stable across runs and machines.
    return make_sample(random.Random(f"shapesworld:{split}:{seed}:{index}"), world, family)


DISTRACTOR_SHARES = ("answer", "colour", "shape", "any")  # what a distractor shares with the object asked about


def adjacent_cells(cell: int, grid: int = 3) -> list[int]:
    """The cells sharing an edge with `cell` on a grid x grid board (row-major)."""
    row, col = divmod(cell, grid)
    return [r * grid + c for r, c in ((row - 1, col), (row, col - 1), (row, col + 1), (row + 1, col))
            if 0 <= r < grid and 0 <= c < grid]


def distractors(sample: Sample, share: str = "answer") -> list[Shape]:
    """The other objects of a one-object question's scene that share an attribute with the object asked about.

    share: "colour" its colour, "shape" its shape, "any" either, "answer" what the answer names (the colour for
    colour questions, the shape for shape questions, either for describe: "red circle" names both).
    """
    if share not in DISTRACTOR_SHARES:
        raise ValueError(f"unknown distractor kind {share!r}; choose from {', '.join(DISTRACTOR_SHARES)}")
    if len(sample.target_cells) != 1:
        raise ValueError(f"a {sample.family!r} question about {len(sample.target_cells)} cells has no single object to distract from")
    if share == "answer":
        share = {"colour": "colour", "shape": "shape", "describe": "any"}.get(sample.family, "")
        if not share:
            raise ValueError(f"a {sample.family!r} answer names no colour or shape; pass share='colour', 'shape' or 'any'")
    (target,) = [s for s in sample.shapes if s.cell == sample.target_cells[0]]
    same_colour, same_shape = share in ("colour", "any"), share in ("shape", "any")
    return [s for s in sample.shapes if s is not target
            and ((same_colour and s.colour == target.colour) or (same_shape and s.kind == target.kind))]


def sample_prompt(sample: Sample) -> str:
    """The chat prompt of a sample (user prompts that already hold <image> are kept as is; a chat prompt without
    <image> is refused rather than wrapped in the chat format a second time). A sample without an image gets
    LLaVA's text-only form, `USER: question ASSISTANT:` (a question already in the chat format is kept)."""
    if sample.image is None:
        return sample.question if "ASSISTANT:" in sample.question else f"USER: {sample.question} ASSISTANT:"
    if "<image>" in sample.question:
        return sample.question
    if "ASSISTANT:" in sample.question:
        raise ValueError(f"prompt {sample.question[:60]!r} is in the chat format but has no <image>; put <image> where the "
                         "image goes, or give only the question")
    return chat_prompt(sample.question)


def bundled_photos() -> dict[str, Path]:
    """Real photos that installed packages ship (no download): name -> path."""
    photos = {}
    try:
        import matplotlib.cbook as cbook

        photos["grace_hopper"] = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    except Exception:  # matplotlib without sample data: just report fewer photos
        pass
    for module, names in (("sklearn.datasets", ("china.jpg", "flower.jpg")), ("skimage", ("astronaut.png", "chelsea.png", "coffee.png"))):
        try:
            package = __import__(module, fromlist=["__file__"])
        except ImportError:
            continue
        for found in Path(package.__file__).parent.rglob("*"):
            if found.name in names:
                photos[found.stem] = found
    return {name: path for name, path in sorted(photos.items()) if path.exists()}


def vocabulary() -> list[str]:
    """Every word ShapesWorld prompts and answers use (for the toy's word-level tokenizer)."""
    words = {"USER", "ASSISTANT", ":", "?", ".", "What", "color", "is", "the", "shape", "in",
             "Describe", "object", "How", "many", "shapes", "are", "there", "Is", "a"}
    words |= set(SHAPES) | set(COLOURS) | set(NUMBERS) | {"yes", "no"}
    for name in POSITIONS:
        words |= set(name.split())
    return sorted(words)



# ---------------------------------------------------------------- batches for the model


@dataclass
class EncodedBatch:
    """Token ids, pixels and position masks for one batch (right-padded)."""

    input_ids: torch.Tensor  # [batch, seq] token ids, image token repeated once per patch
    attention_mask: torch.Tensor  # [batch, seq] 1 for real tokens, 0 for padding
    pixel_values: torch.Tensor | None  # [batch, 3, H, W] normalised pixels
    answer_mask: torch.Tensor  # [batch, seq] bool: answer tokens incl. EOS (empty without answers)

    def answers_correct(self, logits: torch.Tensor) -> torch.Tensor:
        """[batch] bool: the argmax at every answer position (EOS included) is the reference token.

        Equals greedy exact match without running generate(): greedy decoding reproduces the
        answer iff each of its tokens is the argmax given the correct ones before it.
        """
        predicted = logits[:, :-1].argmax(-1).cpu()  # the prediction for token t sits at position t-1
        return ((predicted == self.input_ids[:, 1:]) | ~self.answer_mask[:, 1:]).all(dim=1)

    def model_inputs(self, model) -> dict:
        """Keyword arguments for model(...), on the model's device and dtype."""
        parameter = next(model.parameters())
        inputs = {"input_ids": self.input_ids.to(parameter.device), "attention_mask": self.attention_mask.to(parameter.device)}
        if self.pixel_values is not None:
            inputs["pixel_values"] = self.pixel_values.to(parameter.device, parameter.dtype)
        return inputs


def check_image_tokens(prompts: list[str], images: list | None) -> None:
    """Refuse prompt/image mismatches before the model gives a cryptic shape error."""
    for i, prompt in enumerate(prompts):
        count = prompt.count("<image>")
        has_image = images is not None and images[i] is not None
        if has_image and count != 1:
            raise ValueError(f"prompt {i} has {count} <image> tokens but one image was given; put exactly one <image> in it, "
                             "e.g. 'USER: <image>\\nWhat is this? ASSISTANT:'")
        if not has_image and count:
            raise ValueError(f"prompt {i} contains <image> but no image was given; pass an image or remove the token")


def encode_batch(processor, samples: list[Sample], with_answers: bool = False, max_length: int | None = None) -> EncodedBatch:
    """Tokenise prompts (plus ' answer</s>' when with_answers) and preprocess images.

    max_length: the model's context; default the tokenizer's model_max_length.
    """
    import torch

    prompts = [sample_prompt(s) for s in samples]
    images = [s.image for s in samples]
    check_image_tokens(prompts, images)
    with_image = [image is not None for image in images]
    if any(with_image) and not all(with_image):
        raise ValueError("a batch mixes samples with and without images; encode them in separate batches")
    encoded = processor(images=images if all(with_image) else None, text=prompts, return_tensors="pt", padding=True)
    tokenizer = processor.tokenizer
    rows, answer_rows = [], []
    for ids, mask, sample in zip(encoded["input_ids"], encoded["attention_mask"], samples):
        prompt_ids = ids[mask.bool()].tolist()
        answer_ids = []
        if with_answers and sample.answer:
            answer_ids = tokenizer(" " + sample.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt_ids + answer_ids)
        answer_rows.append([False] * len(prompt_ids) + [True] * len(answer_ids))
    width = max(map(len, rows))
    limit = max_length or tokenizer.model_max_length
    if width > limit:
        raise ValueError(f"a prompt is {width} tokens, longer than the model's context of {limit}; shorten it")
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    answer_mask = torch.tensor([a + [False] * (width - len(a)) for a in answer_rows])
    return EncodedBatch(input_ids, attention, encoded.get("pixel_values"), answer_mask)


def token_summary(tokens: list[str], skip: tuple[str, ...] = ("<pad>",)) -> str:
    """Tokens joined by spaces, runs of a repeated token shown once as 'token×n'."""
    parts: list[str] = []
    previous, run = None, 0
    for token in [t for t in tokens if t not in skip] + [None]:
        if token == previous:
            run += 1
            continue
        if previous is not None:
            parts.append(previous if run == 1 else f"{previous}×{run}")
        previous, run = token, 1
    return " ".join(parts)
