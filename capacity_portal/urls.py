from django.contrib import admin
from django.urls import include, path

from usage.api import api

from . import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("api/v1/", api.urls),
    path("healthz", views.healthz, name="healthz"),
    path("bench/floor/", views.floor_page, name="floor_page"),
    # Each app's urls module adds its own lines here.
    path("", include("teams.urls")),
    path("", include("usage.urls")),
]
