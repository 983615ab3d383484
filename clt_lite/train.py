"""Train a CrossLayerTranscoder from any activation source: progress, checkpoints, exact resume, NaN guard.

The trainer reads an *activation source* (duck-typed, see ActivationSource): the on-disk store and the
streaming source both provide it. Loss = mean over targets of FVU_t, optionally plus an AuxK loss that
revives dead latents and, for JumpReLU, the paper's tanh sparsity penalty.

Optimizer recipes (TrainConfig.optimizer, see clt_lite.optim): fp32 Adam, or the low-memory ones (bf16 Adam,
Adafactor) that step each parameter during backward, which the planner sizes for a full CLT at LLaVA-7B
width on one H200.

Data parallel: under torchrun (WORLD_SIZE > 1) the CLT is replicated with PyTorch DDP (TrainConfig.parallel
"ddp") or sharded with FSDP2 ("fsdp": parameters, gradients and optimizer states split across ranks; see
clt_lite.parallel for what that saves). Every rank reads the same global batch stream and keeps its own rows.
Each rank's loss is its local share of the *global* loss (local squared error divided by the global target
variance) times the world size, and DDP and FSDP average gradients, so a run on W processes computes the same
update as one process with the same global batch, up to float summation order. Checkpoints hold the full,
unsharded model and optimizer (gathered to rank 0 under FSDP), so a run may resume on another number of
processes or in the other mode.
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import checkpoints, optim, parallel, plan
from .checkpoints import TrainingInterrupted, latest_checkpoint  # noqa: F401  (part of train's API)
from .choices import Optimizer, Parallel, check
from .clt import CLTConfig, CrossLayerTranscoder
from .kernels import masked_topk
from .progress import progress_bar
from .sources import ActivationBatch, ActivationSource  # noqa: F401  (train.ActivationBatch: the trainer's input type)
from .tensor_files import load_torch_tensors, read_safetensors


class TrainingDiverged(ValueError):
    """The loss became NaN or Inf; the last good checkpoint is left on disk."""


@dataclass
class TrainConfig:
    """Optimisation settings. Fields in RESUMABLE_FIELDS may change between a run and its resume."""

    tokens: int = 2**20  # total training tokens; steps = tokens // batch_size
    batch_size: int = 1024  # tokens per optimizer step, summed over all data-parallel ranks
    lr: float | None = None  # peak lr; None -> the recipe's default / sqrt(n_latents / 2**14) (optim.default_lr)
    optimizer: Optimizer = "adam"  # recipe in clt_lite.optim.RECIPES: "adam" (fp32), "adam-bf16" or "adafactor" (low-memory)
    adam_betas: tuple[float, float] = (0.9, 0.999)  # Adam (beta1, beta2)
    warmup_steps: int = 100  # linear lr warm-up from 0 over this many steps
    final_lr_fraction: float = 0.0  # lr decays linearly after warm-up to this fraction of the peak at the last step
    aux_k_coef: float = 1 / 32  # AuxK dead-latent loss weight (OpenAI's TopK SAE value); 0 disables it
    dead_tokens: int = 1_000_000  # a latent is dead once it has not fired for this many training tokens
    sparsity_coef: float = 1e-4  # JumpReLU only: lambda of the tanh sparsity penalty (per token)
    sparsity_c: float = 1.0  # JumpReLU only: c inside tanh(c * activation * ||W_dec||)
    checkpoint_every: int = 500  # steps between checkpoints (and one at the end); 0: none, only the final model
    checkpoint_minutes: float = 30.0  # also a checkpoint once this long has passed since the last (0: steps only)
    log_every: int = 10  # steps per history entry and progress-bar update
    val_batches: int | None = 16  # batches of the val split evaluated at the end; None = the whole split
    seed: int = 0  # model init and batch order
    device: str = "auto"  # "auto" (cuda if present), "cpu", "cuda" or "cuda:N"
    parallel: Parallel = "ddp"  # under torchrun only: "ddp" replicates the CLT, "fsdp" shards it (FSDP2; adam recipes)

    def __post_init__(self) -> None:
        if self.tokens < self.batch_size or self.batch_size < 1:
            raise ValueError(f"need tokens >= batch_size >= 1, got tokens={self.tokens}, batch_size={self.batch_size}")
        if self.checkpoint_every < 0 or self.log_every < 1 or self.checkpoint_minutes < 0:
            raise ValueError(f"need checkpoint_every >= 0 (0: no checkpoints), checkpoint_minutes >= 0 and log_every >= 1, "
                             f"got {self.checkpoint_every}, {self.checkpoint_minutes} and {self.log_every}")
        optim.recipe(self.optimizer)
        check("parallel", self.parallel, Parallel)
        if self.parallel == "fsdp" and optim.recipe(self.optimizer).kind != "adam":
            raise ValueError(f"optimizer {self.optimizer!r} does not run sharded (torch's Adafactor fails on FSDP's "
                             "DTensor parameters); use parallel='ddp' or an adam recipe")

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size


# Settings that do not change the trained weights (beyond float summation order, like the number of processes),
# so a resume may use different values. Checkpoints are full tensors in every parallel mode.
RESUMABLE_FIELDS = ("checkpoint_every", "checkpoint_minutes", "log_every", "val_batches", "device", "parallel")


class ValMetrics(NamedTuple):
    """Per-layer validation metrics."""

    fvu: list[float]  # fraction of variance unexplained of each target over the whole val set
    l0: list[float]  # mean active latents per token of each source layer
    dead_fraction: list[float]  # fraction of each layer's latents that never fired on the val set


class TrainResult(NamedTuple):
    """What train() returns; `history` is the loss curve."""

    fvu: list[float]  # final per-layer validation FVU
    l0: list[float]  # final per-layer validation L0
    dead_fraction: list[float]  # final per-layer fraction of latents dead on the val split
    tokens_per_s: float  # training throughput over all sessions of this run (global tokens / wall seconds)
    history: list[dict]  # one entry per log_every steps: step, tokens, loss, lr, fvu (per layer), l0 (mean)
    steps: int  # optimizer steps done


def lr_at(step: int, peak: float, cfg: TrainConfig) -> float:
    """Linear warm-up to `peak`, then linear decay to final_lr_fraction * peak at the last step."""
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    remaining = max(cfg.steps - 1 - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / remaining, 1.0)
    return peak * (1 - (1 - cfg.final_lr_fraction) * progress)


def _target_variance(targets: Tensor, ranks: parallel.Ranks) -> Tensor:
    """[L] sum over the global batch of squared deviations from the global batch mean (the FVU denominator)."""
    t = targets.double()
    sums = ranks.sum(t.sum(0))
    squares = ranks.sum(t.pow(2).sum((0, 2)))
    count = ranks.sum(torch.tensor(float(t.shape[0]), dtype=torch.float64, device=t.device))
    return (squares - sums.pow(2).sum(-1) / count).float().clamp(min=1e-12)


def _aux_k_loss(clt: CrossLayerTranscoder, x: Tensor, pre_acts: Tensor, residual: Tensor, dead: Tensor,
                variance: Tensor) -> Tensor:
    """AuxK (Gao et al. 2024): the top k_aux dead latents per token and layer predict the residual error.

    Gives dead latents a gradient towards directions the live ones miss. Scaled down while only a few
    latents are dead, as in sparsify.
    """
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre_acts.new_zeros(())
    k_aux = min(clt.config.d_model // 2, clt.config.num_latents)
    with torch.no_grad():
        indices = masked_topk(pre_acts, dead, k_aux)
    predicted = clt.latent_sum(clt.pre_acts_at(x, pre_acts, indices).relu(), indices)
    scale = min(n_dead / (k_aux * clt.config.n_layers), 1.0)
    return scale * ((predicted.float() - residual).pow(2).sum((0, 2)) / variance).mean()


def _fired_counts(values: Tensor, indices: Tensor, n_latents: int) -> Tensor:
    """[L, n] number of tokens in the batch on which each latent was active."""
    L = values.shape[1]
    flat_idx = indices.transpose(0, 1).reshape(L, -1)
    active = (values > 0).transpose(0, 1).reshape(L, -1).float()
    return torch.zeros(L, n_latents, device=values.device).scatter_add_(1, flat_idx, active)


@torch.no_grad()
def evaluate(clt: CrossLayerTranscoder, source: ActivationSource, batch_size: int, max_batches: int | None = None,
             seed: int = 0) -> ValMetrics:
    """Per-layer FVU, L0 and dead fraction of `clt` on the val split (FVU pooled over all val tokens)."""
    cfg = clt.config
    device = clt.b_dec.device
    L, n = cfg.n_layers, cfg.num_latents
    squared_error = torch.zeros(L, dtype=torch.float64, device=device)
    sums = torch.zeros(L, cfg.d_model, dtype=torch.float64, device=device)
    squares = torch.zeros(L, dtype=torch.float64, device=device)
    active = torch.zeros(L, dtype=torch.float64, device=device)
    fired = torch.zeros(L, n, device=device)
    tokens = 0
    for batch in islice(source.batches(batch_size, "val", seed), max_batches):
        x, y = batch.inputs.to(device, clt.b_dec.dtype), batch.targets.to(device, torch.float64)
        with _autocast(device):
            out = clt(x)
        squared_error += (out.reconstruction.double() - y).pow(2).sum((0, 2))
        sums += y.sum(0)
        squares += y.pow(2).sum((0, 2))
        active += (out.values > 0).sum((0, 2)).double()
        fired += _fired_counts(out.values, out.indices, n)
        tokens += y.shape[0]
    if tokens == 0:
        raise ValueError("the source's val split yielded no batches; capture a val split or set val_batches")
    variance = squares - sums.pow(2).sum(-1) / tokens
    return ValMetrics(
        fvu=(squared_error / variance.clamp(min=1e-12)).tolist(),
        l0=(active / tokens).tolist(),
        dead_fraction=(fired == 0).float().mean(1).tolist(),
    )


def _autocast(device: torch.device):
    """bf16 autocast on CUDA; plain float32 elsewhere (CPU bf16 matmuls are slow and change results)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _check_source(source: ActivationSource, clt_config: CLTConfig, train_config: TrainConfig, world: int) -> None:
    if (source.n_layers, source.d_model) != (clt_config.n_layers, clt_config.d_model):
        raise ValueError(
            f"activation source has {source.n_layers} layers of width {source.d_model} but the CLT config expects "
            f"{clt_config.n_layers} x {clt_config.d_model}; use a matching store or config"
        )
    if source.input_site != clt_config.input_site:
        raise ValueError(
            f"activation source reads {source.input_site} but the CLT config says input_site={clt_config.input_site!r}; "
            "set the config's input_site to the source's (or capture that site)"
        )
    if train_config.batch_size % world:
        raise ValueError(f"batch_size {train_config.batch_size} is not divisible by the {world} data-parallel ranks")
    param_dtype = optim.recipe(train_config.optimizer).param_dtype
    if clt_config.dtype != param_dtype:
        raise ValueError(f"optimizer {train_config.optimizer!r} trains {param_dtype} parameters but the CLT config "
                         f"says dtype={clt_config.dtype!r}; set CLTConfig(dtype={param_dtype!r})")


def _resident_bytes(source: ActivationSource, batch_size: int, device: torch.device) -> int:
    """What a streaming source keeps on the training device (its model, its pool); 0 for stores, which read from disk."""
    if not hasattr(source, "device_bytes") or torch.device(source.device).type != device.type:
        return 0
    return source.device_bytes(batch_size)


def _device_memory(device: torch.device) -> tuple[float, str]:
    """(bytes, label) of the memory a training process may fill: the GPU's, or the machine's RAM on CPU."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory), torch.cuda.get_device_name(device)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "this machine's RAM"


def _config_dicts(clt_config: CLTConfig, train_config: TrainConfig) -> dict:
    """Both configs as JSON values (tuples become lists), so saved and current ones compare equal."""
    return json.loads(json.dumps({"clt_config": asdict(clt_config), "train_config": asdict(train_config)}))


# -------------------------------------------------------------------------------------- train
def train(clt_config: CLTConfig, train_config: TrainConfig, source: ActivationSource, out_dir: str | os.PathLike,
          progress: bool = True) -> TrainResult:
    """Train a CLT on `source`, resuming from out_dir's last checkpoint when there is one.

    Writes checkpoints under out_dir/checkpoints and the final model to out_dir (load it with
    CrossLayerTranscoder.load(out_dir)). Raises TrainingDiverged on a NaN/Inf loss, leaving the last
    good checkpoint in place. A resumed run computes exactly what an uninterrupted one would (CPU).
    """
    ranks, device, created_group = parallel.setup_ranks(train_config.device)
    try:
        _check_source(source, clt_config, train_config, ranks.world)
        memory, label = _device_memory(device)
        dims = plan.ModelDims(clt_config.n_layers, clt_config.d_model, "source")
        fitted = plan.check_fits(dims, clt_config, memory, train_config.optimizer, train_config.batch_size, ranks.world,
                                 label, train_config.parallel,
                                 _resident_bytes(source, train_config.batch_size // ranks.world, device))
        checkpoints.check_disk(Path(out_dir), fitted.weight_bytes, fitted.optimizer_bytes, train_config.checkpoint_every)
        if ranks.rank == 0:  # one writer; if it refuses, torchrun stops the other ranks
            checkpoints.claim_out_dir(Path(out_dir), _config_dicts(clt_config, train_config), RESUMABLE_FIELDS)
        return _train(clt_config, train_config, source, Path(out_dir), progress, ranks, device)
    finally:
        if created_group:
            # Free the wrapped model's reference cycles now: DDP and FSDP keep gloo work objects that would
            # otherwise be destroyed during interpreter shutdown, which aborts the process now and then (SIGABRT).
            gc.collect()
            dist.destroy_process_group()


def _train(clt_config: CLTConfig, cfg: TrainConfig, source: ActivationSource, out_dir: Path, progress: bool,
           ranks: parallel.Ranks, device: torch.device) -> TrainResult:
    configs = _config_dicts(clt_config, cfg)
    L, n = clt_config.n_layers, clt_config.num_latents
    ckpt = latest_checkpoint(out_dir)
    shard = parallel.decoder_sharder(cfg.parallel, ranks, device)  # FSDP: each decoder sharded as soon as it exists
    if ckpt is None:
        torch.manual_seed(cfg.seed)
        clt = CrossLayerTranscoder(clt_config, device=device, on_decoder=shard)
        first = next(iter(source.batches(cfg.batch_size, "train", cfg.seed)))
        clt.initialize_from_batch(first.inputs.to(device), first.targets.to(device))
        clt.set_scales(source.input_scale.float(), source.target_scale.float())
        clt.trained_on = dict(getattr(source, "model_identity", {}))  # optional in ActivationSource
        since_fired = torch.zeros(L, n, dtype=torch.long, device=device)
        state = {**configs, "step": 0, "history": [], "window": _empty_window(L), "train_seconds": 0.0}
    else:
        state = json.loads((ckpt / "state.json").read_text())
        checkpoints.check_resume(ckpt, state, configs, RESUMABLE_FIELDS)
        clt = CrossLayerTranscoder.load(ckpt, map_location=device, on_decoder=shard)
        if not (torch.allclose(clt.input_scale.cpu(), source.input_scale.float().cpu())
                and torch.allclose(clt.target_scale.cpu(), source.target_scale.float().cpu())):
            raise ValueError(f"{ckpt} was trained on a source with other normalisation scales; resume on that store")
        trainer = read_safetensors(ckpt / "trainer.safetensors", "cpu")
        since_fired = trainer["since_fired"].to(device)
        torch.set_rng_state(trainer["cpu_rng"])

    peak_lr = cfg.lr if cfg.lr is not None else optim.default_lr(cfg.optimizer, n)
    model = parallel.wrap(clt, cfg.parallel, ranks, device)  # FSDP: clt's parameters are now sharded DTensors
    params = [p for p in clt.parameters() if p.requires_grad]
    # Under data parallel the low-memory recipes step after backward: DDP's all-reduce or FSDP's reduce-scatter
    # must finish first (and FSDP writes the sharded gradients directly, so a post-accumulate-grad hook never fires).
    opt = optim.make_optimizer(cfg.optimizer, params, peak_lr, cfg.adam_betas, data_parallel=ranks.world > 1)
    if ckpt is not None:
        # mmap: every rank maps the file and copies out only its shards, instead of reading the full states
        opt_state = load_torch_tensors(ckpt / "optimizer.pt", map_location="cpu", mmap=True)
        opt.load_state_dict(parallel.shard_optimizer_state(opt_state, params))

    start = state["step"]
    batches = islice(source.batches(cfg.batch_size, "train", cfg.seed), start, None)  # skip consumed batches
    bar = progress_bar(total=cfg.steps, initial=start, desc="train CLT", unit="step", disable=not progress or ranks.rank > 0)
    window = state["window"]  # sums over the steps since the last history entry (kept in checkpoints)
    session_start = last_saved = time.perf_counter()
    with checkpoints.StopRequests() as stops:
        for step in range(start, cfg.steps):
            batch = next(batches)
            x = batch.inputs.tensor_split(ranks.world)[ranks.rank].to(device, clt.b_dec.dtype)
            y = batch.targets.tensor_split(ranks.world)[ranks.rank].to(device, torch.float32)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, peak_lr, cfg)

            loss, fvu, out = _loss(model, clt, cfg, x, y, since_fired >= cfg.dead_tokens, batch.inputs.shape[0], ranks)
            loss_value = ranks.sum(loss.detach().clone()).item()
            if not math.isfinite(loss_value):
                last = latest_checkpoint(out_dir)
                raise TrainingDiverged(
                    f"loss became {loss_value} at step {step}; last good checkpoint: {last}; "
                    "lower lr or check the activations"
                )
            opt.zero_grad(set_to_none=True)
            (loss * ranks.world).backward()  # DDP averages gradients over ranks; the global loss needs their sum
            opt.step()

            fired = ranks.sum(_fired_counts(out.values.detach(), out.indices, n)) > 0
            since_fired = torch.where(fired, 0, since_fired + batch.inputs.shape[0])
            window["loss"] += loss_value
            window["fvu"] = [a + b for a, b in zip(window["fvu"], ranks.sum(fvu.detach().clone()).tolist())]
            window["l0"] += ranks.sum(out.l0.mean().detach().clone()).item() / ranks.world
            window["steps"] += 1
            bar.update(1)

            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                steps = window["steps"]
                state["history"].append({
                    "step": done, "tokens": done * cfg.batch_size, "loss": window["loss"] / steps,
                    "lr": lr_at(step, peak_lr, cfg), "fvu": [f / steps for f in window["fvu"]], "l0": window["l0"] / steps,
                })
                bar.set_postfix(loss=f"{window['loss'] / steps:.4f}", refresh=False)
                window = state["window"] = _empty_window(L)
            # Ctrl-C / SIGTERM and the time interval: every rank must agree, or the collectives below would hang.
            timed = bool(cfg.checkpoint_every and cfg.checkpoint_minutes) and \
                time.perf_counter() - last_saved >= 60 * cfg.checkpoint_minutes
            flags = ranks.sum(torch.tensor([float(stops.requested), float(timed)], device=device))
            stop, timed = bool(flags[0]), bool(flags[1])
            if done == cfg.steps or stop or timed or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
                state["step"] = done
                state["train_seconds"] += time.perf_counter() - session_start
                session_start = last_saved = time.perf_counter()
                if cfg.checkpoint_every:
                    full_clt, opt_state = parallel.full_model(clt, ranks), parallel.full_state(opt.state_dict(), ranks)
                    if ranks.rank == 0:
                        checkpoints.save_checkpoint(out_dir, done, full_clt, opt_state, since_fired, state)
                if stop and done < cfg.steps:
                    bar.close()
                    raise checkpoints.TrainingInterrupted(
                        f"stopped at step {done} of {cfg.steps}; " + (f"checkpoint in {out_dir}: rerun the same command to "
                        "resume" if cfg.checkpoint_every else "checkpoint_every=0, so nothing was saved: a rerun starts over"))
    bar.close()

    full_clt = parallel.full_model(clt, ranks)
    if ranks.rank == 0:
        full_clt.save(out_dir)
    # Every rank evaluates the whole val split (under FSDP each forward gathers the weights, in step on all ranks).
    metrics = evaluate(clt, source, cfg.batch_size, cfg.val_batches, cfg.seed)
    seconds = state["train_seconds"]
    return TrainResult(
        fvu=metrics.fvu, l0=metrics.l0, dead_fraction=metrics.dead_fraction,
        tokens_per_s=state["step"] * cfg.batch_size / seconds if seconds > 0 else 0.0,
        history=state["history"], steps=state["step"],
    )


def _empty_window(n_layers: int) -> dict:
    return {"loss": 0.0, "fvu": [0.0] * n_layers, "l0": 0.0, "steps": 0}


def _loss(model: torch.nn.Module, clt: CrossLayerTranscoder, cfg: TrainConfig, x: Tensor, y: Tensor, dead: Tensor,
          global_tokens: int, ranks: parallel.Ranks):
    """This rank's share of the global loss, its per-layer FVU share [L], and the forward output.

    `model` is the CLT or its DDP wrapper (forward goes through it so DDP sees the step); `clt` the CLT itself
    (under FSDP the same object, its weights still gathered after forward).
    """
    with _autocast(x.device):
        out = model(x)
        variance = _target_variance(y, ranks)
        fvu = (out.reconstruction.float() - y).pow(2).sum((0, 2)) / variance
        loss = fvu.mean()
        if cfg.aux_k_coef > 0:
            residual = (y - out.reconstruction.float()).detach()
            loss = loss + cfg.aux_k_coef * _aux_k_loss(clt, x, out.pre_acts, residual, dead, variance)
        if clt.config.activation == "jumprelu" and cfg.sparsity_coef > 0:
            penalty = clt.sparsity_penalty(out.values, out.indices, cfg.sparsity_c).float().sum()
            loss = loss + cfg.sparsity_coef * penalty / global_tokens
    return loss, fvu, out
