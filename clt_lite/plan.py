"""Parameter, memory, FLOP and disk arithmetic for a CLT config, before anyone runs out of memory.

Pure arithmetic on a model's depth and width. Worked example (LLaVA-1.5-7B, n = 8192, C = full):
528 decoder matrices (32·33/2), 17.72e9 decoder + 1.07e9 encoder weights ≈ 18.8e9 parameters.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

from .clt import CLTConfig
from .models import random_config
from .optim import RECIPES, grad_bytes, recipe, state_bytes, step_bytes

BYTES_PER_DTYPE = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1}
GiB = 2**30


class ModelDims(NamedTuple):
    """The two numbers of a language model that size a CLT."""

    n_layers: int  # decoder layers (each one source and one target)
    d_model: int  # residual width
    name: str  # label shown in plans


MODEL_PRESETS = {
    "llava-1.5-7b": ModelDims(32, 4096, "llava-1.5-7b"),
    "tiny-llava-shapes": ModelDims(16, 128, "tiny-llava-shapes"),
    "tiny-llava-shapes-32": ModelDims(32, 128, "tiny-llava-shapes-32"),
}


class DeviceSpec(NamedTuple):
    """Peak numbers of an accelerator; bounds computed from them are upper limits, not predictions."""

    name: str  # label
    flops: float  # dense bf16 (GPU) / fp32 (CPU) FLOP/s
    bandwidth: float  # memory bandwidth, bytes/s
    memory: float  # device memory, bytes
    note: str  # where the numbers come from


DEVICE_PRESETS = {
    "h200": DeviceSpec("h200", 989e12, 4.8e12, 141e9, "NVIDIA H200 SXM datasheet, dense bf16"),
    "cpu-2core": DeviceSpec("cpu-2core", 1e11, 2e10, 24 * GiB, "rough guess for 2 modern x86 cores"),
}


def model_dims(name_or_path: str) -> ModelDims:
    """A preset name, a `random:` model name (with its depth overrides), or a Hugging Face model folder
    (its config.json; LLaVA's text_config is used)."""
    if name_or_path in MODEL_PRESETS:
        return MODEL_PRESETS[name_or_path]
    if name_or_path.startswith("random:"):

        text = random_config(name_or_path).text_config
        return ModelDims(text.num_hidden_layers, text.hidden_size, name_or_path)
    config_path = Path(name_or_path) / "config.json"
    if not config_path.is_file():
        presets = ", ".join(MODEL_PRESETS)
        raise ValueError(f"unknown model {name_or_path!r}: use one of {presets} or a folder with config.json")
    config = json.loads(config_path.read_text())
    text = config.get("text_config", config)
    if "num_hidden_layers" not in text or "hidden_size" not in text:
        raise ValueError(f"{config_path} has no num_hidden_layers/hidden_size; is it a language or LLaVA model?")
    return ModelDims(text["num_hidden_layers"], text["hidden_size"], Path(name_or_path).name)


@dataclass
class Plan:
    """Sizes and bounds of training one CLT config on one model (all byte counts in bytes)."""

    model: ModelDims  # the model the CLT reads
    config: CLTConfig  # the CLT
    decoder_matrices: int  # source -> target pairs, each an [n, d] matrix
    encoder_params: int  # W_enc, b_enc (+ thresholds, post-encoder scales)
    decoder_params: int  # W_dec, b_dec (+ W_skip)
    total_params: int  # encoder + decoder
    weight_bytes: int  # parameters in the recipe's param_dtype
    grad_bytes: int  # gradients alive at once, param_dtype (the largest only when the recipe steps in backward)
    optimizer_bytes: int  # optimizer states (clt_lite.optim.state_bytes)
    optimizer_step_bytes: int  # largest temporary of one optimizer step (clt_lite.optim.step_bytes)
    training_bytes: int  # weights + gradients + optimizer states + step temporary (batch activations not included)
    batch_bytes: int  # rough activation memory of one GPU's share of a batch (inputs, targets, pre-activations, grads)
    encoder_flops_per_token: int  # forward, dense: 2 L d n
    decoder_flops_per_token_dense: int  # forward through dense activations: 2 n d pairs
    decoder_flops_per_token_sparse: int  # forward with k active latents: 2 k d pairs
    decoder_bytes_per_token_sparse: int  # decoder rows gathered per token, forward: k d pairs in param_dtype
    train_flops_per_token: int  # forward plus backward (twice the forward; the encoder's sparse for TopK and BatchTopK)
    disk_bytes_per_token: int  # input + target site of every layer in act_dtype
    optimizer: str  # the recipe (clt_lite.optim.RECIPES) the bytes assume
    batch_size: int  # tokens per step, summed over GPUs, used for the bounds
    gpus: int  # data-parallel GPUs (DDP: each holds a full replica and batch_size / gpus tokens)
    resident_bytes: int  # what else each GPU holds while the CLT trains: the model a streaming source runs, its buffers
    gpu_bytes: int  # memory one GPU needs on one process or under DDP: training_bytes + batch_bytes + resident_bytes
    fsdp_gathered_bytes: int  # FSDP: root unit's weights + gradients, two whole decoders' weights, one's gradient
    fsdp_gpu_bytes: int | None  # per GPU under the trainer's `parallel: fsdp` on `gpus` ranks (None: 1 GPU, adafactor)
    fsdp_gpus_needed: int | None  # fewest devices on which `parallel: fsdp` fits (None: no device, adafactor, or never)
    device: DeviceSpec | None  # device the bounds assume
    compute_tokens_per_s: float | None  # peak FLOP/s / train FLOPs per token
    bandwidth_tokens_per_s: float | None  # batch_size * bandwidth / bytes moved per step
    max_tokens_per_s: float | None  # min of the two: an upper bound, real runs are slower
    fits: bool | None  # gpu_bytes <= device memory


class TableRow(NamedTuple):
    """One row of targets_sources_table."""

    layer: int  # the layer
    targets: list[int]  # MLP outputs written by this layer's latents
    sources: list[int]  # layers whose latents write this layer's MLP output


def storage_advice(tokens: int, bytes_per_token: int, free_bytes: int) -> str:
    """Store or stream? One line: what storing `tokens` training tokens would take against the free disk.

    Stream when the store would fill more than a quarter of the free disk: the rest is needed for
    checkpoints (a full CLT at LLaVA-7B width writes ~100 GB of them) and the executed notebooks.
    """
    need = tokens * bytes_per_token
    verdict = "storing them is fine (stream: false)" if need <= free_bytes / 4 else "stream them (stream: true)"
    return (f"{tokens:,} training tokens x {bytes_per_token:,} B = {need / 1e9:,.1f} GB; {free_bytes / 1e9:,.0f} GB free "
            f"here: {verdict}")


def targets_sources_table(n_layers: int, cross_layer: int) -> list[TableRow]:
    """Per layer: the targets its latents write, and the sources whose latents write its target."""
    if not 0 <= cross_layer <= n_layers:
        raise ValueError(f"cross_layer={cross_layer} must be in 0..{n_layers} (0 or n_layers = full)")
    span = cross_layer or n_layers
    return [
        TableRow(layer, targets=list(range(layer, min(layer + span, n_layers))),
                 sources=list(range(max(0, layer - span + 1), layer + 1)))
        for layer in range(n_layers)
    ]


def param_shapes(clt_config: CLTConfig) -> list[tuple[int, ...]]:
    """Shapes of the CLT's trained parameters, in CrossLayerTranscoder's order (what the optimizer holds)."""
    L, d, n = clt_config.n_layers, clt_config.d_model, clt_config.num_latents
    shapes = [(L, n, d), (L, n), (L, d)]  # W_enc, b_enc, b_dec
    if clt_config.skip_connection:
        shapes.append((L, d, d))
    if clt_config.activation == "jumprelu":
        shapes.append((L, n))
    if clt_config.post_encoder_scale and clt_config.train_post_encoder:
        shapes.append((L, n))
    return shapes + [(n, clt_config.n_targets(s), d) for s in range(L)]  # W_dec, a submodule: listed last


def plan(dims: ModelDims, clt_config: CLTConfig, optimizer: str = "adam", device: str | DeviceSpec | None = None,
         batch_size: int = 4096, act_dtype: str = "bfloat16", gpus: int = 1, resident_bytes: int = 0) -> Plan:
    """Count parameters, bytes and FLOPs of `clt_config` trained with recipe `optimizer`, and bound tokens/s.

    Memory per GPU = weights + gradients (the recipe's param dtype) + optimizer states + the largest
    temporary of an optimizer step + activations of the GPU's share of the batch + resident_bytes (what
    else lives on the GPU: a streaming run's model and shuffle buffer). Data parallel (DDP) replicates
    everything but the batch, so more GPUs do not make a CLT fit. The trainer's FSDP (`parallel: fsdp`,
    see clt_lite.parallel) makes each source's decoder a unit and the encoder and biases the root unit: a
    GPU holds the root unit's weights and gradients whole, at most two whole decoders (the one running,
    the next prefetched) and one decoder's unsharded gradient (fsdp_gathered_bytes), plus its 1/gpus share
    of all weights, gradients and optimizer states (fsdp_gpu_bytes); the CLT's size is then a matter of
    GPU count (fsdp_gpus_needed).

    Throughput model (an upper bound, per GPU): compute bound = peak FLOP/s / (3 x forward FLOPs per
    token, sparse decoder); bandwidth bound = tokens per step / time to move, per step, the weights four
    times (forward read, backward read, optimizer read + write), the gradients twice (write, read), the
    optimizer states twice (read + write), and per token the k active decoder rows of every pair four
    times (forward gather, backward gather, gradient read + write: the gathers have little reuse, and at
    LLaVA width they dominate). The smaller of the two bounds is reported.
    """
    if (clt_config.n_layers, clt_config.d_model) != (dims.n_layers, dims.d_model):
        raise ValueError(f"config is {clt_config.n_layers} x {clt_config.d_model} but {dims.name} is "
                         f"{dims.n_layers} x {dims.d_model}; build the CLTConfig from the model dims")
    param_dtype = recipe(optimizer).param_dtype
    if act_dtype not in BYTES_PER_DTYPE:
        raise ValueError(f"unknown dtype {act_dtype!r}; use one of {', '.join(BYTES_PER_DTYPE)}")
    if gpus < 1 or batch_size % gpus:
        raise ValueError(f"gpus={gpus} must be >= 1 and divide batch_size={batch_size}")
    if isinstance(device, str):
        if device not in DEVICE_PRESETS:
            raise ValueError(f"unknown device {device!r}; use one of {', '.join(DEVICE_PRESETS)}")
        device = DEVICE_PRESETS[device]

    L, d, n, k = dims.n_layers, dims.d_model, clt_config.num_latents, clt_config.k
    pairs = clt_config.n_pairs
    per_latent = 1 + (clt_config.activation == "jumprelu") + clt_config.post_encoder_scale  # b_enc, θ, scale
    encoder = L * n * d + L * n * per_latent
    decoder = pairs * n * d + L * d + (L * d * d if clt_config.skip_connection else 0)
    total = encoder + decoder
    weight_bytes = total * BYTES_PER_DTYPE[param_dtype]
    shapes = param_shapes(clt_config)
    optimizer_bytes, temporary = state_bytes(optimizer, shapes), step_bytes(optimizer, shapes)
    grads = grad_bytes(optimizer, shapes, data_parallel=gpus > 1)
    training_bytes = weight_bytes + grads + optimizer_bytes + temporary

    # JumpReLU keeps the dense pre-activations' gradient too; TopK and BatchTopK differentiate through the k selected
    # latents only (clt_lite.kernels), so only the pre-activations themselves are held (AuxK reads them).
    dense_per_latent = 2 if clt_config.activation == "jumprelu" else 1

    def batch_share(g: int) -> int:  # one GPU's share of the batch on g GPUs: inputs, targets, reconstruction
        return 4 * (batch_size // g) * L * (3 * d + dense_per_latent * n)  # (B L d) and pre-activations (B L n), fp32

    batch_bytes = batch_share(gpus)
    root_shapes, decoder_shapes = shapes[:-L], shapes[-L:]  # param_shapes lists the decoders last
    root = BYTES_PER_DTYPE[param_dtype] * sum(math.prod(s) for s in root_shapes)
    largest_decoder = BYTES_PER_DTYPE[param_dtype] * max(math.prod(s) for s in decoder_shapes)
    gathered = 2 * root + 3 * largest_decoder

    enc_flops = 2 * L * d * n
    dec_dense, dec_sparse = 2 * n * d * pairs, 2 * k * d * pairs
    dec_bytes = k * d * pairs * BYTES_PER_DTYPE[param_dtype]
    # Forward plus twice that for backward; a TopK or BatchTopK encoder's backward touches only the k selected latents.
    enc_backward = 2 * enc_flops if clt_config.activation == "jumprelu" else 2 * 2 * L * k * d
    train_flops = enc_flops + enc_backward + 3 * dec_sparse
    compute = bandwidth = best = fits = None
    if device is not None:
        compute = device.flops / train_flops
        step_bytes_moved = 6 * weight_bytes + 2 * optimizer_bytes + 4 * batch_size * dec_bytes
        bandwidth = batch_size * device.bandwidth / step_bytes_moved
        best = min(compute, bandwidth)
        fits = training_bytes + batch_bytes + resident_bytes <= device.memory
    all_grads = grad_bytes(optimizer, shapes, data_parallel=True)  # FSDP steps after the reduce-scatter
    sharded_part = weight_bytes + all_grads + optimizer_bytes + temporary

    def fsdp_bytes(g: int) -> int:
        return gathered + math.ceil(sharded_part / g) + batch_share(g) + resident_bytes

    runs_sharded = recipe(optimizer).kind == "adam"  # torch's Adafactor fails on DTensor parameters
    fsdp_gpu_bytes = fsdp_bytes(gpus) if runs_sharded and gpus > 1 else None
    fsdp_needed = None
    if device is not None and runs_sharded:
        fsdp_needed = next((g for g in range(2, 4097) if fsdp_bytes(g) <= device.memory), None)
    return Plan(
        model=dims, config=clt_config, decoder_matrices=pairs, encoder_params=encoder, decoder_params=decoder,
        total_params=total, weight_bytes=weight_bytes, grad_bytes=grads, optimizer_bytes=optimizer_bytes,
        optimizer_step_bytes=temporary, training_bytes=training_bytes, batch_bytes=batch_bytes,
        encoder_flops_per_token=enc_flops, decoder_flops_per_token_dense=dec_dense,
        decoder_flops_per_token_sparse=dec_sparse, decoder_bytes_per_token_sparse=dec_bytes,
        train_flops_per_token=train_flops, disk_bytes_per_token=2 * L * d * BYTES_PER_DTYPE[act_dtype],
        optimizer=optimizer, batch_size=batch_size, gpus=gpus, resident_bytes=resident_bytes,
        gpu_bytes=training_bytes + batch_bytes + resident_bytes, fsdp_gathered_bytes=gathered,
        fsdp_gpu_bytes=fsdp_gpu_bytes, fsdp_gpus_needed=fsdp_needed, device=device,
        compute_tokens_per_s=compute, bandwidth_tokens_per_s=bandwidth, max_tokens_per_s=best, fits=fits,
    )


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / GiB:,.2f} GiB ({n_bytes / 1e9:,.2f} GB)"


def format_plan(p: Plan) -> str:
    """A human-readable multi-line summary of a Plan."""
    c = p.config
    span = "full" if c.span == c.n_layers else str(c.span)
    lines = [
        f"CLT on {p.model.name}: {p.model.n_layers} layers x d={p.model.d_model}, n={c.num_latents} latents/layer, "
        f"k={c.k}, cross_layer={span}, {c.activation}",
        f"  decoder matrices     {p.decoder_matrices:,}",
        f"  parameters           {p.total_params:,} ({p.total_params / 1e9:.2f}e9): encoder {p.encoder_params:,}, "
        f"decoder {p.decoder_params:,}",
        f"  weights              {_gib(p.weight_bytes)}",
        f"  gradients            {_gib(p.grad_bytes)}",
        f"  optimizer states     {_gib(p.optimizer_bytes)} ({p.optimizer})",
        *([f"  optimizer step temp  {_gib(p.optimizer_step_bytes)} (largest parameter, one at a time)"]
          if p.optimizer_step_bytes else []),
        f"  training total       {_gib(p.training_bytes)} + batch of {p.batch_size // p.gpus:,} tokens "
        f"{_gib(p.batch_bytes)}" + (f" per GPU, {p.gpus} data-parallel GPUs" if p.gpus > 1 else ""),
        *([f"  resident beside it   {_gib(p.resident_bytes)} (the streamed model's weights and shuffle buffer)"]
          if p.resident_bytes else []),
        f"  FLOPs/token forward  encoder {p.encoder_flops_per_token:.3g}, decoder sparse "
        f"{p.decoder_flops_per_token_sparse:.3g} (dense {p.decoder_flops_per_token_dense:.3g})",
        f"  activations on disk  {p.disk_bytes_per_token / 2**10:,.0f} KiB/token, "
        f"{p.disk_bytes_per_token * 1e6 / 1e12:,.3f} TB per 1M tokens",
    ]
    if p.device is not None:
        lines += [
            f"  on {p.device.name} ({p.device.note}): at most {p.max_tokens_per_s:,.0f} tokens/s "
            f"(compute bound {p.compute_tokens_per_s:,.0f}, bandwidth bound {p.bandwidth_tokens_per_s:,.0f})",
            f"  fits in {p.device.memory / GiB:,.0f} GiB: {'yes' if p.fits else 'NO'}",
        ]
    return "\n".join(lines)


def format_gpus(p: Plan) -> str:
    """Two lines: whether the config trains on p.gpus devices replicated (DDP, the default) and sharded (FSDP)."""
    if p.device is None:
        return "GPUs: give a device preset to size them"
    name = p.device.name
    verdict = "YES" if p.fits else "NO (data parallel replicates weights, gradients and states)"
    ddp = f"fits {p.gpus} x {name} with {p.optimizer}: {verdict}; needs {_gib(p.gpu_bytes)} per GPU"
    if recipe(p.optimizer).kind != "adam":
        return ddp + f"\n  parallel: fsdp: not with {p.optimizer} (torch's Adafactor fails sharded); use an adam recipe"
    needed = (f"needs at least {p.fsdp_gpus_needed} x {name}" if p.fsdp_gpus_needed else
              f"never fits {name} (the gathered units alone, {_gib(p.fsdp_gathered_bytes)}, do not)")
    here = ""
    if p.fsdp_gpu_bytes is not None:
        fits = "YES" if p.fsdp_gpu_bytes <= p.device.memory else "NO"
        here = f"on {p.gpus} x {name}: {fits}, {_gib(p.fsdp_gpu_bytes)} per GPU; "
    return (ddp + f"\n  parallel: fsdp (torchrun, `--parallel fsdp`; one decoder per unit, gathered "
            f"{_gib(p.fsdp_gathered_bytes)}, the rest sharded) {here}{needed}")


def format_recipes(dims: ModelDims, clt_config: CLTConfig, device: DeviceSpec, batch_size: int = 4096,
                   resident_bytes: int = 0) -> str:
    """One line per optimizer recipe the trainer implements: memory per GPU, whether one `device` holds it,
    the tokens/s bound, and how many devices the trainer's FSDP needs ("-": the recipe does not run sharded)."""
    lines = [f"{'recipe':<10} {'param dtype':<11} {'GiB per GPU':>11}  {'fits 1 x ' + device.name:<13} "
             f"{'tokens/s bound':>14}  {'FSDP GPUs':>9}"]
    for name, spec in RECIPES.items():
        p = plan(dims, replace(clt_config, dtype=spec.param_dtype), name, device=device, batch_size=batch_size,
                 resident_bytes=resident_bytes)
        lines.append(f"{name:<10} {spec.param_dtype:<11} {p.gpu_bytes / GiB:>11,.1f}  {'YES' if p.fits else 'no':<13} "
                     f"{p.max_tokens_per_s:>14,.0f}  {p.fsdp_gpus_needed or '-':>9}")
    return "\n".join(lines)


class Launch(NamedTuple):
    """One way to train a CLT: format_launches prints its plan and the command line that starts it."""

    expansion: int  # latents per layer / d_model
    optimizer: str  # recipe (clt_lite.optim.RECIPES)
    gpus: int  # processes, one GPU each (1: plain python; more: torchrun, nodes of 8 past 8)
    parallel: str = "fsdp"  # with gpus > 1: "ddp" or "fsdp"


def format_launches(dims: ModelDims, launches: list[Launch], device: DeviceSpec, k: int, batch_size: int) -> str:
    """Per launch: GPUs, recipe, memory per GPU, whether it fits, the tokens/s bound per GPU, and the exact command
    (full CLT over every layer; `--acts` is a store from `capture`, or use a config with stream: true)."""
    lines = [f"{'expansion':>9} {'recipe':<10} {'GPUs':>4} {'mode':<4} {'GiB/GPU':>8}  {'fits':<4} {'tokens/s/GPU':>12}"]
    for e, optimizer, gpus, parallel in launches:
        config = CLTConfig(dims.n_layers, dims.d_model, expansion_factor=e, k=k, dtype=recipe(optimizer).param_dtype)
        p = plan(dims, config, optimizer, device=device, batch_size=batch_size, gpus=gpus)
        need = _bytes_per_gpu(p, parallel)
        mode = "one" if gpus == 1 else parallel
        args = (f"-m clt_lite train --acts ACTS --expansion {e} --k {k} --cross-layer 0 --optimizer {optimizer} "
                f"--batch-size {batch_size} --out clt-x{e}")
        nodes = "" if gpus <= 8 else f"--nnodes {gpus // 8} --rdzv-backend c10d --rdzv-endpoint HOST:29500 "
        command = (f"python {args}" if gpus == 1 else
                   f"torchrun {nodes}--nproc_per_node {min(gpus, 8)} {args} --parallel {parallel}")
        lines.append(f"{e:>9} {optimizer:<10} {gpus:>4} {mode:<4} {need / GiB:>8,.1f}  "
                     f"{'YES' if need <= device.memory else 'no':<4} {p.max_tokens_per_s:>12,.0f}")
        lines.append(f"{'':>9} $ {command}")
    return "\n".join(lines)


def _bytes_per_gpu(p: Plan, parallel: str) -> int:
    """What one GPU of the run needs: FSDP's count when it shards (several GPUs, an adam recipe), else DDP's."""
    return p.fsdp_gpu_bytes if parallel == "fsdp" and p.fsdp_gpu_bytes is not None else p.gpu_bytes


def nearest_fit(dims: ModelDims, clt_config: CLTConfig, memory: float, optimizer: str, batch_size: int,
                gpus: int = 1, parallel: str = "ddp", resident_bytes: int = 0) -> tuple[str, CLTConfig] | None:
    """The closest (recipe, config) that fits `memory` bytes per GPU: another recipe at the same size first,
    then this recipe (then the others) with latents halved until one fits; None if not even n = k does."""
    order = [optimizer] + [name for name in RECIPES if name != optimizer]
    n = clt_config.num_latents
    while n >= clt_config.k:
        for name in order:
            fitted = replace(clt_config, n_latents=n, dtype=recipe(name).param_dtype)
            p = plan(dims, fitted, name, batch_size=batch_size, gpus=gpus, resident_bytes=resident_bytes)
            if _bytes_per_gpu(p, parallel) <= memory:
                return name, fitted
        n //= 2
    return None


def check_fits(dims: ModelDims, clt_config: CLTConfig, memory: float, optimizer: str, batch_size: int,
               gpus: int = 1, where: str = "the device", parallel: str = "ddp", resident_bytes: int = 0) -> Plan:
    """The plan; a one-line ValueError with its numbers and the nearest config that fits when it does not.

    `parallel` ("ddp" or "fsdp", TrainConfig.parallel) matters only with gpus > 1; `resident_bytes` is what
    else the device holds (a streaming source's model and buffer)."""
    p = plan(dims, clt_config, optimizer, batch_size=batch_size, gpus=gpus, resident_bytes=resident_bytes)
    need = _bytes_per_gpu(p, parallel)
    if need <= memory:
        return p
    near = nearest_fit(dims, clt_config, memory, optimizer, batch_size, gpus, parallel, resident_bytes)
    hint = ("nothing at this depth and width fits" if near is None else
            f"nearest that fits: optimizer={near[0]!r}, n_latents={near[1].num_latents} ({near[1].dtype})")
    resident = f" + resident {resident_bytes / GiB:,.2f}" if resident_bytes else ""
    if parallel == "fsdp" and p.fsdp_gpu_bytes is not None:
        raise ValueError(
            f"CLT does not fit {where} ({memory / GiB:,.1f} GiB) sharded on {gpus} ranks: needs {_gib(need)} per rank "
            f"= gathered units {p.fsdp_gathered_bytes / GiB:,.2f} + 1/{gpus} of the weights, gradients and optimizer "
            f"states ({optimizer}) + batch {p.batch_bytes / GiB:,.2f}{resident} GiB; {hint}"
        )
    raise ValueError(
        f"CLT does not fit {where} ({memory / GiB:,.1f} GiB): needs {_gib(p.gpu_bytes)} = weights "
        f"{p.weight_bytes / GiB:,.2f} + gradients {p.grad_bytes / GiB:,.2f} + optimizer ({optimizer}) "
        f"{(p.optimizer_bytes + p.optimizer_step_bytes) / GiB:,.2f} + batch {p.batch_bytes / GiB:,.2f}{resident} GiB; {hint}"
    )
