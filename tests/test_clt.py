"""CrossLayerTranscoder: semantics of DESIGN.md §3, sparse == dense decode, save/load, circuit-tracer export."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from clt_lite import circuit_tracer
from clt_lite.clt import CLTConfig, CrossLayerTranscoder

torch.set_num_threads(1)

L, D, N, K = 4, 8, 16, 3


def make(seed=0, **overrides) -> CrossLayerTranscoder:
    torch.manual_seed(seed)
    cfg = dict(n_layers=L, d_model=D, n_latents=N, k=K)
    cfg.update(overrides)
    return CrossLayerTranscoder(CLTConfig(**cfg))


def batch(b=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, L, D, generator=g) + 0.5, torch.randn(b, L, D, generator=g) - 0.3


# ------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(k=N + 1), "k=17"),
        (dict(cross_layer=-1), "cross_layer=-1"),
        (dict(cross_layer=L + 1), "cross_layer=5"),
        (dict(activation="relu"), "activation 'relu'"),
        (dict(input_site="resid_pre"), "input_site"),
        (dict(dtype="int8"), "dtype"),
    ],
)
def test_config_rejects_bad_values_in_one_line(overrides, words):
    with pytest.raises(ValueError) as err:
        CLTConfig(**{**dict(n_layers=L, d_model=D, n_latents=N, k=K), **overrides})
    assert words in str(err.value) and "\n" not in str(err.value)


def test_config_resolves_width_and_span():
    assert CLTConfig(n_layers=32, d_model=128, expansion_factor=8, k=16).num_latents == 1024
    assert CLTConfig(n_layers=32, d_model=128, k=16).n_pairs == 32 * 33 // 2
    assert CLTConfig(n_layers=32, d_model=128, k=16, cross_layer=32).n_pairs == 528
    assert CLTConfig(n_layers=32, d_model=128, k=16, cross_layer=1).n_pairs == 32
    assert CLTConfig(n_layers=4, d_model=8, k=2, cross_layer=2).n_pairs == 2 + 2 + 2 + 1
    with pytest.raises(ValueError, match="unknown CLTConfig fields"):
        CLTConfig.from_dict({"n_layers": 2, "d_model": 4, "colour": 1})


# ---------------------------------------------------------------------------------- semantics
def test_reconstruction_is_sum_over_sources_own_layer_included():
    clt = make(cross_layer=2)
    x, _ = batch()
    out = clt(x)
    acts = torch.zeros(x.shape[0], L, N).scatter(-1, out.indices, out.values)
    for t in range(L):
        expected = clt.b_dec[t].expand(x.shape[0], D).clone()
        for s in (t - 1, t):  # C = 2: sources t-1 and t, the own layer included
            if s >= 0:
                expected += acts[:, s] @ clt.W_dec[s][:, t - s]
        torch.testing.assert_close(out.reconstruction[:, t], expected, rtol=1e-5, atol=1e-6)
    assert [W.shape[1] for W in clt.W_dec] == [2, 2, 2, 1]


def test_targets_depend_only_on_sources_within_span():
    clt = make(cross_layer=2)
    x, _ = batch()
    base = clt(x).reconstruction
    for s in range(L):
        moved = x.clone()
        moved[:, s] += 3.0
        changed = (clt(moved).reconstruction - base).abs().amax(dim=(0, 2)) > 1e-6
        assert changed.tolist() == [s <= t < s + 2 for t in range(L)], s


def test_plt_is_cross_layer_one():
    clt = make(cross_layer=1)
    assert [tuple(W.shape) for W in clt.W_dec] == [(N, 1, D)] * L


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "jumprelu"])
def test_sparse_and_dense_decode_match_in_value_and_gradient(activation):
    clt = make(activation=activation, cross_layer=3, skip_connection=True, post_encoder_scale=True)
    x, y = batch()
    clt.initialize_from_batch(x, y)
    enc = clt.encode(x)
    grads = []
    for decode in (clt.decode, clt.decode_dense):
        values = enc.values.detach().clone().requires_grad_(True)
        clt.zero_grad()
        recon = decode(values, enc.indices, x)
        (recon * torch.linspace(-1, 1, D)).pow(2).sum().backward()
        grads.append((recon.detach(), values.grad, [W.grad.clone() for W in clt.W_dec], clt.W_skip.grad.clone()))
    (r1, v1, w1, s1), (r2, v2, w2, s2) = grads
    torch.testing.assert_close(r1, r2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-5)
    for a, b in zip(w1, w2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all(w.abs().sum() > 0 for w in w1)


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_encoder_gradient_through_selected_latents_equals_the_dense_one(activation):
    """encode differentiates only through the selected latents; the dense formula (relu, then top-k or the batch's
    top B*k, gradient through all [B, L, n] pre-activations) must give the same values and gradients, x included."""
    from clt_lite.activations import batch_topk, compact

    clt = make(activation=activation, post_encoder_scale=True)
    x, y = batch(b=10)
    clt.initialize_from_batch(x, y)
    results = []
    for sparse in (True, False):
        xs = x.clone().requires_grad_(True)
        clt.zero_grad()
        if sparse:
            enc = clt.encode(xs)
            values, indices = enc.values, enc.indices
        else:
            pre = torch.einsum("bld,lnd->bln", xs, clt.W_enc) + clt.b_enc
            dense = pre.relu().topk(K, dim=-1) if activation == "topk" else compact(batch_topk(pre.relu(), K))
            values, indices = dense[0] * clt.post_enc_scale.expand(10, -1, -1).gather(-1, dense[1]), dense[1]
        order = values.detach().argsort(-1)  # compare slot by slot in a common order
        values, indices = values.gather(-1, order), indices.gather(-1, order)
        (values * torch.linspace(-1, 1, values.numel()).reshape(values.shape)).sum().backward()
        results.append((values.detach(), xs.grad, clt.W_enc.grad.clone(), clt.b_enc.grad.clone(), clt.post_enc_scale.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert results[0][2].abs().sum() > 0


def test_aux_k_gradient_reaches_dead_latents_only_through_their_pre_activations():
    from clt_lite.train import _aux_k_loss

    clt = make()
    x, y = batch(b=10)
    clt.initialize_from_batch(x, y)
    dead = torch.zeros(L, N, dtype=torch.bool)
    dead[:, :5] = True
    enc = clt.encode(x)
    residual, variance = y - clt.decode(enc.values, enc.indices).detach(), torch.ones(L)
    _aux_k_loss(clt, x, enc.pre_acts, residual, dead, variance).backward()
    sparse_grad = clt.W_enc.grad.clone()
    clt.zero_grad()
    pre = torch.einsum("bld,lnd->bln", x, clt.W_enc) + clt.b_enc  # the dense reference
    _aux_k_loss(clt, x, pre, residual, dead, variance).backward()
    torch.testing.assert_close(sparse_grad, clt.W_enc.grad, rtol=1e-5, atol=1e-6)
    assert sparse_grad[:, 5:].abs().sum() == 0 and sparse_grad[:, :5].abs().sum() > 0


def test_topk_keeps_exactly_k_largest():
    clt = make()
    x, _ = batch()
    enc = clt.encode(x)
    assert enc.values.shape == (6, L, K)
    kth = enc.pre_acts.relu().topk(K, dim=-1).values
    torch.testing.assert_close(enc.values.sort(-1).values, kth.sort(-1).values)


def test_batchtopk_keeps_batch_times_k_per_layer():
    clt = make(activation="batchtopk")
    x, _ = batch(b=10)
    out = clt(x)
    assert ((out.values > 0).sum((0, 2)) == 10 * K).all()
    per_token = (out.values > 0).sum(-1)
    assert per_token.max() > per_token.min()  # tokens share the budget unequally


def test_jumprelu_fires_above_threshold_and_threshold_learns():
    clt = make(activation="jumprelu", jumprelu_bandwidth=0.5)
    x, y = batch(b=64)
    clt.initialize_from_batch(x, y)
    out = clt(x)
    assert abs(out.l0.mean().item() - K) < 1.0  # init sets the threshold for about k active per token
    threshold = clt.log_threshold.exp()
    assert (out.l0 * 64 == (out.pre_acts > threshold).sum((0, 2))).all()
    kept = out.values > 0
    assert (out.values[kept] > threshold.expand(64, -1, -1).gather(-1, out.indices)[kept]).all()
    loss = clt.sparsity_penalty(out.values, out.indices, c=1.0).sum() + out.reconstruction.pow(2).sum()
    loss.backward()
    assert clt.log_threshold.grad.abs().sum() > 0


def test_sparsity_penalty_matches_formula():
    clt = make(activation="jumprelu")
    x, y = batch()
    clt.initialize_from_batch(x, y)
    enc = clt.encode(x)
    dense = torch.zeros(6, L, N).scatter(-1, enc.indices, enc.values)
    norms = torch.stack([W.reshape(N, -1).norm(dim=1) for W in clt.W_dec])
    expected = torch.tanh(2.0 * dense * norms).sum((1, 2))
    torch.testing.assert_close(clt.sparsity_penalty(enc.values, enc.indices, c=2.0), expected)


def test_initialize_from_batch_centres_encoder_and_sets_decoder_bias():
    clt = make()
    x, y = batch(b=32)
    clt.initialize_from_batch(x, y)
    torch.testing.assert_close(clt.b_dec.data, y.mean(0))
    assert clt.encode(x).pre_acts.mean(0).abs().max() < 1e-5


def test_reconstruct_raw_applies_scales():
    clt = make()
    clt.set_scales(torch.tensor([2.0, 1.0, 0.5, 4.0]), torch.tensor([0.5, 1.0, 2.0, 3.0]))
    x, _ = batch()
    expected = clt(x * clt.input_scale[:, None]).reconstruction / clt.target_scale[:, None]
    torch.testing.assert_close(clt.reconstruct_raw(x), expected)
    with pytest.raises(ValueError, match=r"shape \[4\]"):
        clt.set_scales(torch.ones(3), torch.ones(4))


# ---------------------------------------------------------------------------------- save/load
def test_save_load_round_trip(tmp_path):
    clt = make(activation="jumprelu", skip_connection=True, post_encoder_scale=True, train_post_encoder=False)
    clt.set_scales(torch.rand(L) + 0.5, torch.rand(L) + 0.5)
    clt.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clt.safetensors", "config.json"]
    loaded = CrossLayerTranscoder.load(tmp_path)
    assert loaded.config == clt.config
    assert not loaded.post_enc_scale.requires_grad and loaded.W_enc.requires_grad
    for (name, a), b in zip(clt.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    x, _ = batch()
    torch.testing.assert_close(loaded.reconstruct_raw(x), clt.reconstruct_raw(x))


def test_load_errors_are_one_line_and_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="config.json not found"):
        CrossLayerTranscoder.load(tmp_path)
    make().save(tmp_path)
    weights = tmp_path / "clt.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    with pytest.raises(ValueError, match="clt.safetensors is not a readable safetensors file") as err:
        CrossLayerTranscoder.load(tmp_path)
    assert "\n" not in str(err.value)
    make().save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_latents": N * 2}))
    with pytest.raises(ValueError, match=r"W_enc has shape \(4, 16, 8\) but the config implies \(4, 32, 8\)"):
        CrossLayerTranscoder.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "skip_connection": True}))
    with pytest.raises(ValueError, match=r"missing \['W_skip'\]"):
        CrossLayerTranscoder.load(tmp_path)


# ------------------------------------------------------------------------------------- export
@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(cross_layer=2, skip_connection=True, post_encoder_scale=True), dict(activation="jumprelu"),
     dict(activation="jumprelu", post_encoder_scale=True)],
)
def test_circuit_tracer_export_round_trip_on_raw_activations(tmp_path, overrides):
    clt = make(input_site="resid_mid", **overrides)  # circuit-tracer's own convention
    x, y = batch(b=16)
    clt.initialize_from_batch(x, y)
    with torch.no_grad():
        for W in clt.W_dec:
            W.normal_()
        if clt.config.post_encoder_scale:
            clt.post_enc_scale.uniform_(0.5, 2.0)
        if clt.config.skip_connection:
            clt.W_skip.normal_(std=0.1)
    s_in, s_out = torch.tensor([2.0, 1.0, 0.5, 4.0]), torch.tensor([0.5, 1.0, 2.0, 3.0])
    clt.set_scales(s_in, s_out)
    readable = clt.config.activation == "jumprelu" and not clt.config.skip_connection
    if not readable:
        with pytest.raises(circuit_tracer.NotReadableByCircuitTracer, match="circuit-tracer 0.5 cannot read"):
            circuit_tracer.export(clt, tmp_path)
        assert not list(tmp_path.iterdir())  # refused before anything is written
    circuit_tracer.export(clt, tmp_path, allow_unreadable=not readable)

    enc1 = load_file(tmp_path / "W_enc_1.safetensors")
    folded = readable and clt.config.post_encoder_scale  # the post-encoder scale folded into the encoder
    gain = clt.post_enc_scale.detach()[:, :, None] if folded else torch.ones(L, 1, 1)
    torch.testing.assert_close(enc1["W_enc_1"], clt.W_enc[1].detach() * 1.0 * gain[1])
    torch.testing.assert_close(enc1["b_dec_1"], clt.b_dec[1].detach() / 1.0)
    enc2 = load_file(tmp_path / "W_enc_2.safetensors")
    torch.testing.assert_close(enc2["W_enc_2"], clt.W_enc[2].detach() * 0.5 * gain[2])
    torch.testing.assert_close(enc2["b_dec_2"], clt.b_dec[2].detach() / 2.0)
    assert ("threshold_0" in load_file(tmp_path / "W_enc_0.safetensors")) == (clt.config.activation == "jumprelu")
    for s in range(L):
        assert load_file(tmp_path / f"W_dec_{s}.safetensors")[f"W_dec_{s}"].shape == (N, L - s, D)
    assert "feature_input_hook: hook_resid_mid" in (tmp_path / "config.yaml").read_text()

    raw = x / s_in[:, None] * 1.3
    reloaded = circuit_tracer.load(tmp_path)
    assert reloaded.input_scale.tolist() == [1.0] * L
    torch.testing.assert_close(reloaded.reconstruct_raw(raw), clt.reconstruct_raw(raw), rtol=1e-4, atol=1e-4)
    if readable:  # activation values as circuit-tracer computes them from the files (x W_enc^T + b_enc, > threshold)
        enc = clt.encode(raw * s_in[:, None])
        ours = torch.zeros(raw.shape[0], L, N).scatter(-1, enc.indices, enc.values.detach())
        for s in range(L):
            f = load_file(tmp_path / f"W_enc_{s}.safetensors")
            pre = raw[:, s] @ f[f"W_enc_{s}"].T + f[f"b_enc_{s}"]
            torch.testing.assert_close(pre * (pre > f[f"threshold_{s}"]), ours[:, s], rtol=1e-5, atol=1e-5)


def test_load_circuit_tracer_reports_missing_tensor(tmp_path):
    circuit_tracer.export(make(activation="jumprelu"), tmp_path)
    (tmp_path / "W_dec_2.safetensors").unlink()
    with pytest.raises(ValueError, match="W_dec_2.safetensors not found"):
        circuit_tracer.load(tmp_path)


def test_circuit_tracer_export_names_the_hook_each_input_site_is_read_at(tmp_path):
    """mlp_in is the MLP's input after the norm's weight: circuit-tracer's `mlp.hook_in` (not TransformerLens's
    `ln2.hook_normalized`, which is taken before the weight)."""
    import yaml

    for site, hook in (("mlp_in", "mlp.hook_in"), ("resid_mid", "hook_resid_mid")):
        clt = CrossLayerTranscoder(CLTConfig(n_layers=2, d_model=8, expansion_factor=1, k=2, input_site=site,
                                             activation="jumprelu"))
        circuit_tracer.export(clt, tmp_path / site)
        config = yaml.safe_load((tmp_path / site / "config.yaml").read_text())
        assert (config["feature_input_hook"], config["feature_output_hook"]) == (hook, "hook_mlp_out")


def test_fused_decoder_backward_equals_embedding_bags_and_does_not_depend_on_threads():
    """gather_rows's compiled backward against embedding_bag's autograd: both gradients, latents repeated within and
    across tokens, a gradient with strided rows (as sum_into_targets hands each source); the same bits on 1 and 2 threads."""
    from clt_lite.kernels import compiled_kernels, gather_rows

    if compiled_kernels() is None:
        pytest.skip("no C++ toolchain here: training falls back to embedding_bag's backward (warned)")
    g = torch.Generator().manual_seed(0)
    table, values = torch.randn(40, 24, generator=g), torch.rand(30, 5, generator=g)
    indices = torch.randint(0, 12, (30, 5), generator=g)  # few latents: many repeats
    grad = torch.randn(30, 32, generator=g)[:, 8:]  # rows 32 apart
    results = []
    for fused, threads in ((False, 1), (True, 1), (True, 2)):
        torch.set_num_threads(threads)
        W, v = table.clone().requires_grad_(), values.clone().requires_grad_()
        out = (gather_rows if fused else lambda t, i, w: F.embedding_bag(i, t, per_sample_weights=w, mode="sum"))(W, indices, v)
        assert ("GatherRows" in type(out.grad_fn).__name__) == fused
        out.backward(grad)
        results.append((out.detach(), W.grad, v.grad))
    torch.set_num_threads(1)
    (o0, w0, v0), (o1, w1, v1), (o2, w2, v2) = results
    torch.testing.assert_close(o1, o0, rtol=0, atol=0)
    torch.testing.assert_close(w1, w0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-5)
    assert torch.equal(w1, w2) and torch.equal(v1, v2)
    assert (w1[12:] == 0).all()  # latents no token chose get a zero gradient row, not uninitialised memory


def test_gather_rows_falls_back_to_embedding_bag_where_the_kernel_does_not_apply(monkeypatch):
    from clt_lite import kernels

    g = torch.Generator().manual_seed(0)
    indices = torch.randint(0, 8, (6, 3), generator=g)
    double = kernels.gather_rows(torch.randn(8, 4, dtype=torch.float64, requires_grad=True), indices,
                                 torch.rand(6, 3, dtype=torch.float64))
    with torch.no_grad():
        inference = kernels.gather_rows(torch.randn(8, 4, requires_grad=True), indices, torch.rand(6, 3))
    assert "GatherRows" not in type(double.grad_fn).__name__ and inference.grad_fn is None
    monkeypatch.setattr(kernels, "compiled_kernels", lambda: None)  # no compiler on this machine
    out = kernels.gather_rows(torch.randn(8, 4, requires_grad=True), indices, torch.rand(6, 3))
    assert "EmbeddingBag" in type(out.grad_fn).__name__


def test_a_failed_compile_warns_once_in_one_line_and_falls_back(monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    from clt_lite import kernels

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions\nmore detail")

    kernels.compiled_kernels.cache_clear()
    monkeypatch.setattr(cpp_extension, "load_inline", no_compiler)
    try:
        with pytest.warns(UserWarning, match=r"could not be compiled \(Ninja is required to load C\+\+ extensions\); the CLT"):
            assert kernels.compiled_kernels() is None
    finally:
        kernels.compiled_kernels.cache_clear()


def test_compiled_topk_selects_what_torch_topk_selects_largest_first_on_any_number_of_threads():
    """topk_pre_acts's compiled pass against baddbmm + torch.topk: the same pre-activations (bias added in place), the
    same latents largest first, ties broken toward the lower latent, the same bits on 1 and 2 threads."""
    from clt_lite.kernels import compiled_kernels, encoder_pre_acts, topk_pre_acts

    if compiled_kernels() is None:
        pytest.skip("no C++ toolchain here: the encoder falls back to baddbmm and torch.topk (warned)")
    g = torch.Generator().manual_seed(0)
    x, W, b = torch.randn(50, 3, 16, generator=g), torch.randn(3, 40, 16, generator=g), torch.randn(3, 40, generator=g)
    reference = encoder_pre_acts(x, W, b)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append(topk_pre_acts(x, W, b, 5))
    torch.set_num_threads(1)
    (pre, indices), (pre2, indices2) = results
    torch.testing.assert_close(pre, reference, rtol=1e-6, atol=1e-6)
    expected = reference.topk(5, dim=-1)
    torch.testing.assert_close(pre.gather(-1, indices), expected.values, rtol=0, atol=0)
    assert torch.equal(indices, expected.indices) and torch.equal(pre, pre2) and torch.equal(indices, indices2)
    tied = torch.zeros(1, 1, 4, requires_grad=False)  # every latent ties: the lowest k win
    _, first = topk_pre_acts(tied, torch.zeros(1, 6, 4), torch.tensor([[0.0, 1, 1, 0, 1, 1]]), 3)
    assert first.flatten().tolist() == [1, 2, 4]


def test_topk_pre_acts_falls_back_to_torch_where_the_kernel_does_not_apply(monkeypatch):
    from clt_lite import kernels

    g = torch.Generator().manual_seed(0)
    x, W, b = torch.randn(8, 2, 4, generator=g), torch.randn(2, 10, 4, generator=g), torch.randn(2, 10, generator=g)
    monkeypatch.setattr(kernels, "compiled_kernels", lambda: None)
    for dtype in (torch.float64, torch.float32):
        pre, indices = kernels.topk_pre_acts(x.to(dtype), W.to(dtype), b.to(dtype), 3)
        assert pre.dtype == dtype and torch.equal(indices.sort(-1).values, pre.topk(3, dim=-1).indices.sort(-1).values)


def test_compiled_encoder_gradient_and_masked_topk_equal_pytorchs(monkeypatch):
    """The encoder's weight gradient through the compiled pass, and AuxK's masked selection, against the PyTorch path."""
    from clt_lite import kernels

    if kernels.compiled_kernels() is None:
        pytest.skip("no C++ toolchain here: PyTorch's ops are used (warned)")
    g = torch.Generator().manual_seed(0)
    x, W, b = torch.randn(30, 3, 8, generator=g), torch.randn(3, 20, 8, generator=g), torch.randn(3, 20, generator=g)
    pre, indices = kernels.topk_pre_acts(x, W, b, 4)
    grads = []
    for compiled in (True, False):
        if not compiled:
            monkeypatch.setattr(kernels, "compiled_kernels", lambda: None)
        W_, b_ = W.clone().requires_grad_(), b.clone().requires_grad_()
        kernels.selected_pre_acts(x, W_, b_, pre, indices).pow(2).sum().backward()
        grads.append(W_.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)
    monkeypatch.undo()
    allowed = torch.rand(3, 20, generator=g) < 0.3
    allowed[0] = False
    allowed[0, :2] = True  # layer 0 allows fewer latents than k: the rest come from the others, as with torch
    chosen = kernels.masked_topk(pre, allowed, 4)
    expected = pre.masked_fill(~allowed, -torch.inf).topk(4, dim=-1).indices
    torch.testing.assert_close(pre.gather(-1, chosen[:, 1:]), pre.gather(-1, expected[:, 1:]), rtol=0, atol=0)
    assert allowed[0].gather(0, chosen[:, 0].flatten()).view(30, 4)[:, :2].all()
