"""WSGI entry point: Django's application behind the consume lane (``usage.lane``), which
answers the API's plain consumes before Django's request cycle and hands it everything else."""

import gc
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "capacity_portal.settings")
application = get_wsgi_application()

from usage.lane import ConsumeLane  # noqa: E402 - after Django is set up

application = ConsumeLane(application)

# What is loaded by now (Django, the apps, the URLconf) lives as long as the worker. Frozen,
# the cyclic collector stops walking it on every full collection: a 1,000-event batch
# allocates enough objects to trigger several, which cost 13-15% of its CPU (make bench).
# Collected first, so that no garbage is frozen with it.
gc.collect()
gc.freeze()
