"""Figures of the fault scenarios: each test records what it counted, and ``make faults`` turns
the records of a full run into ``docs/reliability.md`` (``python -m tests.faults.report``).

A record is one JSON file per scenario in ``$CONVEYOR_FAULTS_REPORT`` (nothing is written when
it is unset). Every value is counted by the test from the execution log and the database."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: ``make faults`` sets CONVEYOR_FAULTS_FULL=1: the sizes of the issue. CI runs reduced sizes.
FULL = os.environ.get("CONVEYOR_FAULTS_FULL") == "1"


def scale(reduced: float, full: float) -> float:
    """The full-size value under ``make faults``, the reduced one otherwise."""
    return full if FULL else reduced


def size(reduced: int, full: int) -> int:
    return full if FULL else reduced


@dataclass
class Figures:
    """What one scenario measured: its settings and one row per figure."""

    order: int
    scenario: str
    settings: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(self, figure: str, value: Any, required: str = "") -> Any:
        """Record one figure (``required`` says what it must be, e.g. ``"0"``); returns value."""
        self.rows.append({"figure": figure, "value": value, "required": required})
        return value

    def note(self, text: str) -> None:
        self.notes.append(text)

    def write(self, outcome: str) -> Path | None:
        folder = os.environ.get("CONVEYOR_FAULTS_REPORT")
        if not folder:
            return None
        path = Path(folder) / f"{self.order:02d}-{_slug(self.scenario)}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "order": self.order,
            "scenario": self.scenario,
            "full_size": FULL,
            "outcome": outcome,
            "settings": self.settings,
            "rows": self.rows,
            "notes": self.notes,
        }
        path.write_text(json.dumps(record, indent=2, default=str))
        return path


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of values by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q * len(ordered) + 0.5) - 1))
    return ordered[rank]
