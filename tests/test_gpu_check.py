"""benchmarks/gpu_check.py (`make gpu-check`): refuses without CUDA; its CPU test mode runs every phase."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
TINY = ["--model", "random:tiny", "--samples", "8", "--forward-batch", "4", "--batch-size", "64",
        "--stream-batches", "2", "--train-steps", "2", "--k", "4"]


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible: the script would run")
def test_refuses_without_cuda_in_one_line():
    done = _run()
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA" in lines[0]


def test_cpu_mode_prints_one_json_object_with_every_figure(tmp_path):
    out = tmp_path / "results" / "gpu-check.json"
    done = _run("--allow-cpu", *TINY, "--out", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == report
    for key in ("device", "torch", "transformers", "model", "dtype", "tokens_per_forward_batch"):
        assert report[key], key
    for key in ("forward_tok_s", "capture_tok_s", "stream_tok_s", "train_tok_s", "capture_over_forward",
                "stream_over_forward", "train_planned_gib"):
        assert report[key] > 0, key
    for key in ("forward_peak_gib", "capture_peak_gib", "stream_peak_gib", "train_peak_gib",
                "train_measured_over_planned"):
        assert report[key] is None, key  # peak memory is measured on CUDA only
    errors = dict(report["identity_errors"])
    tolerance = errors.pop("tolerance")
    assert len(errors) == 2 and tolerance == 2**-7  # one ulp of bfloat16
    assert all(math.isfinite(error) and 0 <= error <= tolerance for error in errors.values())
    assert report["train_steps_done"] == 2 and report["train_error"] is None
    assert report["model"] == "random:tiny" and report["n_layers"] == 4 and report["dtype"] == "bfloat16"
