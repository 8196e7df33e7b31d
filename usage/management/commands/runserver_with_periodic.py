"""`make run`: Django's development server plus the periodic jobs in a background thread.

    python manage.py runserver_with_periodic [addrport] [--interval SECONDS]

The jobs are those of CELERY_BEAT_SCHEDULE, run in-process and eagerly (see
run_periodic): monthly refresh and expiry, alerts (console email backend by default),
rollup verification, reconciliation and idempotency pruning. No Redis, no worker.
"""

from __future__ import annotations

import threading

from django.core.management import call_command
from django.core.management.base import BaseCommand

from capacity_portal.celery import app

from .run_periodic import PeriodicRunner


class Command(BaseCommand):
    help = "runserver --noreload plus the periodic jobs in a background thread (embedded default)."

    def add_arguments(self, parser):
        parser.add_argument("addrport", nargs="?", default="127.0.0.1:8000")
        parser.add_argument("--interval", type=float, default=30.0, help="Seconds between schedule checks.")

    def handle(self, *args, addrport: str, interval: float, **options):
        stop = threading.Event()
        if app.conf.task_always_eager:
            runner = PeriodicRunner()
            thread = threading.Thread(target=runner.loop, kwargs={"interval": interval, "stop": stop},
                                      name="periodic-jobs", daemon=True)
            thread.start()
            self.stdout.write(f"Periodic jobs running in-process (schedule checked every {interval:g}s).")
        else:
            # With a broker (REDIS_URL) the fan-out would only queue messages: use the real thing.
            self.stdout.write("REDIS_URL is set: periodic jobs are NOT run in-process; start "
                              "`celery -A capacity_portal worker` and `celery -A capacity_portal beat`.")
        try:
            call_command("runserver", addrport, use_reloader=False)
        finally:
            stop.set()
