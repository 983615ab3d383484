"""What a training run keeps on disk, and when: checkpoints, the run's marker, the free-space check, stop requests.

A run's folder (`train --out`) holds run.json (the configs it was started with: the folder is a run of ours),
checkpoints/step-N (weights, optimizer states, trainer state; the newest complete one named by latest.json), and
at the end the CLT itself. Checkpoints are written every `checkpoint_every` steps, every `checkpoint_minutes`, and
when the process is asked to stop (Ctrl-C, SIGTERM), so an interrupted run loses at most one step.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from .clt import CrossLayerTranscoder
from .files import latest_version, write_json, write_version

CHECKPOINTS = "checkpoints"
RUN_MARKER = "run.json"


def save_checkpoint(out_dir: Path, step: int, clt: CrossLayerTranscoder, opt_state: dict, since_fired: Tensor,
                    state: dict) -> Path:
    """checkpoints/step-N, written whole and then made current by one rename (files.write_version)."""
    def write(folder: Path) -> None:
        clt.save(folder)
        torch.save(opt_state, folder / "optimizer.pt")
        save_file({"since_fired": since_fired.cpu().contiguous(), "cpu_rng": torch.get_rng_state()}, str(folder / "trainer.safetensors"))
        (folder / "state.json").write_text(json.dumps(state))

    return write_version(out_dir / CHECKPOINTS, f"step-{step:08d}", write, step=step)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The folder of the newest complete checkpoint in out_dir, or None."""
    return latest_version(Path(out_dir) / CHECKPOINTS)


def check_resume(source: Path, saved: dict, current: dict, resumable: tuple[str, ...]) -> None:
    """One-line ValueError when a checkpoint or run marker was made with other settings than this call (fields in
    `resumable` may differ)."""
    if saved["clt_config"] != current["clt_config"]:
        diff = sorted(k for k in current["clt_config"] if saved["clt_config"].get(k) != current["clt_config"][k])
        raise ValueError(f"{source} was trained with a different CLT config (differs in {diff}); use another out_dir")
    keys = [k for k in current["train_config"] if k not in resumable]
    diff = [k for k in keys if saved["train_config"].get(k) != current["train_config"][k]]
    if diff:
        raise ValueError(f"{source} was trained with a different TrainConfig (differs in {diff}); use another out_dir")


def claim_out_dir(out_dir: Path, configs: dict, resumable: tuple[str, ...]) -> None:
    """Make out_dir this run's folder, or refuse in one line: a file, a folder with other contents (a model, someone
    else's files), or a run started with other settings. Writes run.json on a fresh start."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file; pass a folder (new or empty) for the trained CLT")
    marker = out_dir / RUN_MARKER
    if marker.is_file():
        check_resume(marker, json.loads(marker.read_text()), configs, resumable)
        return
    if out_dir.is_dir() and any(out_dir.iterdir()) and latest_checkpoint(out_dir) is None:
        raise ValueError(f"--out {out_dir} is not empty and holds no training run (no {RUN_MARKER}); nothing was "
                         "written: train into a new or empty folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(marker, configs)


def check_disk(out_dir: Path, weight_bytes: int, optimizer_bytes: int, checkpoint_every: int) -> None:
    """One-line ValueError, before any training, when out_dir's disk cannot take what the run will write: the final
    model and, with checkpoints, two of them at once (a new one is complete before the old one is removed)."""
    checkpoint = weight_bytes + optimizer_bytes
    need = weight_bytes + (2 * checkpoint if checkpoint_every else 0)
    if latest_checkpoint(out_dir) is not None:
        need -= checkpoint  # resuming: one checkpoint is on disk already
    folder = next(parent for parent in (out_dir.absolute(), *out_dir.absolute().parents) if parent.exists())
    free = shutil.disk_usage(folder).free
    if free < need:
        keep = "; or set checkpoint_every=0 to keep only the final model" if checkpoint_every else ""
        raise ValueError(f"{out_dir} has {free / 1e9:,.2f} GB free but this run writes up to {need / 1e9:,.2f} GB (the "
                         f"final model {weight_bytes / 1e9:,.2f} GB" + (f", two checkpoints of {checkpoint / 1e9:,.2f} GB"
                         if checkpoint_every else "") + f"); free space or write elsewhere{keep}")


class StopRequests:
    """Ctrl-C (SIGINT) and SIGTERM set `requested` instead of killing the run mid-step; the trainer then writes a
    checkpoint and stops. A context manager that restores the previous handlers (only the main thread may set them;
    elsewhere it does nothing)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested, self._previous = False, {}

    def _request(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self) -> StopRequests:
        try:
            self._previous = {s: signal.signal(s, self._request) for s in self.SIGNALS}
        except ValueError:  # not the main thread
            self._previous = {}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class TrainingInterrupted(KeyboardInterrupt):
    """Raised after a stop request once the run's state is safe on disk; its message says how to resume."""
