"""Each exercise check fails on its stub and on the typical wrong answers (with the matching hint), and passes on the solution."""

import pytest
import torch

from clt_lite import attribution, data, exercises
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
    "layer_scale": [(lambda a: (a.pow(2).sum(-1).mean(0) / a.shape[-1]).sqrt(), "quiet layers quieter"),
                    (lambda a: (a.shape[-1] / a.norm(dim=-1).mean(0).pow(2)).sqrt(), "squared"),
                    (lambda a: a.pow(2).sum(-1).mean(0).rsqrt(), "mean squared norm to 1")],
    "cell_patches": [(lambda c, n, s: exercises.cell_patches((c % n) * n + c // n, n, s), "swapped"),
                     (lambda c, n, s: [(c // n * (s // n) + i) * (s // n) + c % n * (s // n) + j
                                       for i in range(s // n) for j in range(s // n)], "row \\* patches_per_side")],
    "kl_divergence": [(lambda p, q: exercises.kl_divergence(q, p), "KL\\(replacement"),
                      (lambda p, q: torch.nn.functional.kl_div(q.log_softmax(-1), p.log_softmax(-1), log_target=True,
                                                               reduction="sum"), "summed over positions"),
                      (lambda p, q: (p.softmax(-1) * (p - q)).sum(-1).mean(), "log_softmax")],
    "edge_weights": [(lambda a, dec, r: r @ dec.T, "activation is missing"),
                     (lambda a, dec, r: (dec * a[:, None] @ r.T).T.abs(), "signed")],
    "influence": [(lambda A, w: w @ attribution.normalize_rows(A), "direct effect"),
                  (lambda A, w: attribution.influence(A, w) + w, "identity")],
}
CHECKS = {"rms_norm": exercises.check_rms_norm, "fvu": exercises.check_fvu, "topk": exercises.check_topk,
          "cross_layer_decode": exercises.check_cross_layer_decode, "layer_scale": exercises.check_layer_scale,
          "cell_patches": exercises.check_cell_patches, "kl_divergence": exercises.check_kl_divergence,
          "edge_weights": exercises.check_edge_weights, "influence": exercises.check_influence}


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


def test_replace_one_layer_check_names_a_hook_that_returns_nothing_or_adds(tiny, inputs):
    from clt_lite.sites import decoder_layers

    check = exercises.check_replace_one_layer
    with pytest.raises(ExerciseFailed, match="not written yet"):
        check(stub, tiny.model, inputs, 2)

    def run_with_hook(hook):
        def replace(model, inputs, layer, transcoder):
            handle = decoder_layers(model)[layer].mlp.register_forward_hook(lambda m, a, out: hook(out, transcoder(a[0])))
            try:
                with torch.no_grad():
                    return model(**inputs).logits
            finally:
                handle.remove()
        return replace

    with pytest.raises(ExerciseFailed, match="returns"):
        check(run_with_hook(lambda out, new: None), tiny.model, inputs, 2)
    with pytest.raises(ExerciseFailed, match="added the reconstruction"):
        check(run_with_hook(lambda out, new: out + new), tiny.model, inputs, 2)
    assert check(exercises.solution("replace_one_layer"), tiny.model, inputs, 2) == "replace_one_layer: correct"


def test_the_references_agree_with_the_library(tiny):
    """The references learners are checked against compute what clt_lite itself computes."""
    from clt_lite import store

    g = torch.Generator().manual_seed(0)
    adjacency, weights = torch.randn(9, 9, generator=g).tril(-1), torch.rand(9, generator=g)
    assert torch.allclose(exercises.influence(adjacency, weights), attribution.influence(adjacency, weights))
    world = tiny.world
    for cell in range(world.grid**2):
        assert exercises.cell_patches(cell, world.grid, world.patches_per_side).tolist() == world.cell_patches(cell)
    acts = torch.randn(40, 3, 8, generator=g)
    assert torch.allclose(exercises.layer_scale(acts), store._scale(acts.pow(2).sum(-1).mean(0).tolist(), 8))
