"""The JSON usage API for cloud services, mounted at ``/api/v1/`` (django-ninja).

The API validates input, resolves the key's team and the product, and calls the
usage services; it never writes the ledger itself. Every error is
``{"error": {"code": ..., "message": ...}}``; no input produces a 500.

Tenancy: a key belongs to one team. A product is found by its catalog code but only
among the products the key's team holds (has ever been granted); any other code,
whether it exists in the catalog or not, is ``404 not_found`` (same message, so a
key learns nothing about other teams). Balances, history and refunds are scoped to
the key's team by the services and selectors.
"""

from __future__ import annotations

import logging
import math
import time
from datetime import date, datetime, timedelta
from typing import Annotated, Any, Literal

import pydantic
from django.conf import settings
from django.core.cache import DEFAULT_CACHE_ALIAS, caches
from django.core.exceptions import RequestDataTooBig
from django.db import DatabaseError, OperationalError, ProgrammingError, connection
from django.db.models import Q
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseNotAllowed
from django.urls import re_path
from django.utils import timezone
from ninja import Field, NinjaAPI, Query, Schema
from ninja.errors import AuthenticationError, HttpError, ValidationError
from ninja.openapi.docs import Swagger
from ninja.security import HttpBearer
from pydantic import AfterValidator, AwareDatetime, ConfigDict, StrictInt, StringConstraints

from capacity_portal.postgresql.rows import columns, from_row
from products.models import Product, TeamProduct
from products.selectors import team_balances
from teams.models import ApiKey, Team

from . import fastpath
from .actors import Actor
from .batch import UsageRequest, usage_record, usage_record_many
from .errors import (
    InvalidRequest,
    PayloadTooLarge,
    RateLimited,
    Unavailable,
    UsageError,
    unknown_product,
)
from .history import GRANULARITIES, resolve_range, team_today, usage_series
from .lane import RATE_COUNTED
from .services import Outcome, job_refund, usage_consume_with_key

logger = logging.getLogger(__name__)

MAX_QUANTITY = 10**15
OCCURRED_AT_PAST = timedelta(days=35)
OCCURRED_AT_FUTURE = timedelta(minutes=5)
LAST_USED_EVERY = timedelta(seconds=60)
MAX_TOKEN_LENGTH = 200
RATE_WINDOW_TTL = 120  # seconds a one-minute window's counter is kept (it outlives its minute)
HISTORY_FIRST_DAY = date(2000, 1, 1)
HISTORY_LAST_DAY = date(2999, 12, 31)
# PostgreSQL aborts one side of a deadlock (40P01) or a serialization failure (40001);
# the whole transaction rolled back, so running it again is safe.
RETRY_SQLSTATES = {"40P01", "40001"}
WRITE_ATTEMPTS = 3


# -- errors ------------------------------------------------------------------------------


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


# -- input types ---------------------------------------------------------------------------


def _clean_text(value: str) -> str:
    # PostgreSQL refuses NUL in text and psycopg cannot encode lone surrogates:
    # reject both here so they are a 422, not a 500 from the database.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text") from None
    return value


def Text(max_length: int, min_length: int = 0):  # noqa: N802 (a type factory)
    return Annotated[
        str, StringConstraints(min_length=min_length, max_length=max_length), AfterValidator(_clean_text)
    ]


Quantity = Annotated[StrictInt, Field(gt=0, le=MAX_QUANTITY, description="A positive whole number.")]
ProductCode = Text(64, 1)
IdempotencyKey = Text(255, 1)


class Strict(pydantic.BaseModel):
    # A plain pydantic model, not ninja's Schema: Schema's root validator (for reading
    # ORM objects) validates an extra="forbid" model twice, on every request body.
    model_config = ConfigDict(extra="forbid")


class UsageIn(Strict):
    product: ProductCode = Field(description="Product code, e.g. cloud-tokens.")
    kind: Literal["consume", "checkout", "return", "metered"]
    quantity: Quantity
    idempotency_key: IdempotencyKey = Field(description="Unique per team; a retry sends the same key and body.")
    user: Text(254) = Field("", description="Whose usage: normally an email.")
    service: Text(100) = ""
    job_id: Text(255) = ""
    checkout_id: Text(255) = Field("", description="Required for checkout and return.")
    occurred_at: AwareDatetime | None = Field(
        None, description="With a UTC offset; from 35 days ago to 5 minutes ahead. Default: now."
    )


class BatchIn(Strict):
    events: list[Any] = Field(
        description=f"Up to {settings.API_BATCH_MAX_EVENTS} usage events, each as in POST /usage.",
        json_schema_extra={
            "items": UsageIn.model_json_schema(),  # documented in full; each is validated alone
            "maxItems": settings.API_BATCH_MAX_EVENTS,
        },
    )


class RefundIn(Strict):
    idempotency_key: IdempotencyKey
    reason: Literal["failed", "cancelled"] = "failed"


class HistoryQuery(Strict):
    product: ProductCode
    granularity: Literal["day", "week", "month"] = "day"
    start: date | None = Field(None, description="First local day (YYYY-MM-DD). Default: 1st of this month.")
    end: date | None = Field(None, description="Last local day (YYYY-MM-DD). Default: today.")
    user: Text(254) | None = Field(None, description="Only this user's usage (an email in any case).")


# -- output types (documentation: responses are built from the services' bodies) -------------


class ErrorDetail(Schema):
    code: str
    message: str


class ErrorOut(Schema):
    error: ErrorDetail


class UsageOut(Schema):
    id: int
    product: str
    available: int
    total: int
    kind: str
    quantity: int
    charged: int | None = Field(None, description="consume/metered: units consumed.")
    carried: int | None = Field(None, description="metered: raw usage carried to the next unit.")
    checkout_id: str | None = None
    outstanding: int | None = Field(None, description="checkout/return: still checked out.")


class BatchResult(Schema):
    index: int
    status: int
    replayed: bool = False
    body: UsageOut | None = None
    error: ErrorDetail | None = None


class BatchOut(Schema):
    results: list[BatchResult]


class RefundProduct(Schema):
    product: str
    refunded: int
    available: int
    total: int


class RefundOut(Schema):
    id: int
    job_id: str
    refunded: int
    restored: int
    products: list[RefundProduct]


class BalanceOut(Schema):
    product: str
    name: str
    unit: str
    capacity_type: str
    available: int
    total: int
    used_pct: float = Field(description="Percent used, one decimal (rounded half up).")
    status: Literal["ok", "low", "empty"]
    ends_at: datetime | None
    refreshes_at: datetime | None
    purchased: int
    checked_out: int


class BalancesOut(Schema):
    balances: list[BalanceOut]


class BucketOut(Schema):
    start: date
    consumed: int
    refunded: int
    net_consumed: int
    checked_out: int
    returned: int
    raw_usage: int
    peak_checked_out: int


class HistoryOut(Schema):
    product: str
    unit: str
    capacity_type: str
    granularity: str
    start: date
    end: date
    user: str | None
    series: list[BucketOut]


ERRORS = {401: ErrorOut, 404: ErrorOut, 409: ErrorOut, 413: ErrorOut, 422: ErrorOut, 429: ErrorOut}


# -- auth and rate limiting ------------------------------------------------------------------


class ApiKeyAuth(HttpBearer):
    """``Authorization: Bearer <key>``: the key's team, or 401. Then the per-key rate limit.

    ``defer_lookup=True`` (``POST /usage``): ``request.auth`` is a :class:`BearerKey` and
    the key is looked up later, by the consume's own statement or on first need. The
    answers stay those of an eager lookup: a bad key is 401 before any other error
    (:meth:`UsageApi.on_exception`), and 401 before 429.
    """

    def __init__(self, *, defer_lookup: bool = False):
        super().__init__()
        self.defer_lookup = defer_lookup

    def authenticate(self, request: HttpRequest, token: str) -> ApiKey | BearerKey | None:
        if not token or len(token) > MAX_TOKEN_LENGTH:
            return None
        if self.defer_lookup:
            bearer = BearerKey(token)
            counted = request.META.get(RATE_COUNTED)  # (key hash, count): the consume lane counted it
            try:
                check_rate(bearer.hashed, counted=counted[1] if counted and counted[0] == bearer.hashed else None)
            except RateLimited:
                if bearer.api_key() is None:
                    return None
                raise
            return bearer
        api_key = _active_key(token, timezone.now())
        if api_key is None:
            return None
        check_rate(api_key.hashed_key)
        return api_key


class BearerKey:
    """A bearer token whose key has not been looked up yet (see ``ApiKeyAuth``)."""

    __slots__ = ("token", "hashed", "_api_key", "_looked_up")

    def __init__(self, token: str):
        self.token = token
        self.hashed = ApiKey.hash(token)
        self._api_key: ApiKey | None = None
        self._looked_up = False

    def api_key(self) -> ApiKey | None:
        """The unrevoked key (with its team), or None; looked up once (writing
        ``last_used_at`` as every authenticated request does)."""
        if not self._looked_up:
            self._api_key = _active_key(self.token, timezone.now())
            self._looked_up = True
        return self._api_key


def _active_key(token: str, now: datetime) -> ApiKey | None:
    """The unrevoked key (with its team) of a bearer token; records ``last_used_at`` at
    most once a minute per key (a conditional UPDATE: of concurrent requests in a new
    minute only one writes). PostgreSQL: both in one statement."""
    hashed = ApiKey.hash(token)
    stale = now - LAST_USED_EVERY
    if connection.vendor != "postgresql":
        api_key = (ApiKey.objects.select_related("team")
                   .filter(hashed_key=hashed, revoked_at__isnull=True).first())
        if api_key is not None and not (api_key.last_used_at and api_key.last_used_at > stale):
            ApiKey.objects.filter(pk=api_key.pk).filter(
                Q(last_used_at__isnull=True) | Q(last_used_at__lte=stale)
            ).update(last_used_at=now)
            api_key.last_used_at = now
        return api_key
    with connection.cursor() as cursor:
        cursor.execute(_ACTIVE_KEY_SQL, [hashed, now, stale])
        row = cursor.fetchone()
    if row is None:
        return None
    n = len(_KEY_FIELDS)
    api_key = from_row(ApiKey, _KEY_FIELDS, row[:n])
    team = from_row(Team, _TEAM_FIELDS, row[n:-1])
    ApiKey._meta.get_field("team").set_cached_value(api_key, team)
    if row[-1]:
        api_key.last_used_at = now
    return api_key


_KEY_FIELDS = ApiKey._meta.concrete_fields
_TEAM_FIELDS = Team._meta.concrete_fields
# One round trip: the key and its team, and the once-a-minute last_used_at write
# (a data-modifying CTE runs whether or not the outer query reads it). SKIP LOCKED: a
# request of the same key already writing it (a consume holds the lock until it
# commits) is enough; this one does not wait for it.
_ACTIVE_KEY_SQL = (
    "WITH k AS (SELECT {key}, {team} FROM teams_apikey k JOIN teams_team t ON t.id = k.team_id"
    " WHERE k.hashed_key = %s AND k.revoked_at IS NULL),"
    " u AS (UPDATE teams_apikey SET last_used_at = %s WHERE id = (SELECT s.id FROM teams_apikey s"
    " WHERE s.id = (SELECT k_id FROM k) AND (s.last_used_at IS NULL OR s.last_used_at <= %s)"
    " FOR NO KEY UPDATE SKIP LOCKED) RETURNING id)"
    " SELECT k.*, EXISTS (SELECT 1 FROM u) FROM k"
).format(
    key=columns(_KEY_FIELDS, "k", prefix="k_"),
    team=columns(_TEAM_FIELDS, "t", prefix="t_"),
)


def check_rate(key_hash: str, *, counted: int | None = None) -> None:
    """Fixed one-minute window per key (by the SHA-256 of its secret: known before the
    key is looked up). On PostgreSQL it is counted in the database (migration
    ``usage.0009``: no round trip to another server; the consume lane counts in the
    consume's own statement and passes its ``counted``), elsewhere in the cache (shared
    when it is Redis)."""
    limit = settings.API_RATE_LIMIT_PER_MINUTE
    if not limit:
        return
    now = time.time()
    window = int(now // 60)
    if counted is None and counts_in_database():
        counted = _count_in_database(key_hash, window)
    if counted is None:
        try:
            counted = _count_in_cache(f"api-rate:{key_hash}:{window}")
        except Exception:  # noqa: BLE001 (the cache is down: serve without a limit rather than fail)
            logger.warning("rate limit not applied: the cache is unavailable", exc_info=True)
            return
    if counted > limit:
        retry_after = max(1, math.ceil((window + 1) * 60 - now))
        raise RateLimited(
            f"Rate limit of {limit} requests per minute exceeded; retry in {retry_after} s.",
            retry_after=retry_after,
        )


def counts_in_database() -> bool:
    return connection.vendor == "postgresql"


def statement_rate() -> fastpath.RateCount | None:
    """The rate count a consume's statement makes itself (``fastpath.consume_with_key``);
    None when there is no limit."""
    limit = settings.API_RATE_LIMIT_PER_MINUTE
    if not limit or not counts_in_database():
        return None
    return fastpath.RateCount(window=int(time.time() // 60), limit=limit)


RATE_SQL = "SELECT usage_api_rate_count(%s, %s)"


def _count_in_database(key_hash: str, window: int) -> int | None:
    """The request's count in ``window``; None when the function is not there yet (deployed
    before its migration ran: the cache counts meanwhile)."""
    try:
        return fastpath.statement_row(RATE_SQL, [key_hash, window])[0]
    except ProgrammingError as exc:
        if getattr(exc.__cause__, "sqlstate", None) == fastpath.UNDEFINED_FUNCTION:
            return None
        raise


def _count_in_cache(name: str) -> int:
    backend = caches[DEFAULT_CACHE_ALIAS]  # (the proxy ``cache`` looks it up on every attribute)
    count = getattr(backend, "count", None)
    if count is not None:  # capacity_portal.cache.RedisCache: one atomic round trip
        return count(name, RATE_WINDOW_TTL)
    try:
        return backend.incr(name)
    except ValueError:  # the window's first request
        if backend.add(name, 1, timeout=RATE_WINDOW_TTL):
            return 1
        return backend.incr(name)  # another request created it meanwhile


# -- the API ---------------------------------------------------------------------------------


class UsageApi(NinjaAPI):
    """NinjaAPI whose 405 and 404 (unknown path, the bare root) are JSON errors too."""

    def on_exception(self, request: HttpRequest, exc: Exception) -> HttpResponse:
        # A key not looked up yet (POST /usage): a bad key is 401 before any other error.
        bearer = getattr(request, "auth", None)
        if isinstance(bearer, BearerKey) and not isinstance(exc, AuthenticationError):
            try:
                if bearer.api_key() is None:
                    exc = AuthenticationError()
            except DatabaseError as lookup_failed:  # (a JSON 503 or 500, never Django's HTML page)
                exc = lookup_failed
        return super().on_exception(request, exc)

    @property
    def urls(self):
        patterns, app_name, namespace = super().urls
        wrapped = []
        for pattern in patterns:
            pattern.callback = _json_not_allowed(pattern.callback)
            wrapped.append(pattern)
        wrapped.append(re_path(r"^.*$", _unknown_path, name="unknown"))
        return wrapped, app_name, namespace


def _json_not_allowed(view):
    def wrapper(request, *args, **kwargs):
        try:
            response = view(request, *args, **kwargs)
        except Http404:  # ninja's API root page
            return _unknown_path(request)
        if isinstance(response, HttpResponseNotAllowed):
            json = api.create_response(
                request, error_body("method_not_allowed", f"{request.method} is not allowed here."), status=405
            )
            json["Allow"] = response["Allow"]
            return json
        return response

    for attr in ("csrf_exempt", "__name__", "__doc__"):
        if hasattr(view, attr):
            setattr(wrapper, attr, getattr(view, attr))
    return wrapper


def _unknown_path(request, *args, **kwargs):
    return api.create_response(request, error_body("not_found", "No such API endpoint."), status=404)


_unknown_path.csrf_exempt = True


api = UsageApi(
    title="Capacity portal usage API",
    version="1",
    description=(
        "Report consumption and read balances. Authenticate with `Authorization: Bearer <key>`. "
        "Every error is `{\"error\": {\"code\", \"message\"}}`."
    ),
    urls_namespace="api-v1",
    auth=ApiKeyAuth(),
    # Swagger UI from ninja's bundled static files ("ninja" is in INSTALLED_APPS): no CDN;
    # validatorUrl None: no call to the online validator either. Works offline.
    docs=Swagger(settings={"validatorUrl": None, "persistAuthorization": True}),
    docs_url="/docs",
    openapi_url="/openapi.json",
)
CONTENT_TYPE = api.get_content_type()


def _error(request: HttpRequest, code: str, message: str, status: int) -> HttpResponse:
    return api.create_response(request, error_body(code, message), status=status)


@api.exception_handler(UsageError)
def _usage_error(request, exc: UsageError):
    response = _error(request, exc.code, exc.message, exc.status_code)
    if isinstance(exc, RateLimited):
        response["Retry-After"] = str(exc.retry_after)
    if isinstance(exc, Unavailable):
        response["Retry-After"] = "1"
    return response


@api.exception_handler(ValidationError)
def _validation_error(request, exc: ValidationError):
    return _error(request, "invalid_request", _describe(exc.errors), 422)


@api.exception_handler(AuthenticationError)
def _unauthorized(request, exc):
    response = _error(request, "unauthorized", "A valid API key is required: Authorization: Bearer <key>.", 401)
    response["WWW-Authenticate"] = "Bearer"
    return response


@api.exception_handler(HttpError)
def _http_error(request, exc: HttpError):
    cause = exc.__cause__
    if isinstance(cause, RequestDataTooBig):
        return _error(request, "payload_too_large", "The request body is too large.", 413)
    if isinstance(cause, UsageError):
        return _usage_error(request, cause)
    if exc.status_code == 400:  # ninja could not parse the body
        return _error(request, "invalid_request", "The request body is not valid JSON.", 422)
    code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status_code, "error")
    return _error(request, code, str(exc), exc.status_code)


@api.exception_handler(RequestDataTooBig)
def _too_big(request, exc):
    return _error(request, "payload_too_large", "The request body is too large.", 413)


@api.exception_handler(OperationalError)
def _database_unavailable(request, exc: OperationalError):
    # The database is unreachable or busy (not a bug in the request): ask the caller to retry.
    logger.error("database unavailable in %s %s: %s", request.method, request.path, exc)
    response = _error(request, "unavailable", "The service is temporarily unavailable; retry the request.", 503)
    response["Retry-After"] = "5"
    return response


@api.exception_handler(Exception)
def _bug(request, exc: Exception):
    # Last resort, for genuine bugs only: every expected failure has a code above.
    logger.exception("Unhandled error in %s %s", request.method, request.path)
    return _error(request, "internal_error", "Something went wrong on our side; it has been logged.", 500)


def _describe(errors: list[dict]) -> str:
    parts = []
    for err in errors[:5]:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "payload", "data")]
        where = ".".join(loc) or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "The request is not valid."


# -- helpers ---------------------------------------------------------------------------------


def render(data) -> bytes:
    """``data`` as the API's JSON renderer writes it."""
    return api.renderer.render(None, data, response_status=200).encode(api.renderer.charset)


def json_response(request: HttpRequest, outcome: Outcome) -> HttpResponse:
    response = api.create_response(request, outcome.body, status=outcome.status_code)
    if outcome.replayed:
        response["Idempotent-Replayed"] = "true"
    return response


def _is_retryable(exc: OperationalError) -> bool:
    return getattr(exc.__cause__, "sqlstate", None) in RETRY_SQLSTATES


def _with_retry(fn):
    """Run a write; rerun it if PostgreSQL chose it as a deadlock/serialization victim."""
    for attempt in range(WRITE_ATTEMPTS):
        try:
            return fn()
        except OperationalError as exc:
            if not _is_retryable(exc):
                raise
            logger.warning("usage write retried after %s (attempt %d)", exc.__cause__.sqlstate, attempt + 1)
    raise Unavailable("The balance is busy; retry the request.")


def _held_products(team: Team) -> dict[str, Product]:
    """The products the team holds (ever granted), by code: one query."""
    return {tp.product.code: tp.product for tp in TeamProduct.objects.for_team(team).select_related("product")}


def _held_product(team: Team, code: str) -> Product:
    tp = TeamProduct.objects.for_team(team).select_related("product").filter(product__code=code).first()
    if tp is None:
        raise unknown_product(code)
    return tp.product


def _check_occurred_at(at: datetime | None, now: datetime) -> None:
    if at is None:
        return
    try:
        ok = now - OCCURRED_AT_PAST <= at <= now + OCCURRED_AT_FUTURE
    except OverflowError:
        ok = False
    if not ok:
        raise InvalidRequest("occurred_at must be between 35 days ago and 5 minutes from now.")


def check_event(data: UsageIn, now: datetime) -> None:
    """What the API refuses before any service runs (field combinations, the time window)."""
    _check_occurred_at(data.occurred_at, now)
    if data.kind in ("consume", "metered"):
        if data.checkout_id:
            raise InvalidRequest(f"checkout_id is only for checkout and return, not {data.kind}.")
        return
    if not data.checkout_id:
        raise InvalidRequest(f"checkout_id is required for a {data.kind}.")
    if data.kind == "return" and (data.user or data.service or data.job_id):
        raise InvalidRequest("A return takes user, service and job_id from its checkout: leave them out.")


def _usage_request(data: UsageIn, product: Product) -> UsageRequest:
    return UsageRequest(kind=data.kind, product=product, quantity=data.quantity,
                        idempotency_key=data.idempotency_key, user=data.user, service=data.service,
                        job_id=data.job_id, checkout_id=data.checkout_id, occurred_at=data.occurred_at)


def _record(*, team: Team, actor: Actor, data: UsageIn, product: Product, now: datetime,
            fast: bool = True) -> Outcome:
    """One usage event through its service (the service opens its own (nested) transaction)."""
    check_event(data, now)
    return usage_record(team=team, request=_usage_request(data, product), actor=actor, now=now, fast=fast)


# -- endpoints -------------------------------------------------------------------------------


# Under WSGI, usage.lane answers the plain consumes before they get here (same model, checks,
# rate count and service call) and hands this operation everything else: it stays the reference.
@api.post("/usage", response={201: UsageOut, **ERRORS}, auth=ApiKeyAuth(defer_lookup=True),
          summary="Report usage (consume, checkout, return, metered)")
def post_usage(request: HttpRequest, data: UsageIn):
    """Record one usage event. A retry with the same `idempotency_key` and body returns the
    original status and body with the header `Idempotent-Replayed: true`; the same key with a
    different body is `409 idempotency_conflict`."""
    bearer: BearerKey = request.auth
    if data.kind == "consume":
        # PostgreSQL: the key, the product and the whole write in one round trip; None: not applicable.
        check_event(data, timezone.now())
        try:
            outcome = _with_retry(lambda: consume_with_key(bearer.hashed, data))
        except fastpath.KeyRejected:
            raise AuthenticationError from None
        if outcome is not None:
            return json_response(request, outcome)
    api_key = bearer.api_key()
    if api_key is None:
        raise AuthenticationError
    team = api_key.team
    product = _held_product(team, data.product)
    # (A consume that gets here was just handed over: no second try of the fast path.)
    outcome = _with_retry(lambda: _record(team=team, actor=Actor.for_api_key(api_key), data=data, product=product,
                                          now=timezone.now(), fast=data.kind != "consume"))
    return json_response(request, outcome)


def consume_with_key(key_hash: str, data: UsageIn, *, rate: fastpath.RateCount | None = None) -> Outcome | None:
    """A consume by the API key whose SHA-256 is ``key_hash``, in one round trip (see
    ``usage_consume_with_key``), counted against the key's rate limit there too with
    ``rate``; None when that path does not apply."""
    now = timezone.now()
    return usage_consume_with_key(
        key_hash=key_hash, key_stale=now - LAST_USED_EVERY, product_code=data.product, quantity=data.quantity,
        idempotency_key=data.idempotency_key, user=data.user, service=data.service, job_id=data.job_id,
        occurred_at=data.occurred_at, now=now, rate=rate,
    )


@api.post("/usage/batch", response={200: BatchOut, **ERRORS}, summary="Report up to 1,000 usage events")
def post_usage_batch(request: HttpRequest, data: BatchIn):
    """Each event is recorded as by `POST /usage`, with its own idempotency key and its own
    result (`status` and `body`, or `error`); one failing event does not spoil the others.
    The batch runs in one transaction with a savepoint per event."""
    limit = settings.API_BATCH_MAX_EVENTS
    if len(data.events) > limit:
        raise PayloadTooLarge(f"A batch holds at most {limit} events; this one has {len(data.events)}.")
    api_key: ApiKey = request.auth
    team = api_key.team
    actor = Actor.for_api_key(api_key)
    products = _held_products(team)

    parsed: list[UsageIn | UsageError] = []
    for item in data.events:
        try:
            event = UsageIn.model_validate(item)
        except pydantic.ValidationError as exc:
            parsed.append(InvalidRequest(_describe(exc.errors(include_url=False))))
            continue
        if event.product not in products:
            parsed.append(unknown_product(event.product))
            continue
        parsed.append(event)
    valid: list[tuple[int, UsageIn]] = []
    for index, event in enumerate(parsed):
        if isinstance(event, UsageIn):
            try:
                check_event(event, timezone.now())
            except UsageError as exc:
                parsed[index] = exc
                continue
            valid.append((index, event))
    requests = [_usage_request(event, products[event.product]) for _, event in valid]

    def run() -> list[dict]:
        # One transaction; the service locks the balances in a fixed order and writes in bulk.
        outcomes = usage_record_many(team=team, requests=requests, actor=actor, now=timezone.now())
        results: list[dict | None] = [None] * len(parsed)
        for index, event in enumerate(parsed):
            if isinstance(event, UsageError):
                results[index] = _batch_error(index, event)
        for (index, _), outcome in zip(valid, outcomes, strict=True):
            if isinstance(outcome, UsageError):
                results[index] = _batch_error(index, outcome)
            else:
                results[index] = {"index": index, "status": outcome.status_code, "replayed": outcome.replayed,
                                  "body": outcome.body}
        return results

    return api.create_response(request, {"results": _with_retry(run)}, status=200)


def _batch_error(index: int, exc: UsageError) -> dict:
    return {"index": index, "status": exc.status_code, "replayed": False,
            "error": {"code": exc.code, "message": exc.message}}


@api.post("/jobs/{job_id}/refund", response={200: RefundOut, **ERRORS}, summary="Refund a failed or cancelled job")
def post_job_refund(request: HttpRequest, job_id: str, data: RefundIn):
    """Give back exactly what the job consumed, to the same lots, once. `404 not_found` when
    the key's team recorded no consumption for this job."""
    _clean_or_422(job_id, "job_id")
    api_key: ApiKey = request.auth
    actor = Actor.for_api_key(api_key)
    outcome = _with_retry(lambda: job_refund(team=api_key.team, job_id=job_id, idempotency_key=data.idempotency_key,
                                             actor=actor, reason=data.reason))
    return json_response(request, outcome)


def _clean_or_422(value: str, name: str) -> None:
    try:
        _clean_text(value)
    except ValueError as exc:
        raise InvalidRequest(f"{name} {exc}.") from None


@api.get("/balances", response={200: BalancesOut, **ERRORS}, summary="Balances of the team's products")
def get_balances(request: HttpRequest):
    """The same numbers as the dashboard cards, for every product the team has been granted."""
    team = request.auth.team
    return {"balances": [
        {
            "product": b.product.code, "name": b.product.name, "unit": b.product.unit,
            "capacity_type": b.product.capacity_type, "available": b.available, "total": b.total,
            "used_pct": float(b.used_pct), "status": b.status, "ends_at": b.ends_at,
            "refreshes_at": b.refreshes_at, "purchased": b.purchased, "checked_out": b.checked_out,
        }
        for b in team_balances(team)
    ]}


@api.get("/usage", response={200: HistoryOut, **ERRORS}, summary="Usage history of one product")
def get_usage(request: HttpRequest, params: Query[HistoryQuery]):
    """Per day, ISO week (bucket starts on Monday) or month, in the team's time zone, from
    the daily rollups. Default range: this month so far."""
    team = request.auth.team
    product = _held_product(team, params.product)
    start, end = params.start, params.end
    for value in (start, end):
        if value is not None and not (HISTORY_FIRST_DAY <= value <= HISTORY_LAST_DAY):
            raise InvalidRequest(f"Dates must be between {HISTORY_FIRST_DAY} and {HISTORY_LAST_DAY}.")
    if start is None and end is None:
        start, end, _ = resolve_range(team=team, range_key="month", start=None, end=None)
    elif start is None:
        start = end.replace(day=1)
    elif end is None:
        end = max(team_today(team), start)
    if params.granularity not in GRANULARITIES:  # pragma: no cover (the Literal already refuses it)
        raise InvalidRequest("granularity must be day, week or month.")
    buckets = usage_series(team=team, product=product, start=start, end=end, granularity=params.granularity,
                           user=params.user)
    return {
        "product": product.code, "unit": product.unit, "capacity_type": product.capacity_type,
        "granularity": params.granularity, "start": start, "end": end, "user": params.user,
        "series": [{**b.as_dict(), "net_consumed": b.net_consumed} for b in buckets],
    }
