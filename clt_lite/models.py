"""Load LLaVA models: a local folder, a hub id, the shipped toy, or `random:<preset>`."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import NamedTuple

import torch

from .data import WorldConfig, check_image_tokens, sample_prompt
from .devices import resolve_device, resolve_dtype  # also models.resolve_* for notebooks (00 uses them)
from .toy import SHIPPED, build_processor

TOY_NAME = "tiny-llava-shapes-32"  # the course default: LLaVA-1.5-7B's 32 decoder layers
RANDOM_PRESETS = ("llava-1.5-7b", "tiny")


class LoadedModel(NamedTuple):
    """A model ready for hooking, with what is needed to feed it."""

    model: torch.nn.Module  # LlavaForConditionalGeneration in eval mode
    processor: object  # LlavaProcessor (tokenizer + image processor)
    name: str  # what was asked for: a folder, hub id, toy name or random:<preset>

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @torch.no_grad()
    def fingerprint(self) -> str:
        """16 hex digits identifying the weights (not the name): caches keyed on it go stale when the model changes.

        Hashes each parameter's name, shape and sum and sum of squares in float64: one pass over the
        weights on their device, milliseconds for the toy, well under a second for LLaVA-7B on a GPU.
        """
        digest = hashlib.sha256()
        for name, param in self.model.named_parameters():
            values = param.detach().double()
            digest.update(f"{name}{tuple(param.shape)}{values.sum().item():.10e}{values.square().sum().item():.10e}".encode())
        return digest.hexdigest()[:16]

    @property
    def n_layers(self) -> int:
        return self.model.config.text_config.num_hidden_layers

    @property
    def d_model(self) -> int:
        return self.model.config.text_config.hidden_size

    @property
    def world(self):
        """ShapesWorld geometry at the vision tower's resolution and patch size, so rendered images need no
        resizing and a grid cell maps to the right patches (6x6 patches on the toy, 24x24 on LLaVA-1.5-7B)."""

        vision = self.model.config.vision_config
        return WorldConfig(image_size=vision.image_size, patch_size=vision.patch_size)

    @property
    def is_random(self) -> bool:
        """Random weights (a `random:` preset): shapes are real, answers and quality numbers mean nothing."""
        return self.name.startswith("random:")


RANDOM_OVERRIDES = {"layers": "num_hidden_layers of the language model", "vision_layers": "num_hidden_layers of the CLIP tower"}


def parse_random(name: str) -> tuple[str, dict[str, int]]:
    """'random:<preset>[@key=N[,key=N]]' -> (preset, overrides); keys in RANDOM_OVERRIDES.

    `random:llava-1.5-7b@layers=2` is LLaVA-1.5-7B at full width with 2 decoder layers: real
    shapes, small enough for a CPU. Errors are one line and name what to change.
    """
    spec = name.removeprefix("random:")
    preset, _, tail = spec.partition("@")
    if preset not in RANDOM_PRESETS:
        raise ValueError(f"unknown random preset {preset!r}; choose from {', '.join(RANDOM_PRESETS)}")
    overrides: dict[str, int] = {}
    for item in tail.split(",") if tail else []:
        key, _, value = item.partition("=")
        if key not in RANDOM_OVERRIDES:
            raise ValueError(f"unknown override {key!r} in {name!r}; use {', '.join(RANDOM_OVERRIDES)}, e.g. random:{preset}@layers=2")
        if not value.isdigit():
            raise ValueError(f"override {key}={value!r} in {name!r} is not a whole number; e.g. random:{preset}@{key}=2")
        overrides[key] = int(value)
    return preset, overrides


def random_config(name: str):
    """Config of a named architecture for random-weight dry runs (no download): 'llava-1.5-7b', 'tiny',
    optionally with depth overrides ('llava-1.5-7b@layers=2,vision_layers=2'); every other size is the preset's."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    preset, overrides = parse_random(name)
    if preset == "llava-1.5-7b":  # llava-hf/llava-1.5-7b-hf's config.json
        text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                           bos_token_id=1, eos_token_id=2, pad_token_id=32001)
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                  image_size=336, patch_size=14, projection_dim=768)
        image_token = 32000
    else:  # "tiny": the toy's geometry (48 px images, 8 px patches) and token layout
        text = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=48, patch_size=8, projection_dim=32)
        image_token = 4
    for key, config in (("layers", text), ("vision_layers", vision)):
        depth = overrides.get(key, config.num_hidden_layers)
        if not 1 <= depth <= config.num_hidden_layers:
            raise ValueError(f"{key}={depth} in {name!r} is out of range: {preset} has {config.num_hidden_layers}; use 1..{config.num_hidden_layers}")
        config.num_hidden_layers = depth
    image_seq = (vision.image_size // vision.patch_size) ** 2
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token, image_seq_length=image_seq,
                       projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-2)


def model_config(name: str):
    """The LlavaConfig of the toy name, a random:<preset> or a local folder, without loading any weights."""
    from transformers import LlavaConfig

    if name.startswith("random:"):
        return random_config(name)
    return LlavaConfig.from_pretrained(resolve_source(name), local_files_only=True)


def parameter_count(config) -> int:
    """Parameters of a whole LLaVA model (vision tower, projector, language model), built on the meta device."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration._from_config(config)
    return sum(p.numel() for p in model.parameters())


def random_processor(config):
    """A LlavaProcessor for `config`: the toy's word-level tokenizer with the model's special-token ids,
    a CLIP image processor at the tower's resolution, LLaVA-1.5's chat template.

    The real SentencePiece vocabulary cannot be downloaded here; token ids of a random
    model mean nothing anyway. Shapes (image tokens, sequence lengths, vocabulary size) are the real ones.
    """

    vision, text = config.vision_config, config.text_config
    special_ids = {"<unk>": 0, "<s>": text.bos_token_id or 1, "</s>": text.eos_token_id or 2,
                   "<image>": config.image_token_index, "<pad>": text.pad_token_id if text.pad_token_id is not None else 3}
    return build_processor(WorldConfig(image_size=vision.image_size, patch_size=vision.patch_size), special_ids=special_ids,
                           vocab_size=text.vocab_size, model_max_length=text.max_position_embeddings)


def load(name: str = TOY_NAME, device: str = "auto", dtype: str | torch.dtype = "auto", seed: int = 0) -> LoadedModel:
    """Load model + processor from the toy name, a local folder, a hub id or random:<preset>."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    hf_logging.disable_progress_bar()  # its bars would land in notebook outputs
    if name.startswith("random:"):
        config = random_config(name)
        torch.manual_seed(seed)
        with torch.device(torch_device):
            model = LlavaForConditionalGeneration._from_config(config, dtype=torch_dtype)
        processor = random_processor(config)
    else:
        source = resolve_source(name)
        try:  # a local copy first: offline, the hub client would retry for minutes
            processor = AutoProcessor.from_pretrained(source, local_files_only=True)
            model = LlavaForConditionalGeneration.from_pretrained(source, dtype=torch_dtype, local_files_only=True)
        except OSError as error:
            if Path(source).is_dir():  # a local folder: the hub has nothing to do with it
                folder = Path(source)
                missing = [what for what, found in (
                    ("model weights (model*.safetensors)", any(folder.glob("model*.safetensors"))),
                    ("the processor's files (processor_config.json, tokenizer)", any(folder.glob("*processor_config.json"))),
                ) if not found] or [str(error).splitlines()[0]]
                raise OSError(f"cannot load the model folder {source}: missing {' and '.join(missing)}; save the model and "
                              "its processor there with save_pretrained") from None
            if not _hub_reachable():
                raise OSError(
                    f"cannot load {name!r}: no local copy and the model hub is unreachable; download it where there is "
                    f"internet (`hf download {name} --local-dir DIR`) and pass --model DIR"
                ) from None
            processor = AutoProcessor.from_pretrained(source)
            model = LlavaForConditionalGeneration.from_pretrained(source, dtype=torch_dtype)
        model = model.to(torch_device)
    return LoadedModel(model.eval(), processor, name)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Can we open a connection to the model hub (honours HF_HUB_OFFLINE and HF_ENDPOINT)?"""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_source(name: str) -> str:
    """A folder path for local models; hub ids pass through unchanged."""

    if name in SHIPPED:
        folder, options = SHIPPED[name]
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"the toy model is missing from {folder}; rebuild it with `python -m clt_lite toy train --out {folder}{options}`")
        return str(folder)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: point --model at a folder saved by save_pretrained")
        return str(path)
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") != 1
    if looks_like_path:
        raise FileNotFoundError(f"model folder {name!r} does not exist; give an existing folder, a hub id (org/name), "
                                f"{' or '.join(SHIPPED)} or random:<preset>")
    return name


@torch.no_grad()
def generate_answers(loaded: LoadedModel, samples: list, max_new_tokens: int = 8, batch_size: int = 32) -> list[str]:
    """Greedy answers of the model to samples' prompts (left-padded batches)."""

    model, processor = loaded.model, loaded.processor
    device = next(model.parameters()).device
    answers = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        prompts = [sample_prompt(s) for s in chunk]
        check_image_tokens(prompts, [s.image for s in chunk])
        inputs = processor(images=[s.image for s in chunk], text=prompts, return_tensors="pt", padding=True, padding_side="left")
        inputs = {k: (v.to(device, model.dtype) if k == "pixel_values" else v.to(device)) for k, v in inputs.items()}
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        answers += [text.strip() for text in processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


def describe(loaded: LoadedModel) -> str:
    """LLaVA's anatomy in a few lines: vision tower -> projector -> language model."""
    config, model = loaded.model.config, loaded.model
    vision, text = config.vision_config, config.text_config

    def millions(module) -> str:
        return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f}M params"

    side = vision.image_size // vision.patch_size
    random_note = ["weights        : random (a dry run at real sizes: shapes, counts and identities are real; answers and "
                   "quality numbers mean nothing)"] if loaded.is_random else []
    return "\n".join([
        f"vision tower   : CLIP, {vision.num_hidden_layers} layers x width {vision.hidden_size}, "
        f"{vision.image_size}px images in {vision.patch_size}px patches -> {side}x{side} = {side * side} patch tokens "
        f"({millions(model.model.vision_tower)})",
        f"projector      : {vision.hidden_size} -> {text.hidden_size} -> {text.hidden_size}, GELU ({millions(model.model.multi_modal_projector)})",
        f"language model : Llama, {text.num_hidden_layers} decoder layers x width {text.hidden_size}, MLP width "
        f"{text.intermediate_size}, vocabulary {text.vocab_size} ({millions(model.model.language_model)})",
    ] + random_note)
