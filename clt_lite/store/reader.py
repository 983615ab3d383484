"""ActivationStore: read a captured store (memory-mapped shards, checksums) as normalised shuffled batches."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..sources import ActivationBatch
from .batching import _check_split, _default_buffer, _scale, _shuffled_batches, _val_samples
from .schema import FORMAT, KINDS, MANIFEST, META_FIELDS, TARGET_SITE

_NUMPY_DTYPES = {"F16": np.float16, "BF16": np.int16, "F32": np.float32, "I32": np.int32, "I64": np.int64,
                 "U8": np.uint8, "BOOL": np.bool_}


class ShardInfo(NamedTuple):
    """One row of the shard table."""

    file: str  # file name inside the store folder
    tokens: int  # tokens it holds (BOS included)
    samples: tuple[int, int]  # dataset indices [first, end) of its samples
    bytes: int  # file size
    sha256: str  # checksum recorded at capture time


class TokenMeta(NamedTuple):
    """Per-token metadata over the whole store (numpy arrays, store row order)."""

    token_id: np.ndarray  # int32 vocabulary id
    position: np.ndarray  # int32 index in the sequence
    sample: np.ndarray  # int64 dataset index of the sample
    kind: np.ndarray  # uint8 index into KINDS
    bos: np.ndarray  # bool BOS flag


class ActivationStore:
    """Read a folder written by capture(): memory-mapped shards, checksums, normalised shuffled batches.

    verify: 'open' hashes every shard now, 'lazy' hashes each shard the first time it is read,
    'none' skips checksums (sizes and headers are always checked on open). Train/val are split by
    sample: the round(val_fraction * n_samples) samples with the smallest index hash (at least one
    when there are two or more samples) form val. shuffle_buffer is in tokens (None: ~512 MiB of
    float32 activations, at least 4 batches); batches mix tokens across all shards that fill it.
    """

    def __init__(self, path: str | Path, input_site: str | None = None, verify: str = "lazy",
                 val_fraction: float = 0.1, shuffle_buffer: int | None = None):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise ValueError(f"{self.path} has no {MANIFEST}; capture activations into it first (clt_lite.store.capture)")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{manifest_path} is not valid JSON ({error.msg}); the capture was damaged: capture again "
                             "into a new folder") from None
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest_path} is not a clt-lite activation store (format {self.manifest.get('format')!r})")
        # The model the activations came from (stores captured before fingerprints were recorded: unknown, {}).
        self.model_identity = ({"model": self.manifest["model"], "fingerprint": self.manifest["model_fingerprint"]}
                               if "model_fingerprint" in self.manifest else {})
        if not self.manifest["complete"]:
            raise ValueError(f"the capture in {self.path} is incomplete ({len(self.manifest['shards'])} shards); "
                             "rerun the same capture command to finish it")
        self.input_site = input_site or self.manifest["input_sites"][0]
        if self.input_site not in self.manifest["input_sites"]:
            raise ValueError(f"{self.path} stores input site(s) {self.manifest['input_sites']}, not {self.input_site!r}")
        if verify not in ("open", "lazy", "none") or not 0 <= val_fraction < 1:
            raise ValueError(f"need verify in open/lazy/none and 0 <= val_fraction < 1, got {verify!r}, {val_fraction}")
        self.verify, self.val_fraction, self.shuffle_buffer = verify, val_fraction, shuffle_buffer
        self._layouts = [_read_layout(self.path / r["file"], r["bytes"]) for r in self.manifest["shards"]]
        self._verified: set[int] = set()
        if verify == "open":
            for i in range(len(self._layouts)):
                self._verify(i)
        # metadata is small: read it now; activations are verified (lazy mode) when first read
        self._meta = [{f: np.array(self._array(i, f, verify=False)) for f in META_FIELDS} for i in range(len(self._layouts))]
        self._offsets = np.cumsum([0] + [r["tokens"] for r in self.manifest["shards"]])
        self._val_sample = _val_samples(self.manifest["n_samples"], val_fraction)

    def __repr__(self) -> str:
        m = self.manifest
        return (f"ActivationStore({str(self.path)!r}: {self.n_tokens:,} tokens, {self.n_layers} layers x d={self.d_model}, "
                f"{len(m['shards'])} shards, {m['dtype']}, input {self.input_site})")

    @property
    def n_layers(self) -> int:
        return len(self.manifest["layers"])

    @property
    def d_model(self) -> int:
        return self.manifest["d_model"]

    @property
    def n_tokens(self) -> int:
        """Stored tokens, BOS included."""
        return self.manifest["n_tokens"]

    @property
    def input_scale(self) -> Tensor:
        """[L] sqrt(d / mean squared norm) of the input site per layer."""
        return _scale(self.manifest["mean_sq_norm"][self.input_site], self.d_model)

    @property
    def target_scale(self) -> Tensor:
        """[L] sqrt(d / mean squared norm) of mlp_out per layer."""
        return _scale(self.manifest["mean_sq_norm"][TARGET_SITE], self.d_model)

    @property
    def shards(self) -> list[ShardInfo]:
        return [ShardInfo(r["file"], r["tokens"], tuple(r["samples"]), r["bytes"], r["sha256"]) for r in self.manifest["shards"]]

    @property
    def metadata(self) -> TokenMeta:
        return TokenMeta(*(np.concatenate([m[f] for m in self._meta]) for f in META_FIELDS))

    def split_of_sample(self, sample: int) -> str:
        """'train' or 'val'."""
        return "val" if self._val_sample[sample] else "train"

    def tokens(self, key: int | slice, site: str | None = None) -> dict[str, Tensor] | Tensor:
        """Raw (unnormalised) float32 activations [T, L, d]: a shard's tokens (int) or store rows (slice).

        Returns {site: tensor} for every stored site, or one tensor when `site` is given.
        """
        if isinstance(key, int):
            if not 0 <= key < len(self._layouts):
                raise IndexError(f"shard {key} out of range: the store has {len(self._layouts)} shards")
            pieces = [(key, slice(None))]
        else:
            rows = np.arange(*key.indices(self.n_tokens))
            shard_of = np.searchsorted(self._offsets, rows, side="right") - 1
            pieces = [(i, rows[shard_of == i] - self._offsets[i]) for i in np.unique(shard_of)]
        names = [site] if site else self.manifest["sites"]
        out = {s: torch.cat([self._load(i, s, r) for i, r in pieces]) if pieces
               else torch.zeros(0, self.n_layers, self.d_model) for s in names}
        return out[site] if site else out

    def describe(self, rows: Sequence[int], tokenizer=None) -> list[dict]:
        """One dict per store row: sample, split, position, kind, token (text when a tokenizer is given),
        and for image tokens the patch index (row-major over the vision tower's patch grid)."""
        meta = self.metadata
        first_image = {}
        for s in np.unique(meta.sample[list(rows)]):
            image_rows = (meta.sample == s) & (meta.kind == KINDS.index("image"))
            first_image[s] = int(meta.position[image_rows].min()) if image_rows.any() else None
        table = []
        for row in rows:
            s, kind, pos = int(meta.sample[row]), KINDS[meta.kind[row]], int(meta.position[row])
            token = tokenizer.convert_ids_to_tokens(int(meta.token_id[row])) if tokenizer else int(meta.token_id[row])
            table.append({"row": int(row), "sample": s, "split": self.split_of_sample(s), "position": pos, "kind": kind,
                          "bos": bool(meta.bos[row]), "token": token,
                          "patch": pos - first_image[s] if kind == "image" else None})
        return table

    def batches(self, batch_size: int, split: str = "train", seed: int = 0) -> Iterator[ActivationBatch]:
        """Normalised float32 batches, BOS excluded. 'train' cycles forever (shard order and token
        shuffle drawn from (seed, epoch)); 'val' is one pass, its last batch possibly smaller."""
        _check_split(split, batch_size)
        buffer = self.shuffle_buffer or _default_buffer(batch_size, self.n_layers, self.d_model, 512 * 2**20)
        buffer = min(buffer, max(self._split_tokens(split), 1))  # a small store: shuffle whole epochs
        return _shuffled_batches(self._chunks(split, seed), batch_size, buffer, np.random.default_rng([seed, 1]),
                                 keep_last=split == "val")

    def _split_rows(self, shard: int, split: str) -> np.ndarray:
        """Rows of one shard that belong to the split (BOS excluded)."""
        meta = self._meta[shard]
        return np.flatnonzero(~meta["bos"] & (self._val_sample[meta["sample"]] == (split == "val")))

    def _split_tokens(self, split: str) -> int:
        return sum(len(self._split_rows(i, split)) for i in range(len(self._meta)))

    def _chunks(self, split: str, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Per shard (in an order drawn per epoch), the normalised (inputs, targets) of its split's tokens."""
        in_scale, out_scale = self.input_scale[:, None], self.target_scale[:, None]
        for epoch in range(10**18 if split == "train" else 1):
            yielded = False
            for i in np.random.default_rng([seed, 0, epoch]).permutation(len(self._layouts)):
                rows = self._split_rows(i, split)
                if rows.size:
                    yielded = True
                    yield self._load(i, self.input_site, rows) * in_scale, self._load(i, TARGET_SITE, rows) * out_scale
            if not yielded:
                if split == "val":
                    return
                raise ValueError(f"the train split of {self.path} has no tokens; capture more samples or lower val_fraction")

    def _array(self, shard: int, name: str, verify: bool = True) -> np.ndarray:
        """Memory-map one tensor of a shard (verifying the shard's checksum first when verify='lazy')."""
        if verify and self.verify == "lazy":
            self._verify(shard)
        dtype, shape, offset = self._layouts[shard][name]
        if 0 in shape:
            return np.zeros(shape, _NUMPY_DTYPES[dtype])
        return np.memmap(self.path / self.manifest["shards"][shard]["file"], _NUMPY_DTYPES[dtype], "r", offset, shape)

    def _load(self, shard: int, site: str, rows) -> Tensor:
        """float32 tensor of the given rows of one site in one shard."""
        array = np.array(self._array(shard, site)[rows])
        tensor = torch.from_numpy(array)
        if self._layouts[shard][site][0] == "BF16":
            tensor = tensor.view(torch.bfloat16)
        return tensor.float()

    def _verify(self, shard: int) -> None:
        if shard in self._verified:
            return
        record = self.manifest["shards"][shard]
        path = self.path / record["file"]
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(16 * 2**20):
                digest.update(block)
        if digest.hexdigest() != record["sha256"]:
            raise ValueError(f"shard {path} fails its sha256 check (corrupt or modified); recapture into a new folder")
        self._verified.add(shard)


def _read_layout(path: Path, expected_bytes: int) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """name -> (dtype, shape, absolute byte offset) from a safetensors header; checks size and header."""
    if not path.is_file():
        raise ValueError(f"shard {path} is missing; recapture into a new folder")
    size = path.stat().st_size
    if size != expected_bytes:
        raise ValueError(f"shard {path} is {size:,} bytes but the manifest says {expected_bytes:,} (truncated or "
                         "modified); recapture into a new folder")
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 0 < length <= size - 8:
                raise ValueError("bad header length")
            header = json.loads(f.read(length))
        layout = {}
        for name, info in header.items():
            if name != "__metadata__":
                start, end = info["data_offsets"]
                if 8 + length + end > size or info["dtype"] not in _NUMPY_DTYPES:
                    raise ValueError(f"tensor {name} lies past the end of the file or has an unknown dtype")
                layout[name] = (info["dtype"], tuple(info["shape"]), 8 + length + start)
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"shard {path} has a corrupt header ({error}); recapture into a new folder") from None
    return layout


def check_compatible(source, n_layers: int, d_model: int) -> None:
    """Refuse a store/source whose layer count or width differs from the model's (one-line ValueError)."""
    if (source.n_layers, source.d_model) != (n_layers, d_model):
        raise ValueError(f"the activations have {source.n_layers} layers of width {source.d_model} but the model has "
                         f"{n_layers} x {d_model}; capture activations from this model (all layers)")
