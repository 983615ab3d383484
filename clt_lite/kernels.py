"""Autograd functions that keep a CLT training step sparse where PyTorch's own ops would go dense.

- selected_pre_acts: a TopK or BatchTopK encoder's gradient reaches only the k selected latents of each token and
  layer, so backward need not keep the [B, L, n] pre-activations or zero-fill their gradient.
- sum_into_targets: adds each source's contributions into the targets it writes with one in-place add per source;
  done through autograd's own in-place ops, every add would copy the whole [B, L, d] gradient in backward.
- gather_rows: a decoder's sparse sum (embedding_bag's forward) whose backward, on the CPU in float32, is one fused
  C++ pass (compiled on first use): embedding_bag's own backward zero-fills the whole table gradient, then reads and
  writes one gradient row and reads one table row per (token, latent) pair; the fused pass sorts the pairs by latent,
  reads each table row once and writes each gradient row once (about 2x faster at the toy's width:
  benchmarks/bench_decoder_kernels.py).
- topk_pre_acts: a TopK encoder's pre-activations and selection; on the CPU in float32 the bias is added inside one
  compiled pass over each row that also finds its k largest entries (baddbmm first copies the bias into the whole
  [L, B, n] output, then torch.topk reads it all again).
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.distributed as dist
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
        if ctx.needs_input_grad[1] and _plain_cpu_float32(x, W_enc, grad) and (kernels := compiled_kernels()) is not None:
            # grad_W[l][r] = sum over the (b, j) with indices[b, l, j] = r of grad[b, l, j] x[b, l]: the decoder's table
            # gradient with x in the place of the incoming gradient, one compiled pass per layer
            grad_W = torch.stack([kernels.decoder_backward(W_enc[layer], x[:, layer], indices[:, layer], grad[:, layer], False)[0]
                                  for layer in range(n_layers)])
        elif ctx.needs_input_grad[1]:  # per layer, so the [B*k, d] outer products stay small; summed in float32
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


# decoder_backward: both gradients of out[b] = sum_i values[b, i] * table[indices[b, i]]: the (b, i) pairs
# counting-sorted by latent (a stable sort, so every sum runs in the same order on any number of threads), then per
# latent r, in parallel: grad_table[r] = sum over its pairs of values[b, i] * grad[b] and grad_values[b, i] = table[r] . grad[b].
# biased_topk: per row (layer l, token b) of pre [L, B, n], in parallel: add bias[l] (in place with write_back), keep the
# k largest sums in a sorted list (ties: the lower latent first; a later entry is compared with the k-th only, so the scan is
# one comparison per entry once the list is full) and write them, largest first, to values and indices [B, L, k].
_KERNELS_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <vector>

std::vector<torch::Tensor> decoder_backward(torch::Tensor table, torch::Tensor grad, torch::Tensor indices,
                                            torch::Tensor values, bool with_values) {
  TORCH_CHECK(table.is_contiguous() && table.scalar_type() == torch::kFloat && grad.scalar_type() == torch::kFloat &&
              values.scalar_type() == torch::kFloat && indices.scalar_type() == torch::kLong && grad.stride(1) == 1,
              "decoder_backward: float32 table, grad and values, int64 indices, contiguous rows");
  const int64_t n = table.size(0), width = table.size(1), tokens = indices.size(0), k = indices.size(1);
  const int64_t pairs = tokens * k, grad_stride = grad.stride(0);
  auto indices_c = indices.contiguous();
  auto values_c = values.contiguous();
  const int64_t* latent = indices_c.data_ptr<int64_t>();
  std::vector<int64_t> start(n + 1, 0), order(pairs);
  for (int64_t p = 0; p < pairs; ++p) start[latent[p] + 1]++;
  for (int64_t r = 0; r < n; ++r) start[r + 1] += start[r];
  std::vector<int64_t> next(start.begin(), start.end() - 1);
  for (int64_t p = 0; p < pairs; ++p) order[next[latent[p]]++] = p;
  auto grad_table = torch::empty_like(table);
  auto grad_values = torch::empty({with_values ? tokens : 0, k}, values_c.options());
  const float* W = table.data_ptr<float>();
  const float* G = grad.data_ptr<float>();
  const float* v = values_c.data_ptr<float>();
  float* gW = grad_table.data_ptr<float>();
  float* gv = grad_values.data_ptr<float>();
  at::parallel_for(0, n, 8, [&](int64_t first, int64_t end) {
    for (int64_t r = first; r < end; ++r) {
      float* out = gW + r * width;
      const float* row = W + r * width;
      for (int64_t j = 0; j < width; ++j) out[j] = 0.f;
      for (int64_t q = start[r]; q < start[r + 1]; ++q) {
        const int64_t p = order[q];
        const float* g = G + (p / k) * grad_stride;
        const float weight = v[p];
        if (with_values) {
          float dot = 0.f;
          #pragma omp simd reduction(+:dot)
          for (int64_t j = 0; j < width; ++j) {
            out[j] += weight * g[j];
            dot += row[j] * g[j];
          }
          gv[p] = dot;
        } else {
          #pragma omp simd
          for (int64_t j = 0; j < width; ++j) out[j] += weight * g[j];
        }
      }
    }
  });
  return {grad_table, grad_values};
}

std::vector<torch::Tensor> biased_topk(torch::Tensor pre, torch::Tensor bias, int64_t k, bool write_back) {
  TORCH_CHECK(pre.dim() == 3 && pre.is_contiguous() && pre.scalar_type() == torch::kFloat && bias.is_contiguous() &&
              bias.scalar_type() == torch::kFloat && bias.size(0) == pre.size(0) && bias.size(1) == pre.size(2) &&
              k >= 1 && k <= pre.size(2), "biased_topk: contiguous float32 pre [L, B, n] and bias [L, n], 1 <= k <= n");
  const int64_t L = pre.size(0), B = pre.size(1), n = pre.size(2);
  auto values = torch::empty({B, L, k}, pre.options());
  auto indices = torch::empty({B, L, k}, pre.options().dtype(torch::kLong));
  float* P = pre.data_ptr<float>();
  const float* C = bias.data_ptr<float>();
  float* V = values.data_ptr<float>();
  int64_t* I = indices.data_ptr<int64_t>();
  at::parallel_for(0, L * B, 16, [&](int64_t first, int64_t end) {
    std::vector<float> best(k);
    std::vector<int64_t> which(k);
    for (int64_t row = first; row < end; ++row) {
      const int64_t l = row / B, b = row % B;
      float* x = P + row * n;
      const float* c = C + l * n;
      if (write_back) {
        #pragma omp simd
        for (int64_t j = 0; j < n; ++j) x[j] += c[j];
      }
      int64_t filled = 0;
      for (int64_t j = 0; j < n; ++j) {
        const float v = write_back ? x[j] : x[j] + c[j];
        if (filled == k && !(v > best[k - 1])) continue;
        int64_t slot = filled < k ? filled++ : k - 1;
        for (; slot > 0 && v > best[slot - 1]; --slot) {
          best[slot] = best[slot - 1];
          which[slot] = which[slot - 1];
        }
        best[slot] = v;
        which[slot] = j;
      }
      float* out_v = V + (b * L + l) * k;
      int64_t* out_i = I + (b * L + l) * k;
      for (int64_t q = 0; q < k; ++q) {
        out_v[q] = best[q];
        out_i[q] = which[q];
      }
    }
  });
  return {values, indices};
}
"""


@functools.cache
def compiled_kernels():
    """The C++ kernels (decoder_backward, biased_topk), compiled on first use (a C++ compiler and ninja; cached in
    torch's extensions folder), or None where they cannot be built: one warning says why, and the CLT falls back to
    PyTorch's own ops (embedding_bag's backward, baddbmm and topk)."""
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline("clt_lite_kernels", cpp_sources=_KERNELS_SOURCE, functions=["decoder_backward", "biased_topk"],
                           extra_cflags=["-O3", "-march=native", "-fopenmp-simd"])
    except Exception as err:  # no compiler, no ninja, or a toolchain torch cannot use
        warnings.warn(f"clt_lite's C++ kernels could not be compiled ({str(err).strip().splitlines()[0]}); the CLT uses "
                      "PyTorch's own ops instead and trains about half as fast (install a C++ compiler and ninja)",
                      stacklevel=2)
        return None


def _plain_cpu_float32(*tensors: Tensor) -> bool:
    """Where the compiled kernels apply: CPU float32 tensors, outside torch.distributed (whose sharded parameters are
    not plain tensors)."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not (dist.is_available() and dist.is_initialized()))


def encoder_pre_acts(x: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
    """x [B, L, d] -> W_enc x + b_enc [B, L, n], a view of one [L, B, n] baddbmm (bias added in the same pass)."""
    return torch.baddbmm(b_enc[:, None], x.transpose(0, 1), W_enc.transpose(1, 2)).transpose(0, 1)


@torch.no_grad()
def topk_pre_acts(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(encoder_pre_acts(x, W_enc, b_enc) [B, L, n], the indices [B, L, k] of each token and layer's k largest), without
    gradient. Where the compiled kernels apply, the indices come largest first (ties: the lower latent first) from
    one pass that also adds the bias; elsewhere from torch.topk, in its unspecified order."""
    if _plain_cpu_float32(x, W_enc, b_enc) and (kernels := compiled_kernels()) is not None:
        pre = torch.bmm(x.transpose(0, 1), W_enc.transpose(1, 2))  # [L, B, n]
        _, indices = kernels.biased_topk(pre, b_enc.contiguous(), k, True)
        return pre.transpose(0, 1), indices
    pre = encoder_pre_acts(x, W_enc, b_enc)
    return pre, pre.topk(k, dim=-1, sorted=False).indices


@torch.no_grad()
def masked_topk(pre: Tensor, allowed: Tensor, k: int) -> Tensor:
    """Indices [B, L, k] of the k largest entries of pre [B, L, n] among the latents `allowed` [L, n] (AuxK: the dead
    ones); where a layer allows fewer than k, the rest are other latents, as torch.topk of the -inf-masked pre gives.
    Compiled where it applies (pre a view of a contiguous [L, B, n], as the encoder makes it): no masked copy of pre."""
    by_layer = pre.transpose(0, 1)
    if _plain_cpu_float32(pre) and by_layer.is_contiguous() and (kernels := compiled_kernels()) is not None:
        mask = torch.zeros(allowed.shape, dtype=pre.dtype, device=pre.device).masked_fill_(~allowed, -torch.inf)
        return kernels.biased_topk(by_layer, mask, k, False)[1]
    return pre.masked_fill(~allowed, -torch.inf).topk(k, dim=-1, sorted=False).indices


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table: Tensor, indices: Tensor, values: Tensor, kernel) -> Tensor:
        ctx.save_for_backward(table, indices, values)
        ctx.kernel = kernel
        return F.embedding_bag(indices, table, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, grad: Tensor):
        table, indices, values = ctx.saved_tensors
        grad_table, grad_values = ctx.kernel.decoder_backward(table, grad if grad.stride(-1) == 1 else grad.contiguous(),
                                                              indices, values, ctx.needs_input_grad[2])
        return grad_table, None, grad_values if ctx.needs_input_grad[2] else None, None


def gather_rows(table: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """sum_i values[:, i] * table[indices[:, i]] -> [N, width], for table [n, width] and values, indices [N, k']: what
    embedding_bag computes, with the fused backward where it applies (CPU, float32, a gradient wanted, not under
    torch.distributed, whose sharded parameters are not plain tensors) and embedding_bag's own backward elsewhere."""
    fused = _plain_cpu_float32(table, values) and torch.is_grad_enabled() and (table.requires_grad or values.requires_grad)
    if fused and (kernels := compiled_kernels()) is not None:
        return _GatherRows.apply(table, indices, values, kernels)
    return F.embedding_bag(indices, table, per_sample_weights=values, mode="sum")
