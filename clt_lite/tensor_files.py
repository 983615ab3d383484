"""Reading safetensors files with one-line errors: whole, or one tensor at a time, and checked against what is expected.

Every weights file the package reads (CLTs, checkpoints, circuit-tracer exports) goes through here, so a missing,
truncated or corrupt file is always reported the same way, naming the file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor


def _unreadable(path: Path, err: Exception) -> ValueError:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return ValueError(f"{path} is not a readable safetensors file ({reason}); re-save or re-export it")


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise ValueError(f"{path} not found; expected a folder written by CrossLayerTranscoder.save or the trainer")


def read_safetensors(path: Path, device: str | torch.device) -> dict[str, Tensor]:
    """All tensors of the file on `device`; one-line ValueError naming the file when it is missing or corrupt."""
    _check_exists(path)
    try:
        return load_file(str(path), device=str(device))
    except Exception as err:  # safetensors raises its own error type for corrupt headers and truncation
        raise _unreadable(path, err) from err


@contextmanager
def open_safetensors(path: Path, device: str | torch.device) -> Iterator:
    """The file opened for reading one tensor at a time (safe_open: memory-mapped, get_tensor / get_slice), with
    read_safetensors' one-line errors for a missing or unreadable file."""
    _check_exists(path)
    try:
        handle = safe_open(str(path), framework="pt", device=str(device))
    except Exception as err:
        raise _unreadable(path, err) from err
    with handle:
        yield handle


def load_torch_tensors(path: Path, **kwargs):
    """torch.load(path, weights_only=True) (tensors and plain containers only, never arbitrary objects), with a one-line
    ValueError when the file is missing, corrupt, or holds other pickled objects, instead of torch's advice to
    pass weights_only=False (which would run whatever the file contains)."""
    _check_exists(path)
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except Exception as err:  # UnpicklingError for foreign objects, RuntimeError for corrupt archives
        kind = "holds objects other than tensors" if "weights_only" in str(err) else "is not a readable torch file"
        raise ValueError(f"{path} {kind}; refusing to load it (nothing is unpickled): restore it from the run that "
                         "wrote it, or delete the checkpoint to start over") from None


def check_names(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], source: Path) -> None:
    """One-line ValueError when a file's tensor names or shapes are not the expected ones."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        raise ValueError(f"{source} does not match its config: missing {missing}, unexpected {extra}")
    for name, shape in expected.items():
        if found[name] != shape:
            raise ValueError(f"{source}: {name} has shape {found[name]} but the config implies {shape}")


class TensorDigest:
    """sha256 over tensors' names, dtypes, shapes and bytes, fed one tensor at a time (CPU tensors)."""

    def __init__(self):
        self._sha = hashlib.sha256()

    def update(self, name: str, tensor: Tensor) -> None:
        self._sha.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        self._sha.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())

    def hexdigest(self) -> str:
        return self._sha.hexdigest()
