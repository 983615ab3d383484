"""Run the course notebooks with papermill, in order, with a config's parameters."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import NamedTuple

import yaml

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"


class NotebookRun(NamedTuple):
    notebook: str  # file name, e.g. 01_hooking_llava.ipynb
    output: Path  # the executed copy
    seconds: float  # wall time


def load_config(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A papermill parameter set (YAML mapping of parameter -> value).

    `extends: other.yaml` (relative to this file) starts from that config; this file's values win.
    """
    path = Path(path)
    if path.resolve() in _seen:
        raise ValueError(f"config {path} extends itself (through {' -> '.join(p.name for p in _seen)}); break the cycle")
    if not path.exists():
        raise FileNotFoundError(f"config {path} does not exist; see configs/ for the shipped ones")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"config {path} is not valid YAML ({str(error).splitlines()[0]}); compare it with configs/cpu.yaml") from None
    if not isinstance(config, dict):
        raise ValueError(f"config {path} must be a mapping of parameter: value")
    if base := config.pop("extends", None):
        config = {**load_config(path.parent / base, (*_seen, path.resolve())), **config}
    return config


def notebook_paths(only: list[str] | None = None) -> list[Path]:
    """Course notebooks in order; `only` keeps those whose number prefix is listed (e.g. ['01'])."""
    paths = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    if only:
        paths = [p for p in paths if p.name[:2] in only]
        if not paths:
            raise ValueError(f"no notebook numbered {', '.join(only)} in {NOTEBOOK_DIR}")
    return paths


def _local_kernel_manager(socket_dir: Path):
    """A kernel manager whose kernels talk over local IPC sockets instead of TCP (Linux and macOS):
    nothing listens on a port, and ipykernel has no unencrypted-TCP warning to print for every notebook.
    The sockets live in socket_dir (not the notebooks' working folder, where they would be left behind)."""
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class LocalKernelManager(AsyncKernelManager):
        @default("transport")
        def _default_transport(self):
            return "ipc"

        @default("ip")
        def _default_ip(self):
            return str(socket_dir / "kernel")

    return LocalKernelManager


def run_notebooks(config_path: str | Path, only: list[str] | None = None, figure_dir: str | None = None,
                  in_place: bool = False, progress: bool = True) -> list[NotebookRun]:
    """Execute notebooks in order; stop at the first failure, naming notebook and cell.

    Executed copies go to runs/<config name>/, figures to runs/<config name>/figures/ unless
    figure_dir (relative to notebooks/) says otherwise.
    in_place: execute with the notebooks' own defaults (the CPU config, which a test
    keeps equal to cpu.yaml) and overwrite them: how the committed outputs are made.
    progress: a line as each notebook starts and ends (its time and the figures it wrote) and a bar of
    cells done for the running one.
    """
    run_name = Path(config_path).stem
    if in_place:  # no parameters: papermill injects no cell, the committed source stays clean
        if figure_dir is not None:
            raise ValueError("--in-place runs the notebooks' own defaults; copy figures from runs/cpu/figures instead of --figures")
        parameters = {}
    else:
        parameters = load_config(config_path)
        parameters.setdefault("run_dir", f"../runs/{run_name}")
        # Figures go beside the run, never over the committed figures/ (float noise moves pixels between machines);
        # maintainers refresh those with `make figures`.
        parameters.setdefault("figure_dir", f"../runs/{run_name}/figures")
        if figure_dir is not None:
            parameters["figure_dir"] = figure_dir
    out_dir = ROOT / "runs" / run_name
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = notebook_paths(only)
    figures = Path(parameters.get("figure_dir", "../runs/cpu/figures"))  # in place: the notebooks' own default
    figures = figures if figures.is_absolute() else (NOTEBOOK_DIR / figures).resolve()
    with tempfile.TemporaryDirectory(prefix="clt-lite-kernels-") as sockets:
        return _run_each(paths, parameters, out_dir, in_place, progress, figures, _local_kernel_manager(Path(sockets)))


def _run_each(paths: list[Path], parameters: dict, out_dir: Path, in_place: bool, progress: bool, figures: Path,
              kernel_manager) -> list[NotebookRun]:
    import time

    import papermill
    from papermill.exceptions import PapermillExecutionError

    runs = []
    for number, path in enumerate(paths, 1):
        start = time.time()
        output = path if in_place else out_dir / path.name
        if progress:
            print(f"[{number}/{len(paths)}] {path.name} ...", flush=True)
        try:
            known = papermill.inspect_notebook(str(path))  # pass each notebook only its own parameters
            papermill.execute_notebook(str(path), str(output), parameters={k: v for k, v in parameters.items() if k in known},
                                       cwd=str(NOTEBOOK_DIR), kernel_name="python3", progress_bar=progress,
                                       kernel_manager_class=kernel_manager)
        except PapermillExecutionError as error:
            raise RuntimeError(f"{path.name} failed in cell {error.exec_count}: {error.ename}: {error.evalue} (executed copy: {output})") from None
        runs.append(NotebookRun(path.name, output, time.time() - start))
        if progress:
            written = sorted(f.name for f in figures.glob("*.png") if f.stat().st_mtime >= start) if figures.is_dir() else []
            print(f"[{number}/{len(paths)}] {path.name}: {runs[-1].seconds:.0f} s" + (f", figures {', '.join(written)}" if written else ""),
                  flush=True)
    return runs


def environment_report() -> str:
    """Versions, devices and memory: the first thing to check when a notebook misbehaves."""
    import os
    import platform

    import torch
    import transformers

    lines = [
        f"python       : {platform.python_version()}",
        f"torch        : {torch.__version__}",
        f"transformers : {transformers.__version__}",
        f"cpu cores    : {os.cpu_count()}",
    ]
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        lines.append(f"memory       : {pages * page_size / 2**30:.1f} GiB")
    except (ValueError, OSError, AttributeError):
        lines.append("memory       : unknown")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}       : {props.name}, {props.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("cuda         : none (the CPU config runs the toy model)")
    return "\n".join(lines)


def config_table(config_dir: str | Path = ROOT / "configs") -> str:
    """The shipped parameter sets, one line each."""
    rows = []
    for path in sorted(Path(config_dir).glob("*.yaml")):
        values = load_config(path)
        rows.append(f"{path.name:<22} " + "  ".join(f"{k}={v}" for k, v in values.items()))
    return "\n".join(rows)
