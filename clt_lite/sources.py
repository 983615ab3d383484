"""What the trainer reads: a batch of normalised activations, and the protocol every activation source follows.

At the bottom of the package so that the stores (which produce batches) and the trainer (which consumes them)
both depend on it, and not on each other.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple, Protocol

from torch import Tensor


class ActivationBatch(NamedTuple):
    """One batch of tokens from an activation source, already normalised, BOS/padding excluded, float32."""

    inputs: Tensor  # [B, L, d] input-site activations (resid_mid or mlp_in) * input_scale
    targets: Tensor  # [B, L, d] MLP outputs * target_scale


class ActivationSource(Protocol):
    """What train() needs from a source of activations (the store and streaming sources implement it)."""

    n_layers: int
    d_model: int
    input_site: str  # the site the inputs come from ("resid_mid" or "mlp_in"); must match the CLT config
    input_scale: Tensor  # [L] normalised = raw * scale
    target_scale: Tensor  # [L]

    def batches(self, batch_size: int, split: str = "train", seed: int = 0) -> Iterator[ActivationBatch]:
        """Endless (repeating) for split='train', one finite pass for split='val'; same seed, same order."""
        ...

    # Optional (the streaming source has them): `device`, where the source computes, and `device_bytes(batch_size)`,
    # the bytes it keeps there while a CLT trains; the trainer's memory check adds them when the devices agree.
    # Optional (both stores have it): `model_identity`, {"model": name, "fingerprint": weights fingerprint} of the
    # model the activations come from; a CLT trained on them records it (CrossLayerTranscoder.trained_on).
