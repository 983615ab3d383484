"""Trainer: learns, resumes exactly, stops on NaN, rejects mismatches; data parallel (DDP, FSDP) matches one process."""

import dataclasses
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from clt_lite.clt import CLTConfig, CrossLayerTranscoder
from clt_lite.optim import RECIPES, recipe
from clt_lite.train import ActivationBatch, TrainConfig, TrainingDiverged, latest_checkpoint, lr_at, train

torch.set_num_threads(1)

L, D = 3, 8


class SyntheticSource:
    """Random inputs; targets are a sparse nonlinear cross-layer function of them (a hidden true CLT)."""

    def __init__(self, n_layers=L, d_model=D, val_batches=2):
        self.n_layers, self.d_model, self.val_batches = n_layers, d_model, val_batches
        self.input_site = "mlp_in"
        self.input_scale = torch.full((n_layers,), 2.0)
        self.target_scale = torch.linspace(0.5, 1.5, n_layers)
        g = torch.Generator().manual_seed(1234)
        self.encoders = torch.randn(n_layers, 24, d_model, generator=g)
        self.decoders = torch.randn(n_layers, n_layers, 24, d_model, generator=g) / 3

    def make_batch(self, g: torch.Generator, batch_size: int) -> ActivationBatch:
        x = torch.randn(batch_size, self.n_layers, self.d_model, generator=g)
        pre = torch.einsum("bld,lnd->bln", x, self.encoders)
        acts = torch.zeros_like(pre).scatter(-1, pre.topk(2, -1).indices, pre.topk(2, -1).values.relu())
        y = torch.stack(
            [sum(acts[:, s] @ self.decoders[s, t] for s in range(t + 1)) for t in range(self.n_layers)], dim=1
        )
        return ActivationBatch(x, y + 0.5)

    def batches(self, batch_size, split="train", seed=0):
        g = torch.Generator().manual_seed(seed * 7919 + (split == "val"))
        produced = 0
        while split == "train" or produced < self.val_batches:
            produced += 1
            yield self.make_batch(g, batch_size)


class FaultySource(SyntheticSource):
    """Raises (a simulated kill) or yields NaN once `after` training batches have been produced."""

    def __init__(self, after: int, fault: str):
        super().__init__()
        self.after, self.fault, self.count = after, fault, 0

    def batches(self, batch_size, split="train", seed=0):
        for batch in super().batches(batch_size, split, seed):
            if split == "train":
                self.count += 1
                if self.count > self.after:
                    if self.fault == "kill":
                        raise KeyboardInterrupt("simulated kill")
                    batch = ActivationBatch(batch.inputs * float("nan"), batch.targets)
            yield batch


CLT = CLTConfig(n_layers=L, d_model=D, n_latents=32, k=4)
FAST = dict(batch_size=64, lr=1e-2, warmup_steps=3, log_every=2, val_batches=2, device="cpu", dead_tokens=64 * 5)


def weights(out_dir: Path) -> dict:
    return CrossLayerTranscoder.load(out_dir).state_dict()


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(tokens=100, batch_size=10, warmup_steps=2, final_lr_fraction=0.1)
    assert [round(lr_at(s, 1.0, cfg), 4) for s in range(10)] == [0.5, 1.0, 1.0, 0.8714, 0.7429, 0.6143, 0.4857,
                                                                  0.3571, 0.2286, 0.1]


def test_training_reduces_fvu_and_reports_metrics(tmp_path):
    source = SyntheticSource()
    cfg = TrainConfig(tokens=64 * 150, checkpoint_every=1000, **FAST)
    result = train(CLT, cfg, source, tmp_path, progress=False)
    assert result.steps == 150 and len(result.fvu) == L
    first, last = result.history[0], result.history[-1]
    assert last["step"] == 150 and last["tokens"] == 150 * 64 and len(last["fvu"]) == L
    assert first["loss"] > 0.9 and last["loss"] < 0.55 * first["loss"]
    assert max(result.fvu) < 0.6
    assert result.l0 == pytest.approx([4.0] * L, abs=0.2)
    assert all(0.0 <= f < 1.0 for f in result.dead_fraction)
    assert result.tokens_per_s > 0
    clt = CrossLayerTranscoder.load(tmp_path)  # final model lands in out_dir
    torch.testing.assert_close(clt.input_scale, source.input_scale)
    assert latest_checkpoint(tmp_path).name == "step-00000150"


@pytest.mark.parametrize("optimizer", list(RECIPES))
def test_resume_after_kill_equals_uninterrupted_run(tmp_path, optimizer):
    clt_config = CLTConfig(n_layers=L, d_model=D, n_latents=32, k=4, dtype=recipe(optimizer).param_dtype)
    cfg = TrainConfig(tokens=64 * 12, checkpoint_every=5, optimizer=optimizer, **FAST)
    full = train(clt_config, cfg, SyntheticSource(), tmp_path / "full", progress=False)

    with pytest.raises(KeyboardInterrupt):
        train(clt_config, cfg, FaultySource(after=1 + 8, fault="kill"), tmp_path / "killed", progress=False)  # 1 init batch
    assert latest_checkpoint(tmp_path / "killed").name == "step-00000005"
    resumed = train(clt_config, cfg, SyntheticSource(), tmp_path / "killed", progress=False)

    assert resumed.history == full.history
    assert resumed.fvu == full.fvu
    for (name, a), b in zip(weights(tmp_path / "full").items(), weights(tmp_path / "killed").values()):
        assert torch.equal(a, b), name


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = TrainConfig(tokens=64 * 12, checkpoint_every=4, **FAST)
    with pytest.raises(TrainingDiverged, match="loss became nan at step 6; last good checkpoint: .*step-00000004"):
        train(CLT, cfg, FaultySource(after=1 + 6, fault="nan"), tmp_path, progress=False)
    good = CrossLayerTranscoder.load(latest_checkpoint(tmp_path))
    assert all(torch.isfinite(t).all() for t in good.state_dict().values())


def test_mismatches_are_one_line_errors(tmp_path):
    cfg = TrainConfig(tokens=64 * 2, checkpoint_every=1, **FAST)
    with pytest.raises(ValueError, match="source has 3 layers of width 8 but the CLT config expects 3 x 16"):
        train(CLTConfig(n_layers=L, d_model=16, n_latents=32, k=4), cfg, SyntheticSource(), tmp_path, progress=False)
    with pytest.raises(ValueError, match="source reads mlp_in but the CLT config says input_site='resid_mid'"):
        train(CLTConfig(n_layers=L, d_model=D, n_latents=32, k=4, input_site="resid_mid"), cfg, SyntheticSource(), tmp_path,
              progress=False)
    train(CLT, cfg, SyntheticSource(), tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"different CLT config \(differs in \['k'\]\)"):
        train(CLTConfig(n_layers=L, d_model=D, n_latents=32, k=5), cfg, SyntheticSource(), tmp_path, progress=False)
    other = TrainConfig(**{**cfg.__dict__, "lr": 1e-3})
    with pytest.raises(ValueError, match=r"different TrainConfig \(differs in \['lr'\]\)"):
        train(CLT, other, SyntheticSource(), tmp_path, progress=False)
    later = TrainConfig(**{**cfg.__dict__, "log_every": 7})  # bookkeeping fields may change on resume
    assert train(CLT, later, SyntheticSource(), tmp_path, progress=False).steps == 2
    with pytest.raises(ValueError, match=f"^unknown optimizer 'lion'; use one of {', '.join(RECIPES)}$"):
        TrainConfig(optimizer="lion")
    bf16 = TrainConfig(**{**cfg.__dict__, "optimizer": "adam-bf16"})
    with pytest.raises(ValueError, match=r"trains bfloat16 parameters but the CLT config says dtype='float32'"):
        train(CLT, bf16, SyntheticSource(), tmp_path / "bf16", progress=False)


class ShapeOnlySource:
    """A source that has the sizes and scales but yields nothing: the memory check must come first."""

    def __init__(self, n_layers: int, d_model: int):
        self.n_layers, self.d_model, self.input_site = n_layers, d_model, "mlp_in"
        self.input_scale = self.target_scale = torch.ones(n_layers)

    def batches(self, batch_size, split="train", seed=0):
        raise AssertionError("read a batch before checking the memory")


def test_config_that_does_not_fit_fails_before_allocating(tmp_path):
    huge = CLTConfig(n_layers=32, d_model=4096, expansion_factor=256, k=64)  # 600e9 parameters, ~9 TB with Adam
    cfg = TrainConfig(tokens=4096, batch_size=4096, device="cpu")
    pattern = (r"^CLT does not fit this machine's RAM \(.* GiB\): needs .* = weights .* \+ gradients .* \+ optimizer "
               r"\(adam\) .* \+ batch .* GiB; nearest that fits: optimizer='[\w-]+', n_latents=\d+ \((float32|bfloat16)\)$")
    with pytest.raises(ValueError, match=pattern):
        train(huge, cfg, ShapeOnlySource(32, 4096), tmp_path, progress=False)
    assert not (tmp_path / "checkpoints").exists()


def test_a_disk_too_small_for_the_checkpoints_fails_before_training(tmp_path, monkeypatch):
    """Free space is checked against the final model plus two checkpoints (one with checkpoint_every=0: none)."""
    cfg = TrainConfig(tokens=64 * 2, checkpoint_every=1, **FAST)
    weights = 4 * sum(p.numel() for p in CrossLayerTranscoder(CLT).parameters())
    free = weights + 2 * weights  # the final model fits, two checkpoints of weights + Adam states (3 x weights) do not
    monkeypatch.setattr("clt_lite.checkpoints.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 0, free))
    pattern = (r"^\S+ has 0\.00 GB free but this run writes up to 0\.0\d GB \(the final model 0\.00 GB, two "
               r"checkpoints of 0\.0\d GB\); free space or write elsewhere; or set checkpoint_every=0 to keep only the final model$")
    with pytest.raises(ValueError, match=pattern):
        train(CLT, cfg, SyntheticSource(), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    result = train(CLT, dataclasses.replace(cfg, checkpoint_every=0), SyntheticSource(), tmp_path / "run", progress=False)
    assert result.steps == 2 and not (tmp_path / "run" / "checkpoints").exists()
    assert CrossLayerTranscoder.load(tmp_path / "run").config == CLT


@pytest.mark.parametrize("activation", ["batchtopk", "jumprelu"])
def test_other_activations_train(tmp_path, activation):
    clt_config = CLTConfig(n_layers=L, d_model=D, n_latents=32, k=4, activation=activation, cross_layer=2)
    result = train(clt_config, TrainConfig(tokens=64 * 80, checkpoint_every=100, **FAST), SyntheticSource(), tmp_path,
                   progress=False)
    assert result.history[-1]["loss"] < 0.8 * result.history[0]["loss"]
    assert max(result.fvu) < 0.9
    if activation == "batchtopk":
        assert result.l0 == pytest.approx([4.0] * L)  # B*k per layer over the batch: k per token on average


DDP_SCRIPT = """
import os, sys, torch
torch.set_num_threads(1)
assert os.environ["WORLD_SIZE"] == "2"
sys.path[:0] = [{tests!r}, {repo!r}]
from test_train import CLT, FAST, SyntheticSource
from clt_lite.train import TrainConfig, train
train(CLT, TrainConfig(tokens=64 * 6, checkpoint_every=3, **FAST), SyntheticSource(), sys.argv[1], progress=False)
"""


def torchrun(tmp_path: Path, script: str, out_dir: Path) -> subprocess.CompletedProcess:
    """Run `script` (a DDP_SCRIPT-like template) on 2 CPU processes (gloo) with torchrun."""
    here = Path(__file__).resolve().parent
    path = tmp_path / "ddp_run.py"
    path.write_text(textwrap.dedent(script.format(tests=str(here), repo=str(here.parent))))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(path), str(out_dir)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def test_data_parallel_matches_single_process(tmp_path):
    done = torchrun(tmp_path, DDP_SCRIPT, tmp_path / "ddp")
    assert done.returncode == 0, done.stderr[-3000:]

    single = train(CLT, TrainConfig(tokens=64 * 6, checkpoint_every=3, **FAST), SyntheticSource(), tmp_path / "one",
                   progress=False)
    assert single.steps == 6
    for (name, a), b in zip(weights(tmp_path / "one").items(), weights(tmp_path / "ddp").values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


DDP_KILLED_SCRIPT = DDP_SCRIPT.replace("SyntheticSource(), sys.argv[1]", "FaultySource(after=1 + 4, fault='kill'), sys.argv[1]")
DDP_KILLED_SCRIPT = DDP_KILLED_SCRIPT.replace("from test_train import CLT, FAST, SyntheticSource",
                                              "from test_train import CLT, FAST, FaultySource")


@pytest.mark.parametrize("optimizer", list(RECIPES))
def test_resume_on_another_world_size(tmp_path, optimizer):
    """Killed after step 4 on 2 DDP processes (checkpoint at 3), resumed on 1: matches one process throughout.

    The low-memory recipes step each parameter during backward on one process, after DDP's all-reduce on two."""
    dtype = recipe(optimizer).param_dtype
    script = DDP_KILLED_SCRIPT.replace("checkpoint_every=3,", f"checkpoint_every=3, optimizer={optimizer!r},")
    script = script.replace("train(CLT,", f"train(dataclasses.replace(CLT, dtype={dtype!r}),")
    script = script.replace("import os, sys, torch", "import dataclasses, os, sys, torch")
    done = torchrun(tmp_path, script, tmp_path / "run")
    assert done.returncode != 0 and "simulated kill" in done.stderr
    assert latest_checkpoint(tmp_path / "run").name == "step-00000003"
    cfg = TrainConfig(tokens=64 * 6, checkpoint_every=3, optimizer=optimizer, **FAST)
    clt_config = dataclasses.replace(CLT, dtype=dtype)
    resumed = train(clt_config, cfg, SyntheticSource(), tmp_path / "run", progress=False)
    single = train(clt_config, cfg, SyntheticSource(), tmp_path / "one", progress=False)
    assert resumed.steps == single.steps == 6
    # bf16 gradients summed in another order differ by ulps; Adam divides by sqrt(v), so where a gradient is near
    # zero that can move a weight by up to one step (lr = 1e-2): measured 7.6e-3 at most, on 14% of W_dec[0].
    tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == "float32" else dict(rtol=2**-6, atol=FAST["lr"])
    for (name, a), b in zip(weights(tmp_path / "one").items(), weights(tmp_path / "run").values()):
        torch.testing.assert_close(a, b, **tolerance, msg=name)


# ------------------------------------------------------------------------------------------------ FSDP
def fsdp_script(optimizer: str, source: str = "SyntheticSource()") -> str:
    """DDP_SCRIPT with parallel='fsdp', the recipe's parameter dtype and another source."""
    script = DDP_SCRIPT.replace("checkpoint_every=3,", f"checkpoint_every=3, parallel='fsdp', optimizer={optimizer!r},")
    script = script.replace("train(CLT,", f"train(dataclasses.replace(CLT, dtype={recipe(optimizer).param_dtype!r}),")
    script = script.replace("import os, sys, torch", "import dataclasses, os, sys, torch")
    script = script.replace("from test_train import CLT, FAST, SyntheticSource",
                            "from test_train import CLT, FAST, FaultySource, SyntheticSource")
    return script.replace("SyntheticSource(), sys.argv[1]", f"{source}, sys.argv[1]")


def single_process(tmp_path: Path, optimizer: str, out: str = "one"):
    cfg = TrainConfig(tokens=64 * 6, checkpoint_every=3, optimizer=optimizer, **FAST)
    clt_config = dataclasses.replace(CLT, dtype=recipe(optimizer).param_dtype)
    return train(clt_config, cfg, SyntheticSource(), tmp_path / out, progress=False)


# bf16: as in test_resume_on_another_world_size (gradients summed in another order move a weight by up to one step)
TOLERANCE = {"float32": dict(rtol=1e-4, atol=1e-5), "bfloat16": dict(rtol=2**-6, atol=FAST["lr"])}


def assert_same_weights(a_dir: Path, b_dir: Path, dtype: str) -> None:
    for (name, a), b in zip(weights(a_dir).items(), weights(b_dir).values()):
        torch.testing.assert_close(a, b, **TOLERANCE[dtype], msg=name)


@pytest.mark.parametrize("optimizer", ["adam", "adam-bf16"])
def test_fsdp_matches_single_process(tmp_path, optimizer):
    """2 FSDP processes (weights, gradients and Adam states sharded) train what one process trains."""
    done = torchrun(tmp_path, fsdp_script(optimizer), tmp_path / "fsdp")
    assert done.returncode == 0, done.stderr[-3000:]
    assert single_process(tmp_path, optimizer).steps == 6
    assert latest_checkpoint(tmp_path / "fsdp").name == "step-00000006"
    assert_same_weights(tmp_path / "one", tmp_path / "fsdp", recipe(optimizer).param_dtype)


@pytest.mark.parametrize("optimizer", ["adam", "adam-bf16"])
def test_fsdp_resume_after_kill_on_two_and_on_one_process(tmp_path, optimizer):
    """An FSDP run killed after step 4 (checkpoint at 3, full tensors gathered to rank 0) resumes sharded on 2
    processes bit for bit like an uninterrupted FSDP run, and on 1 process like one uninterrupted process."""
    killed = torchrun(tmp_path, fsdp_script(optimizer, "FaultySource(after=1 + 4, fault='kill')"), tmp_path / "two")
    assert killed.returncode != 0 and "simulated kill" in killed.stderr
    assert latest_checkpoint(tmp_path / "two").name == "step-00000003"
    shutil.copytree(tmp_path / "two", tmp_path / "resumed-on-one")
    for out in ("two", "uninterrupted"):
        done = torchrun(tmp_path, fsdp_script(optimizer), tmp_path / out)
        assert done.returncode == 0, done.stderr[-3000:]
    for (name, a), b in zip(weights(tmp_path / "uninterrupted").items(), weights(tmp_path / "two").values()):
        assert torch.equal(a, b), name
    assert single_process(tmp_path, optimizer, "resumed-on-one").steps == 6
    single_process(tmp_path, optimizer)
    assert_same_weights(tmp_path / "one", tmp_path / "resumed-on-one", recipe(optimizer).param_dtype)


FSDP_UNITS_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
sys.path[:0] = [{tests!r}, {repo!r}]
from torch.distributed.fsdp import FSDPModule
from clt_lite import parallel
from clt_lite.clt import CLTConfig, CrossLayerTranscoder
ranks, device, _ = parallel.setup_ranks("cpu")
config = CLTConfig(n_layers=4, d_model=8, n_latents=16, k=4, activation="jumprelu")
torch.manual_seed(0)
reference, x = CrossLayerTranscoder(config), torch.randn(6, 4, 8)
shard, whole = parallel.decoder_sharder("fsdp", ranks, device), []

def shard_and_count(decoder):  # the decoders built so far that are still whole (not sharded): never more than this one
    whole.append(sum(not isinstance(d, FSDPModule) for d in [*built, decoder]))
    shard(decoder)
    built.append(decoder)

built = []
torch.manual_seed(0)
clt = CrossLayerTranscoder(config, on_decoder=shard_and_count)
assert whole == [1, 1, 1, 1], whole
parallel.wrap(clt, "fsdp", ranks, device)
assert all(isinstance(d, FSDPModule) for d in clt.decoders) and isinstance(clt, FSDPModule)
for (name, p), q in zip(clt.named_parameters(), reference.parameters(), strict=True):
    assert torch.equal(p.full_tensor(), q), name
if ranks.rank == 0:
    reference.save(sys.argv[1])
parallel.dist.barrier()
loaded = CrossLayerTranscoder.load(sys.argv[1], on_decoder=shard)  # read one tensor at a time, decoders sharded
for (name, p), q in zip(loaded.named_parameters(), reference.parameters(), strict=True):
    assert torch.equal(p.full_tensor() if hasattr(p, "full_tensor") else p, q), name

def loss(model):
    out = model(x)
    aux = model.latent_sum(out.values.detach() * 0.5, out.indices)  # a second call of every decoder, as AuxK makes
    return out.reconstruction.pow(2).sum() + aux.pow(2).sum() + model.sparsity_penalty(out.values, out.indices, 1.0).sum()

total = loss(clt)
assert all(d.weight.to_local().shape[0] == 8 for d in clt.decoders), "a decoder stayed gathered after its forward"
total.backward()
loss(reference).backward()
for (name, p), q in zip(clt.named_parameters(), reference.parameters(), strict=True):
    torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-5, atol=1e-6, msg=name)
print("ok")
import gc
gc.collect()  # as clt_lite.train does: FSDP's gloo work objects freed at interpreter shutdown abort 1 run in ~15
parallel.dist.destroy_process_group()
"""


def test_fsdp_gathers_one_decoder_at_a_time_and_computes_the_same_gradients(tmp_path):
    """Every source decoder is its own FSDP unit, sharded as soon as it is built or loaded (with the single-process
    values) and freed after its forward, so one or two are whole at once; gradients through forward, a second
    decoder call (AuxK) and the JumpReLU penalty match one process's."""
    done = torchrun(tmp_path, FSDP_UNITS_SCRIPT, tmp_path / "saved")
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def test_parallel_is_validated_and_may_change_on_resume(tmp_path):
    with pytest.raises(ValueError, match="^unknown parallel 'zero3'; use one of ddp, fsdp$"):
        TrainConfig(parallel="zero3")
    with pytest.raises(ValueError, match="optimizer 'adafactor' does not run sharded"):
        TrainConfig(parallel="fsdp", optimizer="adafactor")
    cfg = TrainConfig(tokens=64 * 2, checkpoint_every=1, **FAST)
    train(CLT, cfg, SyntheticSource(), tmp_path, progress=False)
    fsdp = TrainConfig(**{**cfg.__dict__, "parallel": "fsdp", "tokens": 64 * 3})  # one process: fsdp is not used
    with pytest.raises(ValueError, match=r"differs in \['tokens'\]"):
        train(CLT, fsdp, SyntheticSource(), tmp_path, progress=False)
    assert train(CLT, TrainConfig(**{**cfg.__dict__, "parallel": "fsdp"}), SyntheticSource(), tmp_path,
                 progress=False).steps == 2
