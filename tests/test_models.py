import pytest
import torch

from clt_lite import models


def test_random_tiny_loads_on_cpu_in_float32(tiny):
    assert type(tiny.model).__name__ == "LlavaForConditionalGeneration"
    assert next(tiny.model.parameters()).dtype == torch.float32
    assert (tiny.n_layers, tiny.d_model) == (4, 64)


def test_llava_7b_preset_has_the_real_shapes():
    config = models.random_config("llava-1.5-7b")
    text, vision = config.text_config, config.vision_config
    assert (text.num_hidden_layers, text.hidden_size, text.intermediate_size) == (32, 4096, 11008)
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers) == (336, 14, 1024, 24)
    assert config.image_seq_length == (336 // 14) ** 2


def test_auto_dtype_is_float32_on_cpu_and_bfloat16_on_cuda():
    assert models.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert models.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


@pytest.mark.parametrize("call, message", [
    (lambda: models.resolve_dtype("float8", torch.device("cpu")), "unknown dtype"),
    (lambda: models.resolve_device("tpu"), "unknown device"),
    (lambda: models.load("random:gpt-5"), "unknown random preset"),
    (lambda: models.load("./no/such/folder"), "does not exist"),
    (lambda: models.load("llava-hf/llava-1.5-7b-hf"), "no local copy"),
])
def test_bad_names_get_one_line_errors(call, message):
    with pytest.raises((ValueError, OSError)) as error:
        call()
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_without_gpu_says_so():
    with pytest.raises(ValueError, match="no CUDA GPU"):
        models.resolve_device("cuda")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.load(str(tmp_path))


def test_fingerprint_follows_the_weights_not_the_name():
    own = models.load("random:tiny", device="cpu")  # its own copy: the session's `tiny` is shared by other tests
    before = own.fingerprint()
    assert before == own.fingerprint() and len(before) == 16
    with torch.no_grad():
        next(own.model.parameters())[0].add_(1.0)
    assert own.fingerprint() != before
    assert models.load("random:tiny", device="cpu").fingerprint() == before  # same weights, same fingerprint


def test_depth_override_keeps_every_other_size_of_llava_7b():
    config = models.random_config("random:llava-1.5-7b@layers=2,vision_layers=3")
    text, vision = config.text_config, config.vision_config
    assert (text.num_hidden_layers, vision.num_hidden_layers) == (2, 3)
    assert (text.hidden_size, text.num_attention_heads, text.intermediate_size, text.vocab_size) == (4096, 32, 11008, 32064)
    assert (vision.image_size, vision.patch_size, config.image_seq_length, config.image_token_index) == (336, 14, 576, 32000)


def test_llava_7b_processor_has_the_real_special_ids_context_and_576_image_tokens():
    from clt_lite import data

    config = models.random_config("random:llava-1.5-7b@layers=1")
    processor = models.random_processor(config)
    tokenizer = processor.tokenizer
    assert len(tokenizer) == 32064 and tokenizer.model_max_length == 4096
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 32001)
    assert tokenizer.convert_tokens_to_ids("<image>") == 32000
    vision = config.vision_config
    world = data.WorldConfig(image_size=vision.image_size, patch_size=vision.patch_size)
    batch = data.encode_batch(processor, data.shapes_world(2, "test", world=world), with_answers=True)
    assert batch.pixel_values.shape[-2:] == (336, 336)
    assert ((batch.input_ids == 32000).sum(1) == 576).all()
    assert world.patches_per_side == 24 and len(world.cell_patches(4)) == 8 * 8


@pytest.mark.parametrize("name, message", [
    ("random:llava-1.5-7b@layers=0", "out of range: llava-1.5-7b has 32; use 1..32"),
    ("random:llava-1.5-7b@layers=33", "out of range"),
    ("random:llava-1.5-7b@vision_layers=25", "out of range: llava-1.5-7b has 24"),
    ("random:llava-1.5-7b@depth=2", "unknown override 'depth'"),
    ("random:llava-1.5-7b@layers=two", "not a whole number"),
    ("random:llava-2@layers=2", "unknown random preset"),
])
def test_bad_overrides_get_one_line_errors(name, message):
    with pytest.raises(ValueError) as error:
        models.random_config(name)
    assert message in str(error.value) and "\n" not in str(error.value)
