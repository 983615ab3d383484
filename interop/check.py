"""`make interop`: does a course CLT open in circuit-tracer 0.5 unchanged, and does a graph traced there mean what one
traced here means? One JSON line; exit 1 if any check fails.

Runs in the course's venv; circuit-tracer needs transformers <= 4.57 and nnsight 0.6.1, so its side runs in a venv of
its own (`--ct-python`, built by `make interop`) as a separate process that reads only files:

1. Here: the toy's language model written as a LlamaForCausalLM folder (`circuit_tracer.export_language_model`); the
   course's CLT recipe on the 16-layer toy with a quarter of its tokens (interop/cpu16-jumprelu.yaml: a JumpReLU
   decodes every latent densely, so a 32-layer one trains at 4.4 s a step on 2 cores, and the files circuit-tracer
   reads are laid out the same way at any depth) trained with a JumpReLU,
   the activation circuit-tracer runs (a TopK CLT is refused by the export in one line; `--topk` shows it), exported
   with `circuit_tracer.export`; reconstructions and the attribution graph of a text-only prompt.
2. There (interop/circuit_tracer_side.py, both backends, TransformerLens and nnsight): the same model and CLT
   loaded from those folders, reconstructions and `circuit_tracer.attribute` on the same token ids.
3. Compared: logits and reconstructions (relative error per layer) < 1e-5, adjacency matrices within 1e-5 of the
   largest entry (same nodes in the same order), replacement and completeness scores within 1e-4; for the whole graph
   and for one capped at CAP features (chosen by influence on both sides, re-ranked on the same schedule).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from clt_lite import attribution, circuit_tracer, course, data, models, sites
from clt_lite.clt import CrossLayerTranscoder
from clt_lite.files import write_json
from clt_lite.notebooks import load_config

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "what color is the circle?"  # LLaVA's text-only chat form: "USER: ... ASSISTANT:"
LIMITS = {"logits": 1e-5, "reconstruction": 1e-5, "adjacency": 1e-5, "scores": 1e-4}
CAP, BATCH = 1000, 128  # the capped graph: features kept, rows per backward pass (our default batch size)
UNCAPPED = 2**31  # the whole graph: every active feature, as circuit-tracer's max_feature_nodes=None (ours caps at 4096)


def course_jumprelu_clt(loaded, config: dict, run_dir: Path):
    """The course's CLT recipe (notebook 03, from the config's values) with a JumpReLU, cached like the course's."""
    source = course.training_source(loaded, run_dir, False, config["capture_samples"], seed=config["seed"],
                                    store_dtype=config["store_dtype"])
    clt_config, train_config = course.configs(loaded, config["expansion_factor"], config["k"], config["cross_layer"],
                                              config["train_tokens"], config["batch_size"], config["seed"], "cpu",
                                              config["optimizer"])
    clt, result = course.train_clt(source, run_dir, replace(clt_config, activation="jumprelu"), train_config)
    return clt, result


def replace_activation(clt, activation: str):
    """The same weights under another activation (only the export's refusal is exercised with it)."""
    with torch.device("meta"):
        other = CrossLayerTranscoder(replace(clt.config, activation=activation))
    state = {k: v for k, v in clt.state_dict().items() if k != "log_threshold"}
    other.load_state_dict(state, assign=True)
    return other


def our_side(loaded, clt) -> dict:
    """Reconstructions and the graph of the text-only prompt, here."""
    sample = data.Sample(None, PROMPT, "", "text")
    encoded = data.encode_batch(loaded.processor, [sample])
    with torch.no_grad(), sites.capture(loaded.model, sites=(clt.config.input_site, "mlp_out")) as captured:
        logits = loaded.model(**encoded.model_inputs(loaded.model)).logits[0]
    inputs = captured.stack(clt.config.input_site)[0].float()  # [S, L, d]
    with torch.no_grad():
        reconstruction = clt.reconstruct_raw(inputs).transpose(0, 1)  # [L, S, d]
    graphs = {"full": attribution.attribute(loaded, clt, sample, max_feature_nodes=UNCAPPED),
              "capped": attribution.attribute(loaded, clt, sample, max_feature_nodes=CAP, batch_size=BATCH)}
    return {"input_ids": encoded.input_ids[0].tolist(), "logits": logits, "reconstruction": reconstruction,
            "graphs": graphs}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def compare_graphs(ours, theirs: Path) -> dict:
    graph = load_file(theirs / "graph.safetensors")
    scores = json.loads((theirs / "scores.json").read_text())
    ours_scores = attribution.graph_scores(ours)._asdict()
    features = graph["active_features"][graph["selected_features"].long()]
    same_nodes = (torch.equal(features.long(), ours.features) and torch.equal(graph["logit_targets"].long(), ours.logit_tokens)
                  and graph["adjacency_matrix"].shape == ours.adjacency.shape)
    adjacency = (float((graph["adjacency_matrix"] - ours.adjacency).abs().max() / ours.adjacency.abs().max())
                 if same_nodes else float("inf"))
    score_gap = max(abs(scores[name] - ours_scores[name]) for name in ("replacement", "completeness"))
    return {"same_nodes": same_nodes, "adjacency_rel_error": adjacency, "score_gap": score_gap,
            "scores": {name: scores[name] for name in ("replacement", "completeness")}, "n_features": ours.n_features,
            "n_active_features": ours.n_active_features, "n_nodes": ours.n_nodes,
            "ok": same_nodes and adjacency < LIMITS["adjacency"] and score_gap < LIMITS["scores"]}


def compare(ours: dict, theirs: Path, backend: str) -> dict:
    """One backend's files (theirs/<graph>/<backend>/) against ours."""
    recon = load_file(theirs / "full" / backend / "recon.safetensors")
    logits = relative(recon["logits"], ours["logits"])
    per_layer = [relative(recon["reconstruction"][layer], ours["reconstruction"][layer])
                 for layer in range(len(recon["reconstruction"]))]
    graphs = {name: compare_graphs(graph, theirs / name / backend) for name, graph in ours["graphs"].items()}
    ok = logits < LIMITS["logits"] and max(per_layer) < LIMITS["reconstruction"] and all(g["ok"] for g in graphs.values())
    return {"ok": ok, "logits_rel_error": logits, "reconstruction_rel_error_max": max(per_layer), **graphs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ct-python", required=True, help="python of the venv with circuit-tracer 0.5.0")
    parser.add_argument("--config", type=Path, default=ROOT / "interop" / "cpu16-jumprelu.yaml", help="a course config")
    parser.add_argument("--run-dir", type=Path, default=None, help="that course's cache (default: runs/<config name>)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "interop")
    parser.add_argument("--save", type=Path, help="also write the JSON line here (maintainers: benchmarks/results/)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = load_config(args.config)
    loaded = models.load(config["model"], device="cpu", dtype="float32")
    clt, trained = course_jumprelu_clt(loaded, config, args.run_dir or ROOT / "runs" / args.config.stem)
    topk_refused = ""
    try:
        circuit_tracer.export(replace_activation(clt, "topk"), args.out / "topk-clt")
    except circuit_tracer.NotReadableByCircuitTracer as refused:
        topk_refused = str(refused)
    model_dir = circuit_tracer.export_language_model(loaded, args.out / "model")
    circuit_tracer.export(clt, args.out / "clt")
    ours = our_side(loaded, clt)
    theirs = args.out / "circuit-tracer"
    command = [args.ct_python, str(ROOT / "interop" / "circuit_tracer_side.py"), "--model", str(model_dir),
               "--clt", str(args.out / "clt"), "--token-ids", ",".join(map(str, ours["input_ids"]))]
    subprocess.run([*command, "--out", str(theirs / "full")], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*command, "--out", str(theirs / "capped"), "--max-feature-nodes", str(CAP), "--batch-size", str(BATCH)],
                   check=True, stdout=subprocess.DEVNULL)
    backends = {name: compare(ours, theirs, name) for name in ("transformerlens", "nnsight")}
    summary = {"ok": all(b["ok"] for b in backends.values()) and bool(topk_refused), "limits": LIMITS,
               "clt": {"activation": clt.config.activation, "n_layers": clt.config.n_layers,
                       "num_latents": clt.config.num_latents, "mean_fvu": sum(trained.fvu) / len(trained.fvu),
                       "mean_l0": sum(trained.l0) / len(trained.l0)},
               "prompt": ours["graphs"]["full"].prompt, "backends": backends,
               "topk_export_refused": topk_refused}
    print(json.dumps(summary))
    if args.save:
        write_json(args.save, summary)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
