"""Planner arithmetic against hand-computed numbers (LLaVA-1.5-7B and the toy)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clt_lite.cli import _stream_resident_bytes
from clt_lite.clt import CLTConfig, CrossLayerTranscoder
from clt_lite.plan import (
    DEVICE_PRESETS,
    GiB,
    check_fits,
    format_gpus,
    format_plan,
    format_recipes,
    model_dims,
    param_shapes,
    plan,
    storage_advice,
    targets_sources_table,
)
from clt_lite.store import bytes_per_token

LLAVA = model_dims("llava-1.5-7b")


def llava_clt(**overrides) -> CLTConfig:
    return CLTConfig(**{**dict(n_layers=32, d_model=4096, n_latents=8192, k=32), **overrides})


def test_llava_full_clt_counts():
    p = plan(LLAVA, llava_clt())
    assert p.decoder_matrices == 528 == 32 * 33 // 2
    assert p.encoder_params == 32 * 8192 * 4096 + 32 * 8192 == 1_074_003_968
    assert p.decoder_params == 528 * 8192 * 4096 + 32 * 4096 == 17_716_871_168
    assert p.total_params == 18_790_875_136  # ≈ 18.8e9, DESIGN.md §3
    assert p.weight_bytes == p.grad_bytes == 4 * p.total_params
    assert p.optimizer_bytes == 8 * p.total_params
    assert p.training_bytes == 16 * p.total_params
    assert p.encoder_flops_per_token == 2 * 32 * 4096 * 8192
    assert p.decoder_flops_per_token_dense == 2 * 8192 * 4096 * 528
    assert p.decoder_flops_per_token_sparse == 2 * 32 * 4096 * 528
    # encoder forward, its backward through the k = 32 selected latents (input and weight gradients), decoder x 3
    assert p.train_flops_per_token == 2_147_483_648 + 2 * 2 * 32 * 32 * 4096 + 3 * 138_412_032
    jumprelu = plan(LLAVA, llava_clt(activation="jumprelu"))
    assert jumprelu.train_flops_per_token == 3 * (2_147_483_648 + 138_412_032)  # its threshold needs the dense gradient
    assert p.disk_bytes_per_token == 2 * 32 * 4096 * 2 == 512 * 1024


def test_cross_layer_and_plt_matrix_counts():
    assert plan(LLAVA, llava_clt(cross_layer=16)).decoder_matrices == 17 * 16 + sum(range(1, 16)) == 392
    plt = plan(LLAVA, llava_clt(cross_layer=1))
    assert plt.decoder_matrices == 32
    assert plt.total_params == 2 * 32 * 8192 * 4096 + 32 * 8192 + 32 * 4096


def test_recipe_bytes_for_the_full_7b_clt():
    L, d, n = 32, 4096, 8192
    largest = n * L * d  # W_dec[0]: [n, 32 targets, d]
    # Adafactor factors: W_enc [L,n,d] -> L*n + L*d; b_enc [L,n] -> L + n; W_dec[s] [n,T,d] -> n*T + n*d; b_dec -> L + d
    factors = (L * n + L * d) + (L + n) + (n * 528 + L * n * d) + (L + d)
    fp32 = plan(LLAVA, llava_clt(k=64), optimizer="adafactor", device="h200")
    assert fp32.weight_bytes == 4 * fp32.total_params
    assert fp32.grad_bytes == 4 * largest  # stepped in backward: one gradient at a time
    assert fp32.optimizer_bytes == 4 * factors and fp32.optimizer_step_bytes == 4 * largest
    assert fp32.fits is True and fp32.gpu_bytes < 100 * GiB
    bf16 = plan(LLAVA, llava_clt(k=64, dtype="bfloat16"), optimizer="adam-bf16", device="h200")
    assert bf16.weight_bytes == 2 * bf16.total_params and bf16.grad_bytes == 2 * largest
    assert bf16.optimizer_bytes == 4 * bf16.total_params and bf16.optimizer_step_bytes == 0
    assert bf16.fits is True and bf16.gpu_bytes == 2 * bf16.total_params + 2 * largest + 4 * bf16.total_params + \
        bf16.batch_bytes  # 121.00 GiB of 131 GiB
    ddp = plan(LLAVA, llava_clt(k=64), optimizer="adafactor", device="h200", gpus=4)
    assert ddp.grad_bytes == ddp.weight_bytes  # DDP all-reduces before the step: every gradient is held
    assert ddp.batch_bytes == fp32.batch_bytes // 4
    assert "fits 4 x h200 with adafactor: NO" in format_gpus(ddp)  # 151.52 GiB per GPU: DDP cannot help memory
    adam = plan(LLAVA, llava_clt(k=64), device="h200", gpus=8)
    assert adam.fits is False and adam.fsdp_gpus_needed == 3
    assert "fits 8 x h200 with adam: NO" in format_gpus(adam) and "needs at least 3 x h200" in format_gpus(adam)


def test_fsdp_per_gpu_memory_counts_the_gathered_units():
    """The trainer's FSDP makes each source decoder a unit: a GPU holds the root unit (encoder, biases) whole with its
    gradients, two whole decoders and one decoder's gradient, plus 1/gpus of all weights, gradients and states."""
    config = llava_clt(k=64, dtype="bfloat16")
    p = plan(LLAVA, config, optimizer="adam-bf16", device="h200", gpus=8)
    w, g = p.weight_bytes, p.grad_bytes  # gradients: all of them (stepped after the reduce-scatter)
    root = 2 * (32 * 8192 * 4096 + 32 * 8192 + 32 * 4096)  # W_enc, b_enc, b_dec in bf16
    decoder_0 = 2 * 8192 * 32 * 4096  # W_dec[0] writes all 32 targets
    assert g == w and p.fsdp_gathered_bytes == 2 * root + 3 * decoder_0
    assert p.fsdp_gpu_bytes == 2 * root + 3 * decoder_0 + math.ceil((w + g + p.optimizer_bytes) / 8) + p.batch_bytes
    assert p.fits is False and p.fsdp_gpu_bytes < 141e9 and p.fsdp_gpus_needed == 2  # 28.75 GiB on 8 GPUs
    assert "fits 8 x h200 with adam-bf16: NO" in format_gpus(p)
    assert "parallel: fsdp" in format_gpus(p) and "on 8 x h200: YES" in format_gpus(p)
    assert "needs at least 2 x h200" in format_gpus(p)
    with pytest.raises(ValueError, match="does not fit an H200"):
        check_fits(LLAVA, config, 141e9, "adam-bf16", 4096, gpus=8, where="an H200")
    assert check_fits(LLAVA, config, 141e9, "adam-bf16", 4096, gpus=8, parallel="fsdp").fsdp_gpu_bytes < 141e9
    with pytest.raises(ValueError, match=r"sharded on 2 ranks: needs .* per rank = gathered units .* \+ 1/2 of"):
        check_fits(LLAVA, config, 80e9, "adam-bf16", 4096, gpus=2, parallel="fsdp")  # needs 93.4 GB
    wide = plan(LLAVA, llava_clt(n_latents=65536, k=64, dtype="bfloat16"), "adam-bf16", device="h200", gpus=8)
    assert wide.fsdp_gpus_needed == 23  # 150e9 parameters: a matter of GPU count (one unit would never fit)
    fp32 = plan(LLAVA, llava_clt(k=64), optimizer="adam", device="h200", gpus=8)
    assert fp32.fsdp_gpus_needed == 3 and "on 8 x h200: YES" in format_gpus(fp32)
    adafactor = plan(LLAVA, llava_clt(k=64), optimizer="adafactor", device="h200", gpus=8)
    assert adafactor.fsdp_gpu_bytes is None and "not with adafactor" in format_gpus(adafactor)
    assert plan(LLAVA, config, optimizer="adam-bf16", device="h200").fsdp_gpu_bytes is None  # one GPU: no FSDP


def test_streaming_resident_bytes_count_against_the_device():
    """The model a stream runs and its pool sit beside the CLT: the full 7B recipe fits one H200 at 1024 or 2048 tokens
    per step with them counted, not at 4096 (clt_lite/cli.py plan --stream, configs/llava-7b-full.yaml)."""
    config = llava_clt(k=64, dtype="bfloat16")
    for batch, fits in ((1024, True), (2048, True), (4096, False)):
        resident = _stream_resident_bytes("llava-1.5-7b", LLAVA, batch)
        assert 16e9 < resident < 24e9  # 7.06e9 bf16 weights + the pool (it grows with the batch) + one 608-token forward
        p = plan(LLAVA, config, "adam-bf16", device="h200", batch_size=batch, resident_bytes=resident)
        assert p.gpu_bytes == plan(LLAVA, config, "adam-bf16", batch_size=batch).gpu_bytes + resident and p.fits is fits
    with pytest.raises(ValueError, match=r"\+ resident 15\.75 GiB; nearest that fits"):
        check_fits(LLAVA, config, 120 * GiB, "adam-bf16", 1024, resident_bytes=_stream_resident_bytes("llava-1.5-7b", LLAVA, 1024))


@pytest.mark.parametrize("overrides", [{}, dict(cross_layer=2, activation="jumprelu", skip_connection=True),
                                       dict(post_encoder_scale=True)])
def test_param_shapes_are_what_the_optimizer_holds(overrides):
    config = CLTConfig(n_layers=4, d_model=8, n_latents=16, k=2, **overrides)
    held = [tuple(p.shape) for p in CrossLayerTranscoder(config).parameters() if p.requires_grad]
    assert param_shapes(config) == held
    assert plan(model_dims_of(config), config).total_params == sum(math.prod(s) for s in held)


def model_dims_of(config: CLTConfig):
    from clt_lite.plan import ModelDims

    return ModelDims(config.n_layers, config.d_model, "test")


def test_check_fits_names_the_numbers_and_the_nearest_config():
    config = llava_clt(k=64)
    assert check_fits(LLAVA, config, 141e9, "adafactor", 4096).fits is None
    with pytest.raises(ValueError, match=r"^CLT does not fit an H200 \(131.3 GiB\): needs 290.01 GiB \(311.39 GB\) = "
                                         r"weights 70.00 \+ gradients 70.00 \+ optimizer \(adam\) 140.00 \+ batch "
                                         r"10.00 GiB; nearest that fits: optimizer='adam-bf16', n_latents=8192 "
                                         r"\(bfloat16\)$"):
        check_fits(LLAVA, config, 141e9, "adam", 4096, where="an H200")
    with pytest.raises(ValueError, match=r"nearest that fits: optimizer='adam-bf16', n_latents=2048 \(bfloat16\)$"):
        check_fits(LLAVA, llava_clt(k=64, cross_layer=1), 8 * GiB, "adam", 1024)  # no recipe fits at n=8192: halve n


def test_h200_throughput_bound_is_the_min_of_compute_and_bandwidth():
    p = plan(LLAVA, llava_clt(), device="h200", batch_size=4096)
    assert p.compute_tokens_per_s == pytest.approx(989e12 / 2_579_496_960)
    gathers = 4 * 4096 * (32 * 4096 * 528 * 4)  # 4 passes over k rows of every pair, per token, fp32
    assert p.decoder_bytes_per_token_sparse == 32 * 4096 * 528 * 4
    step_bytes = 6 * 4 * p.total_params + 2 * 8 * p.total_params + gathers
    assert p.bandwidth_tokens_per_s == pytest.approx(4096 * 4.8e12 / step_bytes)
    assert p.max_tokens_per_s == min(p.compute_tokens_per_s, p.bandwidth_tokens_per_s)
    assert p.fits is False  # 300 GB of weights, grads and Adam states on a 141 GB card
    small = plan(LLAVA, llava_clt(n_latents=4096, cross_layer=1), device=DEVICE_PRESETS["h200"])
    assert small.fits is True


def test_toy_preset_and_model_folder(tmp_path):
    toy = model_dims("tiny-llava-shapes")
    assert (toy.n_layers, toy.d_model) == (16, 128)
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 5, "hidden_size": 64}}))
    assert model_dims(str(tmp_path))[:2] == (5, 64)
    with pytest.raises(ValueError, match="unknown model 'gpt-9'"):
        model_dims("gpt-9")
    with pytest.raises(ValueError, match="config is 32 x 4096 but tiny-llava-shapes is 16 x 128"):
        plan(toy, llava_clt())
    with pytest.raises(ValueError, match="unknown optimizer"):
        plan(LLAVA, llava_clt(), optimizer="lion")
    with pytest.raises(ValueError, match="gpus=3 must be >= 1 and divide batch_size=4096"):
        plan(LLAVA, llava_clt(), gpus=3)


def test_targets_sources_table():
    rows = targets_sources_table(4, 2)
    assert [(r.layer, r.targets, r.sources) for r in rows] == [
        (0, [0, 1], [0]), (1, [1, 2], [0, 1]), (2, [2, 3], [1, 2]), (3, [3], [2, 3])
    ]
    full = targets_sources_table(32, 0)
    assert full[0].targets == list(range(32)) and full[31].sources == list(range(32))
    assert sum(len(r.targets) for r in full) == 528 == sum(len(r.sources) for r in full)
    with pytest.raises(ValueError, match="cross_layer=33"):
        targets_sources_table(32, 33)


def test_format_plan_is_readable():
    text = format_plan(plan(LLAVA, llava_clt(), device="h200"))
    assert "decoder matrices     528" in text
    assert "18,790,875,136" in text and "70.00 GiB" in text and "512 KiB/token" in text
    assert "fits in 131 GiB: NO" in text


BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_plan_memory.py"


def _bench_env() -> dict:
    """The benchmark's worker environment (one thread, glibc mapping large tensors on their own)."""
    spec = importlib.util.spec_from_file_location("bench_plan_memory", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return {**os.environ, **bench.WORKER_ENV}


@pytest.mark.parametrize("optimizer, processes", [("adafactor", 1), ("adam-bf16", 2)])
def test_planner_matches_the_measured_peak_of_training_steps(optimizer, processes):
    """One config of benchmarks/bench_plan_memory.py: RSS growth over 2 training steps in a fresh process, and on 2
    FSDP processes (the larger rank's) against the planner's per-GPU figure for `parallel: fsdp`."""
    layers, width, latents, batch = 8, 512, 4096, 256
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    cmd = [*launcher, str(BENCH), "--worker", str(layers), str(width), str(latents), "0", str(batch), optimizer]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_bench_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])["measured_bytes"]
    config = CLTConfig(n_layers=layers, d_model=width, n_latents=latents, k=32)
    p = plan(model_dims_of(config), config, optimizer, batch_size=batch, gpus=processes)
    planned = p.gpu_bytes if processes == 1 else p.fsdp_gpu_bytes
    assert abs(measured / planned - 1) < 0.15, (measured, planned)


def test_readme_states_the_benchmarked_planner_accuracy():
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    readme = (results.parents[1] / "README.md").read_text().replace("\n", " ")
    for name, stated, count in (("plan-memory-cpu.json", 0.08, 12), ("plan-memory-fsdp-cpu.json", 0.10, 8)):
        rows = json.loads((results / name).read_text())["rows"]
        assert len(rows) == count and max(abs(r["ratio"] - 1) for r in rows) <= stated, name
        assert f"within {stated:.0%}" in readme and f"{count} configurations" in readme


def test_format_recipes_lists_every_recipe_and_only_the_low_memory_ones_fit_an_h200():
    big = CLTConfig(n_layers=32, d_model=4096, n_latents=8192, k=64, cross_layer=0)
    rows = format_recipes(model_dims("llava-1.5-7b"), big, DEVICE_PRESETS["h200"]).splitlines()
    verdicts = {row.split()[0]: row.split()[3] for row in rows[1:]}
    assert verdicts == {"adam": "no", "adam-bf16": "YES", "adafactor": "YES"}


def test_random_names_size_the_plan_with_their_overrides():
    assert model_dims("random:llava-1.5-7b@layers=2")[:2] == (2, 4096)
    assert model_dims("random:llava-1.5-7b")[:2] == (32, 4096)


def test_storage_advice_says_when_to_stream():
    llava = bytes_per_token(32, 4096, "bfloat16")
    assert llava == 512 * 1024
    assert "stream them (stream: true)" in storage_advice(4_194_304, llava, 500 * 10**9)  # 2.2 TB > 500 GB / 4
    assert "storing them is fine" in storage_advice(262_144, 12_288, 500 * 10**9)


def test_readme_sharding_figures_are_the_planners():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    eight = plan(LLAVA, llava_clt(k=64), "adam-bf16", device="h200", gpus=8)
    wide = plan(LLAVA, llava_clt(n_latents=65536, k=64), "adam-bf16", device="h200", gpus=8)
    streamed = plan(LLAVA, llava_clt(k=64), "adam-bf16", device="h200", batch_size=1024,
                    resident_bytes=_stream_resident_bytes("llava-1.5-7b", LLAVA, 1024))
    for figure in (f"{eight.gpu_bytes / GiB:.2f} GiB per GPU on 8 H200s", f"{eight.fsdp_gpu_bytes / GiB:.2f} GiB per GPU on 8",
                   f"at\nleast {eight.fsdp_gpus_needed} GPUs", f"({wide.total_params / 1e9:.0f}e9 parameters)",
                   f"({wide.fsdp_gpu_bytes / GiB:.0f} GiB per GPU on 8;", f"at least {wide.fsdp_gpus_needed} H200s",
                   f"({streamed.gpu_bytes / GiB:.2f} GiB of {streamed.device.memory / GiB:.0f})"):
        assert figure.replace("\n", " ") in readme.replace("\n", " "), figure
