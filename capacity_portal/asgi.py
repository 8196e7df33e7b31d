import gc
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "capacity_portal.settings")
application = get_asgi_application()

gc.collect()
gc.freeze()  # what is loaded lives as long as the process (see capacity_portal.wsgi)
