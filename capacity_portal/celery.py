"""The Celery app: Redis broker from REDIS_URL, configured from the CELERY_* settings.

Without REDIS_URL the broker is ``memory://`` and tasks run eagerly in-process (the
embedded default; `make run` also runs CELERY_BEAT_SCHEDULE in a thread, see
usage/management/commands/run_periodic.py). In production:

    celery -A capacity_portal worker     # acks_late, prefetch 1, reject on worker loss
    celery -A capacity_portal beat       # CELERY_BEAT_SCHEDULE
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "capacity_portal.settings")

app = Celery("capacity_portal")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
