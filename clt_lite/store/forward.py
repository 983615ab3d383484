"""One teacher-forced forward pass: the kept tokens' activations at the chosen sites and their metadata."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .. import sites
from ..data import Sample, encode_batch
from ..models import LoadedModel
from .schema import KINDS


class TokenChunk(NamedTuple):
    """Activations and metadata of the kept tokens of one forward batch (rows in sequence order)."""

    acts: dict[str, Tensor]  # site -> [T, L, d]
    token_id: Tensor  # [T] int32
    position: Tensor  # [T] int32 index in the sequence (image tokens: first patch + patch index)
    sample: Tensor  # [T] int64 index of the sample in the dataset
    kind: Tensor  # [T] uint8 index into KINDS
    bos: Tensor  # [T] bool: beginning-of-sequence token (excluded from training batches)


def _keep_mask(loaded: LoadedModel, encoded, kinds: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
    """(keep, kind, bos) [batch, seq] for an encoded batch; answer tokens (and EOS) count as 'answer'."""
    masks = sites.token_masks(encoded.input_ids, encoded.attention_mask, loaded.image_token_id,
                              loaded.processor.tokenizer.bos_token_id)
    answer = encoded.answer_mask & masks.text
    text = masks.text & ~answer
    kind = torch.full(encoded.input_ids.shape, KINDS.index("text"), dtype=torch.uint8)
    kind[masks.image] = KINDS.index("image")
    kind[answer] = KINDS.index("answer")
    keep = torch.zeros_like(masks.padding)
    for name, mask in (("image", masks.image), ("text", text | masks.bos), ("answer", answer)):
        if name in kinds:
            keep |= mask
    return keep, kind, masks.bos


@torch.no_grad()
def forward_tokens(loaded: LoadedModel, samples: list[Sample], first_index: int, layers: Sequence[int],
                   site_names: Sequence[str], kinds: Sequence[str] = KINDS, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> TokenChunk:
    """One teacher-forced forward pass over `samples`, returning the kept tokens' activations."""
    encoded = encode_batch(loaded.processor, samples, with_answers=True)
    keep, kind, bos = _keep_mask(loaded, encoded, kinds)
    with sites.capture(loaded.model, site_names, layers, positions=keep, device=device, dtype=dtype) as captured:
        loaded.model(**encoded.model_inputs(loaded.model), logits_to_keep=1)  # logits are not needed
    rows, cols = keep.nonzero(as_tuple=True)
    return TokenChunk({s: captured.stack(s) for s in site_names}, encoded.input_ids[keep].to(torch.int32),
                      cols.to(torch.int32), rows.to(torch.int64) + first_index, kind[keep], bos[keep])
