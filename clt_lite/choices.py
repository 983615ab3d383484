"""Options that take one of a few names: each declared once, as a Literal type, and checked by one function.

The config dataclasses annotate their fields with these types, validate with `check`, and the CLI offers
`names(...)` as its choices, so a new name is added in exactly one place.
"""

from __future__ import annotations

from typing import Literal, get_args

Activation = Literal["topk", "batchtopk", "jumprelu"]  # CLTConfig.activation
InputSite = Literal["resid_mid", "mlp_in"]  # what a CLT reads; the target is always mlp_out
DType = Literal["float32", "bfloat16", "float16"]  # parameters, models and stores (devices.DTYPES maps them)
Optimizer = Literal["adam", "adam-bf16", "adafactor"]  # TrainConfig.optimizer (optim.RECIPES describes them)
Parallel = Literal["ddp", "fsdp"]  # TrainConfig.parallel under torchrun
ReplacementKind = Literal["clt", "zero", "mean"]  # what stands in for the MLPs
Loop = Literal["closed", "open"]  # whether a replacement reads its own residual stream or the original's
Convention = Literal["circuit-tracer", "clt-lite"]  # what an attribution graph credits to no node (attribution/local.py)


def names(choice) -> tuple[str, ...]:
    """The names a Literal type allows, in declaration order."""
    return get_args(choice)


def check(option: str, value: object, choice) -> None:
    """One-line ValueError naming the option, the value and the allowed names, unless value is one of them."""
    allowed = get_args(choice)
    if value not in allowed:
        raise ValueError(f"unknown {option} {value!r}; use one of {', '.join(allowed)}")
