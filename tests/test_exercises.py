"""Each exercise check fails on its stub and on the typical wrong answers (with the matching hint), and passes on the solution."""

import pytest
import torch

from clt_lite import data, exercises
from clt_lite.exercises import ExerciseFailed


def stub(*args):
    raise NotImplementedError


@pytest.fixture(scope="module")
def inputs(tiny):
    return data.encode_batch(tiny.processor, data.shapes_world(2, "test", world=tiny.world)).model_inputs(tiny.model)


WRONG = {
    "rms_norm": [(lambda x, w, eps: (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True, unbiased=False) + eps).sqrt() * w, "LayerNorm"),
                 (lambda x, w, eps: x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt(), "weight is missing")],
    "fvu": [(lambda r, t: (t - r).pow(2).sum(-1).sum(0) / t.pow(2).sum(-1).sum(0), "centre the target"),
            (lambda r, t: (t - r).pow(2).mean(-1).mean(0), "mean squared error")],
    "topk": [(lambda p, k: torch.zeros_like(p).scatter(-1, p.topk(k, -1).indices, p.topk(k, -1).values), "ReLU"),
             (lambda p, k: p.relu(), "only k latents")],
    "cross_layer_decode": [(lambda a, ds, c: exercises.cross_layer_decode(a, [W[:, :1] for W in ds], 1), "per-layer transcoder"),
                           (lambda a, ds, c: torch.einsum("bln,nld->bld", a, torch.stack([W[:, 0] for W in ds], 1)), "per-layer")],
}
CHECKS = {"rms_norm": exercises.check_rms_norm, "fvu": exercises.check_fvu, "topk": exercises.check_topk,
          "cross_layer_decode": exercises.check_cross_layer_decode}


@pytest.mark.parametrize("name", list(CHECKS))
def test_checks_fail_on_stubs_and_wrong_answers_and_pass_on_solutions(name):
    check = CHECKS[name]
    with pytest.raises(ExerciseFailed, match="not written yet"):
        check(stub)
    for wrong, hint in WRONG[name]:
        with pytest.raises(ExerciseFailed, match=hint):
            check(wrong)
    assert check(exercises.solution(name)) == f"{name}: correct"


def test_capture_hook_check_names_the_wrong_site_and_a_leftover_hook(tiny, inputs):
    from clt_lite.sites import decoder_layers

    check = exercises.check_capture_mlp_in
    with pytest.raises(ExerciseFailed, match="not written yet"):
        check(stub, tiny.model, inputs, 1)

    def output_not_input(model, inputs, layer):
        seen = []
        handle = decoder_layers(model)[layer].mlp.register_forward_hook(lambda m, a, out: seen.append(out))
        with torch.no_grad():
            model(**inputs)
        handle.remove()
        return seen[0]

    def leaves_hook(model, inputs, layer):
        seen = []
        decoder_layers(model)[layer].mlp.register_forward_hook(lambda m, a, out: seen.append(a[0]))
        with torch.no_grad():
            model(**inputs)
        return seen[0]

    with pytest.raises(ExerciseFailed, match="mlp_out"):
        check(output_not_input, tiny.model, inputs, 1)
    with pytest.raises(ExerciseFailed, match="still attached"):
        check(leaves_hook, tiny.model, inputs, 1)
    decoder_layers(tiny.model)[1].mlp._forward_hooks.clear()  # the leftover hook of the wrong answer above
    assert check(exercises.solution("capture_mlp_in"), tiny.model, inputs, 1) == "capture_mlp_in: correct"


def test_every_exercise_has_a_solution_and_a_table_row():
    assert set(exercises.EXERCISES) == set(exercises.SOLUTIONS)
    assert len(exercises.table().splitlines()) == len(exercises.EXERCISES)
    with pytest.raises(ValueError, match="no exercise 'x'"):
        exercises.solution("x")
