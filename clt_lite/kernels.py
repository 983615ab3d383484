"""Autograd functions that keep a CLT training step sparse where PyTorch's own ops would go dense.

- selected_pre_acts: a TopK or BatchTopK encoder's gradient reaches only the k selected latents of each token and
  layer, so backward need not keep the [B, L, n] pre-activations or zero-fill their gradient.
- sum_into_targets: adds each source's contributions into the targets it writes with one in-place add per source;
  done through autograd's own in-place ops, every add would copy the whole [B, L, d] gradient in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class _SelectedPreActs(torch.autograd.Function):
    """pre[b, l, indices[b, l, j]] with the gradient of the encoder's affine map taken through those entries only.

    TopK and BatchTopK pass gradient to the k selected latents of each token and layer and to nothing else, so
    the dense [B, L, n] pre-activations need not be kept for backward nor their gradient zero-filled: backward
    costs O(B L k d) instead of the dense O(B L n d), and keeps only x and the indices.
    """

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, pre: Tensor, indices: Tensor) -> Tensor:
        ctx.save_for_backward(x, W_enc, indices)
        return pre.gather(-1, indices)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, W_enc, indices = ctx.saved_tensors
        n_layers, n, d = W_enc.shape
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.stack([F.embedding_bag(indices[:, layer], W_enc[layer], mode="sum",
                                                  per_sample_weights=grad[:, layer].to(W_enc.dtype))
                                  for layer in range(n_layers)], 1).to(x.dtype)
        if ctx.needs_input_grad[1]:  # per layer, so the [B*k, d] outer products stay small; summed in float32
            grad_W = torch.empty_like(W_enc)
            for layer in range(n_layers):
                rows = (grad[:, layer, :, None].float() * x[:, layer, None, :].float()).reshape(-1, d)
                summed = rows.new_zeros(n, d).index_add_(0, indices[:, layer].reshape(-1), rows)
                grad_W[layer].copy_(summed)
        if ctx.needs_input_grad[2]:
            flat = indices.transpose(0, 1).reshape(n_layers, -1)
            grad_b = grad.new_zeros(n_layers, n, dtype=torch.float32).scatter_add_(
                1, flat, grad.transpose(0, 1).reshape(n_layers, -1).float())
        return grad_x, grad_W, None if grad_b is None else grad_b.to(W_enc.dtype), None, None


def selected_pre_acts(x: Tensor, W_enc: Tensor, b_enc: Tensor, pre: Tensor, indices: Tensor) -> Tensor:
    """The pre-activations [B, L, k'] at `indices` of `pre` = einsum("bld,lnd->bln", x, W_enc) + b_enc (computed
    without gradient), differentiable in x, W_enc and b_enc through the selected entries only."""
    return _SelectedPreActs.apply(x, W_enc, b_enc, pre, indices)


class _SumIntoTargets(torch.autograd.Function):
    @staticmethod
    def forward(ctx, n_layers: int, d: int, *parts: Tensor) -> Tensor:
        batch = parts[0].shape[0]
        ctx.widths = [part.shape[1] // d for part in parts]
        out = parts[0].new_zeros(batch, n_layers, d)
        for source, part in enumerate(parts):
            out[:, source:source + ctx.widths[source]] += part.view(batch, -1, d)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        batch = grad.shape[0]
        return None, None, *(grad[:, s:s + width].reshape(batch, -1) for s, width in enumerate(ctx.widths))


def sum_into_targets(parts: list[Tensor], n_layers: int, d: int) -> Tensor:
    """parts[s] [B, n_targets(s) * d] (source s's contributions to targets s, s+1, ...) -> their sum per target
    [B, L, d]."""
    return _SumIntoTargets.apply(n_layers, d, *parts)
