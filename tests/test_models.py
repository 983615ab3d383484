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


def test_fingerprint_follows_the_weights_not_the_name(tiny):
    before = tiny.fingerprint()
    assert before == tiny.fingerprint() and len(before) == 16
    weight = next(tiny.model.parameters())
    with torch.no_grad():
        weight[0].add_(1.0)
        changed = tiny.fingerprint()
        weight[0].sub_(1.0)
    assert changed != before
