"""``conveyor demo``: a full tour that must end with every job in a terminal state."""

from __future__ import annotations

import json
from pathlib import Path

from conveyor import Conveyor

from .support import conveyor


def test_demo_works_off_every_job(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    demo = conveyor("demo", "--database", url, "--jobs", "100", timeout=60)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "Traceback" not in demo.stderr
    assert f"enqueued 100 jobs into {url}" in demo.stdout
    assert "Conveyor queues" in demo.stdout  # the closing stats table

    stats = conveyor("stats", "--json", "--database", url)
    assert stats.returncode == 0, stats.stderr
    totals: dict[str, int] = {}
    for queue in json.loads(stats.stdout):
        for state, n in queue["counts"].items():
            totals[state] = totals.get(state, 0) + n
    assert sum(totals.values()) == 100
    assert totals["queued"] == totals["running"] == totals["retrying"] == 0, totals
    assert totals["succeeded"] > 0 and totals["dead"] > 0 and totals["cancelled"] > 0, totals

    # And each kind of job ended the way the demo means it to.
    app = Conveyor(url)
    try:
        jobs = app.list_jobs(limit=1000)
        ends = {(j.task, j.state.value) for j in jobs}
        assert {task for task, _ in ends} == {
            "demo.resize_image",
            "demo.send_email",
            "demo.wait_ready",
            "demo.charge_card",
            "demo.sync_account",
        }
        assert {state for task, state in ends if task == "demo.charge_card"} == {"dead"}
        assert {state for task, state in ends if task == "demo.sync_account"} == {"cancelled"}
        others = {
            state for task, state in ends if task not in ("demo.charge_card", "demo.sync_account")
        }
        assert others == {"succeeded"}
        waited = [j for j in jobs if j.task == "demo.wait_ready"]
        assert all(j.snoozes == 3 and j.attempt == 1 for j in waited)
        retried = [j for j in jobs if j.task == "demo.send_email" and j.args[0] % 3 == 0]
        assert retried and all(j.attempt == 2 and len(j.errors) == 1 for j in retried)
    finally:
        app.close()
