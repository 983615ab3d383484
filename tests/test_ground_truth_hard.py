"""The hard ground-truth set: held-out one-object questions whose scene holds a distractor (another object sharing
the answer's colour or shape), drawn from the ordinary test stream; and the per-sample records of the hit rate."""

from types import SimpleNamespace

import pytest
import torch

from clt_lite import attribution as A
from clt_lite import data

torch.set_num_threads(1)

TOY = SimpleNamespace(world=data.WorldConfig())  # the samplers read only the model's geometry


def _target(sample):
    (target,) = [s for s in sample.shapes if s.cell == sample.target_cells[0]]
    return target


def _shares_answer(sample, other) -> bool:
    """Recomputed from the scene: the other object shows what the answer names (its colour, its shape, or either)."""
    target = _target(sample)
    same_colour, same_shape = other.colour == target.colour, other.kind == target.kind
    return {"colour": same_colour, "shape": same_shape, "describe": same_colour or same_shape}[sample.family]


def _next_to(a: int, b: int, grid: int = 3) -> bool:
    (ra, ca), (rb, cb) = divmod(a, grid), divmod(b, grid)
    return abs(ra - rb) + abs(ca - cb) == 1


@pytest.fixture(scope="module")
def hard():
    return A.hard_ground_truth_samples(TOY, 12, seed=3)


def test_hard_samples_hold_an_adjacent_distractor_sharing_the_answer_before_the_object(hard):
    assert len(hard) == 12 and [s.family for s in hard[:3]] == list(A.SINGLE_OBJECT_FAMILIES)
    for s in hard:
        assert len(s.target_cells) == 1 and s.family in A.SINGLE_OBJECT_FAMILIES
        target = _target(s)
        assert s.answer == {"colour": target.colour, "shape": target.kind, "describe": f"{target.colour} {target.kind}"}[s.family]
        assert any(_shares_answer(s, o) and _next_to(o.cell, target.cell) and o.cell < target.cell  # first in reading order
                   for o in s.shapes if o is not target), s


def test_hard_samples_are_the_test_stream_filtered_and_deterministic(hard):
    assert [(s.question, s.shapes) for s in A.hard_ground_truth_samples(TOY, 12, seed=3)] == [(s.question, s.shapes) for s in hard]
    assert [s.shapes for s in A.hard_ground_truth_samples(TOY, 12, seed=4)] != [s.shapes for s in hard]
    for family in A.SINGLE_OBJECT_FAMILIES:  # each is a sample of the test stream at the same seed (images carry
        mine = [s.image.tobytes() for s in hard if s.family == family]  # seeded noise, so they identify the draw)
        stream = [s.image.tobytes() for s in data.shapes_world(600, "test", 3, TOY.world, family=family)]
        positions = [stream.index(image) for image in mine]  # ValueError if one is not in the stream
        assert positions == sorted(positions)  # in stream order
        train = {s.image.tobytes() for s in data.shapes_world(600, "train", 3, TOY.world, family=family)}
        assert not train & set(mine)


def test_other_distractor_kinds():
    for share in ("colour", "any"):
        for s in A.hard_ground_truth_samples(TOY, 6, seed=0, share=share, adjacent=False):
            target = _target(s)
            assert any(o is not target and (o.colour == target.colour or (share == "any" and o.kind == target.kind))
                       for o in s.shapes)
    for s in A.hard_ground_truth_samples(TOY, 4, share="shape", target_second=False, families=("shape", "describe")):
        target = _target(s)
        assert any(o is not target and o.kind == target.kind and _next_to(o.cell, target.cell) for o in s.shapes)
    either_order = A.hard_ground_truth_samples(TOY, 12, seed=0, target_second=False)
    for s in either_order:
        target = _target(s)
        assert any(_shares_answer(s, o) and _next_to(o.cell, target.cell) for o in s.shapes if o is not target)
    assert any(all(o.cell > _target(s).cell for o in data.distractors(s)) for s in either_order)  # some only after it
    with pytest.raises(ValueError, match="same-shape"):
        A.hard_ground_truth_samples(TOY, 3, share="shape")
    with pytest.raises(ValueError, match="unknown distractor"):
        A.hard_ground_truth_samples(TOY, 3, share="size")


def test_unreachable_n_is_refused():
    alone = SimpleNamespace(world=data.WorldConfig(max_objects=1))  # one object per scene: never a distractor
    with pytest.raises(ValueError, match=r"only 0 of the 2 'colour' questions .* in 50 test draws"):
        A.hard_ground_truth_samples(alone, 6, max_draws=50)
    with pytest.raises(ValueError, match="only"):
        A.hard_ground_truth_samples(TOY, 30, max_draws=40)


def test_distractors_and_patch_cells():
    world = data.WorldConfig()
    assert [world.patch_cell(p) for p in world.cell_patches(4)] == [4] * 4
    assert all(world.patch_cell(p) == c for c in range(9) for p in world.cell_patches(c))
    assert sorted(data.adjacent_cells(4)) == [1, 3, 5, 7] and sorted(data.adjacent_cells(0)) == [1, 3]
    sample = data.Sample(None, "What color is the circle?", "red", "colour", [0],
                         [data.Shape("circle", "red", 0), data.Shape("square", "red", 4), data.Shape("square", "blue", 1)])
    assert data.distractors(sample) == [sample.shapes[1]]
    assert data.distractors(sample, "shape") == [] and len(data.distractors(sample, "any")) == 1
    with pytest.raises(ValueError, match="no single object"):
        data.distractors(data.shapes_world(1, "test", family="count")[0])


def test_hit_rate_records_each_sample(tiny):
    from test_attribution import random_clt

    samples = A.hard_ground_truth_samples(tiny, 3, seed=1)
    clt = random_clt(tiny, samples)
    truth = A.ground_truth_hit_rate(tiny, clt, samples + data.shapes_world(1, "test", family="count"), max_n_logits=2)
    assert truth.n == 3 and [r.index for r in truth.samples] == [0, 1, 2]
    for record, sample in zip(truth.samples, samples):
        token = A.answer_token(tiny, sample.answer)
        graph = A.attribute(tiny, clt, sample, target_token=token, max_n_logits=2)
        influence, gradient = A.patch_influence(graph), A.gradient_x_input(tiny, sample, token)
        assert record.graph_patch == int(influence.argmax()) and record.gradient_patch == int(gradient.argmax())
        for shares, scores in ((record.graph_shares, influence), (record.gradient_shares, gradient)):
            assert len(shares) == 9 and sum(shares) == pytest.approx(1.0)
            cell = sample.target_cells[0]
            assert shares[cell] == pytest.approx(float(scores[tiny.world.cell_patches(cell)].sum() / scores.sum()), rel=1e-5)
        assert record.target_cell == sample.target_cells[0] and record.family == sample.family
        assert record.graph_hit == (record.graph_patch in tiny.world.cell_patches(record.target_cell))
    assert truth.graph_hit_rate == pytest.approx(sum(r.graph_hit for r in truth.samples) / 3)
    assert truth.gradient_hit_rate == pytest.approx(sum(r.gradient_hit for r in truth.samples) / 3)
    assert truth.disagreements() == [r for r in truth.samples if r.graph_hit != r.gradient_hit]
