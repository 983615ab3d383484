"""The sparse decoder of a full CLT, forward and backward, through PyTorch's kernels: which is fastest on this machine.

One source at a time, as clt_lite.clt decodes: latents (values, indices [B, k]) of source s times its decoder table
[n, (L - s) * d]. Compared: embedding_bag (what the trainer uses; its backward gives the table's and the values'
gradients), MKL's CSR sparse x dense product for the forward and the table's gradient, the sampled dense x dense
product (SDDMM) for the values' gradient, and the trainer's fused C++ backward (clt_lite.kernels; skipped with a warning
where it cannot be compiled, its tests check it against embedding_bag). Random tensors of the bench_train.py configuration.

    OMP_NUM_THREADS=1 python benchmarks/bench_decoder_kernels.py            # 32 layers, d=128, n=2048, k=16, B=1024
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch
import torch.nn.functional as F

from clt_lite.kernels import compiled_kernels


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
    kernel = compiled_kernels()  # clt_lite's own fused backward; None (warned) where it cannot be compiled
    if kernel is not None:
        def fused_backward():
            for s, W in enumerate(tables):
                kernel.decoder_backward(W, grad_out[:, s * d:], indices[:, s], values[:, s], True)

        candidates.append(("fused c++ backward", fused_backward))

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
