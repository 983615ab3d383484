"""Route shares through attention from the object's patches (clt_lite.attribution.circuits)."""

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
    shares = A.route_shares(tiny, clt, sample, layer=1, head=0)
    assert len(shares.per_layer) == tiny.n_layers and shares.layer == 1 and shares.head_index == 0
    local = A.LocalReplacement(tiny, clt, sample)
    positions = A.object_positions(tiny, sample, local.recorded.input_ids)
    token = int(local.recorded.logits[-1].argmax())
    expected = 1 - _object_contribution(local, positions, token, [(1, [0])]) / shares.contribution
    assert shares.head == pytest.approx(expected, abs=1e-5)


def test_route_shares_reject_bad_requests(tiny, clt, sample):
    with pytest.raises(ValueError, match="does not exist"):
        A.route_shares(tiny, clt, sample, layer=tiny.n_layers, head=0)
    count = data.Sample(sample.image, "Hello?", "", "text")
    with pytest.raises(ValueError, match="names no object"):
        A.route_shares(tiny, clt, count, layer=0)
