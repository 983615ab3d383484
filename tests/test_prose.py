"""Prose cannot disagree with the outputs: every number in a notebook's markdown is found in that notebook's
executed code cells (an output or a parameter), or is a stated definition listed here with its reason; every
exercise header names the difficulty and time its `clt_lite.exercises` entry declares."""

import json
import re
from pathlib import Path

import pytest

from clt_lite import exercises
from clt_lite.notebooks import notebook_paths

NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?:e-?\d+)?")
EXERCISE_HEADER = re.compile(r"^### Exercise \((\*+), ~(\d+) min\)", re.M)

# Numbers in prose that are facts or thresholds, not measurements of this run (so no output needs to print them).
DEFINITIONS = {
    "00": {"14": "LLaVA-7B's bfloat16 weights in GB, a fact of the model", "1.5": "the model's name"},
    "01": {"1.5": "the model's name", "4": "transformers major version", "5": "transformers major version",
           "1.2e-7": "float32's machine epsilon", "7.8e-3": "bfloat16's machine epsilon"},
    "02": {"24": "LLaVA-1.5's patch grid", "336": "LLaVA-1.5's image size", "14": "LLaVA-1.5's patch size",
           "1.5": "the model's name"},
    "04": {"50": "the claim of the design the course grew from", "80": "the filtered subset's definition",
           "90": "the course's agreement goal", "5": "the course's accuracy goal",
           "32": "LLaVA-1.5-7B's decoder layers, a fact of the model", "31": "what targets from L+1 cover of 32 layers",
           "1.5": "the model's name", "7": "the model's name (7B)"},
}


def _outputs_and_sources(notebook: dict) -> str:
    """Everything the code cells say: their sources (parameters, thresholds) and outputs, without thousands commas."""
    parts = []
    for cell in notebook["cells"]:
        if cell["cell_type"] != "code":
            continue
        parts.append("".join(cell["source"]))
        for output in cell.get("outputs", []):
            parts.append("".join(output.get("text", "")))
            parts.extend("".join(v) for k, v in output.get("data", {}).items() if k.startswith("text/"))
    return "\n".join(parts).replace(",", "")


def _prose_numbers(markdown: str) -> list[str]:
    markdown = EXERCISE_HEADER.sub("", markdown)  # difficulty and minutes: checked against the registry below
    markdown = re.sub(r"```.*?```", "", markdown, flags=re.S)
    markdown = re.sub(r"`[^`]*`", "", markdown)  # code names the reader types, not claims
    markdown = re.sub(r"\]\([^)]*\)", "]", markdown)  # link targets
    markdown = re.sub(r"\((?:[^()]*, )?(?:19|20)\d\d\)|arXiv:[\d.]+", "", markdown)  # citations: (2023), (Ameisen et al., 2025)
    markdown = re.sub(r"\b0[0-6]\b", "", markdown)  # notebook numbers
    return [n.rstrip(",").replace(",", "") for n in NUMBER.findall(markdown)]


def unbacked_numbers(path: Path) -> list[str]:
    """Numbers stated in markdown that no code cell of the notebook prints or sets, nor DEFINITIONS lists."""
    notebook = json.loads(path.read_text())
    said = _outputs_and_sources(notebook)
    allowed = DEFINITIONS.get(path.name[:2], {})
    missing = []
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] != "markdown":
            continue
        for number in _prose_numbers("".join(cell["source"])):
            if number not in allowed and not re.search(r"(?<![\d.])" + re.escape(number) + r"(?!\d)", said):
                missing.append(f"{path.name} cell {index}: {number}")
    return missing


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.name[:2])
def test_every_number_in_prose_comes_from_the_outputs(path):
    assert unbacked_numbers(path) == []


def test_a_stale_number_in_prose_is_caught(tmp_path):
    notebook = {"cells": [{"cell_type": "code", "source": ["print(0.93)"], "outputs": [{"text": ["0.93\n"]}]},
                          {"cell_type": "markdown", "source": ["Agreement is 0.93, up from 0.91 last time."]}]}
    path = tmp_path / "04_x.ipynb"
    path.write_text(json.dumps(notebook))
    assert unbacked_numbers(path) == ["04_x.ipynb cell 1: 0.91"]


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.name[:2])
def test_exercise_headers_match_the_registry(path):
    notebook = json.loads(path.read_text())
    cells = notebook["cells"]
    posed = []
    for index, cell in enumerate(cells):
        header = EXERCISE_HEADER.search("".join(cell["source"])) if cell["cell_type"] == "markdown" else None
        if header:
            name = re.match(r"def (\w+)\(", "".join(cells[index + 1]["source"])).group(1)
            entry = exercises.EXERCISES[name]
            assert (entry.notebook, entry.difficulty, entry.minutes) == (path.name[:2], header[1], int(header[2])), name
            posed.append(name)
    assert posed == [name for name, entry in exercises.EXERCISES.items() if entry.notebook == path.name[:2]]


def test_the_workshop_guide_states_the_measured_times_and_the_exercise_minutes():
    """docs/workshop.md's timing table equals benchmarks/results/notebook-times-cpu.json and the exercise registry."""
    root = Path(__file__).resolve().parent.parent
    measured = json.loads((root / "benchmarks" / "results" / "notebook-times-cpu.json").read_text())["seconds"]
    guide = (root / "docs" / "workshop.md").read_text()
    rows = re.findall(r"^\| (\d\d|all) \| (\d+) s \| (\d+) s \| (–|\d+ min) \|$", guide, re.M)
    assert [r[0] for r in rows] == sorted(measured["cold"]) + ["all"]
    for number, cold, warm, minutes in rows:
        if number == "all":
            assert (int(cold), int(warm)) == (sum(measured["cold"].values()), sum(measured["warm"].values()))
            assert minutes == f"{sum(e.minutes for e in exercises.EXERCISES.values())} min"
            continue
        assert (int(cold), int(warm)) == (measured["cold"][number], measured["warm"][number]), number
        expected = sum(e.minutes for e in exercises.EXERCISES.values() if e.notebook == number)
        assert minutes == (f"{expected} min" if expected else "–"), number


def _rounds_to(number: str, said: set[float]) -> bool:
    """Whether some printed value, rounded to the decimals `number` is written with, equals it (97% means 0.97)."""
    percent = number.endswith("%")
    text = number.rstrip("%")
    decimals = len(text.partition(".")[2]) + (2 if percent else 0)
    value = float(text) / (100 if percent else 1)
    return any(round(x, decimals) == round(value, decimals) for x in said)


def test_the_readme_states_only_numbers_the_notebooks_print():
    """Each number in the README's 'What the CPU run measures today' is printed (or set) by a notebook, to its decimals."""
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    section = readme.split("## What the CPU run measures today", 1)[1].split("\n## ", 1)[0]
    section = re.sub(r"!\[[^\]]*\]\([^)]*\)|`[^`]*`", "", section)  # figures and code names
    said = " ".join(_outputs_and_sources(json.loads(p.read_text())) for p in notebook_paths())
    values = {float(x) for x in re.findall(r"(?<![\w.])\d+(?:\.\d+)?", said)}
    stale = [n for n in re.findall(r"(?<![\w.])\d+(?:\.\d+)?%?", section.replace(",", "")) if not _rounds_to(n, values)]
    assert stale == []


def test_the_readme_causes_bullet_follows_notebook_05():
    """The swap rates and route shares the README states are the ones notebook 05 printed, in their places."""
    root = Path(__file__).resolve().parent.parent
    readme = " ".join((root / "README.md").read_text().split())
    notebook = json.loads((root / "notebooks" / "05_attribution_graphs.ipynb").read_text())
    printed = {c.get("id"): "".join("".join(o.get("text", "")) for o in c.get("outputs", [])) for c in notebook["cells"]}
    rates = dict(re.findall(r"(\w+) swaps that give the chosen answer: ([\d.]+) of", printed["swap-rate"] + printed["swap-shape"]))
    route = r"(\w+)\s+through (?:head \d+ of layer \d+(?: \+ )?)+: (-?[\d.]+).*?last layer: (-?[\d.]+)"
    routes = {family: (head, last) for family, head, last in re.findall(route, printed["circuit-check"])}
    assert f"gives the chosen answer on {rates['colour']} of 50 held-out colour questions and {rates['shape']} of 50" in readme
    assert f"carries {routes['colour'][0]} of the object's contribution to colour answers and {routes['describe'][0]} to" in readme
    assert f"of shape answers' object contribution, the last layer carries {routes['shape'][1]}" in readme
