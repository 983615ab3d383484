"""A pytest plugin that lets nbval compare a checked cell's numbers within a stated tolerance.

Why: nbval compares checked outputs as text, but a CLT retrained on another CPU kernel path
(AVX2 vs AVX-512, one thread vs two) moves the third decimal of its metrics. A cell that prints
such numbers carries, beside `# NBVAL_CHECK_OUTPUT`, a line

    # TOLERANCE abs=0.03 rel=0.05   (why: the spread measured across kernel variants)

and then its output passes when the text around the numbers is identical and every number is
within abs + rel * |committed value| of the committed one. Everything else stays exact: a cell
without the line is compared by nbval as text, so identifiers (layers, latent ids, token ids)
belong in cells without a tolerance. Registered through the `pytest11` entry point, so any
`pytest --nbval-lax` in this environment uses it.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

# A number as our notebooks print it: 0.975, -2.0, 4,165, 1.2e+06, nan (thousands separators only in groups of 3).
NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w.])|\bnan\b")
MARKER = re.compile(r"^\s*#\s*TOLERANCE\b(?P<spec>[^(#\n]*)", re.MULTILINE)


class Tolerance(NamedTuple):
    abs: float = 0.0  # allowed |new - committed|
    rel: float = 0.0  # plus this fraction of |committed|

    def allows(self, committed: float, new: float) -> bool:
        if math.isnan(committed) or math.isnan(new):
            return math.isnan(committed) and math.isnan(new)
        return abs(new - committed) <= self.abs + self.rel * abs(committed) + 1e-12


def parse_tolerance(source: str) -> Tolerance | None:
    """The cell's `# TOLERANCE abs=A rel=R` line, or None when it has none."""
    match = MARKER.search(source)
    if match is None:
        return None
    values = {}
    for item in match.group("spec").split():
        key, _, value = item.partition("=")
        if key not in Tolerance._fields or not value:
            raise ValueError(f"bad TOLERANCE item {item!r}: write '# TOLERANCE abs=0.02 rel=0.05' (either may be left out)")
        values[key] = float(value)
    if not values:
        raise ValueError("a TOLERANCE line needs abs= and/or rel=, e.g. '# TOLERANCE abs=0.02'")
    return Tolerance(**values)


def _value(token: str) -> float:
    return float(token.replace(",", ""))


def numbers_agree(committed: str, new: str, tolerance: Tolerance) -> bool:
    """Same text between the numbers, and each number within tolerance of the committed one."""
    if NUMBER.split(committed) != NUMBER.split(new):
        return False
    old_numbers, new_numbers = NUMBER.findall(committed), NUMBER.findall(new)
    return len(old_numbers) == len(new_numbers) and all(
        tolerance.allows(_value(a), _value(b)) for a, b in zip(old_numbers, new_numbers))


def _texts(output) -> list[tuple[str, ...]]:
    """Where a notebook output keeps text: ('text',) for streams, ('data', mime) for text/* results."""
    if "text" in output:
        return [("text",)]
    return [("data", mime) for mime in output.get("data", {}) if mime.startswith("text/")]


def _get(output, where):
    return output["text"] if where == ("text",) else output["data"][where[1]]


def _set(output, where, value):
    if where == ("text",):
        output["text"] = value
    else:
        output["data"][where[1]] = value


def _tolerant(item, tolerance: Tolerance):
    """Wrap the nbval item's comparison: numbers within tolerance are replaced by the committed ones first."""
    exact = item.compare_outputs

    def compare_outputs(test, ref, skip_compare=None):
        for new, committed in zip(test, ref):
            if new.get("output_type") != committed.get("output_type"):
                continue
            for where in _texts(committed):
                try:
                    old_text, new_text = item.sanitize(_get(committed, where)), item.sanitize(_get(new, where))
                except KeyError:
                    continue
                if isinstance(old_text, str) and isinstance(new_text, str) and numbers_agree(old_text, new_text, tolerance):
                    _set(new, where, _get(committed, where))
        return exact(test, ref, skip_compare)

    return compare_outputs


def pytest_collection_modifyitems(items):
    for item in items:
        cell = getattr(item, "cell", None)
        if cell is None or type(item).__name__ != "IPyNbCell":
            continue
        tolerance = parse_tolerance(cell.source)
        if tolerance is not None:
            item.compare_outputs = _tolerant(item, tolerance)
