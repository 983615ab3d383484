"""Build, train and evaluate the toy VLM `tiny-llava-shapes` on ShapesWorld.

The toy is a real `LlavaForConditionalGeneration` (CLIP tower -> two-layer GELU projector
-> Llama language model) at toy width, saved as an ordinary Hugging Face folder, so the
rest of the course loads it by the same `from_pretrained` path as LLaVA-1.5-7B.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from . import data
from .devices import resolve_device
from .files import latest_version, write_json, write_version
from .progress import progress_bar
from .tensor_files import load_torch_tensors

ASSET_DIR = Path(__file__).parent / "assets" / "tiny-llava-shapes"  # the course's toy: 16 layers
SHIPPED = {  # toy name -> (folder, `toy train` options that rebuild it)
    "tiny-llava-shapes": (ASSET_DIR, ""),
    "tiny-llava-shapes-32": (ASSET_DIR.with_name("tiny-llava-shapes-32"), " --layers 32 --grow-from 16"),
}
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")  # ids 0..4, in this order
CHAT_TEMPLATE = (  # LLaVA-1.5's "USER: <image>\n... ASSISTANT:" for single image+text turns
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass
class ToyConfig:
    """Architecture and training recipe of the toy (defaults = the shipped model)."""

    n_layers: int = 16  # decoder layers of the language model
    d_model: int = 128  # language-model width
    n_heads: int = 4  # attention heads in the language model
    rope_theta: float = 1e6  # RoPE base; at head width 32 the default 1e4 leaves few position-free dimensions
    # for matching a question's words to image patches 8-43 tokens back (4-layer existence-only probe, 1000 steps:
    # 0.61 at 1e4, 0.84 at 1e6)
    d_mlp: int = 384  # language-model MLP width
    vision_width: int = 96  # CLIP tower width
    vision_layers: int = 3  # CLIP tower depth
    steps: int = 7000  # optimisation steps (fresh samples each step)
    batch_size: int = 32  # samples per step
    lr: float = 5e-4  # peak AdamW learning rate
    warmup: int = 200  # linear warm-up steps, then cosine decay to 10%
    residual_init_scale: bool = True  # scale o_proj/down_proj init by 1/sqrt(2L): helps deep stacks
    cell_aux_weight: float = 1.0  # weight of an auxiliary loss: each projected patch predicts its cell's (shape, colour)
    attention_aux_weight: float = 1.0  # weight of an auxiliary loss: head 0 of the middle decoder layer, at the last
    # prompt token, attends to the patches of the object asked about (to <s> for an existence "no"), a direct signal
    # for the lookup every question but "count" needs (4-layer probe: colour/shape/describe 0.99-1.00 by step 1250)
    exists_weight: float = 2.0  # sampling weight of the existence family in the training stream (the others 1)
    easy_negatives_until: float = 0.0  # curriculum: existence "no" questions start as easy negatives (colour or shape
    # absent) and are replaced by the hard, binding-only ones linearly until this fraction of the steps; 0 = hard only
    grow_from: int = 0  # 0: train all n_layers from the start. N (dividing n_layers): train an N-layer toy first (this
    # recipe, in out/base), split each of its layers into n_layers/N copies (`deepen`), then train on. From scratch, 32
    # layers stayed at chance on existence for 5000 steps in one of two runs; the 16-layer recipe passed in 3000
    grow_steps: int = 2000  # steps after deepening, all of them: stopped at the first pass (500 steps), the 32-layer toy
    # was at 0.96 on validation but 0.91 on the test split for existence
    seed: int = 0  # model init and sample stream
    eval_every: int = 500  # steps between held-out evaluations and checkpoints
    eval_per_family: int = 100  # validation questions per family at each evaluation
    target_accuracy: float = 0.96  # stop early once every family reaches this on validation

    def __post_init__(self) -> None:
        positive = ("n_layers", "d_model", "n_heads", "d_mlp", "vision_width", "vision_layers", "steps", "batch_size",
                    "eval_every", "eval_per_family")
        bad = [f"{name}={getattr(self, name)}" for name in positive if getattr(self, name) < 1]
        if bad:
            raise ValueError(f"ToyConfig needs positive sizes and counts; got {', '.join(bad)}")
        if self.grow_from and (self.grow_from < 0 or self.grow_from >= self.n_layers or self.n_layers % self.grow_from):
            raise ValueError(f"grow_from={self.grow_from} must be 0 or a proper divisor of n_layers={self.n_layers}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be a multiple of n_heads={self.n_heads}")


def build_processor(world: data.WorldConfig = data.WorldConfig(), special_ids: dict[str, int] | None = None,
                    vocab_size: int | None = None, model_max_length: int = 256):
    """Word-level tokenizer (ShapesWorld vocabulary), CLIP image processor, LlavaProcessor.

    special_ids places the special tokens at another model's ids (default: SPECIAL_TOKENS at 0..4);
    vocab_size fills the vocabulary up to that size with placeholder tokens, so every id a model of
    that vocabulary can emit decodes (`random:llava-1.5-7b`: <image> 32000, <pad> 32001, 32064 ids).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlavaProcessor, PreTrainedTokenizerFast
    from transformers.models.clip import CLIPImageProcessorPil

    vocab = dict(special_ids or {token: i for i, token in enumerate(SPECIAL_TOKENS)})
    taken = set(vocab.values())  # a set: the 7B vocabulary's 32,000 placeholders made a scan of the values quadratic
    free = (i for i in range(10**9) if i not in taken)
    for word in data.vocabulary():
        vocab.setdefault(word, next(free))
    for i in range(len(vocab), vocab_size or 0):
        vocab[f"<unused{i}>"] = next(free)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left", model_max_length=model_max_length,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": world.image_size}, crop_size={"height": world.image_size, "width": world.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=world.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )


def build_model(config: ToyConfig, processor, world: data.WorldConfig = data.WorldConfig()):
    """A randomly initialised LLaVA at toy size."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = processor.tokenizer
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.d_model, intermediate_size=config.d_mlp,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads, num_key_value_heads=config.n_heads,
        max_position_embeddings=256, rope_theta=config.rope_theta, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=config.vision_width, intermediate_size=4 * config.vision_width, num_hidden_layers=config.vision_layers,
        num_attention_heads=4, image_size=world.image_size, patch_size=world.patch_size,
        projection_dim=config.vision_width,
    )
    llava = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=world.patches_per_side**2, projector_hidden_act="gelu",
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )
    torch.manual_seed(config.seed)
    model = LlavaForConditionalGeneration(llava)
    if config.residual_init_scale:
        with torch.no_grad():
            for layer in model.model.language_model.layers:
                layer.self_attn.o_proj.weight.mul_(1 / math.sqrt(2 * config.n_layers))
                layer.mlp.down_proj.weight.mul_(1 / math.sqrt(2 * config.n_layers))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


@torch.no_grad()
def evaluate(model, processor, samples: list[data.Sample], batch_size: int = 64) -> dict[str, float]:
    """Exact-match accuracy per question family (and 'all').

    One teacher-forced forward pass per batch (EncodedBatch.answers_correct).
    """
    model.eval()
    hits: dict[str, list[bool]] = {}
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        batch = data.encode_batch(processor, chunk, with_answers=True)
        correct = batch.answers_correct(model(**batch.model_inputs(model)).logits)
        for sample, ok in zip(chunk, correct.tolist()):
            hits.setdefault(sample.family, []).append(ok)
    result = {family: sum(v) / len(v) for family, v in sorted(hits.items())}
    result["all"] = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    return result


def eval_set(n_per_family: int, split: str = "test", seed: int = 0) -> list[data.Sample]:
    """A fixed held-out set with n questions of every family."""
    return [s for family in data.FAMILIES for s in data.shapes_world(n_per_family, split, seed, family=family)]


def _learning_rate(config: ToyConfig, step: int, steps: int) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, steps - config.warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(config: ToyConfig, out: str | Path, device: str = "auto", progress: bool = True) -> dict:
    """Train the toy from scratch (or resume from `out/checkpoint`), save it to `out`.

    Resumable: sample i of the training stream is a pure function of (seed, i), so a
    resumed run sees exactly the samples it would have seen. A finished run (its
    training.json written for this config) returns at once.
    With `grow_from`, a `grow_from`-layer toy is trained first (in out/base, same rules),
    deepened (`deepen`) and trained on for `grow_steps`, continuing the sample stream.
    Returns the final step and the learning curve.
    """
    from safetensors.torch import load_file, save_file

    out = Path(out)
    if (finished := out / "training.json").is_file() and (record := json.loads(finished.read_text()))["config"] == asdict(config):
        return {"steps": record["curve"][-1]["step"], "curve": record["curve"]}
    first_step, end_step, curve = 0, config.steps, []
    if config.grow_from:
        base_config = replace(config, n_layers=config.grow_from, grow_from=0)
        base = train(base_config, out / "base", device, progress)
        first_step, curve = base["steps"], base["curve"]
        end_step = first_step + config.grow_steps
    device = resolve_device(device)
    processor = build_processor()
    model = build_model(config, processor).to(device)
    # The auxiliary head is a training aid only: it is checkpointed but not part of the saved LLaVA.
    cell_head = torch.nn.Linear(config.d_model, 1 + len(data.SHAPES) * len(data.COLOURS)).to(device)
    parameters = list(model.parameters()) + list(cell_head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, betas=(0.9, 0.95), weight_decay=0.01)
    checkpoints = out / "checkpoint"
    step = first_step
    if checkpoint := latest_version(checkpoints):
        state = json.loads((checkpoint / "state.json").read_text())
        if state["config"] != asdict(config):
            raise ValueError(f"{checkpoint} was made with another ToyConfig; use a new --out or delete it")
        model.load_state_dict(load_file(checkpoint / "model.safetensors", device=str(device)))
        cell_head.load_state_dict(load_file(checkpoint / "cell_head.safetensors", device=str(device)))
        optimizer.load_state_dict(load_torch_tensors(checkpoint / "optimizer.pt", map_location=device))
        step, curve = state["step"], state["curve"]
    elif config.grow_from:  # the deepened base is where this run starts
        base_checkpoint = latest_version(out / "base" / "checkpoint")
        base_model = build_model(base_config, processor)
        base_model.load_state_dict(load_file(base_checkpoint / "model.safetensors"))
        deepen(base_model, config.n_layers // config.grow_from)
        model.load_state_dict(base_model.state_dict())
        cell_head.load_state_dict(load_file(base_checkpoint / "cell_head.safetensors", device=str(device)))
    validation = eval_set(config.eval_per_family, "val", config.seed)
    original_attention = model.config._attn_implementation
    if config.attention_aux_weight:
        model.set_attn_implementation("eager")  # the auxiliary loss needs the attention probabilities
    # A grown run keeps supervising the middle layer, the first copy of the base's supervised layer.
    supervised_layer = model.model.language_model.layers[supervised_heads(config.n_layers)[0][0]].self_attn
    bar = progress_bar(total=end_step, initial=step, desc=f"toy ({config.n_layers} layers)", disable=not progress)
    start_time = time.time() - 60 * (curve[-1]["minutes"] if curve else 0)
    while step < end_step:
        model.train()
        first = step * config.batch_size
        samples = _curriculum([training_sample(i, config) for i in range(first, first + config.batch_size)], config, step)
        batch = data.encode_batch(processor, samples, with_answers=True)
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(config, step - first_step, end_step - first_step)
        with _outputs_of(model.model.multi_modal_projector) as patches, \
                _outputs_of(supervised_layer, pick=lambda output: output[1]) as attention:
            logits = model(**batch.model_inputs(model)).logits[:, :-1]
        labels = batch.input_ids[:, 1:].masked_fill(~batch.answer_mask[:, 1:], -100).to(device)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        if config.cell_aux_weight:
            aux = torch.nn.functional.cross_entropy(cell_head(patches[0]).flatten(0, 1), cell_labels(samples).flatten().to(device))
            loss = loss + config.cell_aux_weight * aux
        if config.attention_aux_weight:
            loss = loss + config.attention_aux_weight * attention_aux_loss(attention[0], samples, batch, processor)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if (step - first_step) % config.eval_every == 0 or step == end_step:
            accuracy = evaluate(model, processor, validation)
            curve.append({"step": step, "loss": round(loss.item(), 4), "minutes": round((time.time() - start_time) / 60, 2),
                          **accuracy, "layers": config.n_layers})
            bar.write(json.dumps(curve[-1]))
            _save_checkpoint(model, cell_head, optimizer, checkpoints, {"step": step, "config": asdict(config), "curve": curve}, save_file)
            if not config.grow_from and min(v for k, v in accuracy.items() if k != "all") >= config.target_accuracy:
                break
    bar.close()
    model.set_attn_implementation(original_attention)
    save_toy(model, processor, out, config, curve)
    return {"steps": step, "curve": curve}


def training_sample(index: int, config: ToyConfig) -> data.Sample:
    """Sample `index` of the training stream: a family drawn with `exists_weight`, then a ShapesWorld sample.

    A pure function of (seed, index), so a resumed run sees exactly the samples it would have seen.
    """
    weights = [config.exists_weight if family == "exists" else 1.0 for family in data.FAMILIES]
    family = random.Random(f"toy-family:{config.seed}:{index}").choices(data.FAMILIES, weights)[0]
    return data.shapes_sample(index, "train", config.seed, family=family)


def deepen(model, factor: int) -> None:
    """Split every decoder layer of `model` into `factor` consecutive copies, each writing 1/factor of its update.

    x + f(x) becomes x + f(x)/factor + f(x + f(x)/factor)/factor + ...: the same function to first order in f, with
    every new layer doing real work (copies of a trained layer, not identities). Like progressive stacking
    (Gong et al. 2019), which copies layers whole; dividing the update keeps the residual stream's scale.
    """
    import copy

    language_model = model.model.language_model
    layers = []
    for layer in language_model.layers:
        for _ in range(factor):
            twin = copy.deepcopy(layer)
            with torch.no_grad():
                twin.self_attn.o_proj.weight.div_(factor)
                twin.mlp.down_proj.weight.div_(factor)
            layers.append(twin)
    for index, layer in enumerate(layers):
        layer.self_attn.layer_idx = index  # the KV cache is indexed by layer
    language_model.layers = torch.nn.ModuleList(layers)
    text_config = model.config.text_config
    text_config.num_hidden_layers = len(layers)
    if getattr(text_config, "layer_types", None):
        text_config.layer_types = [t for t in text_config.layer_types for _ in range(factor)]


SUPERVISED_HEAD = 0  # the head of the middle layer that the auxiliary loss trains


def supervised_heads(n_layers: int, grow_from: int = 0) -> list[tuple[int, int]]:
    """(layer, head) pairs the auxiliary loss trained to look at the asked-about object: head 0 of the middle layer.
    A toy grown from `grow_from` layers has that head in every copy `deepen` made of the base's middle layer."""
    if not grow_from:
        return [(n_layers // 2, SUPERVISED_HEAD)]
    factor = n_layers // grow_from
    return [(grow_from // 2 * factor + copy, SUPERVISED_HEAD) for copy in range(factor)]


def known_heads(loaded) -> list[tuple[int, int]]:
    """supervised_heads of a loaded toy (models.LoadedModel), read from the training.json next to its weights; the
    middle layer's head 0 for models without one (a hub model, random:<preset>), where nothing was supervised."""
    folder = SHIPPED[loaded.name][0] if loaded.name in SHIPPED else Path(loaded.name).expanduser()
    record = folder / "training.json"
    grow_from = json.loads(record.read_text())["config"].get("grow_from", 0) if record.is_file() else 0
    return supervised_heads(loaded.n_layers, grow_from)


def attention_aux_loss(attention: torch.Tensor, samples: list[data.Sample], batch: data.EncodedBatch, processor,
                       world: data.WorldConfig = data.WorldConfig()) -> torch.Tensor:
    """Mean -log(attention mass of head 0, at the last prompt token, on the patches of the object asked about).

    For an existence "no" the target is <s> (position 0): the head then reads "is there a full match" off
    where it looks. Count questions (no single object) are skipped.
    """
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    losses = []
    for row, sample in enumerate(samples):
        if sample.family == "count":
            continue
        last_prompt_token = int(batch.answer_mask[row].nonzero()[0]) - 1
        if sample.family == "exists" and sample.answer == "no":
            targets = [0]
        else:
            cells = sample.target_cells
            if sample.family == "exists":  # every copy of the asked-about object is a right place to look
                asked = next(s for s in sample.shapes if s.cell == cells[0])
                cells = [s.cell for s in sample.shapes if (s.colour, s.kind) == (asked.colour, asked.kind)]
            first_patch = int((batch.input_ids[row] == image_token).nonzero()[0])
            targets = [first_patch + patch for cell in cells for patch in world.cell_patches(cell)]
        losses.append(-torch.log(attention[row, SUPERVISED_HEAD, last_prompt_token, targets].sum() + 1e-6))
    return torch.stack(losses).mean() if losses else attention.sum() * 0


def _curriculum(samples: list[data.Sample], config: ToyConfig, step: int) -> list[data.Sample]:
    """Swap hard existence negatives for easy ones with a probability falling from 1 to 0 over the curriculum.

    Seeded by (seed, step), so a resumed run sees the same batches.
    """
    if config.easy_negatives_until <= 0:
        return samples
    p_easy = max(0.0, 1.0 - step / (config.easy_negatives_until * config.steps))
    rng = random.Random(f"toy-curriculum:{config.seed}:{step}")
    return [data.easy_negative(s, rng) if s.family == "exists" and s.answer == "no" and rng.random() < p_easy else s
            for s in samples]


def _save_checkpoint(model, cell_head, optimizer, root: Path, state: dict, save_file) -> None:
    """root/step-N with the model, the auxiliary head, the optimizer and state.json, made current in one rename."""
    def write(folder: Path) -> None:
        for name, module in (("model", model), ("cell_head", cell_head)):
            save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(folder / f"{name}.safetensors"))
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
        (folder / "state.json").write_text(json.dumps(state))

    write_version(root, f"step-{state['step']:08d}", write, step=state["step"])


@contextmanager
def _outputs_of(module, pick=lambda output: output):
    """Collect `pick(output)` of every forward call of `module` (e.g. the projector's patches, a layer's attention)."""
    found: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _a, output: found.append(pick(output)))
    try:
        yield found
    finally:
        handle.remove()


def cell_labels(samples: list[data.Sample], world: data.WorldConfig = data.WorldConfig()) -> torch.Tensor:
    """[batch, patches] class of each patch's cell: 0 empty, else 1 + shape * n_colours + colour."""
    colours = list(data.COLOURS)
    labels = torch.zeros(len(samples), world.patches_per_side**2, dtype=torch.long)
    for i, sample in enumerate(samples):
        for shape in sample.shapes:
            label = 1 + data.SHAPES.index(shape.kind) * len(colours) + colours.index(shape.colour)
            labels[i, world.cell_patches(shape.cell)] = label
    return labels


def save_toy(model, processor, out: str | Path, config: ToyConfig, curve: list[dict]) -> None:
    """Save in float16 (what ships), with the training record next to it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".save-") as staging:  # every file written before any is swapped in
        model.to("cpu", torch.float16).save_pretrained(staging)
        model.to(torch.float32)
        processor.save_pretrained(staging)
        for written in Path(staging).iterdir():
            os.replace(written, out / written.name)  # each file is the old one or the new one, never half
    write_json(out / "training.json", {"config": asdict(config), "curve": curve})
