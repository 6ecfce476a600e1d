"""``conveyor demo``: a self-contained tour on a SQLite file.

A few hundred jobs: most succeed, some fail once and succeed on retry, some poll (snooze) a few
times, some always fail and end dead, some are cancelled by their task. A worker works them off
while a progress bar shows the finished count; the stats table closes the run.
"""

from __future__ import annotations

import asyncio
import logging
import random

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .app import Conveyor
from .control import Cancel, Snooze, current_job
from .job import JobState
from .worker import Worker


def build_demo_app(url: str) -> Conveyor:
    app = Conveyor(url)

    @app.task(name="demo.resize_image", queue="images")
    async def resize_image(image_id: int) -> dict[str, int]:
        await asyncio.sleep(random.uniform(0.005, 0.03))
        return {"image_id": image_id, "width": 640}

    @app.task(name="demo.send_email", queue="emails", max_attempts=3, backoff=0.2)
    def send_email(user_id: int) -> str:
        if current_job().job.attempt == 1 and user_id % 3 == 0:
            raise ConnectionError(f"SMTP server busy for user {user_id}")
        return f"sent to {user_id}"

    @app.task(name="demo.wait_ready", queue="docker", max_snoozes=20)
    async def wait_ready(project_id: int) -> str:
        if current_job().job.snoozes < 3:
            raise Snooze(0.1)
        return f"project {project_id} ready"

    @app.task(name="demo.charge_card", queue="billing", max_attempts=2, backoff=0.1)
    def charge_card(order_id: int) -> None:
        raise ValueError(f"card declined for order {order_id}")

    @app.task(name="demo.sync_account", queue="default")
    def sync_account(account_id: int) -> None:
        raise Cancel(f"account {account_id} was closed")

    return app


def run_demo(url: str, n_jobs: int, concurrency: int, console: Console) -> None:
    logging.getLogger("conveyor").setLevel(logging.CRITICAL)  # failures are part of the show
    app = build_demo_app(url)
    app.migrate()
    tasks = app.tasks
    # A fixed cycle of 20, so every kind of ending appears whenever there are 20 jobs or more.
    cycle = (
        ["demo.resize_image"] * 11
        + ["demo.send_email"] * 5
        + ["demo.wait_ready"] * 2
        + ["demo.charge_card", "demo.sync_account"]
    )
    requests = [tasks[cycle[i % len(cycle)]].request(i) for i in range(n_jobs)]
    jobs = app.enqueue_many(requests)
    console.print(f"enqueued {len(jobs)} jobs into {app.url}")
    ids = {j.id for j in jobs}
    asyncio.run(_work_off(app, ids, concurrency, console))
    from .cli import stats_table

    console.print(stats_table(app.stats()))
    app.close()


async def _work_off(app: Conveyor, ids: set[int], concurrency: int, console: Console) -> None:
    worker = Worker(app, concurrency=concurrency, poll_interval=0.05, lease=10)
    runner = asyncio.create_task(worker.run())
    columns = (TextColumn("working"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("jobs", total=len(ids))
        while True:
            stats = await asyncio.to_thread(app.stats)
            finished = sum(
                s.counts.get(st.value, 0) for s in stats for st in JobState if st.terminal
            )
            progress.update(bar, completed=min(finished, len(ids)))
            if finished >= len(ids):
                break
            await asyncio.sleep(0.1)
    worker.stop()
    await runner
