"""Fine-tune a trained CLT through its own closed loop: a remedy for errors that compound with depth.

Trained on the original model's activations (open loop), layer l's encoder never sees the residual stream the
replacement model hands it, which carries the errors of every replaced layer before l: a small error at MLP 0 is
read and amplified by every later layer. Fine-tuning runs the replacement model itself (every MLP replaced) on
training prompts and lowers, by gradient descent on the CLT's parameters only,

    KL(original || replacement) over text positions  +  fvu_weight * mean over layers of the closed-loop FVU

where a layer's closed-loop FVU compares its reconstruction with what the true MLP outputs *on the same stream*.
The FVU term keeps each layer a transcoder of its MLP instead of a free logit-matching network; the KL term is
the quantity notebook 04 reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import data
from .clt import CrossLayerTranscoder
from .progress import progress_bar
from .replacement import Replacement, replaced, text_targets


@dataclass
class ClosedLoopConfig:
    """The fine-tuning recipe (defaults: what benchmarks/bench_closed_loop.py's `closedloop` variant runs)."""

    steps: int = 300  # optimizer steps
    batch_size: int = 16  # training prompts per step
    lr: float = 3e-4  # Adam's learning rate: small, the CLT starts trained
    fvu_weight: float = 1.0  # weight of the mean closed-loop FVU next to the KL
    seed: int = 0  # which training prompts, in which order


class ClosedLoopStep(NamedTuple):
    """One optimizer step's losses (before the step)."""

    kl: float  # KL(original || replacement) per text position
    fvu: float  # mean over layers of the closed-loop FVU


def text_kl(original: torch.Tensor, patched: torch.Tensor, batch: data.EncodedBatch, image_token_id: int) -> torch.Tensor:
    """Mean KL(original || patched) of the next-token distributions over real text targets (notebook 04's KL)."""
    text = text_targets(batch, image_token_id).to(original.device)
    log_p, log_q = F.log_softmax(original[:, :-1].float(), -1), F.log_softmax(patched[:, :-1].float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)[text].mean()


def finetune(loaded, clt: CrossLayerTranscoder, samples: list[data.Sample], config: ClosedLoopConfig | None = None,
             progress: bool = True) -> list[ClosedLoopStep]:
    """Fine-tune `clt` in place through the closed-loop replacement of every MLP; returns each step's losses."""
    config = config or ClosedLoopConfig()
    if not samples:
        raise ValueError("closed-loop fine-tuning needs training prompts; give at least one sample")
    model = loaded.model
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:  # gradients for the CLT only; the model is the fixed thing being explained
        p.requires_grad_(False)
    params = [p for p in clt.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    history = []
    try:
        for _ in progress_bar(range(config.steps), desc="closed-loop fine-tune", disable=not progress):
            chosen = torch.randint(len(samples), (config.batch_size,), generator=generator).tolist()
            batch = data.encode_batch(loaded.processor, [samples[i] for i in chosen], with_answers=True)
            inputs = batch.model_inputs(model)
            with torch.no_grad():
                original = model(**inputs).logits
            errors: list[torch.Tensor] = []
            with replaced(model, Replacement("clt", clt), train_errors=errors,
                          positions=batch.attention_mask.bool().to(inputs["input_ids"].device)):
                patched = model(**inputs).logits
            kl, fvu = text_kl(original, patched, batch, loaded.image_token_id), torch.stack(errors).mean()
            optimizer.zero_grad(set_to_none=True)
            (kl + config.fvu_weight * fvu).backward()
            optimizer.step()
            history.append(ClosedLoopStep(kl.item(), fvu.item()))
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return history
