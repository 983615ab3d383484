"""The package's one way to write a file: a kill or a full disk never leaves half of one.

Everything that persists work (store shards and manifests, CLT weights, checkpoints' pointers, graphs,
course results) goes through `atomic_write`: write a hidden temporary sibling, flush it to disk, then
rename it over the target. Readers see the old file or the new one, and a failed write removes its
temporary file instead of leaving it behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temporary sibling of `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, payload: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(payload))


def write_json(path: str | os.PathLike, obj, indent: int | None = 1) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=indent) + "\n"))
