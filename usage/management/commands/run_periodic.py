"""Run the periodic work (CELERY_BEAT_SCHEDULE) in this process, without Redis.

    python manage.py run_periodic            # loop forever, checking the schedule every 30 s
    python manage.py run_periodic --once     # run every scheduled job once and exit

Each due beat task runs eagerly here (its fan-out too), exactly as a Celery worker
would run it; the jobs are idempotent, so this may run beside a real beat safely.
`runserver_with_periodic` (what `make run` uses) starts the same loop in a thread.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta

from celery.schedules import schedule as interval_schedule
from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import close_old_connections, connection, connections
from django.utils import timezone

from capacity_portal.celery import app
from usage import tasks as _registers_tasks  # noqa: F401  (autodiscovery is lazy outside a worker)

logger = logging.getLogger("usage.periodic")


def _close_old_connections() -> None:
    # Like a request boundary: drop broken or expired connections of this thread
    # (never inside a transaction, e.g. when a test calls the runner).
    if not connection.in_atomic_block:
        close_old_connections()


class PeriodicRunner:
    """A tiny in-process beat: runs each CELERY_BEAT_SCHEDULE entry when it is due."""

    def __init__(self, schedule: dict | None = None):
        self.entries = {}
        for name, entry in (schedule if schedule is not None else settings.CELERY_BEAT_SCHEDULE).items():
            sched = entry["schedule"]
            if isinstance(sched, int | float | timedelta):
                sched = interval_schedule(run_every=sched if isinstance(sched, timedelta) else timedelta(seconds=sched))
            self.entries[name] = (entry["task"], sched, tuple(entry.get("args", ())))
        self.last_run: dict[str, datetime | None] = dict.fromkeys(self.entries)

    def due(self) -> list[str]:
        names = []
        for name, (_, sched, _args) in self.entries.items():
            last = self.last_run[name]
            if last is None or sched.is_due(last).is_due:
                names.append(name)
        return names

    def run_job(self, name: str) -> None:
        task_name, _, args = self.entries[name]
        self.last_run[name] = timezone.now()
        _close_old_connections()
        try:
            # apply(): run here, eagerly, whatever the broker setting (fan-out included when eager).
            app.tasks[task_name].apply(args=args, throw=True)
        except Exception:
            logger.exception("periodic job %s (%s) failed; it runs again when next due", name, task_name)
        finally:
            _close_old_connections()

    def tick(self) -> list[str]:
        names = self.due()
        for name in names:
            self.run_job(name)
        return names

    def loop(self, *, interval: float, stop: threading.Event) -> None:
        # One INFO line per eager task would drown the server log; results are logged by usage.*.
        logging.getLogger("celery.app.trace").setLevel(logging.WARNING)
        while not stop.is_set():
            self.tick()
            stop.wait(interval)
        connections.close_all()


class Command(BaseCommand):
    help = "Run the periodic jobs of CELERY_BEAT_SCHEDULE in-process (embedded default, no Redis needed)."

    def add_arguments(self, parser):
        parser.add_argument("--once", action="store_true", help="Run every job once, then exit.")
        parser.add_argument("--interval", type=float, default=30.0, help="Seconds between schedule checks.")

    def handle(self, *args, once: bool = False, interval: float = 30.0, **options):
        runner = PeriodicRunner()
        if once:
            logging.getLogger("celery.app.trace").setLevel(logging.WARNING)
            ran = runner.tick()
            self.stdout.write(f"ran {len(ran)} periodic jobs: {', '.join(ran)}")
            return
        self.stdout.write(f"periodic jobs every {interval:g}s check: {', '.join(runner.entries)} (Ctrl-C to stop)")
        stop = threading.Event()
        try:
            runner.loop(interval=interval, stop=stop)
        except KeyboardInterrupt:
            stop.set()
