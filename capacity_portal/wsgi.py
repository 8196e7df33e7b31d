"""WSGI entry point: Django's application behind the consume lane (``usage.lane``), which
answers the API's plain consumes before Django's request cycle and hands it everything else."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "capacity_portal.settings")
application = get_wsgi_application()

from usage.lane import ConsumeLane  # noqa: E402 - after Django is set up

application = ConsumeLane(application)
