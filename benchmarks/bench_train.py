"""Training throughput and peak memory of the sparse decoder vs the dense reference, measured in one run.

Each (expansion, path) configuration runs in its own child process so its peak memory is its own
(ru_maxrss on CPU, max_memory_allocated on CUDA). Random activations of the right shape stand in for a
model: speed and memory do not depend on the values. Also measured in the same run: a plain matmul of
comparable size, the yardstick for the achieved FLOP/s, the planner's upper bound for the device, and two floors
for one step: its FLOPs done at the matmul's rate, and one pass over the memory it must touch (weights, gradients,
optimizer states) at the bandwidth of a large in-place add. With --reference DIR (a checkout of another commit,
e.g. `git worktree add /tmp/before HEAD~1`), the sparse path of that checkout runs too, in the same run.

    python benchmarks/bench_train.py                      # toy width: 32 layers, d=128, k=16, expansion 8 and 16
    python benchmarks/bench_train.py --device cuda --d-model 4096 --n-layers 32 --expansions 1 --cross-layer 4 \
        --batch-size 4096 --paths sparse                  # LLaVA-7B width on a GPU
    ... --reference /tmp/before                           # also time the sparse path of another checkout
    ... --json                                            # last line: one JSON object
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

# A worker for --reference imports clt_lite from the checkout named in this variable.
sys.path.insert(0, os.environ.get("BENCH_CLT_LITE_ROOT", str(Path(__file__).resolve().parents[1])))
from clt_lite.clt import CLTConfig, CrossLayerTranscoder  # noqa: E402
from clt_lite.optim import RECIPES, make_optimizer, recipe  # noqa: E402
from clt_lite.plan import ModelDims, plan  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--n-layers", type=int, default=32)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--expansions", type=int, nargs="+", default=[8, 16], help="latents per layer = expansion * d")
    p.add_argument("--cross-layer", type=int, default=0, help="C; 0 = full")
    p.add_argument("--batch-size", type=int, default=256, help="tokens per step")
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--paths", nargs="+", default=["sparse", "dense"], choices=["sparse", "dense"])
    p.add_argument("--optimizer", default="adam", choices=list(RECIPES), help="recipe: parameter dtype + optimizer")
    p.add_argument("--reference", metavar="DIR", help="also time the sparse path of the clt_lite in this checkout")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--worker", nargs=2, metavar=("EXPANSION", "PATH"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def clt_config(args: argparse.Namespace, expansion: int) -> CLTConfig:
    return CLTConfig(n_layers=args.n_layers, d_model=args.d_model, expansion_factor=expansion, k=args.k,
                     cross_layer=args.cross_layer, dtype=recipe(args.optimizer).param_dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def worker(args: argparse.Namespace, expansion: int, path: str) -> dict:
    """Time `steps` training steps (forward, FVU loss, backward, optimizer) of one config on one decode path."""
    device = torch.device(args.device)
    base_mb = peak_memory_mb(device)
    torch.manual_seed(0)
    cfg = clt_config(args, expansion)
    clt = CrossLayerTranscoder(cfg, device=device)
    opt = make_optimizer(args.optimizer, clt.parameters(), 1e-4, (0.9, 0.999))  # as in clt_lite.train
    x = torch.randn(args.batch_size, cfg.n_layers, cfg.d_model, device=device)
    y = torch.randn(args.batch_size, cfg.n_layers, cfg.d_model, device=device)
    decode = clt.decode if path == "sparse" else clt.decode_dense

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            enc = clt.encode(x.to(clt.b_dec.dtype))
            recon = decode(enc.values, enc.indices)
            loss = ((recon.float() - y).pow(2).sum((0, 2)) / (y - y.mean(0)).pow(2).sum((0, 2))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: allocates optimizer state and gradients
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - start) / args.steps
    peak_mb = peak_memory_mb(device)
    # step_mb: what the CLT, its optimizer and the step add to the process (on CPU, ru_maxrss also counts the ~0.7 GB
    # of the interpreter and torch itself, the same for every path)
    return {"expansion": expansion, "path": path, "n_latents": cfg.num_latents, "step_s": seconds,
            "tokens_per_s": args.batch_size / seconds, "peak_mb": peak_mb, "base_mb": base_mb, "step_mb": peak_mb - base_mb}


def matmul_flops(args: argparse.Namespace, n_latents: int) -> float:
    """FLOP/s of a plain [B, n] @ [n, L*d] matmul (the dense decoder's shape for all targets of one source)."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(args.batch_size, n_latents, device=device, dtype=dtype)
    b = torch.randn(n_latents, args.n_layers * args.d_model, device=device, dtype=dtype)
    a @ b
    sync(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 1.0:
        a @ b
        reps += 1
    sync(device)
    return 2 * args.batch_size * n_latents * args.n_layers * args.d_model * reps / (time.perf_counter() - start)


def bandwidth_bytes_per_s(args: argparse.Namespace) -> float:
    """Bytes/s of a.add_(b) over 256 MB tensors (reads a and b, writes a): the memory-pass yardstick."""
    device = torch.device(args.device)
    a, b = (torch.ones(2**26, device=device) for _ in range(2))
    a.add_(b)
    sync(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 1.0:
        a.add_(b)
        reps += 1
    sync(device)
    return 3 * a.numel() * a.element_size() * reps / (time.perf_counter() - start)


def run_child(args: argparse.Namespace, expansion: int, path: str, argv: list[str]) -> dict:
    reference = path.endswith("@reference")
    cmd = [sys.executable, __file__, *argv, "--worker", str(expansion), path.removesuffix("@reference")]
    env = {**os.environ, "BENCH_CLT_LITE_ROOT": str(Path(args.reference).resolve())} if reference else None
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"worker {expansion}/{path} failed: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args, int(args.worker[0]), args.worker[1])))
        return
    parent_argv = [a for a in argv if a != "--json"]
    device_preset = "h200" if args.device.startswith("cuda") else "cpu-2core"
    dims = ModelDims(args.n_layers, args.d_model, f"{args.n_layers}x{args.d_model}")
    rows, results = [], {}
    paths = [*args.paths, *(["sparse@reference"] if args.reference else [])]
    bandwidth = bandwidth_bytes_per_s(args)
    printed = 0
    print(f"CLT training step, {args.n_layers} layers x d={args.d_model}, k={args.k}, "
          f"cross_layer={args.cross_layer or 'full'}, batch {args.batch_size} tokens, {args.device}, "
          f"torch threads {torch.get_num_threads()}")
    for expansion in args.expansions:
        cfg = clt_config(args, expansion)
        p = plan(dims, cfg, args.optimizer, device=device_preset, batch_size=args.batch_size)
        mm = matmul_flops(args, cfg.num_latents)
        entry = {"n_latents": cfg.num_latents, "params": p.total_params, "matmul_flops": mm,
                 "planner_max_tokens_per_s": p.max_tokens_per_s, "planner_training_gib": p.training_bytes / 2**30}
        for path in paths:
            r = run_child(args, expansion, path, parent_argv)
            dec = p.decoder_flops_per_token_dense if path == "dense" else p.decoder_flops_per_token_sparse
            r["flops"] = (p.train_flops_per_token + 3 * (dec - p.decoder_flops_per_token_sparse)) * r["tokens_per_s"]
            r["flops_vs_matmul"] = r["flops"] / mm
            entry[path] = r
            rows.append(f"  x{expansion:<3} n={cfg.num_latents:<6} {path:<16} {r['tokens_per_s']:>10,.0f} tok/s  "
                        f"{r['step_s']:>8.3f} s/step  peak {r['peak_mb']:>8,.0f} MB = base {r['base_mb']:,.0f} + step {r['step_mb']:,.0f}  "
                        f"{r['flops'] / 1e9:>8.2f} GFLOP/s = {r['flops_vs_matmul']:.2f} x matmul")
        if "sparse" in entry:
            compute_floor = p.train_flops_per_token * args.batch_size / mm
            memory_floor = p.training_bytes / bandwidth
            entry["floors_s"] = {"compute": compute_floor, "memory": memory_floor}
            entry["step_over_floors"] = entry["sparse"]["step_s"] / (compute_floor + memory_floor)
            rows.append(f"  x{expansion:<3} floors: compute {compute_floor:.3f} s (step FLOPs at matmul rate) + memory "
                        f"{memory_floor:.3f} s (weights+grads+optimizer at {bandwidth / 1e9:.1f} GB/s); "
                        f"sparse step = {entry['step_over_floors']:.1f} x their sum")
        if "sparse@reference" in entry:
            entry["speedup_over_reference"] = entry["sparse"]["tokens_per_s"] / entry["sparse@reference"]["tokens_per_s"]
            entry["memory_ratio_reference_over_sparse"] = entry["sparse@reference"]["peak_mb"] / entry["sparse"]["peak_mb"]
            rows.append(f"  x{expansion:<3} sparse vs {args.reference}: {entry['speedup_over_reference']:.2f}x tokens/s, "
                        f"reference/sparse peak memory {entry['memory_ratio_reference_over_sparse']:.2f}x")
        if {"sparse", "dense"} <= set(args.paths):
            entry["speedup_sparse_over_dense"] = entry["sparse"]["tokens_per_s"] / entry["dense"]["tokens_per_s"]
            entry["memory_ratio_dense_over_sparse"] = entry["dense"]["peak_mb"] / entry["sparse"]["peak_mb"]
            rows.append(f"  x{expansion:<3} sparse/dense speed {entry['speedup_sparse_over_dense']:.1f}x, "
                        f"dense/sparse peak memory {entry['memory_ratio_dense_over_sparse']:.2f}x")
        rows.append(f"  x{expansion:<3} matmul {mm / 1e9:.1f} GFLOP/s; planner ({device_preset}) upper bound "
                    f"{p.max_tokens_per_s:,.0f} tok/s, weights+grads+{args.optimizer} {p.training_bytes / 2**30:.2f} GiB")
        results[f"x{expansion}"] = entry
        print("\n".join(rows[printed:]), flush=True)
        printed = len(rows)
    if args.json:
        print(json.dumps({"config": {k: v for k, v in vars(args).items() if k not in ("json", "worker")},
                          "results": results}))


if __name__ == "__main__":
    main()
