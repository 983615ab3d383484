"""The course's cached steps: a stream as a training source, and reloads that do no work."""

from unittest import mock

import pytest

from clt_lite import course, data, store
from clt_lite.clt import CLTConfig
from clt_lite.train import TrainConfig


def test_a_streamed_clt_trains_then_reloads_without_touching_the_model(tiny, tmp_path):
    source = course.training_source(tiny, tmp_path, stream=True, capture_samples=4, seed=1)
    assert isinstance(source, store.StreamingSource) and source.input_site == "mlp_in"
    assert len(source.val_samples) == 4 and source.val_samples[0].image.size == (tiny.world.image_size,) * 2
    clt_config = CLTConfig(n_layers=tiny.n_layers, d_model=tiny.d_model, n_latents=64, k=4, input_site="mlp_in")
    train_config = TrainConfig(tokens=256, batch_size=64, device="cpu", val_batches=1, warmup_steps=1)
    clt, result = course.train_clt(source, tmp_path, clt_config, train_config, progress=False)
    assert result.steps == 4 and len(result.fvu) == tiny.n_layers
    again = course.training_source(tiny, tmp_path, stream=True, capture_samples=4, seed=1)
    assert again.name == source.name
    with mock.patch.object(course, "train", side_effect=AssertionError("retrained")), \
         mock.patch.object(again, "_run", side_effect=AssertionError("ran the model")):
        reloaded, same = course.train_clt(again, tmp_path, clt_config, train_config)
    assert same == result and (reloaded.W_enc == clt.W_enc).all()
    other = course.training_source(tiny, tmp_path, stream=True, capture_samples=4, seed=2)
    assert other.name != source.name  # another stream, another cache entry


def test_the_stored_source_reads_the_asked_site(tiny, tmp_path):
    resid = course.training_source(tiny, tmp_path, stream=False, capture_samples=6, input_site="resid_mid", progress=False)
    assert isinstance(resid, store.ActivationStore) and resid.input_site == "resid_mid"


def test_shapes_world_refuses_a_geometry_that_splits_patches():
    with pytest.raises(ValueError, match="divisible by 42"):
        data.WorldConfig(image_size=330, patch_size=14)


def test_a_killed_streaming_run_resumes_at_the_same_batch(tiny, tmp_path):
    """The stream is replayed from its start on resume, so the resumed run equals an uninterrupted one."""
    import torch

    from clt_lite.clt import CrossLayerTranscoder
    from clt_lite.train import latest_checkpoint, train

    def stream():
        return course.training_source(tiny, tmp_path / "cache", stream=True, capture_samples=4, seed=3)

    def killed_after(source, after: int):
        original, produced = source.batches, [0]

        def batches(batch_size, split="train", seed=0):
            for batch in original(batch_size, split, seed):
                produced[0] += split == "train"
                if produced[0] > after:
                    raise KeyboardInterrupt("simulated kill")
                yield batch
        source.batches = batches
        return source

    clt_config = CLTConfig(n_layers=tiny.n_layers, d_model=tiny.d_model, n_latents=64, k=4, input_site="mlp_in")
    cfg = TrainConfig(tokens=64 * 6, batch_size=64, device="cpu", val_batches=1, warmup_steps=1, checkpoint_every=3, log_every=1)
    full = train(clt_config, cfg, stream(), tmp_path / "full", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(clt_config, cfg, killed_after(stream(), 1 + 4), tmp_path / "killed", progress=False)  # 1 init batch
    assert latest_checkpoint(tmp_path / "killed").name == "step-00000003"
    resumed = train(clt_config, cfg, stream(), tmp_path / "killed", progress=False)
    assert resumed.history == full.history and resumed.fvu == full.fvu
    for a, b in zip(CrossLayerTranscoder.load(tmp_path / "full").state_dict().values(),
                    CrossLayerTranscoder.load(tmp_path / "killed").state_dict().values()):
        assert torch.equal(a, b)
