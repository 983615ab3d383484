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

    runs = run_notebooks(args.config, args.only, figure_dir=args.figures, in_place=args.in_place, progress=not args.json)
    width = max(len(run.notebook) for run in runs)
    print(f"\n{'notebook':<{width}}  seconds  executed copy")
    for run in runs:
        print(f"{run.notebook:<{width}}  {run.seconds:>7.0f}  {run.output}")
    print(f"{'all':<{width}}  {sum(run.seconds for run in runs):>7.0f}")
    return {"notebooks": [{"name": r.notebook, "output": str(r.output), "seconds": round(r.seconds, 1)} for r in runs]}


def _cmd_toy(args) -> dict:
    from . import models, toy

    if args.action == "train":
        overrides = {"steps": args.steps, "n_layers": args.layers, "grow_from": args.grow_from, "grow_steps": args.grow_steps}
        config = toy.ToyConfig(**{field: value for field, value in overrides.items() if value is not None})
        result = toy.train(config, args.out, device=args.device, progress=not args.json)
        print(f"toy saved to {args.out} after {result['steps']} steps")
        return {"out": str(args.out), **result}
    if args.per_family < 1:
        raise ValueError(f"--per-family {args.per_family}: evaluate at least 1 question per family")
    loaded = models.load(args.model, device=args.device)
    accuracy = toy.evaluate(loaded.model, loaded.processor, toy.eval_set(args.per_family))
    for family, value in accuracy.items():
        print(f"{family:>8}: {value:.3f}")
    if args.card:
        from .files import write_bytes
        from .model_card import model_card

        card = Path(models.resolve_source(args.model)) / "README.md"
        write_bytes(card, model_card(card.parent, accuracy, args.per_family).encode())
        print(f"model card written to {card}")
    return {"model": args.model, "per_family": args.per_family, "accuracy": accuracy}


def _clt_config(args, n_layers: int, d_model: int, input_site: str | None = None):
    from .clt import CLTConfig
    from .optim import recipe

    site = {} if input_site is None else {"input_site": input_site}  # None: CLTConfig's default
    return CLTConfig(n_layers=n_layers, d_model=d_model, expansion_factor=args.expansion, k=args.k,
                     cross_layer=args.cross_layer, activation=args.activation, dtype=recipe(args.optimizer).param_dtype,
                     **site)


def _cmd_plan(args) -> dict:
    from dataclasses import asdict

    from . import plan

    dims = plan.model_dims(args.model.removeprefix("random:"))
    device = plan.DEVICE_PRESETS[args.device_preset] if args.device_preset else None
    resident = _stream_resident_bytes(args.model, dims, args.batch_size // max(args.gpus, 1)) if args.stream else 0
    result = plan.plan(dims, _clt_config(args, dims.n_layers, dims.d_model), optimizer=args.optimizer, device=device,
                       gpus=args.gpus, batch_size=args.batch_size, resident_bytes=resident)
    print(plan.format_plan(result))
    print(plan.format_gpus(result))
    if device is not None:  # every recipe the trainer implements, side by side
        print(plan.format_recipes(dims, result.config, device, args.batch_size, resident))
    return {k: v for k, v in asdict(result).items() if k not in ("config", "model", "device")}


def _stream_resident_bytes(model: str, dims, batch_size: int) -> int:
    """What streaming from `model` in bfloat16 keeps on each GPU (store.streaming.resident_bytes), with the forward
    batch the streaming source picks for prompts of prompt_tokens() tokens."""
    from . import models
    from .store import streaming

    config = models.model_config("random:llava-1.5-7b" if model == "llava-1.5-7b" else model)  # a preset: its architecture
    tokens = streaming.prompt_tokens(config)
    forward_tokens = tokens * streaming.forward_samples(tokens, dims.n_layers, dims.d_model, 2)
    return streaming.resident_bytes(2 * models.parameter_count(config), batch_size, forward_tokens, dims.n_layers,
                                    dims.d_model, 2)


def _cmd_capture(args) -> dict:
    from . import datasets, models
    from .store import CaptureConfig, capture

    loaded = models.load(args.model, device=args.device)
    samples = datasets.parse_data_spec(args.data, "train", args.seed, loaded.world)
    config = CaptureConfig(dtype=args.dtype, max_tokens=args.tokens, input_sites=tuple(args.input_sites))
    summary = capture(loaded, samples, args.out, config,
                      data_id=f"{args.data}:seed{args.seed}", progress=not args.json)
    print(f"{summary.tokens:,} tokens in {summary.shards} shards at {args.out} ({summary.mb_per_s:.1f} MB/s)")
    return summary._asdict()


def _cmd_train(args) -> dict:
    from .store import ActivationStore
    from .train import TrainConfig, train

    source = ActivationStore(args.acts, input_site=args.input_site)
    config = TrainConfig(tokens=args.tokens, batch_size=args.batch_size, lr=args.lr, device=args.device, seed=args.seed,
                         optimizer=args.optimizer, parallel=args.parallel, checkpoint_every=args.checkpoint_every)
    clt_config = _clt_config(args, source.n_layers, source.d_model, source.input_site)
    result = train(clt_config, config, source, args.out, progress=not args.json)
    mean_fvu, mean_l0 = sum(result.fvu) / len(result.fvu), sum(result.l0) / len(result.l0)
    print(f"CLT saved to {args.out}: mean val FVU {mean_fvu:.3f}, mean L0 {mean_l0:.1f}, {result.tokens_per_s:,.0f} tokens/s")
    return {"out": str(args.out), "mean_fvu": mean_fvu, "mean_l0": mean_l0, **result._asdict(), "history": None}


def _load_clt(path: Path, loaded, allow_other_model: bool):
    """A CLT for `loaded` (models.LoadedModel): its checksum checked, and refused if trained on another model."""
    from .clt import CrossLayerTranscoder

    clt = CrossLayerTranscoder.load(path, loaded.model.device)
    clt.check_model(loaded, allow_other=allow_other_model)
    return clt


def _cmd_evaluate(args) -> dict:
    from . import datasets, models
    from . import replacement as R

    loaded = models.load(args.model, device=args.device)
    samples = datasets.parse_data_spec(args.data, "test", args.seed, loaded.world)
    replacements = [R.Replacement("clt", _load_clt(args.clt, loaded, args.allow_other_model), name="CLT")]
    if args.plt:
        replacements.append(R.Replacement("clt", _load_clt(args.plt, loaded, args.allow_other_model), name="PLT"))
    means = R.mlp_out_means(loaded.model, loaded.processor, datasets.parse_data_spec(args.data, "train", args.seed, loaded.world))
    replacements += [R.Replacement("zero"), R.Replacement("mean", means=means)]
    rows = [R.token_match(loaded, r, samples) for r in replacements]
    print(R.format_table(rows))
    return {"rows": [row._asdict() for row in rows]}


def _cmd_attribute(args) -> dict:
    from . import attribution, data, datasets, models

    loaded = models.load(args.model, device=args.device)
    clt = _load_clt(args.clt, loaded, args.allow_other_model)
    if args.ground_truth:
        truth = attribution.ground_truth_hit_rate(loaded, clt, attribution.ground_truth_samples(loaded, args.ground_truth, args.seed),
                                                  max_feature_nodes=args.max_feature_nodes)
        print(f"top patch inside the object's cell: graph {truth.graph_hit_rate:.3f}, "
              f"gradient x input {truth.gradient_hit_rate:.3f} ({truth.n} prompts)")
        return {"graph_hit_rate": truth.graph_hit_rate, "gradient_hit_rate": truth.gradient_hit_rate, "n": truth.n,
                "per_family": {f: h._asdict() for f, h in truth.per_family.items()}}
    if not (args.prompt and args.out):
        raise ValueError("give --prompt TEXT --out FILE.json (and --image PATH unless the prompt is text only), or "
                         "--ground-truth N")
    sample = data.Sample(datasets.load_image(args.image) if args.image else None, args.prompt, "", "user")
    graph = attribution.attribute(loaded, clt, sample, max_feature_nodes=args.max_feature_nodes, convention=args.convention)
    exported = attribution.export_json(graph, args.out)
    scores = attribution.graph_scores(graph)
    print(f"graph with {len(exported['nodes'])} nodes and {len(exported['links'])} links written to {args.out}")
    return {"out": str(args.out), "nodes": len(exported["nodes"]), "links": len(exported["links"]),
            "replacement_score": scores.replacement, "completeness_score": scores.completeness}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clt_lite", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, handler) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help)
        sub.add_argument("--json", action="store_true", help="print one JSON object as the last line")
        sub.add_argument("--debug", action="store_true", help="on an error, show the whole traceback instead of one line")
        sub.set_defaults(handler=handler)
        return sub

    nb = command("notebooks", "execute the course notebooks with papermill", _cmd_notebooks)
    nb.add_argument("--config", default="configs/cpu.yaml", help="papermill parameter set (YAML)")
    nb.add_argument("--only", nargs="+", metavar="NN", help="notebook numbers to run, e.g. 01 02")
    nb.add_argument("--figures", default=None, help="figure folder relative to notebooks/ (default: under runs/)")
    nb.add_argument("--in-place", action="store_true", help="overwrite notebooks/ with outputs of the CPU defaults (maintainers)")

    # Defaults come from the config dataclasses (CLTConfig, TrainConfig, CaptureConfig): one default per option.
    from . import plan
    from .choices import Convention, names
    from .clt import ACTIVATIONS, CLTConfig
    from .models import TOY_NAME
    from .sites import INPUT_SITES
    from .store import CaptureConfig
    from .train import TrainConfig

    def clt_options(sub) -> None:
        from .optim import RECIPES

        sub.add_argument("--expansion", type=int, default=CLTConfig.expansion_factor, help="latents per layer as a multiple of d_model")
        sub.add_argument("--k", type=int, default=CLTConfig.k, help="active latents per token per layer")
        sub.add_argument("--cross-layer", type=int, default=CLTConfig.cross_layer, help="targets per latent; 0 = full, 1 = PLT")
        sub.add_argument("--activation", default=CLTConfig.activation, choices=ACTIVATIONS, help="activation function")
        sub.add_argument("--optimizer", default=TrainConfig.optimizer,
                         help=f"recipe (parameter dtype + optimizer): {', '.join(RECIPES)}")

    pl = command("plan", "parameters, memory, FLOPs and speed bounds of a CLT config", _cmd_plan)
    pl.add_argument("--model", required=True, help=f"preset ({', '.join(plan.MODEL_PRESETS)}) or a model folder")
    clt_options(pl)
    pl.add_argument("--device-preset", choices=list(plan.DEVICE_PRESETS), help="bound speed and memory on this device")
    pl.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs (each holds a full replica)")
    pl.add_argument("--batch-size", type=int, default=4096, help="tokens per step, over all GPUs")
    pl.add_argument("--stream", action="store_true", help="count the streamed model (bf16) and its buffers on each GPU")

    ca = command("capture", "capture resid_mid and mlp_out of every layer to a sharded store", _cmd_capture)
    ca.add_argument("--model", default=TOY_NAME)
    ca.add_argument("--data", required=True, help="shapes:N or jsonl:PATH")
    ca.add_argument("--tokens", type=int, help="stop after this many tokens")
    ca.add_argument("--out", required=True, type=Path)
    ca.add_argument("--dtype", default=CaptureConfig.dtype, help="on-disk dtype: float16, bfloat16 or float32")
    ca.add_argument("--input-sites", nargs="+", default=list(CaptureConfig.input_sites), choices=INPUT_SITES,
                    help="CLT input site(s) to store: mlp_in (after the norm; default, see notebook 04) and/or resid_mid")
    ca.add_argument("--device", default="auto")
    ca.add_argument("--seed", type=int, default=0)

    from .parallel import PARALLEL

    tr = command("train", "train a CLT on a captured store (resumes from its checkpoints)", _cmd_train)
    tr.add_argument("--acts", required=True, type=Path, help="store folder written by capture")
    tr.add_argument("--input-site", choices=INPUT_SITES,
                    help="which stored site the CLT reads (default: the store's first)")
    clt_options(tr)
    tr.add_argument("--tokens", type=int, default=TrainConfig.tokens, help="training tokens")
    tr.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="tokens per optimizer step")
    tr.add_argument("--lr", type=float, help="peak learning rate (default scales with width)")
    tr.add_argument("--out", required=True, type=Path)
    tr.add_argument("--device", default=TrainConfig.device)
    tr.add_argument("--seed", type=int, default=TrainConfig.seed)
    tr.add_argument("--checkpoint-every", type=int, default=TrainConfig.checkpoint_every,
                    help="steps between checkpoints; 0: none, only the final model (a killed run starts over)")
    tr.add_argument("--parallel", choices=PARALLEL, default=TrainConfig.parallel,
                    help="under torchrun: ddp replicates the CLT, fsdp shards it (FSDP2; adam recipes; see `plan --gpus`)")

    ev = command("evaluate", "token match of the CLT replacement model against baselines", _cmd_evaluate)
    ev.add_argument("--model", default=TOY_NAME)
    ev.add_argument("--clt", required=True, type=Path, help="folder written by train")
    ev.add_argument("--plt", type=Path, help="a per-layer transcoder to compare (train with --cross-layer 1)")
    ev.add_argument("--data", default="shapes:200", help="shapes:N or jsonl:PATH (test split for shapes)")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--allow-other-model", action="store_true", help="use CLTs trained on another model's weights")

    at = command("attribute", "attribution graph of one prompt, or the ShapesWorld ground-truth check", _cmd_attribute)
    at.add_argument("--model", default=TOY_NAME)
    at.add_argument("--clt", required=True, type=Path)
    at.add_argument("--image", type=Path, help="the image; without it the prompt is text only")
    at.add_argument("--prompt", help="question, or a full chat prompt (with <image> when --image is given)")
    at.add_argument("--out", type=Path, help="graph JSON in circuit-tracer's format")
    at.add_argument("--ground-truth", type=int, metavar="N", help="hit rate over N held-out ShapesWorld prompts")
    at.add_argument("--max-feature-nodes", type=int, default=4096)
    at.add_argument("--convention", default=names(Convention)[0], choices=names(Convention),
                    help="circuit-tracer: BOS and b_dec credited to no node, the cap keeps features by influence; "
                         "clt-lite: BOS kept, b_dec in the errors, the cap folds the rest into the errors")
    at.add_argument("--device", default="auto")
    at.add_argument("--seed", type=int, default=0)
    at.add_argument("--allow-other-model", action="store_true", help="use a CLT trained on another model's weights")

    toy = command("toy", "train or evaluate the shipped toy VLM", _cmd_toy)
    toy.add_argument("action", choices=["train", "eval"])
    toy.add_argument("--out", type=Path, help="train: output folder")
    toy.add_argument("--model", default=TOY_NAME, help="eval: model folder or name")
    toy.add_argument("--steps", type=int, help="train: override the number of steps")
    toy.add_argument("--layers", type=int, help="train: override the number of decoder layers (default 16)")
    toy.add_argument("--grow-from", type=int, help="train: first train this many layers, then deepen to --layers "
                     "(ToyConfig.grow_from; default 0, from scratch)")
    toy.add_argument("--grow-steps", type=int, help="train: steps after deepening (ToyConfig.grow_steps)")
    toy.add_argument("--card", action="store_true", help="eval: write the model card (README.md) into the model folder")
    toy.add_argument("--per-family", type=int, default=100, help="eval: held-out questions per family")
    toy.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return parser


def one_line(error: Exception) -> str:
    """Our own errors say what to change in one line; anything else (a bug, or a library's error we did not
    anticipate) is named by its type, its first line, and where to look further."""
    first = (str(error).strip().splitlines() or [""])[0]
    if isinstance(error, (ValueError, OSError, RuntimeError)):
        return first
    return f"{type(error).__name__}: {first} (unexpected: rerun with --debug for the traceback and report it)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "toy" and args.action == "train" and args.out is None:
        print("error: toy train needs --out DIR", file=sys.stderr)
        return 2
    try:
        result = args.handler(args)
    except KeyboardInterrupt as stop:  # Ctrl-C; the trainer has saved its state first and says how to resume
        print(f"interrupted: {stop}" if str(stop) else "interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # every failure is one line naming what went wrong; --debug shows where
        if args.debug:
            raise
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, default=str))
    return 0
