"""How far the graph's top features move the answer, against random features, on many held-out prompts per family.

For each question family (50 held-out test-split prompts each by default), build each prompt's attribution graph for
the model's own answer and ablate, in the real model, k features three ways (`attribution.ablation_effects`): the
graph's k most influential, k random active features at the same positions (the baseline), and the k most active.
Prints, per family and k, the mean |change of the answer's logit| for each choice, the graph / random ratio, the
quartiles of the per-prompt changes, and the time per graph.

    python benchmarks/bench_effects.py --prompts 50 --json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from clt_lite import attribution, course, data, models
from clt_lite.notebooks import ROOT, load_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "cpu.yaml"), help="the course recipe (its CLT is notebook 03's)")
    p.add_argument("--run-dir", default="runs/cpu", help="the course's cache (notebook 02's store, notebook 03's CLT)")
    p.add_argument("--prompts", type=int, default=50, help="held-out prompts per family")
    p.add_argument("--families", nargs="+", default=list(data.FAMILIES), choices=data.FAMILIES)
    p.add_argument("--ks", nargs="+", type=int, default=[1, 4, 16], help="features ablated together")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p.parse_args(argv)


def quartiles(values: list[float]) -> list[float]:
    return [round(float(q), 4) for q in torch.tensor([abs(v) for v in values]).quantile(torch.tensor([0.25, 0.5, 0.75]))]


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    recipe = load_config(args.config)
    loaded = models.load(recipe["model"], device="cpu", dtype=recipe["dtype"])
    source = course.training_source(loaded, args.run_dir, recipe["stream"], recipe["capture_samples"], seed=recipe["seed"],
                                    store_dtype=recipe["store_dtype"], progress=False)
    clt_config, train_config = course.configs(loaded, recipe["expansion_factor"], recipe["k"], recipe["cross_layer"],
                                              recipe["train_tokens"], recipe["batch_size"], recipe["seed"], "cpu", recipe["optimizer"])
    clt, _ = course.train_clt(source, args.run_dir, clt_config, train_config, progress=False)
    results = {}
    for family in args.families:
        samples = data.shapes_world(args.prompts, "test", recipe["seed"], loaded.world, family=family)
        start = time.perf_counter()
        effects = attribution.ablation_effects(loaded, clt, samples, ks=args.ks, max_feature_nodes=recipe["ground_truth_max_features"])
        seconds = time.perf_counter() - start
        results[family] = {str(e.k): {"graph": round(e.mean_abs("graph"), 4), "random": round(e.mean_abs("random"), 4),
                                      "largest": round(e.mean_abs("largest"), 4), "ratio": round(e.ratio, 2),
                                      "graph_quartiles": quartiles(e.graph), "random_quartiles": quartiles(e.random)}
                           for e in effects}
        results[family]["seconds_per_prompt"] = round(seconds / len(samples), 2)
        results[family]["mean_lead"] = round(sum(effects[0].leads) / len(effects[0].leads), 3)
        for e in effects:
            row = results[family][str(e.k)]
            print(f"{family:<9} k={e.k:<3} graph {row['graph']:.3f} random {row['random']:.3f} largest {row['largest']:.3f} "
                  f"ratio {row['ratio']:.1f}  graph quartiles {row['graph_quartiles']}", flush=True)
    if args.json:
        print(json.dumps({"model": loaded.name, "prompts_per_family": args.prompts,
                          "max_feature_nodes": recipe["ground_truth_max_features"], "threads": torch.get_num_threads(),
                          "results": results}))


if __name__ == "__main__":
    main()
