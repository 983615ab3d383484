"""The activation store: safe resumable capture, integrity checks, normalised split batches, streaming."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from clt_lite import data, sites, store

torch.set_num_threads(1)

CONFIG = store.CaptureConfig(samples_per_shard=4, batch_size=2)


@pytest.fixture(scope="module")
def samples():
    return data.shapes_world(10, "test")


@pytest.fixture(scope="module")
def captured(tiny, samples, tmp_path_factory):
    """An uninterrupted reference capture: 10 samples in shards of 4 (3 shards)."""
    out = tmp_path_factory.mktemp("store") / "acts"
    store.capture(tiny, samples, out, CONFIG, data_id="shapes:10:test", progress=False)
    return out


class Killed(Exception):
    pass


def _kill_after_first(index):
    if index == 0:
        raise Killed


def test_killed_capture_resumes_bit_identical(tiny, samples, captured, tmp_path):
    out = tmp_path / "acts"
    with pytest.raises(Killed):
        store.capture(tiny, samples, out, CONFIG, data_id="shapes:10:test", progress=False, on_shard=_kill_after_first)
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and len(manifest["shards"]) == 1
    (out / ".shard-00001.safetensors.tmp123").write_bytes(b"half a shard")  # a kill in the middle of a write

    summary = store.capture(tiny, samples, out, CONFIG, data_id="shapes:10:test", progress=False)

    assert summary.resumed_shards == 1 and summary.shards == 3
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in captured.iterdir())
    assert json.loads((out / "manifest.json").read_text()) == json.loads((captured / "manifest.json").read_text())
    for shard in captured.glob("shard-*.safetensors"):
        reference, resumed = load_file(shard), load_file(out / shard.name)
        assert reference.keys() == resumed.keys()
        for name in reference:
            assert torch.equal(reference[name], resumed[name]), (shard.name, name)


def test_complete_rerun_does_nothing_and_other_args_are_refused(tiny, samples, captured, tmp_path):
    assert store.capture(tiny, samples, captured, CONFIG, data_id="shapes:10:test", progress=False).resumed_shards == 3
    with pytest.raises(ValueError, match="other arguments.*dtype"):
        store.capture(tiny, samples, captured, store.CaptureConfig(samples_per_shard=4, batch_size=2, dtype="float32"),
                      data_id="shapes:10:test", progress=False)
    with pytest.raises(ValueError, match="other arguments.*first_sample_sha256"):
        store.capture(tiny, samples[1:], captured, CONFIG, data_id="shapes:10:test", progress=False)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        store.capture(tiny, samples, tmp_path, CONFIG, progress=False)


def test_corrupt_and_truncated_shards_are_named(captured, tmp_path):
    import shutil

    flipped, cut = tmp_path / "flipped", tmp_path / "cut"
    shutil.copytree(captured, flipped)
    shutil.copytree(captured, cut)
    shard = flipped / "shard-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-100] ^= 0xFF  # inside the data, the header still parses
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="shard-00001.safetensors fails its sha256"):
        store.ActivationStore(flipped, verify="open")
    lazy = store.ActivationStore(flipped, verify="lazy")  # opens; the bad shard is caught when first read
    with pytest.raises(ValueError, match="shard-00001.safetensors fails its sha256"):
        lazy.tokens(1)

    shard = cut / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match="shard-00002.safetensors is .* bytes but the manifest says"):
        store.ActivationStore(cut, verify="none")


def test_small_disk_is_refused_before_writing(tiny, samples, tmp_path, monkeypatch):
    monkeypatch.setattr(store.capturing, "free_bytes", lambda path: 10_000)  # patched where capture() looks it up
    with pytest.raises(ValueError, match="not enough disk space"):
        store.capture(tiny, samples, tmp_path / "acts", CONFIG, progress=False)
    assert not list((tmp_path / "acts").glob("shard-*"))


def test_bad_inputs_are_one_line_errors(tiny, samples, captured, tmp_path):
    with pytest.raises(ValueError, match="no usable tokens"):
        store.capture(tiny, [], tmp_path / "empty", CONFIG, progress=False)
    with pytest.raises(ValueError, match="has 4 decoder layers"):
        store.capture(tiny, samples, tmp_path / "layers", store.CaptureConfig(layers=(0, 4)), progress=False)
    with pytest.raises(ValueError, match="kinds"):
        store.CaptureConfig(kinds=("padding",))
    acts = store.ActivationStore(captured)
    store.check_compatible(acts, tiny.n_layers, tiny.d_model)
    for n_layers, d_model in ((tiny.n_layers + 1, tiny.d_model), (tiny.n_layers, 2 * tiny.d_model)):
        with pytest.raises(ValueError, match="capture activations from this model"):
            store.check_compatible(acts, n_layers, d_model)


def _rows(x):
    """Rows of a [T, L, d] tensor as a lexicographically sorted set, for order-free comparison."""
    return torch.unique(x.reshape(len(x), -1), dim=0)


def test_batches_are_normalised_split_by_sample_and_exclude_bos(captured):
    acts = store.ActivationStore(captured, val_fraction=0.3)
    meta = acts.metadata
    is_val = np.array([acts.split_of_sample(s) == "val" for s in meta.sample])
    assert 0 < len(np.unique(meta.sample[is_val])) < len(np.unique(meta.sample))
    raw = acts.tokens(slice(None))
    inputs = raw["mlp_in"] * acts.input_scale[:, None]
    targets = raw["mlp_out"] * acts.target_scale[:, None]
    non_bos = torch.from_numpy(~meta.bos)
    for x in (inputs, targets):  # the scales make the mean squared norm exactly d over the stored non-BOS tokens
        torch.testing.assert_close(x[non_bos].pow(2).sum(-1).mean(0), torch.full((acts.n_layers,), 64.0), rtol=1e-4, atol=0)

    for split, mask in (("train", ~is_val), ("val", is_val)):
        expected = non_bos & torch.from_numpy(mask)
        n = int(expected.sum())
        # batch 1 and a buffer of exactly one epoch: the first n batches are the whole train split
        acts.shuffle_buffer = n
        got = [b for _, b in zip(range(n), acts.batches(1, split))]
        assert len(got) == n and all(b.inputs.dtype == torch.float32 for b in got)
        assert torch.equal(_rows(torch.cat([b.inputs for b in got])), _rows(inputs[expected]))
        assert torch.equal(_rows(torch.cat([b.targets for b in got])), _rows(targets[expected]))
    assert len(list(acts.batches(7, "val"))) == -(-int((non_bos & torch.from_numpy(is_val)).sum()) // 7)  # one finite pass


def test_train_batches_are_deterministic_per_seed_and_cycle(captured):
    acts = store.ActivationStore(captured, shuffle_buffer=64)
    first = [b.inputs for _, b in zip(range(40), acts.batches(32, seed=1))]  # 40 x 32 tokens: several epochs
    again = [b.inputs for _, b in zip(range(40), acts.batches(32, seed=1))]
    other = next(iter(acts.batches(32, seed=2))).inputs
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and len(first) == 40
    assert not torch.equal(first[0], other)


def test_stored_activations_equal_a_direct_capture(tiny, samples, tmp_path):
    batch = samples[:3]
    config = store.CaptureConfig(input_sites=("resid_mid", "mlp_in"), dtype="float32", samples_per_shard=3, batch_size=3)
    store.capture(tiny, batch, tmp_path, config, progress=False)
    acts = store.ActivationStore(tmp_path, input_site="mlp_in")
    encoded = data.encode_batch(tiny.processor, batch, with_answers=True)
    real = encoded.attention_mask.bool()
    with torch.no_grad(), sites.capture(tiny.model, sites.SITES, positions=real) as direct:
        tiny.model(**encoded.model_inputs(tiny.model))
    stored = acts.tokens(0)
    for site in sites.SITES:
        assert torch.equal(stored[site], direct.stack(site)), site
    meta = acts.metadata
    assert torch.equal(torch.from_numpy(meta.token_id).long(), encoded.input_ids[real])
    assert (meta.kind == store.KINDS.index("answer")).sum() == encoded.answer_mask.sum()
    assert meta.bos.sum() == 3 and (meta.kind == store.KINDS.index("image")).sum() == (encoded.input_ids == tiny.image_token_id).sum()
    assert acts.input_site == "mlp_in" and acts.manifest["bytes_per_token"] == 3 * 4 * 64 * 4


def test_max_tokens_and_kinds(tiny, samples, tmp_path):
    summary = store.capture(tiny, samples, tmp_path / "cut", store.CaptureConfig(max_tokens=100, samples_per_shard=1),
                            progress=False)
    assert summary.tokens == 100 and store.ActivationStore(tmp_path / "cut").n_tokens == 100
    store.capture(tiny, samples[:2], tmp_path / "answers", store.CaptureConfig(kinds=("answer",)), progress=False)
    meta = store.ActivationStore(tmp_path / "answers").metadata
    assert set(meta.kind.tolist()) == {store.KINDS.index("answer")} and not meta.bos.any()


def test_streaming_source_has_the_same_interface(tiny, samples, captured):
    stream = store.StreamingSource(tiny, samples, val_fraction=0.3, scale_samples=4, forward_batch=4)
    acts = store.ActivationStore(captured)
    for source in (stream, acts):
        assert (source.n_layers, source.d_model) == (tiny.n_layers, tiny.d_model)
        assert source.input_scale.shape == source.target_scale.shape == (tiny.n_layers,)
        batch = next(iter(source.batches(32, "train", seed=0)))
        assert batch.inputs.shape == batch.targets.shape == (32, tiny.n_layers, tiny.d_model)
        assert batch.inputs.dtype == batch.targets.dtype == torch.float32
        store.check_compatible(source, tiny.n_layers, tiny.d_model)
    assert 0.5 < batch.inputs.pow(2).sum(-1).mean() / tiny.d_model < 2
    val = list(stream.batches(32, "val"))  # the same samples as the store's val split, so the same token count
    held_out = store.ActivationStore(captured, val_fraction=0.3)
    meta = held_out.metadata
    assert sum(len(b.inputs) for b in val) == sum(held_out.split_of_sample(s) == "val" for s in meta.sample[~meta.bos]) > 0
    # scales estimated from a few samples land near the store's exact ones
    torch.testing.assert_close(stream.input_scale, acts.input_scale, rtol=0.2, atol=0)
    with pytest.raises(ValueError, match="val_samples"):
        next(store.StreamingSource(tiny, lambda: data.iter_shapes_world(None), scale_samples=2).batches(8, "val"))
