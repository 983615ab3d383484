"""The package's one way to write a file or a folder: a kill or a full disk never leaves half of one.

Everything that persists work (store shards and manifests, CLT weights, checkpoints' pointers, graphs,
course results) goes through `atomic_write`: write a hidden temporary sibling, flush it to disk, then
rename it over the target. Readers see the old file or the new one, and a failed write removes its
temporary file instead of leaving it behind. Folders that are replaced as a whole (checkpoints) go through
`write_version`: the new version is filled in a temporary folder and renamed into place, and one atomic
pointer file (latest.json) names the current one, so a reader never sees a mix of two versions.
"""

from __future__ import annotations

import json
import os
import shutil
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


LATEST = "latest.json"


def write_version(root: str | os.PathLike, name: str, write: Callable[[Path], None], **pointer) -> Path:
    """Fill a new folder root/name with write(folder), then make it the current version in one atomic rename.

    write() fills a temporary sibling; it is renamed to root/name, root/latest.json is rewritten (atomically) to
    name it, with any `pointer` fields beside, and the other versions are removed. A kill at any moment leaves
    latest.json naming a complete folder (or no latest.json at all, before the first version).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / name, root / f".{name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_json(root / LATEST, {**pointer, "dir": name}, indent=None)
    for old in root.iterdir():
        if old.is_dir() and old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_version(root: str | os.PathLike) -> Path | None:
    """The folder root/latest.json names (the newest complete version), or None when there is none yet."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    return pointer.parent / json.loads(pointer.read_text())["dir"]
