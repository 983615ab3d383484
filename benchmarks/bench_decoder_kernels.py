"""The sparse decoder of a full CLT, forward and backward, through PyTorch's kernels: which is fastest on this machine.

One source at a time, as clt_lite.clt decodes: latents (values, indices [B, k]) of source s times its decoder table
[n, (L - s) * d]. Compared: embedding_bag (what the trainer uses; its backward gives the table's and the values'
gradients), MKL's CSR sparse x dense product for the forward and the table's gradient, the sampled dense x dense
product (SDDMM) for the values' gradient, and a fused C++ backward (compiled here with torch.utils.cpp_extension; skipped
with the reason when that fails): the token-latent pairs sorted by latent, each latent's table row read once and its
gradient row written once, both gradients in one pass. Random tensors of the bench_train.py configuration.

    OMP_NUM_THREADS=1 python benchmarks/bench_decoder_kernels.py            # 32 layers, d=128, n=2048, k=16, B=1024
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch
import torch.nn.functional as F

# Both gradients of out[b] = sum_i values[b, i] * W[indices[b, i]] for one source: pairs (b, i) counting-sorted by latent,
# then per latent r (in parallel): grad_W[r] = sum over its pairs of values * G[b], and grad_values = W[r] . G[b].
FUSED_BACKWARD = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <vector>
std::vector<torch::Tensor> decoder_backward(torch::Tensor W, torch::Tensor G, torch::Tensor idx, torch::Tensor vals) {
  TORCH_CHECK(W.is_contiguous() && W.scalar_type() == torch::kFloat && G.stride(1) == 1, "float32, contiguous rows");
  const int64_t n = W.size(0), D = W.size(1), B = idx.size(0), k = idx.size(1), P = B * k;
  auto idx_c = idx.contiguous();
  auto vals_c = vals.contiguous();
  const int64_t* ip = idx_c.data_ptr<int64_t>();
  std::vector<int64_t> start(n + 1, 0);
  for (int64_t p = 0; p < P; ++p) start[ip[p] + 1]++;
  for (int64_t r = 0; r < n; ++r) start[r + 1] += start[r];
  std::vector<int64_t> order(P), fill(start.begin(), start.end() - 1);
  for (int64_t p = 0; p < P; ++p) order[fill[ip[p]]++] = p;
  auto gW = torch::empty_like(W);
  auto gv = torch::empty({B, k}, vals_c.options());
  const float* Wp = W.data_ptr<float>();
  const float* Gp = G.data_ptr<float>();
  const int64_t gs = G.stride(0);
  const float* vp = vals_c.data_ptr<float>();
  float* gWp = gW.data_ptr<float>();
  float* gvp = gv.data_ptr<float>();
  at::parallel_for(0, n, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* out = gWp + r * D;
      const float* w = Wp + r * D;
      for (int64_t j = 0; j < D; ++j) out[j] = 0.f;
      for (int64_t q = start[r]; q < start[r + 1]; ++q) {
        const int64_t p = order[q];
        const float* g = Gp + (p / k) * gs;
        const float v = vp[p];
        float dot = 0.f;
        #pragma omp simd reduction(+:dot)
        for (int64_t j = 0; j < D; ++j) { out[j] += v * g[j]; dot += w[j] * g[j]; }
        gvp[p] = dot;
      }
    }
  });
  return {gW, gv};
}
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-layers", type=int, default=32)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-latents", type=int, default=2048)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=1024)
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="Sparse")  # CSR support is "beta"; invariant checks are off by default
    L, d, n, k, B = args.n_layers, args.d_model, args.n_latents, args.k, args.batch_size
    g = torch.Generator().manual_seed(0)
    indices, values = torch.randint(0, n, (B, L, k), generator=g), torch.rand(B, L, k, generator=g)
    tables = [torch.randn(n, (L - s) * d, generator=g).mul_(0.01) for s in range(L)]
    grad_out = torch.randn(B, L * d, generator=g)

    def csr(s: int):  # [B, n]: row b holds token b's k latents
        return torch.sparse_csr_tensor(torch.arange(0, B * k + 1, k), indices[:, s].reshape(-1), values[:, s].reshape(-1), (B, n))

    def embedding_bag_forward():
        for s, W in enumerate(tables):
            F.embedding_bag(indices[:, s], W, per_sample_weights=values[:, s], mode="sum")

    trainable = [W.clone().requires_grad_() for W in tables]
    trainable_values = values.clone().requires_grad_()

    def embedding_bag_forward_backward():
        trainable_values.grad = None
        for s, W in enumerate(trainable):
            W.grad = None  # as the trainer's zero_grad(set_to_none=True): backward allocates a fresh gradient
            F.embedding_bag(indices[:, s], W, per_sample_weights=trainable_values[:, s], mode="sum").backward(grad_out[:, s * d:])

    def csr_forward():
        for s, W in enumerate(tables):
            torch.sparse.mm(csr(s), W)

    def csr_table_gradient():
        for s in range(L):
            torch.sparse.mm(csr(s).t().to_sparse_csr(), grad_out[:, s * d:])

    def sddmm_values_gradient():
        for s, W in enumerate(tables):
            torch.sparse.sampled_addmm(csr(s), grad_out[:, s * d:], W.t(), beta=0.0)

    candidates = []
    try:
        from torch.utils.cpp_extension import load_inline

        fused = load_inline("clt_lite_bench_fused_decoder", cpp_sources=FUSED_BACKWARD, functions=["decoder_backward"],
                            extra_cflags=["-O3", "-march=native", "-fopenmp-simd"])
        check = [fused.decoder_backward(W, grad_out[:, s * d:], indices[:, s], values[:, s]) for s, W in enumerate(tables[:2])]
        for s, (grad_W, grad_values) in enumerate(check):  # against autograd through embedding_bag
            W, v = tables[s].clone().requires_grad_(), values[:, s].clone().requires_grad_()
            F.embedding_bag(indices[:, s], W, per_sample_weights=v, mode="sum").backward(grad_out[:, s * d:])
            assert torch.allclose(grad_W, W.grad, atol=1e-4) and torch.allclose(grad_values, v.grad, atol=1e-3)

        def fused_backward():
            for s, W in enumerate(tables):
                fused.decoder_backward(W, grad_out[:, s * d:], indices[:, s], values[:, s])

        candidates.append(("fused c++ backward", fused_backward))
    except Exception as err:  # no compiler, or a toolchain torch cannot use: the other kernels still run
        print(f"fused c++ backward skipped: {str(err).splitlines()[0]}")

    seconds = {}
    for name, fn in [("embedding_bag forward", embedding_bag_forward),
                     ("embedding_bag forward+backward", embedding_bag_forward_backward),
                     ("csr forward", csr_forward), ("csr table gradient", csr_table_gradient),
                     ("sddmm values gradient", sddmm_values_gradient), *candidates]:
        fn()  # warm-up
        start = time.perf_counter()
        fn()
        seconds[name] = time.perf_counter() - start
        print(f"{name:<32} {seconds[name]:.3f} s", flush=True)
    backward = {"embedding_bag": seconds["embedding_bag forward+backward"] - seconds["embedding_bag forward"],
                "csr + sddmm": seconds["csr table gradient"] + seconds["sddmm values gradient"]}
    if "fused c++ backward" in seconds:
        backward["fused c++"] = seconds["fused c++ backward"]
    print("backward: " + ", ".join(f"{name} {s:.3f} s" for name, s in backward.items()) +
          f" (torch threads {torch.get_num_threads()})")
    print(json.dumps({"config": vars(args), "threads": torch.get_num_threads(), "seconds": seconds, "backward_s": backward}))


if __name__ == "__main__":
    main()
