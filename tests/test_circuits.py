"""Route shares through attention from the object's patches (clt_lite.attribution.circuits)."""

from types import SimpleNamespace

import pytest
import torch
from test_attribution import random_clt

from clt_lite import attribution as A
from clt_lite import data
from clt_lite.attribution.circuits import _object_contribution

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sample(tiny):
    return data.shapes_world(1, "test", seed=2, world=tiny.world, family="colour")[0]


@pytest.fixture(scope="module")
def clt(tiny, sample):
    return random_clt(tiny, [sample])


def test_cutting_attention_from_the_object_everywhere_leaves_nothing(tiny, clt, sample):
    local = A.LocalReplacement(tiny, clt, sample)
    positions = A.object_positions(tiny, sample, local.recorded.input_ids)
    token = int(local.recorded.logits[-1].argmax())
    total = _object_contribution(local, positions, token, [])
    heads = range(local.frozen.patterns[0].shape[0])
    assert abs(total) > 1e-4
    assert _object_contribution(local, positions, token, [(l, heads) for l in range(tiny.n_layers)]) == pytest.approx(0, abs=1e-5)
    # the last layer alone is not every route, and the frozen patterns are left as they were
    assert _object_contribution(local, positions, token, [(tiny.n_layers - 1, heads)]) != pytest.approx(0, abs=1e-5)
    assert _object_contribution(local, positions, token, []) == pytest.approx(total, rel=1e-6)


def test_route_shares_per_layer_and_head(tiny, clt, sample):
    shares = A.route_shares(tiny, clt, sample, heads=[(1, 0)])
    assert len(shares.per_layer) == tiny.n_layers and shares.heads == [(1, 0)]
    local = A.LocalReplacement(tiny, clt, sample)
    positions = A.object_positions(tiny, sample, local.recorded.input_ids)
    token = int(local.recorded.logits[-1].argmax())
    expected = 1 - _object_contribution(local, positions, token, [(1, [0])]) / shares.contribution
    assert shares.through_heads == pytest.approx(expected, abs=1e-5)
    assert shares.through_their_layers == pytest.approx(shares.per_layer[1], abs=1e-6)


def test_route_shares_through_heads_in_two_layers_cut_together(tiny, clt, sample):
    """A grown toy's known circuit is one head copied into adjacent layers: both are cut at once. A route leaves the
    object's patches once (at the first attention that reads it to another position), so the shares of different
    layers add up; the test checks that too."""
    shares = A.route_shares(tiny, clt, sample, heads=[(0, 0), (1, 0)])
    local = A.LocalReplacement(tiny, clt, sample)
    positions = A.object_positions(tiny, sample, local.recorded.input_ids)
    token = int(local.recorded.logits[-1].argmax())
    together = 1 - _object_contribution(local, positions, token, [(0, [0]), (1, [0])]) / shares.contribution
    every_head = range(local.frozen.patterns[0].shape[0])
    both_layers = 1 - _object_contribution(local, positions, token, [(0, every_head), (1, every_head)]) / shares.contribution
    assert shares.through_heads == pytest.approx(together, abs=1e-5)
    assert shares.through_their_layers == pytest.approx(both_layers, abs=1e-5)
    assert shares.through_their_layers == pytest.approx(shares.per_layer[0] + shares.per_layer[1], abs=1e-4)


def test_known_heads_of_a_grown_toy_are_the_copies_of_the_supervised_head(tiny):
    from clt_lite import toy

    assert toy.supervised_heads(16) == [(8, 0)]
    assert toy.supervised_heads(32, grow_from=16) == [(16, 0), (17, 0)]
    assert toy.supervised_heads(32, grow_from=8) == [(16, 0), (17, 0), (18, 0), (19, 0)]
    assert toy.known_heads(tiny) == [(tiny.n_layers // 2, 0)]
    shipped = {name: toy.known_heads(SimpleNamespace(name=name, n_layers=n)) for name, n in
               [("tiny-llava-shapes", 16), ("tiny-llava-shapes-32", 32)]}
    assert shipped == {"tiny-llava-shapes": [(8, 0)], "tiny-llava-shapes-32": [(16, 0), (17, 0)]}


def test_route_shares_reject_bad_requests(tiny, clt, sample):
    with pytest.raises(ValueError, match="does not exist"):
        A.route_shares(tiny, clt, sample, heads=[(tiny.n_layers, 0)])
    count = data.Sample(sample.image, "Hello?", "", "text")
    with pytest.raises(ValueError, match="names no object"):
        A.route_shares(tiny, clt, count, heads=[(0, 0)])
