"""StreamingSource: activations straight from the model into training, no disk, the same interface as ActivationStore."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice

import numpy as np
import torch
from torch import Tensor

from ..data import Sample
from ..models import LoadedModel
from ..sources import ActivationBatch
from .batching import _batched, _check_split, _hash, _scale, _shuffled_batches, _val_samples
from .capturing import CaptureConfig
from .forward import TokenChunk, forward_tokens
from .schema import KINDS, TARGET_SITE

POOL_BUDGET = 2**30  # shuffle-pool bytes a stream aims at (8 batches when smaller; never under 2 batches)


def pool_tokens(batch_size: int, n_layers: int, d_model: int, act_bytes: int) -> int:
    """Tokens a stream pools and shuffles before emitting batches (rows of one input and one target site)."""
    return min(8 * batch_size, max(2 * batch_size, POOL_BUDGET // (2 * n_layers * d_model * act_bytes)))


def forward_samples(tokens_per_sample: int, n_layers: int, d_model: int, act_bytes: int) -> int:
    """Samples per model forward: 8, fewer when their captured rows would pass a quarter of POOL_BUDGET (at
    LLaVA-7B width a 600-token prompt captures 300 MiB of rows, so one sample per forward there)."""
    return max(1, min(8, POOL_BUDGET // (4 * tokens_per_sample * 2 * n_layers * d_model * act_bytes)))


def prompt_tokens(config) -> int:
    """Tokens of one ShapesWorld prompt at most, from a LlavaConfig: its image tokens plus 32 text tokens."""
    return config.image_seq_length + 32


def resident_bytes(weight_bytes: int, batch_size: int, forward_tokens: int, n_layers: int, d_model: int,
                   act_bytes: int) -> int:
    """Device bytes a stream keeps beside the CLT it feeds (the planner's resident_bytes): the model's weights,
    and raw (input, target) rows in the model's dtype for the pool plus one forward batch, twice over (the
    pooled chunks and their shuffled copy). The model's own forward temporaries (under no_grad) are not counted."""
    rows = pool_tokens(batch_size, n_layers, d_model, act_bytes) + forward_tokens
    return weight_bytes + 2 * rows * 2 * n_layers * d_model * act_bytes


class StreamingSource:
    """Activations straight from the model into training: no disk, same interface as ActivationStore.

    Each `batches()` call runs the model over the samples (forward batches of `forward_batch`
    samples, by default forward_samples()), pools kept non-BOS tokens in a shuffle buffer on `device` and yields normalised
    float32 batches. samples: a list (reshuffled each epoch by (seed, epoch)), a re-iterable, or a
    callable returning a fresh iterable (e.g. `lambda: iter_shapes_world(None)` for an endless
    stream). Val: `val_samples` when given; else, for samples with a length, the same samples an
    ActivationStore of them holds out, and for a stream those whose index hash falls below
    val_fraction; either way excluded from train. A val pass needs a finite val set.

    Normalisation scales are estimated once, from the first `scale_samples` train samples in
    stream order (not the whole stream, which may be endless): mean squared norm per layer over
    their non-BOS tokens. They are then fixed, so every batch uses the same scales.
    """

    def __init__(self, loaded: LoadedModel, samples: Iterable[Sample] | Callable[[], Iterable[Sample]],
                 layers: Sequence[int] | None = None, input_site: str = "mlp_in", kinds: Sequence[str] = KINDS,
                 val_samples: Sequence[Sample] | None = None, val_fraction: float = 0.1, forward_batch: int | None = None,
                 scale_samples: int = 64, shuffle_buffer: int | None = None, device: str | torch.device | None = None,
                 name: str = ""):
        n_layers = len(CaptureConfig(layers=layers).resolve_layers(loaded.n_layers))
        act_bytes = next(loaded.model.parameters()).element_size()
        forward_batch = forward_batch or forward_samples(prompt_tokens(loaded.model.config), n_layers, loaded.d_model, act_bytes)
        config = CaptureConfig(layers=layers, input_sites=(input_site,), kinds=tuple(kinds), batch_size=forward_batch)
        if not 0 <= val_fraction < 1 or scale_samples < 1:
            raise ValueError(f"need 0 <= val_fraction < 1 and scale_samples >= 1, got {val_fraction}, {scale_samples}")
        self.loaded, self.samples, self.config = loaded, samples, config
        self.layers = config.resolve_layers(loaded.n_layers)
        self.val_samples, self.val_fraction = val_samples, val_fraction
        self.scale_samples, self.shuffle_buffer = scale_samples, shuffle_buffer
        self.name = name  # what the stream is (model, data, seed, site): caches of CLTs trained on it are keyed by it
        self.device = torch.device(device) if device is not None else next(loaded.model.parameters()).device
        self._scales: tuple[Tensor, Tensor] | None = None
        self._forward_tokens = 0  # most tokens one forward batch kept, seen while estimating the scales

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return self.loaded.d_model

    @property
    def model_identity(self) -> dict[str, str]:
        """The model the activations come from: name and weights fingerprint (what a CLT trained on them records)."""
        return {"model": self.loaded.name, "fingerprint": self.loaded.fingerprint()}

    @property
    def input_site(self) -> str:
        return self.config.input_sites[0]

    @property
    def input_scale(self) -> Tensor:
        return self._estimate_scales()[0]

    @property
    def target_scale(self) -> Tensor:
        return self._estimate_scales()[1]

    def batches(self, batch_size: int, split: str = "train", seed: int = 0) -> Iterator[ActivationBatch]:
        """Like ActivationStore.batches. Rows are pooled raw in the model's dtype (bf16 halves the pool at 7B) and
        normalised to float32 per batch, which gives the same values as normalising first. The default pool
        (pool_tokens) is 8 batches, fewer at large widths, so the first batch comes fast and the pool stays small."""
        _check_split(split, batch_size)
        buffer = self.shuffle_buffer or pool_tokens(batch_size, self.n_layers, self.d_model, self._act_bytes)
        in_scale, out_scale = (s.to(self.device)[:, None] for s in self._estimate_scales())
        chunks = ((c.acts[self.input_site], c.acts[TARGET_SITE]) for c in self._forward(split, seed))
        raw = _shuffled_batches(chunks, batch_size, buffer, np.random.default_rng([seed, 1]), keep_last=split == "val")
        return (ActivationBatch(b.inputs.float() * in_scale, b.targets.float() * out_scale) for b in raw)

    def device_bytes(self, batch_size: int) -> int:
        """What this stream keeps on its device while a CLT trains (resident_bytes), the forward batch sized by
        the longest one seen while estimating the scales (runs that estimation if it has not run yet)."""
        self._estimate_scales()
        model = self.loaded.model
        weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        return resident_bytes(weights, batch_size, self._forward_tokens, self.n_layers, self.d_model, self._act_bytes)

    @property
    def _act_bytes(self) -> int:
        return next(self.loaded.model.parameters()).element_size()

    def _forward(self, split: str, seed: int) -> Iterator[TokenChunk]:
        """Non-BOS tokens of the split's samples, one forward batch at a time; train repeats forever."""
        for epoch in range(10**18 if split == "train" else 1):
            seen = False
            for pending in _batched(self._split_samples(split, (seed, epoch)), self.config.batch_size):
                seen = True
                chunk = self._run(pending)
                if len(chunk.bos):
                    yield chunk
            if not seen:
                if split == "val":
                    return
                raise ValueError("the sample stream is empty (a used-up iterator?); pass a list or a callable returning a fresh iterable")

    def _split_samples(self, split: str, shuffle: tuple[int, int] | None) -> Iterator[tuple[int, Sample]]:
        """(index, sample) pairs of one split; a Sequence's train order is permuted by shuffle=(seed, epoch)."""
        if split == "val" and self.val_samples is not None:
            return enumerate(self.val_samples)
        source = self.samples() if callable(self.samples) else self.samples
        if split == "val" and not hasattr(source, "__len__"):
            raise ValueError("a sample stream without a length has no finite val split; pass val_samples=[...]")
        in_val = self._val_test(source)
        if split == "train" and shuffle is not None and isinstance(source, Sequence):
            pairs = ((int(i), source[i]) for i in np.random.default_rng([*shuffle, 2]).permutation(len(source)))
        else:
            pairs = enumerate(source)
        return ((i, s) for i, s in pairs if in_val(i) == (split == "val"))

    def _val_test(self, source) -> Callable[[int], bool]:
        """index -> whether that sample of `source` is held out for val."""
        if self.val_samples is not None:
            return lambda i: False
        if hasattr(source, "__len__"):  # the same samples an ActivationStore of this list holds out
            return _val_samples(len(source), self.val_fraction).__getitem__
        return lambda i: int(_hash(np.array([i]))[0]) < self.val_fraction * 2**64

    def _run(self, pending: list[tuple[int, Sample]]) -> TokenChunk:
        """Forward one batch; keep non-BOS tokens (`sample` holds stream indices)."""
        chunk = forward_tokens(self.loaded, [s for _, s in pending], 0, self.layers, self.config.sites, self.config.kinds,
                               self.device, next(self.loaded.model.parameters()).dtype)
        keep = ~chunk.bos
        index = torch.tensor([i for i, _ in pending])
        return TokenChunk({s: a[keep.to(a.device)] for s, a in chunk.acts.items()}, chunk.token_id[keep],
                          chunk.position[keep], index[chunk.sample[keep]], chunk.kind[keep], chunk.bos[keep])

    def _estimate_scales(self) -> tuple[Tensor, Tensor]:
        """Fix the scales from the first scale_samples train samples in stream order (computed once)."""
        if self._scales is None:
            sums = {s: torch.zeros(self.n_layers, dtype=torch.float64) for s in self.config.sites}
            count = self._forward_tokens = 0
            first = islice(self._split_samples("train", None), self.scale_samples)
            for pending in _batched(first, self.config.batch_size):
                chunk = self._run(pending)
                for s in sums:
                    sums[s] += chunk.acts[s].float().pow(2).sum(-1).double().sum(0).cpu()
                count += len(chunk.bos)
                self._forward_tokens = max(self._forward_tokens, len(chunk.bos))
            if count == 0:
                raise ValueError(f"the first samples of the stream have no usable tokens (kinds kept: {', '.join(self.config.kinds)})")
            self._scales = (_scale((sums[self.config.input_sites[0]] / count).tolist(), self.d_model),
                            _scale((sums[TARGET_SITE] / count).tolist(), self.d_model))
        return self._scales
