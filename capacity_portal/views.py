"""Project-level views: the health check and the benchmark's floor page.

Both are deliberately trivial. ``make bench`` measures the hot paths against them:
``healthz`` is the JSON floor (no database), ``floor_page`` the HTML floor (a logged-in
page extending the base template, with no queries beyond the session and the user).
"""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness: the process is up and serving requests (no database round trip)."""
    return JsonResponse({"status": "ok"})


@require_GET
@login_required
def floor_page(request: HttpRequest) -> HttpResponse:
    """A trivial signed-in page: the cost of the session, the user and the base template."""
    return render(request, "bench/floor.html")
