"""Cached steps of the course, so each notebook runs on its own.

Every product (an activation store, a trained CLT) lives under `run_dir` in a folder named
by a hash of the parameters that made it. A notebook asks for what it needs; if an earlier
notebook already produced it with the same parameters it is reused, otherwise it is made
(and the underlying steps resume after a kill rather than start over).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from . import data, optim
from .clt import CLTConfig, CrossLayerTranscoder
from .files import write_json
from .store import ActivationStore, CaptureConfig, CaptureSummary, StreamingSource, capture
from .train import TrainConfig, TrainResult, train


def cache_path(run_dir: str | Path, kind: str, **key) -> Path:
    """run_dir/<kind>-<10 hex digits of the key>: same parameters, same folder."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return Path(run_dir) / f"{kind}-{digest}"


# The course's CLTs read mlp_in; resid_mid is stored too so notebooks 03-04 can show why (image tokens'
# residual stream is tens of times larger than text's at layer 0, so one scale per layer drowns the text).
COURSE_INPUT_SITES = ("mlp_in", "resid_mid")


def capture_shapes(loaded, n_samples: int, run_dir: str | Path, seed: int = 0, dtype: str = "float16",
                   progress: bool = True) -> tuple[ActivationStore, CaptureSummary]:
    """Activations of n ShapesWorld training samples (all layers, mlp_in + resid_mid + mlp_out), cached.

    The store is opened reading mlp_in; `ActivationStore(store.path, "resid_mid")` reads the other site.
    """
    config = CaptureConfig(dtype=dtype, input_sites=COURSE_INPUT_SITES)
    path = cache_path(run_dir, "acts", model=loaded.name, weights=loaded.fingerprint(), n_samples=n_samples, seed=seed,
                      dtype=dtype, input_sites=COURSE_INPUT_SITES)
    samples = data.iter_shapes_world(n_samples, "train", seed, loaded.world)
    summary = capture(loaded, samples, path, config, data_id=f"shapes:{n_samples}:seed{seed}", progress=progress)
    return ActivationStore(path), summary


def training_source(loaded, run_dir: str | Path, stream: bool, capture_samples: int, seed: int = 0,
                    store_dtype: str = "float16", input_site: str = "mlp_in", progress: bool = True) -> ActivationStore | StreamingSource:
    """Where a course CLT's training activations come from.

    stream=False: notebook 02's cached store of `capture_samples` samples (reused every epoch).
    stream=True: fresh ShapesWorld samples run through the model on the fly, never stored (the only
    option at LLaVA-7B scale, 512 KiB per token); normalised like a store, and a resumed training run
    replays the same stream, so it continues at the same batch. Then `capture_samples` held-out samples
    serve as the val split, and as many train samples fix the normalisation scales.
    """
    if not stream:
        acts, _ = capture_shapes(loaded, capture_samples, run_dir, seed=seed, dtype=store_dtype, progress=progress)
        return acts if input_site == acts.input_site else ActivationStore(acts.path, input_site=input_site)
    world = loaded.world
    return StreamingSource(loaded, lambda: data.iter_shapes_world(None, "train", seed, world), input_site=input_site,
                           val_samples=data.shapes_world(capture_samples, "val", seed, world), scale_samples=capture_samples,
                           name=f"stream-{loaded.name}-{loaded.fingerprint()}-seed{seed}-n{capture_samples}-{input_site}")


def configs(loaded, expansion_factor: int, k: int, cross_layer: int, train_tokens: int, batch_size: int, seed: int = 0,
            device: str = "auto", optimizer: str = "adam", input_site: str = "mlp_in") -> tuple[CLTConfig, TrainConfig]:
    """Notebook 03's CLT and training configs from the notebooks' parameters (so 04-06 reload the same CLT);
    the CLT's dtype is the one the optimizer recipe trains (bfloat16 for adam-bf16)."""
    clt_config = CLTConfig(n_layers=loaded.n_layers, d_model=loaded.d_model, expansion_factor=expansion_factor, k=k,
                           cross_layer=cross_layer, input_site=input_site, dtype=optim.recipe(optimizer).param_dtype)
    return clt_config, TrainConfig(tokens=train_tokens, batch_size=batch_size, seed=seed, device=device, optimizer=optimizer)


def train_clt(source: ActivationStore | StreamingSource, run_dir: str | Path, clt_config: CLTConfig,
              train_config: TrainConfig, progress: bool = True) -> tuple[CrossLayerTranscoder, TrainResult]:
    """Train (or resume, or just reload) a CLT on a store or a `training_source` stream; cached by source and configs.

    A finished run's result is kept beside it (result.json), so a reload neither re-runs validation nor, for a
    stream, re-runs the model to re-estimate its scales: notebooks 04-06 reload in seconds at any model size.
    """
    source_key = source.path.name if isinstance(source, ActivationStore) else source.name
    # DDP or FSDP, checkpoints by time or not: the same weights
    how = {k: v for k, v in asdict(train_config).items() if k not in ("parallel", "checkpoint_minutes")}
    path = cache_path(run_dir, "clt", store=source_key, clt=asdict(clt_config), train=how)
    saved = path / "result.json"
    if saved.is_file():
        result = TrainResult(**json.loads(saved.read_text()))
    else:
        result = train(clt_config, train_config, source, path, progress=progress)
        write_json(saved, result._asdict())
    return CrossLayerTranscoder.load(path), result
