"""The hook sites and the identities the whole course relies on."""

import pytest
import torch
from torch import nn

from clt_lite import data, sites


@pytest.fixture(scope="module")
def batch(tiny):
    return data.encode_batch(tiny.processor, data.shapes_world(3, "test"), with_answers=True)


def _forward(model, batch, **kwargs):
    with torch.no_grad():
        return model(**batch.model_inputs(model), **kwargs)


def test_identities_on_llava(tiny, batch):
    layers = sites.decoder_layers(tiny.model)
    with sites.capture(tiny.model, sites=sites.SITES) as captured:
        hidden = _forward(tiny.model, batch, output_hidden_states=True).hidden_states
    resid_mid, mlp_in, mlp_out = (captured.stack(s) for s in sites.SITES)
    assert resid_mid.shape == (*batch.input_ids.shape, tiny.n_layers, tiny.d_model)
    for l in range(tiny.n_layers):
        torch.testing.assert_close(mlp_in[..., l, :], layers[l].post_attention_layernorm(resid_mid[..., l, :]))
        if l + 1 < tiny.n_layers:  # the last hidden state has the final norm applied
            torch.testing.assert_close(hidden[l + 1], resid_mid[..., l, :] + mlp_out[..., l, :])


def test_identity_patch_leaves_logits_bit_identical(tiny, batch):
    reference = _forward(tiny.model, batch).logits
    with sites.patch_mlp_out(tiny.model, lambda layer, out, resid, mlp_in: out.clone()):
        patched = _forward(tiny.model, batch).logits
    assert torch.equal(reference, patched)


def test_patch_changes_logits_and_is_removed(tiny, batch):
    reference = _forward(tiny.model, batch).logits
    with sites.patch_mlp_out(tiny.model, lambda layer, out, resid, mlp_in: torch.zeros_like(out), layers=[1]):
        ablated = _forward(tiny.model, batch).logits
    assert not torch.allclose(reference, ablated)
    assert torch.equal(reference, _forward(tiny.model, batch).logits)


def test_hooks_are_removed_after_an_exception(tiny, batch):
    def count_hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny.model.modules())

    before = count_hooks()
    with pytest.raises(RuntimeError, match="boom"):
        with sites.capture(tiny.model, sites=sites.SITES):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        with sites.patch_mlp_out(tiny.model, lambda *a: None):
            raise RuntimeError("boom")
    assert count_hooks() == before


def test_capture_positions_and_dtype(tiny, batch):
    masks = sites.token_masks(batch.input_ids, batch.attention_mask, tiny.image_token_id, tiny.processor.tokenizer.bos_token_id)
    with sites.capture(tiny.model, positions=masks.image, dtype=torch.float16) as captured:
        _forward(tiny.model, batch)
    assert captured.stack("mlp_out").shape == (int(masks.image.sum()), tiny.n_layers, tiny.d_model)
    assert captured["mlp_out"][0].dtype == torch.float16 and not captured["mlp_out"][0].requires_grad


def test_token_masks_partition_the_sequence(tiny, batch):
    masks = sites.token_masks(batch.input_ids, batch.attention_mask, tiny.image_token_id, tiny.processor.tokenizer.bos_token_id)
    total = masks.image.int() + masks.text.int() + masks.padding.int() + masks.bos.int()
    assert torch.equal(total, torch.ones_like(total))
    assert masks.image.sum(1).tolist() == [36, 36, 36] and masks.bos[:, 0].all()


def test_sites_on_a_plain_llama_causal_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 50, (2, 7))
    with sites.capture(model) as captured, torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    assert len(sites.decoder_layers(model)) == 3
    torch.testing.assert_close(hidden[1], captured["resid_mid"][0] + captured["mlp_out"][0])


def test_unsupported_model_names_what_was_found():
    model = nn.Sequential(nn.ModuleList([nn.Linear(2, 2)]))
    with pytest.raises(ValueError, match="no Llama-style decoder layers.*module lists found: 0"):
        sites.decoder_layers(model)


def test_bad_site_and_layer_are_refused(tiny):
    with pytest.raises(ValueError, match="unknown site"):
        with sites.capture(tiny.model, sites=["resid_post"]):
            pass
    with pytest.raises(ValueError, match="out of range: the model has 4 decoder layers"):
        with sites.capture(tiny.model, layers=[4]):
            pass


def test_image_and_prompt_must_agree():
    with pytest.raises(ValueError, match="has 0 <image> tokens but one image"):
        data.check_image_tokens(["USER: hi ASSISTANT:"], [object()])
    with pytest.raises(ValueError, match="contains <image> but no image"):
        data.check_image_tokens(["USER: <image>\nhi ASSISTANT:"], None)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_identities_hold_within_one_ulp_of_the_dtype_and_fail_beyond(dtype):
    """bfloat16 rounds the residual sum far above float32's rounding: the tolerance follows the dtype."""
    from clt_lite import models

    loaded = models.load("random:tiny", device="cpu", dtype=dtype)
    batch = data.encode_batch(loaded.processor, data.shapes_world(2, "test", world=loaded.world), with_answers=True)
    with sites.capture(loaded.model, sites=sites.SITES) as captured:
        hidden = _forward(loaded.model, batch, output_hidden_states=True).hidden_states
    tolerance = sites.identity_tolerance(loaded.model.dtype)
    assert tolerance == torch.finfo(getattr(torch, dtype)).eps
    errors = sites.identity_errors(loaded.model, captured, hidden)
    assert all(0 <= error <= tolerance for error in errors.values()), errors
    captured["mlp_out"][0] = captured["mlp_out"][0] + 4 * tolerance * hidden[1].float().abs().max()  # four ulps off
    assert sites.identity_errors(loaded.model, captured, hidden)["hidden[l+1] = resid_mid + mlp_out"] > tolerance


def test_relative_error_is_at_the_scale_of_the_values():
    assert sites.relative_error(torch.tensor([100.0, 1.5]), torch.tensor([100.0, 1.0])) == pytest.approx(0.005)
