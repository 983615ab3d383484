"""How long each course notebook takes on this machine, from an empty cache and again with the cache filled.

An instructor runs this on a workshop laptop before the day: the cold pass is what a learner who skips
`make run` waits for (the activation store is captured and the CLTs are trained on first use), the warm
pass is what opening a notebook costs once `make run` has filled `runs/`. Both passes use one fresh cache
folder, so the machine's own `runs/cpu` is left alone. The committed results (docs/workshop.md's table,
checked against them by tests/test_prose.py) came from

    python benchmarks/bench_notebooks.py --out benchmarks/results/notebook-times-cpu.json
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clt_lite.files import write_json  # noqa: E402
from clt_lite.notebooks import ROOT, load_config, run_notebooks  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "cpu.yaml"), help="papermill parameter set (YAML)")
    p.add_argument("--only", nargs="+", default=None, metavar="NN", help="notebook numbers, e.g. 01 02 (default: all)")
    p.add_argument("--out", default=None, help="write the results here as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="clt-lite-times-") as cache:
        config = {**load_config(args.config), "run_dir": cache, "figure_dir": f"{cache}/figures"}
        config_path = Path(cache) / f"{Path(args.config).stem}-timing.yaml"
        config_path.write_text(yaml.safe_dump(config))
        passes = {name: {r.notebook[:2]: round(r.seconds) for r in run_notebooks(config_path, args.only)}
                  for name in ("cold", "warm")}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    result = {"config": Path(args.config).name, "commit": commit.stdout.strip(), "cpu_cores": os.cpu_count(),
              "omp_threads": os.environ.get("OMP_NUM_THREADS"), "machine": platform.machine(),
              "seconds": passes, "total_seconds": {name: sum(times.values()) for name, times in passes.items()}}
    print(f"{'notebook':<9} {'cold s':>7} {'warm s':>7}")
    for number in passes["cold"]:
        print(f"{number:<9} {passes['cold'][number]:>7} {passes['warm'][number]:>7}")
    print(f"{'all':<9} {result['total_seconds']['cold']:>7} {result['total_seconds']['warm']:>7}")
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
