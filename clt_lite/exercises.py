"""Exercises: the learner writes a key piece of the course, a check runs it against the reference.

Each exercise has a reference solution here (`solution(name)`, what a notebook's `solutions = True`
switch fills in) and a check that runs the learner's function on small random inputs. When the
answer is wrong, the check compares it with the usual wrong answers and names the mistake it looks
like: a hint, not the answer. A check raises `ExerciseFailed` (papermill stops on it, a learner
reads one line); it returns a short confirmation when the function is right.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn


class Exercise(NamedTuple):
    notebook: str  # where it is posed
    difficulty: str  # "*" (a few lines), "**" (think about shapes), "***" (the heart of a method)
    minutes: int  # expected time for a learner who has read the notebook so far
    task: str  # what to write, in one line


EXERCISES = {
    "rms_norm": Exercise("01", "*", 5, "Llama's RMSNorm: x / sqrt(mean(x^2) + eps) * weight, over the last dimension"),
    "capture_mlp_in": Exercise("01", "**", 10, "a forward hook that records one layer's MLP input, removed afterwards"),
    "fvu": Exercise("03", "*", 5, "fraction of variance unexplained per layer, for [tokens, layers, d] tensors"),
    "topk": Exercise("03", "**", 10, "TopK activation: per token, keep the k largest pre-activations (after ReLU)"),
    "cross_layer_decode": Exercise("03", "***", 15, "sum every source's decoder writes into each target layer it reaches"),
}


class ExerciseFailed(AssertionError):
    """The learner's function is not right yet; the message is the hint."""


def _close(a, b) -> bool:
    return isinstance(a, Tensor) and a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)


def _judge(name: str, answer, reference, mistakes: dict[str, Tensor]) -> str:
    if _close(answer, reference):
        return f"{name}: correct"
    if not isinstance(answer, Tensor):
        raise ExerciseFailed(f"{name}: returned {type(answer).__name__}, expected a tensor of shape {tuple(reference.shape)}")
    if answer.shape != reference.shape:
        raise ExerciseFailed(f"{name}: shape {tuple(answer.shape)}, expected {tuple(reference.shape)}; check which dimension you reduce over")
    for hint, wrong in mistakes.items():
        if _close(answer, wrong):
            raise ExerciseFailed(f"{name}: {hint}")
    raise ExerciseFailed(f"{name}: the values differ from the reference (max |diff| {(answer.float() - reference.float()).abs().max():.3g}); "
                         f"reread the task: {EXERCISES[name].task}")


def _run(name: str, fn: Callable, *args):
    try:
        return fn(*args)
    except NotImplementedError:
        raise ExerciseFailed(f"{name}: not written yet ({EXERCISES[name].task}); or set solutions = True") from None


# ----------------------------------------------------------------------------------- references


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def capture_mlp_in(model: nn.Module, inputs: dict, layer: int) -> Tensor:
    from .sites import decoder_layers

    seen = []
    handle = decoder_layers(model)[layer].mlp.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen[-1]


def fvu(reconstruction: Tensor, target: Tensor) -> Tensor:
    residual = (target - reconstruction).pow(2).sum(-1).sum(0)
    return residual / (target - target.mean(0)).pow(2).sum(-1).sum(0)


def topk(pre: Tensor, k: int) -> Tensor:
    values, indices = pre.relu().topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values)


def cross_layer_decode(acts: Tensor, decoders: list[Tensor], cross_layer: int) -> Tensor:
    n_layers = acts.shape[1]
    span = n_layers if cross_layer in (0, n_layers) else cross_layer
    out = acts.new_zeros(acts.shape[0], n_layers, decoders[0].shape[-1])
    for source, W in enumerate(decoders):
        for offset in range(min(span, n_layers - source)):
            out[:, source + offset] += acts[:, source] @ W[:, offset]
    return out


SOLUTIONS = {"rms_norm": rms_norm, "capture_mlp_in": capture_mlp_in, "fvu": fvu, "topk": topk,
             "cross_layer_decode": cross_layer_decode}


def solution(name: str) -> Callable:
    """The reference for an exercise (what `solutions = True` uses)."""
    if name not in SOLUTIONS:
        raise ValueError(f"no exercise {name!r}; the exercises are {', '.join(SOLUTIONS)}")
    return SOLUTIONS[name]


def table() -> str:
    """Every exercise: notebook, difficulty, expected minutes, task."""
    return "\n".join(f"{e.notebook}  {e.difficulty:<3} {e.minutes:>3} min  {name:<19} {e.task}" for name, e in EXERCISES.items())


# ------------------------------------------------------------------------------------- checks


def check_rms_norm(fn: Callable) -> str:
    g = torch.Generator().manual_seed(0)
    x, weight, eps = torch.randn(3, 5, 16, generator=g) * 4 + 1, torch.rand(16, generator=g) + 0.5, 1e-5
    return _judge("rms_norm", _run("rms_norm", fn, x, weight, eps), rms_norm(x, weight, eps), {
        "you centred x first: that is LayerNorm; Llama's RMSNorm divides by the root mean square, no mean subtracted":
            (x - x.mean(-1, keepdim=True)) * torch.rsqrt((x - x.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True) + eps) * weight,
        "the learned weight is missing: multiply by it after normalising": x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps),
        "you normalised over the wrong dimension: the mean of squares is over the last (width) dimension":
            x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + eps) * weight,
    })


def check_capture_mlp_in(fn: Callable, model: nn.Module, inputs: dict, layer: int) -> str:
    from .sites import capture, decoder_layers

    block = decoder_layers(model)[layer]
    hooks_before = len(block.mlp._forward_hooks) + len(block.mlp._forward_pre_hooks)
    answer = _run("capture_mlp_in", fn, model, inputs, layer)
    if len(block.mlp._forward_hooks) + len(block.mlp._forward_pre_hooks) != hooks_before:
        raise ExerciseFailed("capture_mlp_in: your hook is still attached after the function returned; keep its handle and "
                             "call handle.remove() (in a finally: block, so an error cannot leave it behind)")
    with capture(model, ("resid_mid", "mlp_in", "mlp_out"), layers=[layer], device=next(model.parameters()).device) as seen, \
            torch.no_grad():
        model(**inputs)
    return _judge("capture_mlp_in", answer, seen["mlp_in"][layer], {
        "that is the MLP's output (mlp_out): a forward hook receives (module, inputs, output); the input is inputs[0]":
            seen["mlp_out"][layer],
        "that is resid_mid, before post_attention_layernorm: hook the MLP itself, whose input is already normalised":
            seen["resid_mid"][layer],
    })


def check_fvu(fn: Callable) -> str:
    g = torch.Generator().manual_seed(1)
    target = torch.randn(64, 3, 8, generator=g) * torch.tensor([1.0, 3.0, 0.5])[:, None] + 2.0
    reconstruction = target + 0.3 * torch.randn(64, 3, 8, generator=g)
    residual = (target - reconstruction).pow(2).sum(-1).sum(0)
    return _judge("fvu", _run("fvu", fn, reconstruction, target), fvu(reconstruction, target), {
        "you divided by the target's raw sum of squares: the variance is around the mean, centre the target first":
            residual / target.pow(2).sum(-1).sum(0),
        "you centred each token over its width: the mean to remove is over tokens (dimension 0), per layer and unit":
            residual / (target - target.mean(-1, keepdim=True)).pow(2).sum(-1).sum(0),
        "that is the plain mean squared error: divide by the target's variance so layers of different scale compare":
            (target - reconstruction).pow(2).mean(-1).mean(0),
    })


def check_topk(fn: Callable) -> str:
    g = torch.Generator().manual_seed(2)
    pre, k = torch.randn(6, 3, 20, generator=g), 4
    pre[:3] -= 2.0  # tokens whose top k include negatives, beside tokens with more than k positives
    values, indices = pre.topk(k, dim=-1)
    return _judge("topk", _run("topk", fn, pre, k), topk(pre, k), {
        "negative pre-activations survived: apply the ReLU (a latent is either off or positive)":
            torch.zeros_like(pre).scatter(-1, indices, values),
        "you kept the k smallest: topk's default is largest=True, or sort descending":
            torch.zeros_like(pre).scatter(-1, pre.topk(k, dim=-1, largest=False).indices,
                                          pre.topk(k, dim=-1, largest=False).values).relu(),
        "you applied ReLU but did not zero the rest: only k latents per token and layer may stay active": pre.relu(),
    })


def check_cross_layer_decode(fn: Callable) -> str:
    g = torch.Generator().manual_seed(3)
    L, n, d, C = 4, 5, 6, 3
    acts = torch.randn(7, L, n, generator=g).relu()
    decoders = [torch.randn(n, min(C, L - s), d, generator=g) for s in range(L)]
    plt = [W[:, :1] for W in decoders]
    shifted = acts.new_zeros(7, L, d)
    for s, W in enumerate(decoders):
        for offset in range(1, W.shape[1]):
            shifted[:, s + offset] += acts[:, s] @ W[:, offset]
    reference = cross_layer_decode(acts, decoders, C)
    counts = torch.tensor([sum(1 for s in range(L) if s <= t < s + C) for t in range(L)], dtype=torch.float32)
    return _judge("cross_layer_decode", _run("cross_layer_decode", fn, acts, decoders, C), reference, {
        "each layer only decodes into itself: that is a per-layer transcoder; a latent writes to targets s .. s+C-1":
            cross_layer_decode(acts, plt, 1),
        "targets start at s+1, so MLP 0 is never reconstructed (the mistake of the design this course grew from): "
        "decoder column 0 is the source's own layer": shifted,
        "you averaged the sources: a target's reconstruction is the sum over every source that reaches it":
            reference / counts[:, None],
    })
