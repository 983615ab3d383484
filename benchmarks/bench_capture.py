"""What capturing activations costs, measured in one run: tokens/s of

  (a) a bare forward pass (encode + forward, no hooks),
  (b) capture into memory (hooks keep every kept token's sites on the model's device, float32,
      as StreamingSource does),
  (c) capture to disk (store.capture into a temporary folder: hooks, copy to CPU, safetensors
      shards, checksums, manifest),

and the ratios (b)/(a), (c)/(a) plus MB/s written. Every mode encodes the same batches, so the
ratios isolate hooks, copies and writes. Modes are interleaved and repeated; medians are reported.

    python benchmarks/bench_capture.py                       # CPU, the toy (or random:tiny)
    python benchmarks/bench_capture.py --device cuda --model random:llava-1.5-7b --dtype bfloat16 --samples 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from clt_lite import data, models, store
from clt_lite.toy import ASSET_DIR


def default_model() -> str:
    return models.TOY_NAME if (ASSET_DIR / "config.json").exists() else "random:tiny"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def bare_forward(loaded: models.LoadedModel, batches: list[list[data.Sample]]) -> int:
    """Encode and run every batch without hooks; returns the tokens processed (padding excluded)."""
    tokens = 0
    for batch in batches:
        encoded = data.encode_batch(loaded.processor, batch, with_answers=True)
        loaded.model(**encoded.model_inputs(loaded.model), logits_to_keep=1)
        tokens += int(encoded.attention_mask.sum())
    return tokens


def capture_memory(loaded: models.LoadedModel, batches: list[list[data.Sample]], layers: list[int]) -> int:
    """Capture resid_mid + mlp_out of every token into memory on the model's device; returns tokens kept."""
    device = next(loaded.model.parameters()).device
    kept = [store.forward_tokens(loaded, batch, 0, layers, ("resid_mid", "mlp_out"), device=device, dtype=torch.float32)
            for batch in batches]
    return sum(len(chunk.bos) for chunk in kept)


def capture_disk(loaded: models.LoadedModel, samples: list[data.Sample], config: store.CaptureConfig) -> store.CaptureSummary:
    with tempfile.TemporaryDirectory(prefix="bench_capture_") as folder:
        return store.capture(loaded, samples, f"{folder}/acts", config, progress=False)


def timed(device: torch.device, fn):
    """(seconds, result, peak CUDA bytes or None) of one call."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return time.perf_counter() - start, result, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=default_model(), help="toy name, folder, hub id or random:<preset>")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--dtype", default="auto", help="model dtype: auto, float32, bfloat16, float16")
    parser.add_argument("--store-dtype", default="float16", help="on-disk dtype for (c)")
    parser.add_argument("--samples", type=int, default=32, help="ShapesWorld samples per measurement")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward pass")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions; medians are reported")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = models.load(args.model, device=args.device, dtype=args.dtype)
    device = next(loaded.model.parameters()).device
    samples = data.shapes_world(args.samples, "test")
    batches = [samples[i:i + args.batch_size] for i in range(0, len(samples), args.batch_size)]
    layers = list(range(loaded.n_layers))
    config = store.CaptureConfig(dtype=args.store_dtype, batch_size=args.batch_size)

    bare_forward(loaded, batches[:1])  # warm-up: first-call allocations, kernels, lazy imports
    rates = {"forward": [], "memory": [], "disk": []}
    peaks = {"forward": 0, "memory": 0, "disk": 0}
    mb_per_s, summary = [], None
    for _ in range(args.repeats):
        for mode, fn in (("forward", lambda: bare_forward(loaded, batches)),
                         ("memory", lambda: capture_memory(loaded, batches, layers)),
                         ("disk", lambda: capture_disk(loaded, samples, config))):
            seconds, result, peak = timed(device, fn)
            if mode == "disk":
                summary, result = result, result.tokens
                mb_per_s.append(summary.bytes / 1e6 / seconds)
            rates[mode].append(result / seconds)
            peaks[mode] = max(peaks[mode], peak or 0)

    median = {mode: statistics.median(values) for mode, values in rates.items()}
    report = {
        "model": args.model, "device": str(device), "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        "n_layers": loaded.n_layers, "d_model": loaded.d_model, "tokens": summary.tokens, "repeats": args.repeats,
        "forward_tokens_per_s": median["forward"], "memory_tokens_per_s": median["memory"],
        "disk_tokens_per_s": median["disk"], "memory_over_forward": median["memory"] / median["forward"],
        "disk_over_forward": median["disk"] / median["forward"], "disk_mb_per_s": statistics.median(mb_per_s),
        "store_dtype": args.store_dtype, "bytes_per_token": summary.bytes_per_token, "shards": summary.shards,
    }
    if device.type == "cuda":
        report.update({f"{mode}_max_memory_allocated_gb": peaks[mode] / 1e9 for mode in peaks})

    print(f"{args.model} on {device} ({report['dtype']}), {loaded.n_layers} layers x d={loaded.d_model}, "
          f"{summary.tokens:,} tokens per measurement, median of {args.repeats}")
    print(f"  (a) bare forward      {median['forward']:>12,.0f} tok/s")
    print(f"  (b) capture -> memory {median['memory']:>12,.0f} tok/s   (b)/(a) = {report['memory_over_forward']:.2f}")
    print(f"  (c) capture -> disk   {median['disk']:>12,.0f} tok/s   (c)/(a) = {report['disk_over_forward']:.2f}   "
          f"{report['disk_mb_per_s']:,.1f} MB/s written ({summary.bytes_per_token:,} B/token, {args.store_dtype})")
    if device.type == "cuda":
        print("  peak CUDA memory: " + ", ".join(f"{mode} {peaks[mode] / 1e9:.1f} GB" for mode in peaks))
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
