"""The one atomic writer: the old file or the new one, never half, and no temporary file left behind."""

import pytest

from clt_lite import files


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "result.json"
    files.write_json(target, {"a": 1})
    files.write_json(target, {"a": 2})
    assert target.read_text() == '{\n "a": 2\n}\n' and [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    target = tmp_path / "weights.bin"
    files.write_bytes(target, b"old")

    def half_then_fail(tmp):
        tmp.write_bytes(b"ha")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        files.atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["weights.bin"]
