"""Optimizer recipes: one name fixes the parameter dtype and the optimizer, for the trainer and the planner alike.

Why each recipe exists:

- ``adam``: float32 parameters and gradients, torch's fused Adam (two float32 states). The reference:
  16 bytes per parameter, so the full 32-layer CLT at LLaVA-7B width (18.8e9 parameters) needs 280 GiB.
- ``adam-bf16``: bfloat16 parameters, gradients and Adam states (torch's fused Adam computes each update
  in float32 and rounds it back), stepped *during backward*: one optimizer per parameter runs as soon as
  that parameter's gradient is complete and then frees it (PyTorch's post-accumulate-grad hook), so only
  one gradient exists at a time. About 6 bytes per parameter: the full 7B-width CLT fits one H200.
- ``adafactor``: float32 parameters, ``torch.optim.Adafactor`` (Shazeer & Stern 2018: the second moment of
  an [.., r, c] tensor kept as a row and a column factor, no first moment, step relative to the parameter's
  RMS), stepped during backward likewise. About 4 bytes per parameter, the smallest recipe.

``benchmarks/bench_optimizers.py`` compares them on the toy at one token budget (results in
``benchmarks/results/optimizers-toy.json``). Under data parallel a recipe's step waits for DDP's all-reduce,
so there every gradient is held, and the planner counts them all.

The planner (``clt_lite.plan``) sizes every recipe with ``state_bytes`` and ``step_bytes`` below, from the same
parameter shapes the trainer optimizes, so the two cannot disagree on what a recipe keeps in memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .choices import Optimizer, check

BYTES = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class Recipe:
    """A parameter dtype plus an optimizer, selected by TrainConfig.optimizer."""

    name: str  # the name TrainConfig.optimizer and `--optimizer` use
    param_dtype: str  # dtype of parameters, gradients and optimizer states ("float32" or "bfloat16")
    kind: str  # the torch optimizer: "adam" (torch.optim.Adam, fused) or "adafactor" (torch.optim.Adafactor)
    default_peak_lr: float  # peak lr at 2**14 latents per layer; scaled by 1/sqrt(width) like sparsify's default
    step_in_backward: bool  # one process: step each parameter as its gradient completes, then free the gradient


# adam-bf16's lr is 4x adam's: a bf16 weight drops steps under ~0.2% of its size, and on the toy 4x lr brought
# it within 10% of fp32 Adam at that lr (1.22x worse at adam's own lr). Adafactor's lr caps the relative step
# (update RMS / parameter RMS); 1e-2 is torch's default. Order = preference when looking for a config that fits.
RECIPES = {
    "adam": Recipe("adam", "float32", "adam", 2e-4, step_in_backward=False),
    "adam-bf16": Recipe("adam-bf16", "bfloat16", "adam", 8e-4, step_in_backward=True),
    "adafactor": Recipe("adafactor", "float32", "adafactor", 1e-2, step_in_backward=True),
}


def recipe(name: str) -> Recipe:
    """The recipe called `name`; one-line ValueError naming the choices otherwise."""
    check("optimizer", name, Optimizer)
    return RECIPES[name]


def default_lr(name: str, n_latents: int) -> float:
    """The recipe's peak lr at 2**14 latents per layer, scaled by 1/sqrt(n_latents / 2**14)."""
    return recipe(name).default_peak_lr / math.sqrt(n_latents / 2**14)


def _torch_optimizer(name: str, params: list[nn.Parameter], lr: float, betas: tuple[float, float]):
    if recipe(name).kind == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(betas), fused=True)  # one pass: ~6x faster on CPU
    # foreach=False: the foreach path builds every parameter's full-size variance estimate at once.
    return torch.optim.Adafactor(params, lr=lr, foreach=False)


class PerParameter:
    """One optimizer per parameter; with in_backward, each is stepped by a post-accumulate-grad hook that then
    frees the gradient (the pattern of PyTorch's tutorial "How to save memory by fusing the optimizer step
    into the backward pass"), otherwise all are stepped by step() after backward (data parallel).

    Quacks like the torch optimizer the trainer uses (param_groups, zero_grad, step, state_dict); both modes
    share one state-dict layout, so a checkpoint resumes on any number of processes.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer], params: list[nn.Parameter], in_backward: bool):
        self.optimizers, self.in_backward = optimizers, in_backward
        if in_backward:
            for p, o in zip(params, optimizers):
                p.register_post_accumulate_grad_hook(self._hook(o))

    @staticmethod
    def _hook(optimizer: torch.optim.Optimizer):
        def step(param: Tensor) -> None:
            optimizer.step()
            param.grad = None

        return step

    @property
    def param_groups(self) -> list[dict]:
        return [group for o in self.optimizers for group in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none)

    def step(self) -> None:
        """Step every parameter, unless each already stepped during backward."""
        if not self.in_backward:
            for o in self.optimizers:
                o.step()

    def state_dict(self) -> dict:
        return {"per_parameter": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for o, s in zip(self.optimizers, state["per_parameter"], strict=True):
            o.load_state_dict(s)


def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float, betas: tuple[float, float],
                   data_parallel: bool = False) -> torch.optim.Optimizer | PerParameter:
    """The recipe's optimizer over `params` (betas apply to Adam only); stepped in backward where the recipe
    says so and no data-parallel all-reduce has to come first."""
    params = list(params)
    wrong = {str(p.dtype) for p in params if p.dtype != getattr(torch, recipe(name).param_dtype)}
    if wrong:
        raise ValueError(f"optimizer {name!r} trains {recipe(name).param_dtype} parameters, got {sorted(wrong)}")
    if recipe(name).step_in_backward:
        return PerParameter([_torch_optimizer(name, [p], lr, betas) for p in params], params, not data_parallel)
    return _torch_optimizer(name, params, lr, betas)


def grad_bytes(name: str, shapes: Sequence[tuple[int, ...]], data_parallel: bool = False) -> int:
    """Bytes of gradients alive at once: all of them, or the largest one when stepped in backward."""
    sizes = [math.prod(s) for s in shapes]
    held = max(sizes) if recipe(name).step_in_backward and not data_parallel else sum(sizes)
    return BYTES[recipe(name).param_dtype] * held


def state_bytes(name: str, shapes: Sequence[tuple[int, ...]]) -> int:
    """Bytes of optimizer state the recipe keeps for parameters of these shapes (step counters ignored)."""
    size = BYTES[recipe(name).param_dtype]
    if recipe(name).kind == "adam":
        return 2 * size * sum(math.prod(s) for s in shapes)  # exp_avg, exp_avg_sq (fused Adam: no temporaries)
    # Adafactor: a row factor [.., r, 1] and a column factor [.., 1, c] per matrix, full variance per vector.
    elements = sum(math.prod(s[:-1]) + math.prod(s[:-2]) * s[-1] if len(s) > 1 else s[0] for s in shapes)
    return size * elements


def step_bytes(name: str, shapes: Sequence[tuple[int, ...]]) -> int:
    """Largest temporary one optimizer step allocates: Adafactor builds one full-size variance estimate at a time."""
    if recipe(name).kind == "adam":
        return 0
    return BYTES[recipe(name).param_dtype] * max(math.prod(s) for s in shapes)
