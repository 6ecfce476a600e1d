"""Write docs/reliability.md from the figures of the last fault run.

``python -m tests.faults.report DIR [OUT]``: DIR holds one JSON record per scenario (figures.py);
OUT defaults to docs/reliability.md."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

HEADER = """# Reliability: the fault suite's figures

Every figure below was counted by `tests/faults/` in the run described here: from the execution
log each test task writes (job id, attempt, worker, start, end) and from the database, never
assumed. Rerun it with `make faults` (full size; it rewrites this file). CI runs the same suite
at reduced sizes on every push (`make test`).
"""


def machine() -> list[str]:
    lines = [
        f"- Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {platform.system()} {platform.release()} {platform.machine()},"
        f" {os.cpu_count()} CPUs, Python {platform.python_version()}",
    ]
    try:
        version = subprocess.run(
            ["psql", "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if version:
            lines.append(f"- PostgreSQL client: {version}")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
        if commit:
            lines.append(f"- Conveyor commit: {commit}")
    except OSError:
        pass
    return lines


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".")
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def section(record: dict[str, Any]) -> list[str]:
    size = "full size" if record["full_size"] else "REDUCED size"
    out = [f"## {record['order']}. {record['scenario']}", ""]
    out.append(f"Outcome: **{record['outcome']}** ({size}).")
    if record["settings"]:
        settings = ", ".join(f"{k} = {_cell(v)}" for k, v in record["settings"].items())
        out += ["", f"Settings: {settings}."]
    out += ["", "| figure | value | required |", "|---|---|---|"]
    out += [
        f"| {_cell(r['figure'])} | {_cell(r['value'])} | {r['required']} |" for r in record["rows"]
    ]
    out += [""] + [f"- {n}" for n in record["notes"]]
    return [*out, ""]


def build(folder: Path) -> str:
    records = sorted(
        (json.loads(p.read_text()) for p in folder.glob("*.json")), key=lambda r: r["order"]
    )
    lines = [HEADER, *machine(), ""]
    if not records:
        lines.append("No figures were recorded.")
    for record in records:
        lines += section(record)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m tests.faults.report DIR [OUT]", file=sys.stderr)
        return 2
    out = Path(argv[1]) if len(argv) > 1 else ROOT / "docs" / "reliability.md"
    out.write_text(build(Path(argv[0])))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
