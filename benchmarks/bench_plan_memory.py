"""The planner's memory per device against the measured peak of real training steps on the CPU, in one run.

Each configuration runs in a fresh child process: it first runs one step of a tiny CLT with the same recipe
(so torch's kernels and allocator pools are loaded), reads its resident set size, then builds the real CLT
and runs `--steps` training steps (the trainer's loss, backward, the recipe's optimizer). The measured peak
is ru_maxrss minus that baseline (glibc told to map large tensors on their own: WORKER_ENV); the planner's
number is Plan.gpu_bytes (weights + gradients alive at once + optimizer states + step temporary + batch
activations). Random activations stand in for a model.

    OMP_NUM_THREADS=1 python benchmarks/bench_plan_memory.py --out benchmarks/results/plan-memory-cpu.json

With --fsdp each configuration runs on 2 processes under torchrun (gloo): the CLT is built with its decoders
sharded as they appear, wrapped, and trained as clt_lite.train does with `parallel: fsdp`; the measured peak is the
larger of the two ranks', the planner's number Plan.fsdp_gpu_bytes on 2 GPUs (gathered units + half of the rest).

    OMP_NUM_THREADS=1 python benchmarks/bench_plan_memory.py --fsdp --optimizers adam adam-bf16 \
        --out benchmarks/results/plan-memory-fsdp-cpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clt_lite.clt import CLTConfig, CrossLayerTranscoder  # noqa: E402
from clt_lite.optim import RECIPES, make_optimizer, recipe  # noqa: E402
from clt_lite.parallel import Ranks, decoder_sharder, setup_ranks, wrap  # noqa: E402
from clt_lite.plan import ModelDims, plan  # noqa: E402
from clt_lite.train import TrainConfig, _loss  # noqa: E402

# A fixed mmap threshold makes glibc map every tensor over 64 KiB on its own and unmap it when freed. Otherwise it
# raises the threshold after the first large free and serves later tensors from its heap, which it does not give
# back: RSS then measures fragmentation (FSDP's gathers and frees doubled it), not what the allocations need.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}

# (layers, width, latents per layer, cross_layer (0 = full), tokens per step)
CONFIGS = [(8, 512, 4096, 0, 256), (8, 256, 2048, 0, 256), (16, 256, 4096, 0, 256), (16, 512, 4096, 1, 256)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--optimizers", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--steps", type=int, default=2, help="training steps measured per configuration")
    p.add_argument("--out", type=Path, help="also write the table as JSON here")
    p.add_argument("--fsdp", action="store_true", help="2 processes under torchrun, parallel: fsdp")
    p.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def rss_bytes() -> int:
    """Current resident set size (Linux /proc)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def clt_config(layers: int, width: int, latents: int, cross_layer: int, optimizer: str) -> CLTConfig:
    return CLTConfig(n_layers=layers, d_model=width, n_latents=latents, k=32, cross_layer=cross_layer,
                     dtype=recipe(optimizer).param_dtype)


ONE_PROCESS = Ranks(0, 1)


def train_steps(config: CLTConfig, optimizer: str, batch_size: int, steps: int, ranks: Ranks = ONE_PROCESS) -> None:
    """`steps` training steps exactly as clt_lite.train runs them (fresh run: no dead latents); with more than one
    rank, sharded as `parallel: fsdp` does, each rank taking its share of the batch."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    clt = CrossLayerTranscoder(config, on_decoder=decoder_sharder("fsdp", ranks, device))
    model = wrap(clt, "fsdp", ranks, device)
    opt = make_optimizer(optimizer, [p for p in clt.parameters() if p.requires_grad], 1e-3, (0.9, 0.999),
                         data_parallel=ranks.world > 1)
    cfg = TrainConfig(tokens=batch_size * steps, batch_size=batch_size, optimizer=optimizer, device="cpu")
    dead = torch.zeros(config.n_layers, config.num_latents, dtype=torch.bool)
    share = batch_size // ranks.world
    for _ in range(steps):
        x = torch.randn(share, config.n_layers, config.d_model).to(clt.b_dec.dtype)
        y = torch.randn(share, config.n_layers, config.d_model)
        loss, _, _ = _loss(model, clt, cfg, x, y, dead, batch_size, ranks)
        opt.zero_grad(set_to_none=True)
        (loss * ranks.world).backward()
        opt.step()


def worker(layers: int, width: int, latents: int, cross_layer: int, batch_size: int, optimizer: str,
           steps: int) -> dict:
    torch.set_num_threads(1)
    ranks, _, _ = setup_ranks("cpu")
    train_steps(clt_config(2, 16, 64, 0, optimizer), optimizer, 8, 2, ranks)  # load kernels and pools first
    base = rss_bytes()
    train_steps(clt_config(layers, width, latents, cross_layer, optimizer), optimizer, batch_size, steps, ranks)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    measured = torch.tensor([peak - base])
    if ranks.world > 1:
        dist.all_reduce(measured, op=dist.ReduceOp.MAX)
        gc.collect()  # as clt_lite.train does: free FSDP's gloo work objects before the group goes (else SIGABRT now and then)
        dist.destroy_process_group()
    return {"measured_bytes": int(measured), "base_bytes": base, "ranks": ranks.world}


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.worker:
        result = worker(*map(int, args.worker[:5]), args.worker[5], args.steps)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result))
        return []
    gpus = 2 if args.fsdp else 1
    rows = []
    print(f"{'config':<32} {'optimizer':<15} {'planned MiB':>12} {'measured MiB':>13} {'measured/planned':>17}")
    for layers, width, latents, cross_layer, batch_size in CONFIGS:
        for name in args.optimizers:
            config = clt_config(layers, width, latents, cross_layer, name)
            p = plan(ModelDims(layers, width, f"{layers}x{width}"), config, name, batch_size=batch_size, gpus=gpus)
            planned = p.fsdp_gpu_bytes if args.fsdp else p.gpu_bytes
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if args.fsdp \
                else [sys.executable]
            cmd = [*launcher, __file__, "--steps", str(args.steps), "--worker",
                   *map(str, (layers, width, latents, cross_layer, batch_size)), name]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **WORKER_ENV})
            if done.returncode != 0:
                raise SystemExit(f"worker failed: {done.stderr.strip().splitlines()[-1]}")
            measured = json.loads(done.stdout.strip().splitlines()[-1])["measured_bytes"]
            label = f"L={layers} d={width} n={latents} {'full' if cross_layer == 0 else f'C={cross_layer}'} B={batch_size}"
            row = {"config": label, "optimizer": name, "processes": gpus, "planned_bytes": planned,
                   "measured_bytes": measured, "ratio": measured / planned, "params": p.total_params, "planned": {
                       "weights": p.weight_bytes, "grads": p.grad_bytes, "optimizer": p.optimizer_bytes,
                       "step_temporary": p.optimizer_step_bytes, "batch": p.batch_bytes,
                       **({"fsdp_gathered": p.fsdp_gathered_bytes} if args.fsdp else {})}}
            rows.append(row)
            print(f"{label:<32} {name:<15} {planned / 2**20:>12,.0f} {measured / 2**20:>13,.0f} "
                  f"{row['ratio']:>17.3f}", flush=True)
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"largest disagreement: {worst:.1%}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"steps": args.steps, "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
