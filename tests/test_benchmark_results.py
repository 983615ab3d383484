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


def finetune_figures(result: dict) -> dict[str, str]:
    """Closed-loop fine-tuning (bench_closed_loop.py's `closedloop` variant) against the course CLT it starts from,
    on the 16- and 32-layer toys: KL all / MLP 0 kept / MLP 0 only, agreement, validation FVU before and after."""
    figures = {}
    for depth, runs in result["results"].items():
        before, after = runs["course"], runs["closedloop"]
        tuned = after["finetune"]
        figures[f"{depth} KL"] = (f"{depth} layers: KL with all MLPs replaced {before['all']['kl']:.2f} → {after['all']['kl']:.2f}, "
                                  f"MLP 0 kept {before['kept0']['kl']:.2f} → {after['kept0']['kl']:.2f}, MLP 0 alone "
                                  f"{before['only0']['kl']:.3f} → {after['only0']['kl']:.3f}")
        figures[f"{depth} agreement"] = (f"answer agreement {before['all']['answer_agreement']:.3f} → "
                                         f"{after['all']['answer_agreement']:.3f}")
        figures[f"{depth} FVU"] = (f"validation FVU {before['val_fvu_mean']:.4f} → {tuned['val_fvu_mean_after']:.4f} "
                                   f"(layer 0 {before['val_fvu_layer0']:.4f} → {tuned['val_fvu_layer0_after']:.4f})")
        figures[f"{depth} time"] = f"{tuned['config']['steps']} steps in {after['train_seconds']:.0f} s"
        figures[f"{depth} step 50"] = f"{tuned['kl_every_25_steps'][2]:.2f} at {depth} layers"
    return figures


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
                                           ("closed-loop-finetune-cpu.json", finetune_figures),
                                           ("effects-cpu.json", effects_figures)])
def test_readme_states_the_committed_benchmark_results(name, figures):
    readme = " ".join((ROOT / "README.md").read_text().split())
    for what, value in figures(json.loads((RESULTS / name).read_text())).items():
        assert value in readme, f"README should state {what} = {value} from {name}"


def full_depth_figures(closed_loop: dict) -> dict[str, str]:
    """The 32-layer toy's card and training record, the course's times on it and its closed-loop fidelity."""
    from clt_lite import model_card
    from clt_lite.toy import SHIPPED

    folder = SHIPPED["tiny-llava-shapes-32"][0]
    record = json.loads((folder / "training.json").read_text())
    curve, config = record["curve"], record["config"]
    base_steps = max(c["step"] for c in curve if c["layers"] == config["grow_from"])
    first, second = (run["curve"][-1] for run in json.loads((folder / model_card.FROM_SCRATCH_FILE).read_text()))
    card = (folder / "README.md").read_text().splitlines()
    accuracy = [float(v) for v in card[card.index("| colour | shape | count | exists | describe | all |") + 2].strip("| ").split(" | ")]
    drift = statistics.median(model_card.copy_drift(folder, config["n_layers"] // config["grow_from"]))
    course_times = json.loads((RESULTS / "course-times-cpu32.json").read_text())
    times, circuit = course_times["seconds"], course_times["known_circuit_05"]
    runs = closed_loop["results"]
    course, skip = [runs[n] for n in ("course", "seed1")], [runs[n] for n in ("skip", "skip+seed1")]

    def kls(rows, which):
        return " / ".join(f"{row[which]['kl']:.2f}" for row in rows)

    agreement = [row[w]["answer_agreement"] for row in course + skip for w in ("all", "kept0", "only0")]
    return {"from scratch": f"existence at {first['exists']:.2f} after {first['step']} steps and at chance, {second['exists']:.2f}, "
                            f"after {second['step']}",
            "base steps": f"until every family passes ({base_steps} steps)",
            "grown steps": f"trains {curve[-1]['step'] - base_steps} more steps",
            "rebuild": f"{curve[-1]['minutes']:.1f} minutes on 2 cores", "accuracy": f"at least {min(accuracy):.3f}",
            "drift": f"median relative difference of their MLP weights {drift:.3f}",
            "notebook 03": f"notebook 03 (three transcoders) takes {times['03']:.0f} s",
            "notebook 05": f"notebook 05 {times['05']:.0f} s",
            "notebook 05 before": f"Notebook 05 took {course_times['05_before_batched_interventions']['seconds']:.0f} s before",
            "swap cell": f"its swap cell went from {course_times['05_before_batched_interventions']['swap-rate cell']:.0f} s to "
                         f"{course_times['slowest_cells_s']['05']['swaps, 50 prompts (swap-rate)']:.0f} s",
            "course": f"all seven {sum(times.values()):.0f} s",
            "known circuit": f"together carry {circuit['through_heads']['colour']:.2f} of colour answers' object contribution "
                             f"and {circuit['through_heads']['describe']:.2f} of descriptions', the other heads of those "
                             f"layers {circuit['other_heads_of_those_layers']['colour']:.2f} and "
                             f"{circuit['other_heads_of_those_layers']['describe']:.2f}",
            "course KL": f"all 32 MLPs replaced {kls(course, 'all')}, MLP 0 kept {kls(course, 'kept0')}, "
                         f"MLP 0 alone {kls(course, 'only0')}",
            "skip KL": f"skip path {kls(skip, 'all')}, {kls(skip, 'kept0')} and {kls(skip, 'only0')}",
            "agreement": f"answer agreement {min(agreement):.3f}–{max(agreement):.3f}"}


def test_readme_states_the_decoder_kernel_figures():
    backward = json.loads((RESULTS / "decoder-kernels-cpu.json").read_text())["backward_s"]
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"takes {backward['fused c++']:.2f} s fused against {backward['embedding_bag']:.2f} s" in readme


def test_readme_states_the_full_depth_figures():
    readme = " ".join((ROOT / "README.md").read_text().split())
    for what, value in full_depth_figures(json.loads((RESULTS / "closed-loop-cpu32.json").read_text())).items():
        assert value in readme, f"README should state {what} = {value}"
