"""Where the closed-loop replacement loses fidelity, and what remedies buy: measured in one run.

For the course CLT (configs/cpu.yaml's recipe, or --config's, on notebook 02's store) and each remedy variant, the closed-loop
replacement model is scored on held-out ShapesWorld questions (the test split notebook 04 uses) three ways:

  all      every MLP replaced by the CLT
  kept0    MLP 0 left original, MLPs 1..L-1 replaced (what a design with targets from L+1 covers)
  only0    MLP 0 replaced, every other MLP original

reporting KL(original || replacement) over text positions and answer-token top-1 agreement. Variants:

  course   the course recipe (cached with notebook 03's CLT: the same folder)
  skip     plus a learned linear skip from each layer's input to its MLP output (W_skip)
  x16      twice the latents per layer (expansion 16)
  tokens4x four times the training tokens (the store is reused for more epochs)
  closedloop  then fine-tuned through its own closed loop (clt_lite.closed_loop: KL + closed-loop FVU, on
              training prompts; the cached CLT is not changed)

and combinations joined by "+" (skip+x16); a part seedN trains with seed N (seed1, skip+seed1) to show how much
of a difference is the seed's.

    python benchmarks/bench_closed_loop.py --variants course skip skip+x16 --json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

from clt_lite import closed_loop, course, data, models
from clt_lite import replacement as R
from clt_lite.notebooks import ROOT, load_config
from clt_lite.train import evaluate

VARIANTS = ("course", "skip", "x16", "tokens4x", "closedloop")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "cpu.yaml"), help="the course recipe the variants change")
    p.add_argument("--run-dir", default="runs/cpu", help="the course's cache (notebook 02's store, notebook 03's CLT)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), type=variant, help=f"any of {VARIANTS}, or joined by + (with seedN too)")
    p.add_argument("--samples", type=int, default=200, help="held-out questions (test split)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p.parse_args(argv)


def variant(name: str) -> str:
    if not {part for part in name.split("+") if not part.removeprefix("seed").isdigit()} <= set(VARIANTS):
        raise argparse.ArgumentTypeError(f"unknown variant {name!r}: use {', '.join(VARIANTS)} or join them with +")
    return name


def variant_configs(loaded, recipe: dict, name: str):
    """Notebook 03's configs from the course recipe, changed as the variant's parts say."""
    clt_config, train_config = course.configs(loaded, recipe["expansion_factor"], recipe["k"], recipe["cross_layer"],
                                              recipe["train_tokens"], recipe["batch_size"], recipe["seed"], "cpu",
                                              recipe["optimizer"])
    parts = set(name.split("+"))
    if "skip" in parts:
        clt_config = replace(clt_config, skip_connection=True)
    if "x16" in parts:
        clt_config = replace(clt_config, expansion_factor=16)
    if "tokens4x" in parts:
        train_config = replace(train_config, tokens=4 * train_config.tokens)
    for part in parts:
        if part.removeprefix("seed").isdigit():
            train_config = replace(train_config, seed=int(part.removeprefix("seed")))
    return clt_config, train_config


def main(argv=None) -> None:
    args = parse_args(argv)
    recipe = load_config(args.config)
    torch.manual_seed(recipe["seed"])
    loaded = models.load(recipe["model"], device="cpu")
    source = course.training_source(loaded, args.run_dir, stream=False, capture_samples=recipe["capture_samples"],
                                    seed=recipe["seed"], store_dtype=recipe["store_dtype"], progress=False)
    samples = data.shapes_world(args.samples, "test", seed=recipe["seed"], world=loaded.world)
    L = loaded.n_layers
    results = {}
    print(f"{loaded.name}: {L} layers, {len(samples)} held-out questions, closed loop")
    print(f"{'variant':<9} {'train s':>7}  {'KL all':>7} {'KL kept0':>8} {'KL only0':>8}  {'agr all':>7} {'agr kept0':>9} {'agr only0':>9}")
    for name in args.variants:
        clt_config, train_config = variant_configs(loaded, recipe, name)
        start = time.perf_counter()
        clt, trained = course.train_clt(source, args.run_dir, clt_config, train_config, progress=False)
        row = {"val_fvu_mean": sum(trained.fvu) / len(trained.fvu), "val_fvu_layer0": trained.fvu[0]}
        if "closedloop" in name.split("+"):
            prompts = data.shapes_world(recipe["capture_samples"], "train", seed=recipe["seed"], world=loaded.world)
            history = closed_loop.finetune(loaded, clt, prompts, progress=False)
            after = evaluate(clt, source, train_config.batch_size)  # still a transcoder on the original's activations?
            row["finetune"] = {"config": vars(closed_loop.ClosedLoopConfig()), "kl_every_25_steps": [
                round(step.kl, 4) for step in history[::25]] + [round(history[-1].kl, 4)],
                "closed_loop_fvu": {"first": history[0].fvu, "last": history[-1].fvu},
                "val_fvu_mean_after": sum(after.fvu) / len(after.fvu), "val_fvu_layer0_after": after.fvu[0]}
        seconds = time.perf_counter() - start
        row["train_seconds"] = seconds
        for which, layers in (("all", range(L)), ("kept0", range(1, L)), ("only0", [0])):
            scored = R.token_match(loaded, R.Replacement("clt", clt, layers=layers), samples, generate=False)
            row[which] = {"kl": scored.kl, "answer_agreement": scored.top1_answer}
        results[name] = row
        print(f"{name:<9} {seconds:>7.0f}  {row['all']['kl']:>7.3f} {row['kept0']['kl']:>8.3f} {row['only0']['kl']:>8.3f}  "
              f"{row['all']['answer_agreement']:>7.3f} {row['kept0']['answer_agreement']:>9.3f} "
              f"{row['only0']['answer_agreement']:>9.3f}", flush=True)
    if args.json:
        print(json.dumps({"model": loaded.name, "n_layers": L, "samples": len(samples), "results": results}))


if __name__ == "__main__":
    main()
