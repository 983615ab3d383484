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


def test_a_new_version_becomes_current_in_one_rename_and_a_failed_one_leaves_the_old(tmp_path):
    from clt_lite.files import latest_version, write_version

    assert latest_version(tmp_path) is None
    write_version(tmp_path, "step-1", lambda folder: (folder / "a.txt").write_text("one"), step=1)
    assert (latest_version(tmp_path) / "a.txt").read_text() == "one"

    def dies_halfway(folder):
        (folder / "a.txt").write_text("two")
        raise KeyboardInterrupt  # a kill while the new version is being written

    with pytest.raises(KeyboardInterrupt):
        write_version(tmp_path, "step-2", dies_halfway, step=2)
    assert (latest_version(tmp_path) / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-1"]  # no temporary folder left
    write_version(tmp_path, "step-2", lambda folder: (folder / "a.txt").write_text("two"), step=2)
    assert latest_version(tmp_path).name == "step-2" and not (tmp_path / "step-1").exists()
