"""The notebook harness: parameters match the CPU config, nbval really checks, errors are clear."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from clt_lite import cli, notebooks
from clt_lite.nbval_tolerance import Tolerance, numbers_agree, parse_tolerance

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


def _nbval(path: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """nbval on a notebook (or a folder of them) as `make test` runs it, in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path), "--nbval-lax", "--nbval-current-env",
         "--nbval-sanitize-with", str(ROOT / "tests" / "sanitize.cfg"), "--nbval-cell-timeout", "1800"],
        capture_output=True, text=True, cwd=path if path.is_dir() else path.parent, timeout=timeout,
        env=None if env is None else {**os.environ, **env},
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


def test_numbers_agree_only_within_tolerance_and_with_the_same_text():
    tolerance = Tolerance(abs=0.02, rel=0.05)
    assert numbers_agree("KL 1.0313, top1 0.975, kept 4,165 edges", "KL 1.0409, top1 0.960, kept 4,077 edges", tolerance)
    assert not numbers_agree("top1 0.975", "top1 0.900", tolerance)  # 0.075 > 0.02 + 0.05 * 0.975
    assert not numbers_agree("kept 4,165 edges", "kept 3,900 edges", tolerance)
    assert not numbers_agree("CLT better 0.9", "PLT better 0.9", tolerance)  # words are exact
    assert not numbers_agree("[1, 2]", "[1, 2, 3]", tolerance)
    assert numbers_agree("gen tok nan", "gen tok nan", tolerance) and not numbers_agree("nan", "0.5", tolerance)
    assert parse_tolerance("# NBVAL_CHECK_OUTPUT\n# TOLERANCE abs=0.03 (spread 0.01)\nprint(1)") == Tolerance(0.03, 0.0)
    assert parse_tolerance("print(1)") is None
    with pytest.raises(ValueError, match="TOLERANCE"):
        parse_tolerance("# TOLERANCE absolute=3")


def _one_cell_notebook(path: Path, source: str, committed_output: str) -> Path:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(source, execution_count=1)
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=committed_output)]
    nb.cells = [cell]
    nbformat.write(nb, path)
    return path


@pytest.mark.parametrize("committed, passes", [("0.5050\n", True), ("0.4900\n", True), ("0.5300\n", False)])
def test_nbval_applies_a_cells_tolerance_and_still_fails_beyond_it(tmp_path, committed, passes):
    source = "# NBVAL_CHECK_OUTPUT\n# TOLERANCE abs=0.01 rel=0.01\nprint(f'{0.5:.4f}')"
    result = _nbval(_one_cell_notebook(tmp_path / "tolerant.ipynb", source, committed))
    assert (result.returncode == 0) == passes, result.stdout[-2000:]


def test_nbval_stays_exact_in_a_cell_without_tolerance(tmp_path):
    result = _nbval(_one_cell_notebook(tmp_path / "exact.ipynb", "# NBVAL_CHECK_OUTPUT\nprint(f'{0.5:.4f}')", "0.5050\n"))
    assert result.returncode != 0 and "1 failed" in result.stdout


# Another CPU kernel path than the one that wrote the committed outputs: AVX2 instead of AVX-512 in ATen's kernels
# and MKL's GEMMs (a different grouping of every fused multiply-add). A few hundred optimizer steps carry the
# last-bit differences into the third decimal of a trained CLT's metrics; the TOLERANCE lines must absorb it.
# This is `make test`'s only run of the notebooks: on the machine that wrote the outputs, a run on its own kernel
# path would reproduce them bit for bit and could not catch a tolerance that is too tight.
KERNEL_VARIANT = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


@pytest.mark.slow
def test_checked_outputs_hold_from_an_empty_cache_on_another_kernel_path(tmp_path):
    """Every notebook, top to bottom, from an empty cache on another kernel path, checked by nbval.

    The copies sit in tmp_path/notebooks, so their run_dir (../runs/cpu) is an empty cache: the store is
    captured and every CLT trained again under KERNEL_VARIANT, then nbval compares with the committed outputs.
    """
    folder = tmp_path / "notebooks"
    folder.mkdir()
    for path in NOTEBOOKS:
        shutil.copy(path, folder)
    result = _nbval(folder, env=KERNEL_VARIANT, timeout=5400)
    failures = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
    assert result.returncode == 0, "\n".join(failures) + "\n" + result.stdout[-6000:]


def test_notebooks_command_rejects_bad_input(capsys):
    assert cli.main(["notebooks", "--config", "configs/nope.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["notebooks", "--only", "99"]) == 2
    assert "no notebook numbered 99" in capsys.readouterr().err


def test_without_solutions_a_notebook_stops_at_its_first_exercise(tmp_path):
    """A learner's run (solutions = False) stops at the first unwritten exercise and says which one."""
    import papermill

    with pytest.raises(papermill.PapermillExecutionError) as error:
        papermill.execute_notebook(str(ROOT / "notebooks" / "01_hooking_llava.ipynb"), str(tmp_path / "01.ipynb"),
                                   parameters={"solutions": False, "run_dir": str(tmp_path)}, cwd=str(ROOT / "notebooks"),
                                   kernel_name="python3", progress_bar=False)
    assert error.value.ename == "ExerciseFailed" and "capture_mlp_in: not written yet" in error.value.evalue


def test_make_run_reports_each_notebook_and_writes_figures_under_runs(monkeypatch, capsys):
    """`make run` (the CPU config, no --figures) talks as it goes and never writes over the committed figures/."""
    import papermill

    calls = []
    monkeypatch.setattr(papermill, "inspect_notebook", lambda path: {"figure_dir": None, "run_dir": None, "seed": None})
    monkeypatch.setattr(papermill, "execute_notebook", lambda path, output, parameters, **kw: calls.append((parameters, kw)))
    assert cli.main(["notebooks", "--config", "configs/cpu.yaml", "--only", "00", "01"]) == 0
    printed = capsys.readouterr().out
    assert "[1/2] 00_setup.ipynb ..." in printed and "[2/2] 01_hooking_llava.ipynb:" in printed
    assert "all" in printed.splitlines()[-1]
    for parameters, options in calls:
        figure_dir = (ROOT / "notebooks" / parameters["figure_dir"]).resolve()
        assert figure_dir.is_relative_to(ROOT / "runs") and options["progress_bar"] is True
    assert "--figures" not in (ROOT / "Makefile").read_text().split("\nrun:", 1)[1].split("\n\n", 1)[0]


def test_a_failing_notebook_is_named_with_its_cell_in_one_line(monkeypatch, capsys):
    import papermill
    from papermill.exceptions import PapermillExecutionError

    def fail(path, output, **kw):
        raise PapermillExecutionError(cell_index=3, exec_count=4, source="x", ename="ValueError", evalue="bad k", traceback=[])

    monkeypatch.setattr(papermill, "inspect_notebook", lambda path: {})
    monkeypatch.setattr(papermill, "execute_notebook", fail)
    assert cli.main(["notebooks", "--config", "configs/cpu.yaml", "--only", "03"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "03_training_the_clt.ipynb failed in cell 4: ValueError: bad k" in error


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_name_the_installed_kernel_so_opening_one_does_not_modify_it(path):
    """JupyterLab marks a notebook modified when its kernelspec differs from the installed kernel's (make setup's)."""
    from jupyter_client.kernelspec import KernelSpecManager

    installed = KernelSpecManager().get_kernel_spec("python3")
    assert json.loads(path.read_text())["metadata"]["kernelspec"] == {
        "display_name": installed.display_name, "language": installed.language, "name": "python3"}


def test_a_config_extends_another_and_a_cycle_is_refused(tmp_path):
    sixteen = notebooks.load_config(ROOT / "configs" / "cpu16.yaml")
    course = notebooks.load_config(ROOT / "configs" / "cpu.yaml")
    assert sixteen["model"] == "tiny-llava-shapes" and course["model"] == "tiny-llava-shapes-32"
    assert {key: value for key, value in sixteen.items() if course[key] != value} == {
        "model": "tiny-llava-shapes", "expansion_factor": 8, "train_tokens": 262144, "eval_samples": 200, "closed_loop_steps": 50,
        "max_feature_nodes": 4096, "ground_truth_max_features": 1024, "ground_truth_prompts": 60,
        "hard_prompts": 30, "flip_prompts": 12, "route_prompts": 8}
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nk: 1\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ValueError, match="extends itself"):
        notebooks.load_config(tmp_path / "a.yaml")
