"""Send a request through the consume lane (``usage.lane.ConsumeLane``) in a test.

Django's test client calls Django's handler directly, not the WSGI application, so it
never meets the lane. ``through_lane`` builds the WSGI environ as the test client does,
calls the lane in front of the test client's own handler, and returns a response object
like the test client's either way: Django's (the lane handed over) or one built from the
lane's status, headers and body (``response.lane`` is True then).
"""

from __future__ import annotations

import json
from contextlib import contextmanager

from django.core import signals
from django.db import close_old_connections
from django.http import HttpResponse
from django.test import Client, RequestFactory

from usage.lane import ConsumeLane


@contextmanager
def connection_kept():
    """As the test client does around its requests: the request signals do not close the
    test's connection (that would end the test's transaction)."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    try:
        yield
    finally:
        signals.request_started.connect(close_old_connections)
        signals.request_finished.connect(close_old_connections)


def through_lane(method: str, path: str, data=b"", content_type: str = "application/json",
                 headers: dict | None = None, secure: bool = False, **extra) -> HttpResponse:
    environ = RequestFactory().generic(method, path, data, content_type=content_type, secure=secure,
                                       headers=headers or {}, **extra).environ
    client = Client()
    handled = {}

    def django(environ, start_response):
        handled["response"] = client.handler(environ)
        return []

    answer = {}

    def start_response(status, headers):
        answer["status"], answer["headers"] = status, headers

    with connection_kept():
        result = ConsumeLane(django)(environ, start_response)
        body = b"".join(result)
        if hasattr(result, "close"):  # as a WSGI server does once the body is sent
            result.close()
    if "response" in handled:
        response = handled["response"]
        response.lane = False
    else:
        response = HttpResponse(body, status=int(answer["status"].split(" ", 1)[0]))
        for name in list(response.headers):
            del response[name]
        for name, value in answer["headers"]:
            response[name] = value
        response.lane = True
        response.wsgi_status = answer["status"]
    response.json = lambda: json.loads(response.content)
    return response
