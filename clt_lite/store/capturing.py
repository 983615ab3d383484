"""capture(): run the model over a dataset and write a sharded, checksummed store, resuming a killed run."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from itertools import chain, islice
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save as safetensors_bytes

from .. import __version__
from ..choices import DType, check
from ..data import Sample, encode_batch, sample_prompt
from ..files import write_bytes, write_json
from ..models import LoadedModel
from ..progress import progress_bar
from .forward import TokenChunk, _keep_mask, forward_tokens
from .schema import FORMAT, INPUT_SITES, KINDS, MANIFEST, META_BYTES, META_FIELDS, STORE_DTYPES, TARGET_SITE


def bytes_per_token(n_layers: int, d_model: int, dtype: str = "bfloat16", n_sites: int = 2) -> int:
    """Activation bytes one token costs: n_sites x layers x d x dtype size (LLaVA-7B bf16: 512 KiB)."""
    return n_sites * n_layers * d_model * STORE_DTYPES[dtype].itemsize


def free_bytes(path: Path) -> int:
    """Free space where `path` lives; a module function so tests can simulate a small disk."""
    return shutil.disk_usage(path).free


@dataclass(frozen=True)
class CaptureConfig:
    """What to record. Every field is part of the store's identity: a rerun must use the same values."""

    layers: tuple[int, ...] | None = None  # decoder layers to record (sorted); None = all
    input_sites: tuple[str, ...] = ("mlp_in",)  # CLT input site(s) stored next to mlp_out: mlp_in (default) and/or resid_mid
    kinds: tuple[str, ...] = KINDS  # position kinds kept; padding never; BOS kept (flagged) whenever "text" is
    dtype: DType = "float16"  # on-disk dtype: float16, bfloat16 or float32
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
        check("store dtype", self.dtype, DType)
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
    bar = progress_bar(total=total_estimate or None, initial=manifest["n_tokens"], desc="capture", unit="tok", unit_scale=True,
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
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; capture into a new or empty folder")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty and holds no {MANIFEST}; capture into a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": FORMAT, "clt_lite_version": __version__, "model": loaded.name, "model_fingerprint": loaded.fingerprint(),
        "model_layers": loaded.n_layers,
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
    chunks, kept = [], 0
    for i in range(0, len(samples), config.batch_size):
        if remaining is not None and kept >= remaining:  # the token budget is met: forward no more of the shard
            break
        chunks.append(forward_tokens(loaded, samples[i:i + config.batch_size], first_index + i, layers, config.sites,
                                     config.kinds, "cpu", dtype))
        kept += len(chunks[-1].bos)
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
