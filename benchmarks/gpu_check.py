"""`make gpu-check`: one JSON object of GPU figures for LLaVA-1.5-7B's architecture (random weights).

Phases, all on the same ShapesWorld samples drawn at the model's image size (336 px for LLaVA-7B):

  forward   the model's forward pass, no hooks: tokens/s
  capture   the same forward with sites.capture of mlp_in + mlp_out on every layer, kept on the GPU
  stream    store.StreamingSource batches, as the trainer reads them (encode + forward + hooks + scale + shuffle)
  identity  relative errors of the two site identities the CLT relies on, in bf16, and their tolerance
  train     a short streaming CLT training run: tokens/s and peak memory next to the planner's prediction

forward and capture reuse inputs encoded once, so their ratio isolates the hooks; stream encodes as
training does (encode_tok_s says what that costs). Progress goes to stderr; stdout gets only the JSON.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu-check.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path
from unittest import mock

# Fewer fragmentation OOMs when a ~114 GiB CLT shares the GPU with LLaVA; must be set before CUDA starts.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
import transformers  # noqa: E402

from clt_lite import data, models, optim, plan, sites, store, train  # noqa: E402
from clt_lite.clt import CLTConfig, CrossLayerTranscoder  # noqa: E402
from clt_lite.files import write_json  # noqa: E402

DTYPE = "bfloat16"


def no_cuda_message() -> str:
    cpu_build = f"; torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None else ""
    return (f"gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False{cpu_build}); "
            "run it on a machine with an NVIDIA GPU and a CUDA build of torch")


def log(message: str) -> None:
    print(f"gpu_check: {message}", file=sys.stderr, flush=True)


def measure(device: torch.device, fn):
    """(seconds, fn(), peak GiB allocated during fn or None on CPU); CUDA is synchronised so the clock sees its work."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) / plan.GiB if cuda else None
    return time.perf_counter() - start, result, peak


def load(args, device: torch.device) -> tuple[models.LoadedModel, list[data.Sample]]:
    loaded = models.load(args.model, device=device.type, dtype=DTYPE)
    return loaded, data.shapes_world(args.samples, "train", seed=0, world=loaded.world)  # drawn at the tower's size


def encode(loaded: models.LoadedModel, samples: list[data.Sample], per_batch: int) -> list[data.EncodedBatch]:
    """Teacher-forced batches (prompt + answer), as store.forward_tokens builds them."""
    return [data.encode_batch(loaded.processor, samples[i:i + per_batch], with_answers=True)
            for i in range(0, len(samples), per_batch)]


@torch.no_grad()
def forward_phase(loaded: models.LoadedModel, batches: list[data.EncodedBatch]) -> None:
    for batch in batches:  # logits_to_keep=1 like store.forward_tokens: a CLT never needs the 32k-wide logits
        loaded.model(**batch.model_inputs(loaded.model), logits_to_keep=1)


@torch.no_grad()
def capture_phase(loaded: models.LoadedModel, batches: list[data.EncodedBatch], device: torch.device) -> None:
    for batch in batches:  # each batch's capture stays alive on the GPU until the next one replaces it
        with sites.capture(loaded.model, ("mlp_in", "mlp_out"), device=device) as captured:
            loaded.model(**batch.model_inputs(loaded.model), logits_to_keep=1)
        assert len(captured["mlp_out"]) == loaded.n_layers


def stream_phase(loaded: models.LoadedModel, samples: list[data.Sample], args, device: torch.device) -> dict:
    source = store.StreamingSource(loaded, samples, input_site="mlp_in", forward_batch=args.forward_batch)
    _ = source.input_scale  # estimate the normalisation scales now (a one-off pass), outside the timing
    seconds, _, peak = measure(device, lambda: sum(1 for _ in islice(source.batches(args.batch_size), args.stream_batches)))
    return {"stream_tok_s": args.stream_batches * args.batch_size / seconds, "stream_peak_gib": peak}


@torch.no_grad()
def identity_phase(loaded: models.LoadedModel, batch: data.EncodedBatch) -> dict[str, float]:
    """Relative errors of the two site identities, next to their tolerance (one ulp of the dtype)."""
    model = loaded.model
    with sites.capture(model, sites.SITES) as captured:  # to the CPU (the default): identity_errors compares there
        output = model(**batch.model_inputs(model), output_hidden_states=True, logits_to_keep=1)
    return {**sites.identity_errors(model, captured, output.hidden_states), "tolerance": sites.identity_tolerance(model.dtype)}


def train_phase(loaded: models.LoadedModel, samples: list[data.Sample], args, device: torch.device,
                forward_batch: int) -> dict:
    clt_config = CLTConfig(loaded.n_layers, loaded.d_model, expansion_factor=args.expansion, k=args.k,
                           cross_layer=args.cross_layer, input_site="mlp_in",
                           dtype=optim.recipe(args.optimizer).param_dtype)
    dims = plan.ModelDims(loaded.n_layers, loaded.d_model, loaded.name)
    planned = plan.plan(dims, clt_config, args.optimizer, device="h200", batch_size=args.batch_size)
    # No checkpoints (weights + optimizer states, ~113 GB at 7B width and expansion 2, more than the disk may hold):
    # a throughput check needs none.
    config = train.TrainConfig(tokens=args.train_steps * args.batch_size, batch_size=args.batch_size,
                               optimizer=args.optimizer, val_batches=1, device=device.type, checkpoint_every=0)
    # Streamed activations are float32, 1 MiB per token at 7B width, beside a ~114 GiB CLT and 13 GiB of LLaVA:
    # a shuffle buffer of one batch (the default eight would add 16 GiB) and forward passes of about one batch.
    source = store.StreamingSource(loaded, samples, input_site="mlp_in", forward_batch=forward_batch,
                                   shuffle_buffer=args.batch_size)
    report = dict.fromkeys(("train_tok_s", "train_peak_gib", "train_baseline_gib", "train_measured_over_planned",
                            "train_steps_done", "train_error"))
    # gpu_bytes is what one GPU needs whatever the device; the preset sets the tokens/s bound and the fit.
    report.update(train_params=planned.total_params, plan_device="h200", train_planned_fits=planned.fits,
                  train_planned_gib=planned.gpu_bytes / plan.GiB, train_planned_max_tok_s=planned.max_tokens_per_s)
    if device.type == "cuda":  # what the GPU holds before training (LLaVA's weights): not the CLT's
        report["train_baseline_gib"] = torch.cuda.memory_allocated(device) / plan.GiB
    # The final weights (38 GB at 7B width and expansion 2) are not needed either: their save is skipped.
    with (tempfile.TemporaryDirectory(prefix="gpu_check_") as out, mock.patch.object(CrossLayerTranscoder, "save")):
        try:
            _, result, peak = measure(device, lambda: train.train(clt_config, config, source, out, progress=False))
        except torch.OutOfMemoryError as error:  # a finding, not a crash: the other phases still report
            report["train_error"] = f"out of memory: {str(error).splitlines()[0]}"
            return report
    report.update(train_tok_s=result.tokens_per_s, train_peak_gib=peak, train_steps_done=result.steps)
    if peak is not None:  # the planner counts the CLT (weights, grads, states, batch), not LLaVA or the stream
        report["train_measured_over_planned"] = (peak - report["train_baseline_gib"]) / report["train_planned_gib"]
    return report


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:llava-1.5-7b", help="random:<preset>, folder or hub id")
    parser.add_argument("--samples", type=int, default=64, help="ShapesWorld samples (the forward/capture data)")
    parser.add_argument("--forward-batch", type=int, default=8, help="samples per model forward pass")
    parser.add_argument("--batch-size", type=int, default=2048, help="tokens per streamed / training batch")
    parser.add_argument("--stream-batches", type=int, default=16, help="batches timed in the stream phase")
    parser.add_argument("--train-steps", type=int, default=20, help="optimizer steps of the training run")
    parser.add_argument("--expansion", type=int, default=2, help="CLT latents per layer / d_model")
    parser.add_argument("--k", type=int, default=64, help="active latents per token and layer")
    parser.add_argument("--cross-layer", type=int, default=0, help="decoder span C (0 = full)")
    parser.add_argument("--optimizer", default="adam-bf16", choices=list(optim.RECIPES), help="optimizer recipe")
    parser.add_argument("--out", help="also write the JSON object to this file")
    parser.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)  # tests only: run it all on the CPU
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if not args.allow_cpu and not torch.cuda.is_available():
        print(no_cuda_message(), file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.allow_cpu else "cuda")
    log(f"loading {args.model} ({DTYPE}) on {device} and {args.samples} ShapesWorld samples")
    loaded, samples = load(args, device)
    encode_s, batches, _ = measure(device, lambda: encode(loaded, samples, args.forward_batch))
    tokens = sum(int(batch.attention_mask.sum()) for batch in batches)  # padding excluded
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "model": args.model, "dtype": DTYPE,
        "n_layers": loaded.n_layers, "d_model": loaded.d_model, "samples": len(samples),
        "forward_batch": args.forward_batch, "tokens_per_forward_batch": tokens / len(batches),
        "encode_tok_s": tokens / encode_s, "batch_size": args.batch_size, "stream_batches": args.stream_batches,
        "train_steps": args.train_steps, "expansion": args.expansion, "k": args.k, "cross_layer": args.cross_layer,
        "optimizer": args.optimizer,
    }

    log(f"bare forward over {tokens:,} tokens")
    forward_phase(loaded, batches[:1])  # warm-up: kernel selection and first-call allocations
    seconds, _, peak = measure(device, lambda: forward_phase(loaded, batches))
    report.update(forward_tok_s=tokens / seconds, forward_peak_gib=peak)

    log(f"capture of mlp_in + mlp_out on every layer, kept on {device}")
    seconds, _, peak = measure(device, lambda: capture_phase(loaded, batches, device))
    report.update(capture_tok_s=tokens / seconds, capture_peak_gib=peak)

    log(f"streaming {args.stream_batches} batches of {args.batch_size} tokens")
    report.update(stream_phase(loaded, samples, args, device))
    report.update(capture_over_forward=report["capture_tok_s"] / report["forward_tok_s"],
                  stream_over_forward=report["stream_tok_s"] / report["forward_tok_s"])

    log("site identity errors")
    report["identity_errors"] = identity_phase(loaded, encode(loaded, samples[:2], 2)[0])
    if device.type == "cuda":
        torch.cuda.empty_cache()  # hand cached blocks back before the largest allocation of the run

    log(f"training a CLT for {args.train_steps} steps (expansion {args.expansion}, k {args.k}, {args.optimizer})")
    # samples per forward pass that give about one training batch (fewer float32 activations alive at once)
    report["train_forward_batch"] = max(1, min(args.forward_batch, args.batch_size * len(samples) // tokens))
    report.update(train_phase(loaded, samples, args, device, report["train_forward_batch"]))

    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, report, indent=None)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
