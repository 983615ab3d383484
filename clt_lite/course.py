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

from . import data
from .clt import CLTConfig, CrossLayerTranscoder
from .store import ActivationStore, CaptureConfig, CaptureSummary, capture
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
    samples = data.iter_shapes_world(n_samples, "train", seed)
    summary = capture(loaded, samples, path, config, data_id=f"shapes:{n_samples}:seed{seed}", progress=progress)
    return ActivationStore(path), summary


def train_clt(source: ActivationStore, run_dir: str | Path, clt_config: CLTConfig, train_config: TrainConfig,
              progress: bool = True) -> tuple[CrossLayerTranscoder, TrainResult]:
    """Train (or resume, or just reload) a CLT on a store; cached by store and configs."""
    path = cache_path(run_dir, "clt", store=source.path.name, clt=asdict(clt_config), train=asdict(train_config))
    result = train(clt_config, train_config, source, path, progress=progress)
    return CrossLayerTranscoder.load(path), result
