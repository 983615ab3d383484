"""Where a CLT reads and writes: decoder layers and their resid_mid / mlp_in / mlp_out sites.

In a Llama decoder layer

    h   = x + attn(input_layernorm(x))          # resid_mid  (the CLT's input)
    out = h + mlp(post_attention_layernorm(h))  #   mlp_in = post_attention_layernorm(h)
                                                #   mlp_out = mlp(mlp_in)  (the CLT's target)

A forward pre-hook on `post_attention_layernorm` sees resid_mid; a forward hook on `mlp`
sees mlp_in and mlp_out, and may replace mlp_out by returning a tensor. Every context
manager here removes its hooks on exit, also when the body raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from .choices import InputSite, names

SITES = ("resid_mid", "mlp_in", "mlp_out")
INPUT_SITES = names(InputSite)  # sites a CLT may read; the target is always mlp_out


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The language model's decoder layers, found by structure (LLaVA under transformers
    5 or 4, or any Llama-family causal LM): the first ModuleList whose blocks all have
    `post_attention_layernorm` and `mlp`."""
    lists = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            lists.append(name)
            if all(hasattr(block, "post_attention_layernorm") and hasattr(block, "mlp") for block in module):
                return module
    raise ValueError(
        f"{type(model).__name__} has no Llama-style decoder layers (blocks with post_attention_layernorm and mlp); "
        f"module lists found: {', '.join(lists) or 'none'}. clt-lite supports LLaVA and Llama-family language models"
    )


def _check_layers(model: nn.Module, layers: Sequence[int] | None) -> list[int]:
    n = len(decoder_layers(model))
    chosen = list(range(n)) if layers is None else list(layers)
    bad = [l for l in chosen if not 0 <= l < n]
    if bad:
        raise ValueError(f"layer(s) {bad} out of range: the model has {n} decoder layers (0..{n - 1})")
    return chosen


class Captured(dict):
    """site -> {layer -> tensor}; `stack(site)` gives [..., n_layers, d] in layer order."""

    def stack(self, site: str) -> torch.Tensor:
        per_layer = self[site]
        return torch.stack([per_layer[l] for l in sorted(per_layer)], dim=-2)


@contextmanager
def capture(
    model: nn.Module,
    sites: Sequence[str] = ("resid_mid", "mlp_out"),
    layers: Sequence[int] | None = None,
    positions: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Iterator[Captured]:
    """Record activations of the next forward pass(es); the last pass wins.

    positions: optional bool mask [batch, seq]; then each tensor is [n_kept, d] (rows in
    mask order), else [batch, seq, d]. Tensors are detached and moved to `device`/`dtype`.
    """
    unknown = set(sites) - set(SITES)
    if unknown:
        raise ValueError(f"unknown site(s) {sorted(unknown)}; choose from {', '.join(SITES)}")
    blocks = decoder_layers(model)
    captured = Captured({site: {} for site in sites})

    def keep(site: str, layer: int, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        if positions is not None:
            tensor = tensor[positions.to(tensor.device)]
        captured[site][layer] = tensor.to(device=device, dtype=dtype or tensor.dtype)

    handles = []
    try:
        for layer in _check_layers(model, layers):
            block = blocks[layer]
            if "resid_mid" in sites:
                handles.append(block.post_attention_layernorm.register_forward_pre_hook(
                    lambda _m, args, layer=layer: keep("resid_mid", layer, args[0])))
            if "mlp_in" in sites or "mlp_out" in sites:
                def on_mlp(_m, args, output, layer=layer):
                    if "mlp_in" in sites:
                        keep("mlp_in", layer, args[0])
                    if "mlp_out" in sites:
                        keep("mlp_out", layer, output)
                handles.append(block.mlp.register_forward_hook(on_mlp))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


MlpPatch = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


@contextmanager
def patch_mlp_out(model: nn.Module, patch: MlpPatch, layers: Sequence[int] | None = None) -> Iterator[None]:
    """Replace mlp_out of chosen layers by `patch(layer, mlp_out, resid_mid, mlp_in)`.

    The patch sees the residual stream as it flows in *this* forward pass, so patching
    every layer with a CLT gives the closed-loop replacement model. Returning None keeps
    the original output.
    """
    blocks = decoder_layers(model)
    resid: dict[int, torch.Tensor] = {}
    handles = []
    try:
        for layer in _check_layers(model, layers):
            block = blocks[layer]
            handles.append(block.post_attention_layernorm.register_forward_pre_hook(
                lambda _m, args, layer=layer: resid.__setitem__(layer, args[0])))
            handles.append(block.mlp.register_forward_hook(
                lambda _m, args, output, layer=layer: patch(layer, output, resid.pop(layer), args[0])))
        yield
    finally:
        for handle in handles:
            handle.remove()


class TokenMasks(NamedTuple):
    """Boolean [batch, seq] masks of position kinds."""

    image: torch.Tensor  # image-patch placeholder positions
    text: torch.Tensor  # real text tokens (not image, not BOS, not padding)
    padding: torch.Tensor  # padding positions
    bos: torch.Tensor  # beginning-of-sequence token


def token_masks(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int, bos_token_id: int | None) -> TokenMasks:
    padding = attention_mask == 0
    image = (input_ids == image_token_id) & ~padding
    bos = (input_ids == bos_token_id) & ~padding if bos_token_id is not None else torch.zeros_like(padding)
    return TokenMasks(image, ~padding & ~image & ~bos, padding, bos)


def identity_tolerance(dtype: torch.dtype) -> float:
    """The one tolerance for checks that a recomputation matches the model, relative to the largest magnitude
    involved (max |diff| / max |value|): one unit in the last place of the model's dtype (torch.finfo eps).

    float32 1.2e-7, bfloat16 7.8e-3, float16 9.8e-4. The residual sum hidden = resid_mid + mlp_out is rounded
    once to the dtype, at most half an ulp (measured 0.3-0.5 ulp in all three); a norm recomputed on the same
    device matches exactly. A fixed absolute tolerance cannot serve both float32 and bfloat16.
    """
    return torch.finfo(dtype).eps


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: a recomputation's error at the scale of its values."""
    expected = expected.float().cpu()
    return ((actual.float().cpu() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def identity_errors(model: nn.Module, captured: Captured, hidden_states: Sequence[torch.Tensor]) -> dict[str, float]:
    """Relative errors (max |diff| / max |value|, over all layers) of the two identities the CLT relies on:

    mlp_in = post_attention_layernorm(resid_mid) and hidden[l+1] = resid_mid[l] + mlp_out[l]
    (checked for l < L-1: the model's last hidden state has the final norm applied).
    Compare them with `identity_tolerance(model dtype)`. Needs a capture of all three sites over all
    layers and output_hidden_states=True.
    """
    blocks = decoder_layers(model)
    resid_mid, mlp_in, mlp_out = (captured.stack(site).float() for site in SITES)
    norm_diff = norm_scale = residual_diff = residual_scale = 0.0
    with torch.no_grad():
        for l, block in enumerate(blocks):
            weight = next(block.parameters())  # the norm runs where the model is; the comparison on the CPU
            normed = block.post_attention_layernorm(resid_mid[..., l, :].to(weight.device, weight.dtype)).float().cpu()
            norm_diff = max(norm_diff, (mlp_in[..., l, :] - normed).abs().max().item())
            norm_scale = max(norm_scale, normed.abs().max().item())
            if l + 1 < len(blocks):
                after = hidden_states[l + 1].float().cpu()
                residual_diff = max(residual_diff, (after - resid_mid[..., l, :] - mlp_out[..., l, :]).abs().max().item())
                residual_scale = max(residual_scale, after.abs().max().item())
    return {"mlp_in = norm(resid_mid)": norm_diff / max(norm_scale, 1e-30),
            "hidden[l+1] = resid_mid + mlp_out": residual_diff / max(residual_scale, 1e-30)}
