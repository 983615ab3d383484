"""`python -m clt_lite <command>`: the package's API for long unattended runs.

Every command takes --json (one JSON object as the last line of output) and exits
non-zero with a one-line message on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_notebooks(args) -> dict:
    from .notebooks import run_notebooks

    runs = run_notebooks(args.config, args.only, figure_dir=args.figures, in_place=args.in_place)
    for run in runs:
        print(f"{run.notebook}: {run.seconds:.0f} s -> {run.output}")
    return {"notebooks": [{"name": r.notebook, "output": str(r.output), "seconds": round(r.seconds, 1)} for r in runs]}


def _cmd_toy(args) -> dict:
    from . import models, toy

    if args.action == "train":
        config = toy.ToyConfig(**({"steps": args.steps} if args.steps else {}))
        result = toy.train(config, args.out, device=args.device, progress=not args.json)
        print(f"toy saved to {args.out} after {result['steps']} steps")
        return {"out": str(args.out), **result}
    loaded = models.load(args.model, device=args.device)
    accuracy = toy.evaluate(loaded.model, loaded.processor, toy.eval_set(args.per_family))
    for family, value in accuracy.items():
        print(f"{family:>8}: {value:.3f}")
    return {"model": args.model, "per_family": args.per_family, "accuracy": accuracy}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clt_lite", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, handler) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help)
        sub.add_argument("--json", action="store_true", help="print one JSON object as the last line")
        sub.set_defaults(handler=handler)
        return sub

    nb = command("notebooks", "execute the course notebooks with papermill", _cmd_notebooks)
    nb.add_argument("--config", default="configs/cpu.yaml", help="papermill parameter set (YAML)")
    nb.add_argument("--only", nargs="+", metavar="NN", help="notebook numbers to run, e.g. 01 02")
    nb.add_argument("--figures", default=None, help="figure folder relative to notebooks/ (default: under runs/)")
    nb.add_argument("--in-place", action="store_true", help="overwrite notebooks/ with outputs of the CPU defaults (maintainers)")

    toy = command("toy", "train or evaluate the shipped toy VLM", _cmd_toy)
    toy.add_argument("action", choices=["train", "eval"])
    toy.add_argument("--out", type=Path, help="train: output folder")
    toy.add_argument("--model", default="tiny-llava-shapes", help="eval: model folder or name")
    toy.add_argument("--steps", type=int, help="train: override the number of steps")
    toy.add_argument("--per-family", type=int, default=100, help="eval: held-out questions per family")
    toy.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "toy" and args.action == "train" and args.out is None:
        print("error: toy train needs --out DIR", file=sys.stderr)
        return 2
    try:
        result = args.handler(args)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, default=str))
    return 0
