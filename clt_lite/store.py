"""Activations for CLT training: a sharded on-disk store, and a streaming source that needs no disk.

`capture()` runs the model over a dataset (teacher-forced: prompt + answer + EOS) and writes, for
every kept token, the CLT's input site (resid_mid, optionally or instead mlp_in) and its target
site (mlp_out) of the chosen layers, plus token id, position, sample index, kind (image / text /
answer) and a BOS flag. Each MLP output is stored once: the CLT reads layer l's input and
predicts every target t >= l from the same [tokens, layers, d] array.

On disk: `shard-00000.safetensors`, ... (token-major [tokens, layers, d] per site) and
`manifest.json` (model, sites, layers, dtype, token counts, per-layer mean squared norms, one
sha256 per shard, package version, capture arguments). Shard i holds samples [i*S, (i+1)*S),
forwarded in batches that start at the shard's first sample, so a shard is a pure function of
(arguments, i). Every file is written to a temporary name and renamed; the manifest is rewritten
after each shard. A capture killed at any moment and rerun with the same arguments therefore
continues after the last complete shard and ends bit-identical to an uninterrupted run.

`ActivationStore` (disk) and `StreamingSource` (model -> memory) both give what the trainer
needs: `n_layers`, `d_model`, `input_scale`/`target_scale` [L] (normalised = raw * scale, so the
mean squared norm per layer is ~d) and `batches(batch_size, split, seed)` of ActivationBatch,
float32, normalised, BOS excluded, shuffled at token level, split into train/val by sample.

Storage math: 2 sites x 32 layers x 4096 x 2 B = 512 KiB per token for LLaVA-1.5-7B in bf16,
so 1M tokens is ~0.5 TB. At that scale stream; store the toy.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor
from tqdm.auto import tqdm

from . import __version__, sites
from .data import Sample, encode_batch, sample_prompt
from .files import write_bytes, write_json
from .models import LoadedModel
from .train import ActivationBatch

KINDS = ("image", "text", "answer")  # position kinds; the `kind` array stores their index
INPUT_SITES = ("resid_mid", "mlp_in")  # sites a CLT may read; the target is always mlp_out
TARGET_SITE = "mlp_out"
STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
MANIFEST = "manifest.json"
FORMAT = "clt-lite-activations/1"
META_FIELDS = ("token_id", "position", "sample", "kind", "bos")
META_BYTES = 4 + 4 + 8 + 1 + 1  # token_id int32, position int32, sample int64, kind uint8, bos bool


def bytes_per_token(n_layers: int, d_model: int, dtype: str = "bfloat16", n_sites: int = 2) -> int:
    """Activation bytes one token costs: n_sites x layers x d x dtype size (LLaVA-7B bf16: 512 KiB)."""
    return n_sites * n_layers * d_model * STORE_DTYPES[dtype].itemsize


def free_bytes(path: Path) -> int:
    """Free space where `path` lives; a module function so tests can simulate a small disk."""
    return shutil.disk_usage(path).free


# ----------------------------------------------------------------------------------- capturing


@dataclass(frozen=True)
class CaptureConfig:
    """What to record. Every field is part of the store's identity: a rerun must use the same values."""

    layers: tuple[int, ...] | None = None  # decoder layers to record (sorted); None = all
    input_sites: tuple[str, ...] = ("mlp_in",)  # CLT input site(s) stored next to mlp_out: mlp_in (default) and/or resid_mid
    kinds: tuple[str, ...] = KINDS  # position kinds kept; padding never; BOS kept (flagged) whenever "text" is
    dtype: str = "float16"  # on-disk dtype: float16, bfloat16 or float32
    batch_size: int = 8  # samples per forward pass (batches start at each shard's first sample)
    samples_per_shard: int | None = None  # samples per shard file; None = as many as fit in about shard_mb
    shard_mb: float = 256.0  # target shard size when samples_per_shard is None
    max_tokens: int | None = None  # stop after this many kept tokens (the last shard is cut there); None = whole dataset

    def __post_init__(self) -> None:
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted(self.layers)))
        object.__setattr__(self, "input_sites", tuple(self.input_sites))
        if not self.input_sites or set(self.input_sites) - set(INPUT_SITES):
            raise ValueError(f"input_sites must be a non-empty subset of {INPUT_SITES}, got {self.input_sites}")
        if not self.kinds or set(self.kinds) - set(KINDS):
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {self.kinds}")
        object.__setattr__(self, "kinds", tuple(k for k in KINDS if k in self.kinds))  # canonical order
        if self.dtype not in STORE_DTYPES:
            raise ValueError(f"unknown store dtype {self.dtype!r}; use {', '.join(STORE_DTYPES)}")
        if self.batch_size < 1 or (self.samples_per_shard or 1) < 1 or self.shard_mb <= 0:
            raise ValueError("batch_size, samples_per_shard and shard_mb must be positive")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 (or None for the whole dataset), got {self.max_tokens}")

    @property
    def sites(self) -> tuple[str, ...]:
        return (*self.input_sites, TARGET_SITE)

    def resolve_layers(self, n_layers: int) -> list[int]:
        """The recorded layers, checked against the model's layer count."""
        chosen = list(range(n_layers)) if self.layers is None else list(self.layers)
        bad = [l for l in chosen if not 0 <= l < n_layers]
        if bad or len(set(chosen)) != len(chosen) or not chosen:
            raise ValueError(f"layers {list(self.layers or [])} are invalid: the model has {n_layers} decoder layers "
                             f"(0..{n_layers - 1}); give distinct indices in that range or None for all")
        return chosen


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


class CaptureSummary(NamedTuple):
    """What capture() did; tokens/shards/bytes describe the whole store, rates this run."""

    path: str  # the store folder
    tokens: int  # tokens in the store
    shards: int  # shard files in the store
    bytes: int  # bytes of all shard files
    resumed_shards: int  # shards that were already complete when this run started
    seconds: float  # wall time of this run
    tokens_per_s: float  # tokens captured by this run per second
    mb_per_s: float  # MB (1e6 B) written by this run per second
    bytes_per_token: int  # activation bytes per token (all stored sites and layers)


def capture(loaded: LoadedModel, samples: Iterable[Sample], out_dir: str | Path, config: CaptureConfig = CaptureConfig(),
            data_id: str = "", progress: bool = True, on_shard: Callable[[int], None] | None = None) -> CaptureSummary:
    """Capture activations of `samples` into the store folder `out_dir`, resuming a killed run.

    data_id names the dataset (e.g. 'shapes:1000') in the manifest; together with a fingerprint of
    the first sample it tells a rerun whether the data is the same. on_shard(i) is called after
    shard i is safely on disk (tests use it to simulate a kill).
    """
    started = time.perf_counter()
    out = Path(out_dir)
    layers = config.resolve_layers(loaded.n_layers)
    stream = iter(samples)
    probe = list(islice(stream, config.batch_size))
    probe_tokens = int(_keep_mask(loaded, encode_batch(loaded.processor, probe, with_answers=True), config.kinds)[0].sum()) if probe else 0
    if probe_tokens == 0:
        raise ValueError(f"the dataset has no usable tokens (kinds kept: {', '.join(config.kinds)}); give samples, or keep more kinds")
    per_sample = probe_tokens / len(probe)
    per_token = bytes_per_token(len(layers), loaded.d_model, config.dtype, len(config.sites))
    shard_samples = config.samples_per_shard or max(1, int(config.shard_mb * 2**20 / (per_token * per_sample)))
    manifest = _open_manifest(out, _capture_args(loaded, config, data_id, probe[0]), loaded, layers, config, per_token, shard_samples)
    shard_samples, done = manifest["samples_per_shard"], len(manifest["shards"])
    if manifest["complete"]:
        return _summary(out, manifest, done, started, 0, 0)

    total_estimate = _estimate_tokens(samples, per_sample, config.max_tokens)
    left = max(total_estimate - manifest["n_tokens"], 0)
    _check_disk(out, left * (per_token + META_BYTES), f"~{left:,} more tokens x {per_token + META_BYTES:,} B")
    write_json(out / MANIFEST, manifest)
    stream = islice(chain(probe, stream), done * shard_samples, None)
    bar = tqdm(total=total_estimate or None, initial=manifest["n_tokens"], desc="capture", unit="tok", unit_scale=True,
               disable=not progress)
    new_tokens = new_bytes = 0
    index = done
    while not manifest["complete"]:
        batch = list(islice(stream, shard_samples))
        remaining = None if config.max_tokens is None else config.max_tokens - manifest["n_tokens"]
        if batch:
            chunk = _capture_shard(loaded, batch, index * shard_samples, layers, config, remaining)
            record = _write_shard(out, index, chunk, [index * shard_samples, index * shard_samples + len(batch)])
            manifest["shards"].append(record)
            _update_totals(manifest)
            new_tokens += record["tokens"]
            new_bytes += record["bytes"]
            bar.update(record["tokens"])
            bar.set_postfix_str(f"{new_bytes / 1e6:.1f} MB written")
        reached = remaining is not None and manifest["n_tokens"] >= config.max_tokens
        manifest["complete"] = len(batch) < shard_samples or reached
        write_json(out / MANIFEST, manifest)
        if batch and on_shard is not None:
            on_shard(index)
        index += 1
    bar.close()
    return _summary(out, manifest, done, started, new_tokens, new_bytes)


def _capture_args(loaded: LoadedModel, config: CaptureConfig, data_id: str, first: Sample) -> dict:
    """Everything that decides the store's content; a rerun must match it exactly."""
    fingerprint = hashlib.sha256(f"{sample_prompt(first)}\0{first.answer}\0".encode() + first.image.tobytes()).hexdigest()
    parameter = next(loaded.model.parameters())
    args = {"model": loaded.name, "model_dtype": str(parameter.dtype).removeprefix("torch."),
            "model_device": parameter.device.type, "data": data_id, "first_sample_sha256": fingerprint, **asdict(config)}
    return json.loads(json.dumps(args))  # tuples -> lists, as they come back from the manifest


def _open_manifest(out: Path, args: dict, loaded: LoadedModel, layers: list[int], config: CaptureConfig,
                   per_token: int, shard_samples: int) -> dict:
    """The manifest to continue: the existing one when args match, a fresh one for an empty folder."""
    path = out / MANIFEST
    if path.exists():
        manifest = json.loads(path.read_text())
        if manifest.get("args") != args:
            old = manifest.get("args", {})
            differ = sorted(k for k in set(old) | set(args) if old.get(k) != args.get(k))
            raise ValueError(f"{out} holds a capture made with other arguments (differs in: {', '.join(differ)}); "
                             "rerun with the same arguments to resume, or capture into a new folder")
        for stale in out.glob(".*.tmp*"):  # half-written files of a killed run
            stale.unlink()
        return manifest
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty and holds no {MANIFEST}; capture into a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": FORMAT, "clt_lite_version": __version__, "model": loaded.name, "model_layers": loaded.n_layers,
        "layers": layers, "d_model": loaded.d_model, "sites": list(config.sites), "input_sites": list(config.input_sites),
        "target_site": TARGET_SITE, "dtype": config.dtype, "bytes_per_token": per_token,
        "samples_per_shard": shard_samples, "args": args, "complete": False, "shards": [],
    }
    _update_totals(manifest)
    return manifest


def _estimate_tokens(samples: Iterable[Sample], per_sample: float, max_tokens: int | None) -> int:
    """Tokens the whole capture will hold (0 when unknown: an iterable without len and no max_tokens)."""
    estimates = [max_tokens] if max_tokens is not None else []
    if hasattr(samples, "__len__"):
        estimates.append(int(len(samples) * per_sample) + 1)
    return min(estimates, default=0)


def _check_disk(out: Path, need: int, what: str) -> None:
    """Refuse before writing when `need` bytes (described by `what`) do not fit in the free space."""
    free = free_bytes(out)
    if need > free:
        raise ValueError(f"not enough disk space in {out}: {what} need ~{need / 1e9:.3f} GB but {free / 1e9:.3f} GB are "
                         "free; free some space, capture fewer tokens (max_tokens), use a 16-bit dtype, or stream "
                         "activations instead (StreamingSource)")


def _capture_shard(loaded: LoadedModel, samples: list[Sample], first_index: int, layers: list[int],
                   config: CaptureConfig, remaining: int | None) -> TokenChunk:
    """Forward the shard's samples in batches (starting at its first sample) and keep up to `remaining` tokens."""
    dtype = STORE_DTYPES[config.dtype]
    chunks = [forward_tokens(loaded, samples[i:i + config.batch_size], first_index + i, layers, config.sites,
                             config.kinds, "cpu", dtype)
              for i in range(0, len(samples), config.batch_size)]
    joined = TokenChunk({s: torch.cat([c.acts[s] for c in chunks]) for s in config.sites},
                        *(torch.cat([getattr(c, f) for c in chunks]) for f in META_FIELDS))
    if remaining is None:
        return joined
    return TokenChunk({s: a[:remaining] for s, a in joined.acts.items()}, *(getattr(joined, f)[:remaining] for f in META_FIELDS))


def _write_shard(out: Path, index: int, chunk: TokenChunk, samples: list[int]) -> dict:
    """Write one shard atomically; return its manifest record (checksum, counts, squared-norm sums)."""
    tensors = {s: a.contiguous() for s, a in chunk.acts.items()}
    tensors.update({f: getattr(chunk, f).contiguous() for f in META_FIELDS})
    payload = safetensors_bytes(tensors)
    name = f"shard-{index:05d}.safetensors"
    _check_disk(out, len(payload), f"{name} ({len(chunk.bos):,} tokens)")
    write_bytes(out / name, payload)
    non_bos = ~chunk.bos
    return {
        "file": name, "tokens": len(chunk.bos), "samples": samples,
        "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest(), "non_bos_tokens": int(non_bos.sum()),
        "kind_counts": {k: int((chunk.kind == i).sum()) for i, k in enumerate(KINDS)} | {"bos": int(chunk.bos.sum())},
        # float64 sums of the *stored* values' squared norms, so normalisation matches what readers see
        "sq_norm_sums": {s: a[non_bos].float().pow(2).sum(-1).double().sum(0).tolist() for s, a in chunk.acts.items()},
    }


def _update_totals(manifest: dict) -> None:
    """Recompute token counts and per-layer mean squared norms (over non-BOS tokens) from the shard records."""
    shards = manifest["shards"]
    manifest["n_tokens"] = sum(r["tokens"] for r in shards)
    manifest["n_samples"] = max((r["samples"][1] for r in shards), default=0)
    manifest["token_counts"] = {k: sum(r["kind_counts"][k] for r in shards) for k in (*KINDS, "bos")}
    non_bos = max(sum(r["non_bos_tokens"] for r in shards), 1)
    manifest["mean_sq_norm"] = {s: [sum(r["sq_norm_sums"][s][l] for r in shards) / non_bos for l in range(len(manifest["layers"]))]
                                for s in manifest["sites"]}


def _summary(out: Path, manifest: dict, resumed: int, started: float, new_tokens: int, new_bytes: int) -> CaptureSummary:
    seconds = time.perf_counter() - started
    return CaptureSummary(str(out), manifest["n_tokens"], len(manifest["shards"]), sum(r["bytes"] for r in manifest["shards"]),
                          resumed, seconds, new_tokens / seconds, new_bytes / 1e6 / seconds, manifest["bytes_per_token"])


# ------------------------------------------------------------------------------------- reading

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
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest_path} is not a clt-lite activation store (format {self.manifest.get('format')!r})")
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


def _scale(mean_sq_norm: Sequence[float], d_model: int) -> Tensor:
    return torch.tensor([(d_model / max(m, 1e-12)) ** 0.5 for m in mean_sq_norm], dtype=torch.float32)


def _val_samples(n_samples: int, val_fraction: float) -> np.ndarray:
    """Bool [n_samples]: the round(fraction * n) samples with the smallest hash (>= 1 when n >= 2 and fraction > 0)."""
    n_val = round(val_fraction * n_samples)
    if val_fraction > 0 and n_samples >= 2:
        n_val = min(max(n_val, 1), n_samples - 1)
    is_val = np.zeros(n_samples, dtype=bool)
    is_val[np.argsort(_hash(np.arange(n_samples)), kind="stable")[:n_val]] = True
    return is_val


def _hash(index: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a fixed pseudo-random uint64 per sample index."""
    z = index.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _check_split(split: str, batch_size: int) -> None:
    if split not in ("train", "val"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _default_buffer(batch_size: int, n_layers: int, d_model: int, budget_bytes: int) -> int:
    """Shuffle-buffer tokens: as many float32 (input, target) rows as fit the budget, at least 4 batches."""
    return max(4 * batch_size, budget_bytes // (2 * n_layers * d_model * 4))


def _shuffled_batches(chunks: Iterator[tuple[Tensor, Tensor]], batch_size: int, buffer: int, rng: np.random.Generator,
                      keep_last: bool) -> Iterator[ActivationBatch]:
    """Pool chunks until `buffer` tokens, shuffle the pool, emit full batches; leftovers join the next pool."""
    xs, ys, size = [], [], 0
    for x, y in chunks:
        xs.append(x)
        ys.append(y)
        size += len(x)
        if size >= buffer:
            x, y = _permuted(xs, ys, rng)
            full = len(x) // batch_size * batch_size
            for start in range(0, full, batch_size):
                yield ActivationBatch(x[start:start + batch_size], y[start:start + batch_size])
            xs, ys, size = [x[full:]], [y[full:]], len(x) - full
    if size:
        x, y = _permuted(xs, ys, rng)
        stop = len(x) if keep_last else len(x) // batch_size * batch_size
        for start in range(0, stop, batch_size):
            yield ActivationBatch(x[start:start + batch_size], y[start:start + batch_size])


def _permuted(xs: list[Tensor], ys: list[Tensor], rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    x, y = torch.cat(xs), torch.cat(ys)
    order = torch.from_numpy(rng.permutation(len(x))).to(x.device)
    return x[order], y[order]


# ----------------------------------------------------------------------------------- streaming


class StreamingSource:
    """Activations straight from the model into training: no disk, same interface as ActivationStore.

    Each `batches()` call runs the model over the samples (forward batches of `forward_batch`
    samples), pools kept non-BOS tokens in a shuffle buffer on `device` and yields normalised
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
                 val_samples: Sequence[Sample] | None = None, val_fraction: float = 0.1, forward_batch: int = 8,
                 scale_samples: int = 64, shuffle_buffer: int | None = None, device: str | torch.device | None = None,
                 name: str = ""):
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

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return self.loaded.d_model

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
        """Like ActivationStore.batches; the default buffer is 8 batches (at most ~4 GiB) so the first batch comes fast."""
        _check_split(split, batch_size)
        buffer = self.shuffle_buffer or min(8 * batch_size, _default_buffer(batch_size, self.n_layers, self.d_model, 4 * 2**30))
        in_scale, out_scale = (s.to(self.device)[:, None] for s in self._estimate_scales())
        chunks = ((c.acts[self.config.input_sites[0]] * in_scale, c.acts[TARGET_SITE] * out_scale)
                  for c in self._forward(split, seed))
        return _shuffled_batches(chunks, batch_size, buffer, np.random.default_rng([seed, 1]), keep_last=split == "val")

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
                               self.device, torch.float32)
        keep = ~chunk.bos
        index = torch.tensor([i for i, _ in pending])
        return TokenChunk({s: a[keep.to(a.device)] for s, a in chunk.acts.items()}, chunk.token_id[keep],
                          chunk.position[keep], index[chunk.sample[keep]], chunk.kind[keep], chunk.bos[keep])

    def _estimate_scales(self) -> tuple[Tensor, Tensor]:
        """Fix the scales from the first scale_samples train samples in stream order (computed once)."""
        if self._scales is None:
            sums = {s: torch.zeros(self.n_layers, dtype=torch.float64) for s in self.config.sites}
            count = 0
            first = islice(self._split_samples("train", None), self.scale_samples)
            for pending in _batched(first, self.config.batch_size):
                chunk = self._run(pending)
                for s in sums:
                    sums[s] += chunk.acts[s].pow(2).sum(-1).double().sum(0).cpu()
                count += len(chunk.bos)
            if count == 0:
                raise ValueError(f"the first samples of the stream have no usable tokens (kinds kept: {', '.join(self.config.kinds)})")
            self._scales = (_scale((sums[self.config.input_sites[0]] / count).tolist(), self.d_model),
                            _scale((sums[TARGET_SITE] / count).tolist(), self.d_model))
        return self._scales


def _batched(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    items = iter(items)
    while batch := list(islice(items, size)):
        yield batch


def check_compatible(source, n_layers: int, d_model: int) -> None:
    """Refuse a store/source whose layer count or width differs from the model's (one-line ValueError)."""
    if (source.n_layers, source.d_model) != (n_layers, d_model):
        raise ValueError(f"the activations have {source.n_layers} layers of width {source.d_model} but the model has "
                         f"{n_layers} x {d_model}; capture activations from this model (all layers)")
