"""The README's benchmark figures are the committed results' (benchmarks/results/*.json), to the digits it states."""

import json
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def trainer_figures(result: dict) -> dict[str, str]:
    """From bench_train.py's two runs (full CLT, per-layer transcoder) at expansion 16."""
    full, plt = result["full_clt"]["results"]["x16"], result["per_layer_transcoder"]["results"]["x16"]
    return {"full step": f"{full['sparse']['step_s']:.2f} s",
            "full speed-up": f"{full['speedup_over_reference']:.2f}x",
            "full peak": f"{full['sparse']['peak_mb']:,.0f} MB", "full peak before": f"{full['sparse@reference']['peak_mb']:,.0f} MB",
            "per-layer speed-up": f"{plt['speedup_over_reference']:.2f}x",
            "per-layer peak": f"{plt['sparse']['peak_mb']:,.0f} MB", "per-layer peak before": f"{plt['sparse@reference']['peak_mb']:,.0f} MB",
            "sparse/dense": f"{full['speedup_sparse_over_dense']:.1f}x", "floors ratio": f"{full['step_over_floors']:.1f}x",
            "compute floor": f"{full['floors_s']['compute']:.3f} s", "memory floor": f"{full['floors_s']['memory']:.3f} s"}


def closed_loop_figures(result: dict) -> dict[str, str]:
    """KL with every MLP replaced for the course recipe and the skip variant over seeds 0-2, and the rest."""
    runs = result["results"]
    course = [runs[name]["all"]["kl"] for name in ("course", "seed1", "seed2")]
    skip = [runs[name]["all"]["kl"] for name in ("skip", "skip+seed1", "skip+seed2")]
    kept0 = [runs[name]["kept0"]["kl"] for name in ("course", "seed1", "seed2")]
    agreement = [runs[name]["all"]["answer_agreement"] for name in ("course", "seed1", "seed2", "skip", "skip+seed1", "skip+seed2")]
    return {"course KL": " / ".join(f"{v:.2f}" for v in course), "course mean": f"{statistics.mean(course):.2f}",
            "skip KL": " / ".join(f"{v:.2f}" for v in skip), "skip mean": f"{statistics.mean(skip):.2f}",
            "kept0 KL": f"{min(kept0):.2f}–{max(kept0):.2f}",
            "only0 KL": f"{min(r['only0']['kl'] for r in runs.values()):.3f}–{max(r['only0']['kl'] for r in runs.values()):.3f}",
            "agreement": f"{min(agreement):.3f}–{max(agreement):.3f}",
            "x16 KL": f"{runs['x16']['all']['kl']:.2f}", "tokens4x KL": f"{runs['skip+tokens4x']['all']['kl']:.2f}",
            "tokens4x FVU": f"{runs['skip+tokens4x']['val_fvu_mean']:.4f}", "course FVU": f"{runs['course']['val_fvu_mean']:.4f}"}


def effects_figures(result: dict) -> dict[str, str]:
    """Graph / random ratios at k = 16 and 4, median changes and answer leads, per family in the README's order."""
    runs = [result["results"][family] for family in ("colour", "shape", "count", "exists", "describe")]
    seconds = [run["seconds_per_prompt"] for run in runs]
    c, s, n, e, d = (f"{run['16']['ratio']:.1f}x" for run in runs)
    return {"ratios k=16": f"{c} (colour), {s} (shape), {n} (count), {e} (existence) and {d} (description)",
            "ratios k=4": " / ".join(f"{run['4']['ratio']:.1f}x" for run in runs),
            "medians k=16": " / ".join(f"{run['16']['graph_quartiles'][1]:.2f}" for run in runs),
            "leads": " / ".join(f"{run['mean_lead']:.1f}" for run in runs),
            "seconds": f"{min(seconds):.2f}–{max(seconds):.2f} s"}


@pytest.mark.parametrize("name, figures", [("train-cpu.json", trainer_figures), ("closed-loop-cpu.json", closed_loop_figures),
                                           ("effects-cpu.json", effects_figures)])
def test_readme_states_the_committed_benchmark_results(name, figures):
    readme = " ".join((ROOT / "README.md").read_text().split())
    for what, value in figures(json.loads((RESULTS / name).read_text())).items():
        assert value in readme, f"README should state {what} = {value} from {name}"
