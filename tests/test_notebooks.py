"""The notebook harness: parameters match the CPU config, nbval really checks, errors are clear."""

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from clt_lite import cli, notebooks

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _parameters(path: Path) -> dict:
    nb = nbformat.read(path, as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    namespace: dict = {}
    exec(cell.source, namespace)
    return {k: v for k, v in namespace.items() if not k.startswith("__")}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_parameter_defaults_equal_the_cpu_config(path):
    """The committed outputs are the CPU config's outputs only if the defaults are that config."""
    defaults = _parameters(path)
    cpu = notebooks.load_config(ROOT / "configs" / "cpu.yaml")
    for key in ("model", "device", "dtype", "seed"):
        assert key in defaults, f"{path.name} lacks the common parameter {key}"
    for key, value in defaults.items():
        if key not in ("run_dir", "figure_dir"):
            assert cpu.get(key) == value, f"{path.name}: {key}={value!r}, cpu.yaml says {cpu.get(key)!r}"
    assert defaults["run_dir"] == "../runs/cpu" and defaults["figure_dir"].startswith("../runs/")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_committed_executed_and_checked(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code]
    assert None not in counts and counts == sorted(counts), "re-run the notebook top to bottom before committing"
    assert any("NBVAL_CHECK_OUTPUT" in c.source for c in code), "nothing in it would be checked by nbval"


def _nbval(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path), "--nbval-lax", "--nbval-current-env",
         "--nbval-sanitize-with", str(ROOT / "tests" / "sanitize.cfg")],
        capture_output=True, text=True, cwd=path.parent, timeout=300,
    )


def test_nbval_fails_when_a_checked_output_changes(tmp_path):
    source = ROOT / "notebooks" / "00_setup.ipynb"
    unchanged = tmp_path / "unchanged.ipynb"
    unchanged.write_text(source.read_text())
    nb = json.loads(source.read_text())
    checked = [c for c in nb["cells"] if c["cell_type"] == "code" and "NBVAL_CHECK_OUTPUT" in "".join(c["source"])]
    checked[0]["outputs"][0]["text"] = ["device: cuda | dtype: torch.bfloat16\n"]
    changed = tmp_path / "changed.ipynb"
    changed.write_text(json.dumps(nb))
    assert _nbval(unchanged).returncode == 0
    result = _nbval(changed)
    assert result.returncode != 0 and "1 failed" in result.stdout


def test_notebooks_command_rejects_bad_input(capsys):
    assert cli.main(["notebooks", "--config", "configs/nope.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["notebooks", "--only", "99"]) == 2
    assert "no notebook numbered 99" in capsys.readouterr().err
