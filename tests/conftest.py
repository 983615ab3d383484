import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """A random-weight LLaVA at test size (4 layers, width 64), float32 on the CPU."""
    from clt_lite import models

    return models.load("random:tiny", device="cpu")
