"""Mounted at the site root: ``home`` at ``/`` plus the ``teams:`` namespace under ``/teams/``."""

from django.urls import include, path

from . import views

team_patterns = [
    path("", views.picker, name="picker"),
    path("<slug:slug>/", views.dashboard, name="dashboard"),
]

urlpatterns = [
    path("", views.home, name="home"),
    path("teams/", include((team_patterns, "teams"))),
]
