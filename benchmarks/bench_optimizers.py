"""Validation FVU of each optimizer recipe at the same token budget on the toy, measured in one run.

Captures (or reuses) a small activation store of the shipped toy VLM under --run-dir, trains the same CLT
with every recipe in clt_lite.optim.RECIPES from the same seed, batches and token budget, and prints each
recipe's mean validation FVU and its ratio to fp32 Adam's (the low-memory recipe must stay within 1.10).
The committed results (about 11 minutes on 2 shared cores) came from

    OMP_NUM_THREADS=1 python benchmarks/bench_optimizers.py --adam-lr 0.0032 --out benchmarks/results/optimizers-toy.json

3.2e-3 is adam-bf16's default at the toy's width (4x adam's); at adam's default (8e-4) separate runs gave
adam 0.0057 and adam-bf16 0.0069 (1.22x): bf16 weights lose steps smaller than their rounding.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clt_lite import course, models  # noqa: E402
from clt_lite.clt import CLTConfig  # noqa: E402
from clt_lite.optim import RECIPES, recipe  # noqa: E402
from clt_lite.train import TrainConfig, train  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default="/tmp/clt-lite-bench", help="where the toy's activation store is cached")
    p.add_argument("--samples", type=int, default=400, help="ShapesWorld samples captured (about 50 tokens each)")
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--cross-layer", type=int, default=0, help="0 = full")
    p.add_argument("--tokens", type=int, default=2**18, help="training tokens per recipe")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--optimizers", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--adam-lr", type=float, help="peak lr of every Adam recipe, so they compare at one lr "
                   "(default: the recipe's width-scaled default); Adafactor keeps its relative-step default")
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    loaded = models.load("tiny-llava-shapes", device="cpu")
    store, _ = course.capture_shapes(loaded, args.samples, args.run_dir, progress=False)
    print(f"toy store: {store.n_tokens:,} tokens, {store.n_layers} layers x d={store.d_model}, input {store.input_site}")
    results = {}
    for name in args.optimizers:
        clt_config = CLTConfig(n_layers=store.n_layers, d_model=store.d_model, expansion_factor=args.expansion,
                               k=args.k, cross_layer=args.cross_layer, input_site=store.input_site,
                               dtype=recipe(name).param_dtype)
        lr = args.adam_lr if recipe(name).kind == "adam" else None
        config = TrainConfig(tokens=args.tokens, batch_size=args.batch_size, optimizer=name, device="cpu", lr=lr,
                             val_batches=None, checkpoint_every=10**9)
        out = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        start = time.perf_counter()
        result = train(clt_config, config, store, out, progress=False)
        shutil.rmtree(out)
        mean_fvu = sum(result.fvu) / len(result.fvu)
        results[name] = {"lr": lr, "mean_val_fvu": mean_fvu, "val_fvu": result.fvu, "mean_l0": sum(result.l0) / len(result.l0),
                         "steps": result.steps, "seconds": time.perf_counter() - start,
                         "final_train_loss": result.history[-1]["loss"]}
        print(f"{name:>15}: mean val FVU {mean_fvu:.4f} (worst layer {max(result.fvu):.4f}), "
              f"{result.steps} steps in {results[name]['seconds']:.0f} s", flush=True)
    if "adam" in results:
        for name, r in results.items():
            r["fvu_ratio_to_adam"] = r["mean_val_fvu"] / results["adam"]["mean_val_fvu"]
            print(f"{name:>15}: FVU / adam's = {r['fvu_ratio_to_adam']:.3f}")
    report = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "store_tokens": store.n_tokens, "torch": torch.__version__, "results": results}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
