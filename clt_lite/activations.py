"""The sparse activations a CLT's encoder can use besides TopK: JumpReLU (with its straight-through threshold
gradient) and BatchTopK, and the compaction of a dense activation tensor into (values, indices)."""

from __future__ import annotations

import torch
from torch import Tensor


class _JumpReLU(torch.autograd.Function):
    """pre * 1[pre > threshold] with a straight-through threshold gradient.

    The step function has zero gradient almost everywhere, so the threshold's gradient uses the
    rectangle-kernel estimate of Rajamanoharan et al. (2024): d/dθ ≈ -(θ/ε) · 1[|pre - θ| < ε/2].
    """

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > threshold)
        near = ((pre - threshold).abs() < eps / 2).to(grad.dtype)
        grad_threshold = (-(threshold / eps) * near * grad).sum(0)
        return grad_pre, grad_threshold.to(threshold.dtype), None


def batch_topk(acts: Tensor, k: int) -> Tensor:
    """Keep, per layer, the B*k largest activations over the whole batch; zero the rest."""
    batch, n_layers, n = acts.shape
    per_layer = acts.transpose(0, 1).reshape(n_layers, batch * n)
    kth = per_layer.topk(min(batch * k, batch * n), dim=-1).values[:, -1]
    return acts * (acts >= kth[None, :, None])


def compact(dense: Tensor) -> tuple[Tensor, Tensor]:
    """Dense [B, L, n] activations -> (values, indices) padded to the largest active count in the batch."""
    width = int((dense > 0).sum(-1).max().clamp(min=1))
    return dense.topk(width, dim=-1, sorted=False)


def jump_relu(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """pre where it exceeds threshold, else 0; the threshold learns through the straight-through estimate."""
    return _JumpReLU.apply(pre, threshold, bandwidth)
