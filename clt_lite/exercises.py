"""Exercises: the learner writes a key piece of the course, a check runs it against the reference.

Each exercise has a reference solution here (`solution(name)`, what a notebook's `solutions = True`
switch fills in) and a check that runs the learner's function on small random inputs. When the
answer is wrong, the check compares it with the usual wrong answers and names the mistake it looks
like: a hint, not the answer. A check raises `ExerciseFailed` (papermill stops on it, a learner
reads one line); it returns a short confirmation when the function is right.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .sites import capture, decoder_layers


class Exercise(NamedTuple):
    notebook: str  # where it is posed
    difficulty: str  # "*" (a few lines), "**" (think about shapes), "***" (the heart of a method)
    minutes: int  # expected time for a learner who has read the notebook so far
    task: str  # what to write, in one line


EXERCISES = {
    "capture_mlp_in": Exercise("01", "**", 10, "a forward hook that records one layer's MLP input, removed afterwards"),
    "rms_norm": Exercise("01", "*", 5, "Llama's RMSNorm: x / sqrt(mean(x^2) + eps) * weight, over the last dimension"),
    "cell_patches": Exercise("02", "**", 10, "the row-major indices of the vision patches that cover one cell of ShapesWorld's grid"),
    "layer_scale": Exercise("02", "*", 5, "one scalar per layer that brings the mean squared norm of [tokens, layers, d] activations to d"),
    "cross_layer_decode": Exercise("03", "***", 15, "sum every source's decoder writes into each target layer it reaches"),
    "fvu": Exercise("03", "*", 5, "fraction of variance unexplained per layer, for [tokens, layers, d] tensors"),
    "topk": Exercise("03", "**", 10, "TopK activation: per token, keep the k largest pre-activations (after ReLU)"),
    "replace_one_layer": Exercise("04", "**", 15, "closed loop: the logits when one layer's MLP output is replaced by transcoder(mlp_in)"),
    "kl_divergence": Exercise("04", "*", 5, "mean over positions of KL(original || replacement), from two [positions, vocab] logit tensors"),
    "edge_weights": Exercise("05", "**", 10, "direct effects [targets, sources]: source activation x (its decoder write . the target's read)"),
    "influence": Exercise("05", "***", 15, "total influence w (A + A^2 + ...) of every node, A the row-normalised |adjacency|"),}


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
    seen = []
    handle = decoder_layers(model)[layer].mlp.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen[-1]


def layer_scale(acts: Tensor) -> Tensor:
    return (acts.shape[-1] / acts.pow(2).sum(-1).mean(0)).sqrt()


def cell_patches(cell: int, cells_per_side: int, patches_per_side: int) -> Tensor:
    per_cell = patches_per_side // cells_per_side
    row, col = divmod(cell, cells_per_side)
    rows = torch.arange(row * per_cell, (row + 1) * per_cell)
    cols = torch.arange(col * per_cell, (col + 1) * per_cell)
    return (rows[:, None] * patches_per_side + cols[None, :]).flatten()


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


def kl_divergence(original_logits: Tensor, replacement_logits: Tensor) -> Tensor:
    log_p, log_q = original_logits.log_softmax(-1), replacement_logits.log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def replace_one_layer(model: nn.Module, inputs: dict, layer: int, transcoder: Callable[[Tensor], Tensor]) -> Tensor:
    # A forward hook that returns a value replaces the module's output; the layers after it read the replacement.
    handle = decoder_layers(model)[layer].mlp.register_forward_hook(lambda _m, args, _out: transcoder(args[0]))
    try:
        with torch.no_grad():
            return model(**inputs).logits
    finally:
        handle.remove()


def edge_weights(activations: Tensor, decoders: Tensor, reads: Tensor) -> Tensor:
    return (reads @ decoders.T) * activations


def influence(adjacency: Tensor, weights: Tensor) -> Tensor:
    absolute = adjacency.abs()
    return _path_sum(absolute / absolute.sum(1, keepdim=True).clamp(min=1e-10), weights)


def _path_sum(A: Tensor, weights: Tensor) -> Tensor:
    """w (A + A^2 + ...): the graph is acyclic, so the series ends after at most len(A) terms."""
    current, total = weights @ A, torch.zeros_like(weights)
    while current.any():
        total, current = total + current, current @ A
    return total


SOLUTIONS = {"rms_norm": rms_norm, "capture_mlp_in": capture_mlp_in, "layer_scale": layer_scale, "cell_patches": cell_patches,
             "fvu": fvu, "topk": topk, "cross_layer_decode": cross_layer_decode, "kl_divergence": kl_divergence,
             "replace_one_layer": replace_one_layer, "edge_weights": edge_weights, "influence": influence}


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


def check_layer_scale(fn: Callable) -> str:
    g = torch.Generator().manual_seed(4)
    acts = torch.randn(50, 3, 16, generator=g) * torch.tensor([0.5, 2.0, 9.0])[:, None] * (torch.rand(50, 1, 1, generator=g) + 0.5)
    mean_sq = acts.pow(2).sum(-1).mean(0)
    return _judge("layer_scale", _run("layer_scale", fn, acts), layer_scale(acts), {
        "that scale makes quiet layers quieter: normalised = raw * scale, so the scale is sqrt(d / mean squared norm)":
            (mean_sq / 16).sqrt(),
        "the square root is missing: scaling by s multiplies the squared norm by s**2": 16 / mean_sq,
        "you averaged the norms and then squared: the target is the mean of the *squared* norms":
            (16 / acts.norm(dim=-1).mean(0).pow(2)).sqrt(),
        "that brings the mean squared norm to 1; the course scales to d, so each unit has a mean square of about 1":
            mean_sq.rsqrt(),
    })


def check_cell_patches(fn: Callable) -> str:
    cases = [(5, 3, 6), (0, 3, 6), (7, 3, 24)]  # the toy's 6x6 patch grid, and LLaVA-1.5's 24x24 (336 px / 14 px)
    for cell, cells, side in cases:
        per = side // cells
        row, col = divmod(cell, cells)
        answer = _run("cell_patches", fn, cell, cells, side)
        answer = torch.as_tensor(answer).sort().values if isinstance(answer, (Tensor, list)) else answer
        _judge("cell_patches", answer, cell_patches(cell, cells, side), {
            "rows and columns are swapped: cell c is at row c // cells_per_side, and patches are numbered row by row":
                cell_patches(col * cells + row, cells, side).sort().values,
            "a cell is patches_per_side // cells_per_side patches wide: multiply its row and column by that width first":
                torch.tensor([(row + i) * side + col + j for i in range(per) for j in range(per)]).sort().values,
            "a patch's index is row * patches_per_side + column: you stepped rows by the cell's width":
                torch.tensor([(row * per + i) * per + col * per + j for i in range(per) for j in range(per)]).sort().values,
        })
    return "cell_patches: correct"


def check_kl_divergence(fn: Callable) -> str:
    g = torch.Generator().manual_seed(5)
    original = torch.randn(12, 9, generator=g) * 3
    replacement = original + torch.randn(12, 9, generator=g)
    log_p, log_q = original.log_softmax(-1), replacement.log_softmax(-1)
    return _judge("kl_divergence", _run("kl_divergence", fn, original, replacement), kl_divergence(original, replacement), {
        "that is KL(replacement || original): the expectation is under the original model's distribution":
            kl_divergence(replacement, original),
        "you summed over positions: the course reports the mean KL per position": (log_p.exp() * (log_p - log_q)).sum(),
        "logits are not log-probabilities: take log_softmax first": (log_p.exp() * (original - replacement)).sum(-1).mean(),
    })


def check_replace_one_layer(fn: Callable, model: nn.Module, inputs: dict, layer: int) -> str:
    d = model.config.text_config.hidden_size
    transcoder = nn.Linear(d, d)
    with torch.no_grad():
        nn.init.normal_(transcoder.weight, std=d**-0.5, generator=torch.Generator().manual_seed(6))
        transcoder.bias.zero_()
    weight = next(model.parameters())
    transcoder = transcoder.to(weight.device, weight.dtype)  # the residual stream's dtype, as a real transcoder's output
    mlp = decoder_layers(model)[layer].mlp
    hooks_before = len(mlp._forward_hooks)
    answer = _run("replace_one_layer", fn, model, inputs, layer, transcoder)
    if len(mlp._forward_hooks) != hooks_before:
        raise ExerciseFailed("replace_one_layer: your hook is still attached after the function returned; keep its handle "
                             "and call handle.remove() in a finally: block")
    with torch.no_grad():
        original = model(**inputs).logits
        handle = mlp.register_forward_hook(lambda _m, args, out: out + transcoder(args[0]))
        try:
            added = model(**inputs).logits
        finally:
            handle.remove()
    return _judge("replace_one_layer", answer, replace_one_layer(model, inputs, layer, transcoder), {
        "the logits are the original model's: a forward hook changes the output only if it *returns* the new value":
            original,
        "you added the reconstruction to the MLP's output: the replacement takes the MLP's place, return it alone": added,
    })


def check_edge_weights(fn: Callable) -> str:
    g = torch.Generator().manual_seed(7)
    activations, decoders, reads = torch.rand(5, generator=g) + 0.5, torch.randn(5, 8, generator=g), torch.randn(3, 8, generator=g)
    reference = edge_weights(activations, decoders, reads)
    return _judge("edge_weights", _run("edge_weights", fn, activations, decoders, reads), reference, {
        "the source's activation is missing: a feature's write is its activation times its decoder vector":
            reads @ decoders.T,
        "edges are signed (a source can push a target down); keep the sign, pruning takes |.| later": reference.abs(),
        "you scaled by the *target's* activation: the edge carries the source's write into the target's read":
            (reads @ decoders.T) * activations[:3, None],
    })


def check_influence(fn: Callable) -> str:
    g = torch.Generator().manual_seed(8)
    n = 7
    adjacency = torch.randn(n, n, generator=g).tril(-1)  # row = target, column = source; sources come first: acyclic
    adjacency[:, 0] = 0.0  # node 0 reads nothing and feeds nothing: an isolated input
    weights = torch.zeros(n)
    weights[-1] = 1.0  # the logit
    reference = influence(adjacency, weights)
    row_sums = adjacency.abs().sum(1, keepdim=True).clamp(min=1e-10)
    return _judge("influence", _run("influence", fn, adjacency, weights), reference, {
        "that is only the direct effect w A: influence also flows through intermediate nodes (A^2, A^3, ...)":
            weights @ (adjacency.abs() / row_sums),
        "normalise each row of |A| to sum 1 first, so influence is a share of each target's input":
            _path_sum(adjacency.abs(), weights),
        "take absolute values: opposite-signed paths must not cancel in an influence score":
            _path_sum(adjacency / row_sums, weights),
        "the series starts at A: a node's own weight (the identity term) is not influence": reference + weights,
    })
