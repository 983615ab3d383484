"""Interrupted training keeps its work: Ctrl-C writes a checkpoint and stops in one line; SIGKILL at random moments,
again and again, loses at most the steps since the last checkpoint; every resumed run ends bit-identical (CPU) to an
uninterrupted one. The CLI runs in child processes, as a user runs it."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clt_lite import cli
from clt_lite.clt import CrossLayerTranscoder
from clt_lite.train import latest_checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("interrupts") / "acts"
    assert cli.main(["capture", "--model", "random:tiny", "--data", "shapes:24", "--out", str(out), "--device", "cpu"]) == 0
    return out


def _train_cmd(store: Path, out: Path, steps: int, checkpoint_every: int) -> list[str]:
    return [sys.executable, "-m", "clt_lite", "train", "--acts", str(store), "--expansion", "1", "--k", "4",
            "--batch-size", "64", "--tokens", str(64 * steps), "--checkpoint-every", str(checkpoint_every),
            "--out", str(out), "--device", "cpu"]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return CrossLayerTranscoder.load(folder).state_dict()


def _assert_identical(a: Path, b: Path) -> None:
    for (name, x), y in zip(_weights(a).items(), _weights(b).values(), strict=True):
        assert torch.equal(x, y), name


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None and time.time() < deadline, "training never started"
        time.sleep(0.05)


def test_ctrl_c_saves_a_checkpoint_says_so_in_one_line_and_the_rerun_finishes_identically(store, tmp_path):
    steps = 1500
    run = subprocess.Popen(_train_cmd(store, tmp_path / "run", steps, 10**6) + ["--json"], env=ENV,  # --json: no bars
                           stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    _wait_for(tmp_path / "run" / "run.json", run)
    time.sleep(1.5)
    run.send_signal(signal.SIGINT)
    err = run.communicate(timeout=120)[1].strip().splitlines()
    assert run.returncode == 130, err
    assert len(err) == 1 and err[0].startswith("interrupted: stopped at step ") and "rerun the same command" in err[0]
    stopped_at = int(err[0].split("step ")[1].split(" ")[0])
    assert 0 < stopped_at < steps and latest_checkpoint(tmp_path / "run").name == f"step-{stopped_at:08d}"
    assert subprocess.run(_train_cmd(store, tmp_path / "run", steps, 10**6), env=ENV, capture_output=True).returncode == 0
    assert subprocess.run(_train_cmd(store, tmp_path / "whole", steps, 10**6), env=ENV, capture_output=True).returncode == 0
    _assert_identical(tmp_path / "whole", tmp_path / "run")


def test_sigkill_at_ten_random_moments_then_resume_is_bit_identical(store, tmp_path):
    steps, every, rng, kills = 2000, 25, random.Random(0), []
    while True:
        run = subprocess.Popen(_train_cmd(store, tmp_path / "run", steps, every), env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        if len(kills) == 10:
            assert run.wait(timeout=300) == 0
            break
        _wait_for(tmp_path / "run" / "run.json", run)
        time.sleep(rng.uniform(0.3, 1.5))  # somewhere in start-up, a step, or a checkpoint being written
        run.kill()
        run.wait()
        last = latest_checkpoint(tmp_path / "run")
        kills.append(int(last.name.removeprefix("step-")) if last else 0)
    assert len(kills) == 10 and kills == sorted(kills), kills  # no kill ever lost a checkpoint already written
    assert subprocess.run(_train_cmd(store, tmp_path / "whole", steps, every), env=ENV, capture_output=True).returncode == 0
    _assert_identical(tmp_path / "whole", tmp_path / "run")
