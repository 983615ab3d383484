"""Interrupted work is kept: Ctrl-C on `train` writes a checkpoint and stops in one line; SIGKILL at ten random moments,
again and again, of `train`, `capture` and the toy's training loses at most the work since the last checkpoint or
shard, and each resumed run ends bit-identical (CPU) to an uninterrupted one. Child processes, as a user runs them.

About six minutes, so outside `make test`: `make test-interrupts` (CI runs it).
"""

from __future__ import annotations

import json
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

pytestmark = pytest.mark.interrupts

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
    steps = 6000  # about 35 s here: the SIGINT 4 s in lands mid-run, after the compiled kernels have loaded
    run = subprocess.Popen(_train_cmd(store, tmp_path / "run", steps, 10**6) + ["--json"], env=ENV,  # --json: no bars
                           stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    _wait_for(tmp_path / "run" / "run.json", run)
    time.sleep(4)
    run.send_signal(signal.SIGINT)
    err = run.communicate(timeout=120)[1].strip().splitlines()
    assert run.returncode == 130, err
    assert len(err) == 1 and err[0].startswith("interrupted: stopped at step ") and "rerun the same command" in err[0]
    stopped_at = int(err[0].split("step ")[1].split(" ")[0])
    assert 0 < stopped_at < steps and latest_checkpoint(tmp_path / "run").name == f"step-{stopped_at:08d}"
    assert subprocess.run(_train_cmd(store, tmp_path / "run", steps, 10**6), env=ENV, capture_output=True).returncode == 0
    assert subprocess.run(_train_cmd(store, tmp_path / "whole", steps, 10**6), env=ENV, capture_output=True).returncode == 0
    _assert_identical(tmp_path / "whole", tmp_path / "run")


def _kill_loop(cmd: list[str], progress, seed: int) -> list:
    """Start `cmd` and SIGKILL it, ten times; then let it finish. Kills are placed by what the run has done, not by the
    clock (how much a second buys depends on the machine: a fresh clone's capture once finished inside 3 s): a third
    of them fall in start-up (a random moment before the run's first new unit of work), the rest a random moment
    (0-0.4 s) after the run wrote a new unit of work (checkpoint or shard), so in a step, a forward pass or the next
    write. Each such kill must keep that unit, and the run is still unfinished when it falls."""
    rng, seen = random.Random(seed), []
    for _ in range(10):
        before = progress()
        run = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        in_start_up = rng.random() < 1 / 3
        deadline = time.time() + (rng.uniform(0.1, 2.5) if in_start_up else 300)
        while time.time() < deadline and run.poll() is None and progress() == before:
            time.sleep(0.02)
        if not in_start_up:
            assert run.poll() is None and progress() > before, "the run made no progress before it ended or timed out"
            time.sleep(rng.uniform(0.0, 0.4))
        run.kill()
        run.wait()
        seen.append(progress())
    assert subprocess.run(cmd, env=ENV, capture_output=True, timeout=600).returncode == 0
    final = progress()
    assert seen == sorted(seen), seen  # no kill ever lost work already written
    assert any(0 < done < final for done in seen), (seen, final)  # at least one kill fell in the middle of the work
    return seen


def test_train_killed_at_ten_random_moments_resumes_bit_identical(store, tmp_path):
    steps, every = 3000, 25

    def step() -> int:
        last = latest_checkpoint(tmp_path / "run")
        return int(last.name.removeprefix("step-")) if last else 0

    _kill_loop(_train_cmd(store, tmp_path / "run", steps, every), step, 0)
    assert subprocess.run(_train_cmd(store, tmp_path / "whole", steps, every), env=ENV, capture_output=True).returncode == 0
    _assert_identical(tmp_path / "whole", tmp_path / "run")


CAPTURE = """
import sys
from clt_lite import data, models
from clt_lite.store import CaptureConfig, capture
loaded = models.load("random:tiny", device="cpu")
capture(loaded, data.shapes_world(600, "train", 0, loaded.world), sys.argv[1], CaptureConfig(samples_per_shard=4),
        data_id="shapes:600", progress=False)
"""


def test_capture_killed_at_ten_random_moments_resumes_byte_identical(tmp_path):
    script = tmp_path / "capture.py"
    script.write_text(CAPTURE)
    manifest = tmp_path / "run" / "manifest.json"
    shards = lambda: len(json.loads(manifest.read_text())["shards"]) if manifest.exists() else 0  # noqa: E731
    _kill_loop([sys.executable, str(script), str(tmp_path / "run")], shards, 1)
    assert subprocess.run([sys.executable, str(script), str(tmp_path / "whole")], env=ENV).returncode == 0
    for path in sorted((tmp_path / "whole").iterdir()):
        assert path.read_bytes() == (tmp_path / "run" / path.name).read_bytes(), path.name


TOY = """
import sys
from clt_lite.toy import ToyConfig, train
train(ToyConfig(n_layers=2, d_model=32, n_heads=2, d_mlp=64, vision_width=32, vision_layers=1, steps=600, batch_size=4,
                warmup=4, eval_every=4, eval_per_family=2), sys.argv[1], device="cpu", progress=False)
"""


def test_toy_training_killed_at_ten_random_moments_resumes_bit_identical(tmp_path):
    from clt_lite.files import latest_version

    script = tmp_path / "toy.py"
    script.write_text(TOY)
    step = lambda: json.loads((latest_version(tmp_path / "run" / "checkpoint") / "state.json").read_text())["step"] \
        if latest_version(tmp_path / "run" / "checkpoint") else 0  # noqa: E731
    _kill_loop([sys.executable, str(script), str(tmp_path / "run")], step, 2)
    assert subprocess.run([sys.executable, str(script), str(tmp_path / "whole")], env=ENV).returncode == 0
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "run" / name).read_bytes(), name
