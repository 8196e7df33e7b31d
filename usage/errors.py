"""Domain errors of the ledger services. Each maps to one API error code."""

from __future__ import annotations


class UsageError(Exception):
    code = "invalid_request"
    status_code = 422

    def __init__(self, message: str, **details):
        super().__init__(message)
        self.message = message
        self.details = details

    def as_dict(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


class InvalidRequest(UsageError):
    code = "invalid_request"
    status_code = 422


class NotFound(UsageError):
    code = "not_found"
    status_code = 404


class InsufficientBalance(UsageError):
    code = "insufficient_balance"
    status_code = 409


class IdempotencyConflict(UsageError):
    code = "idempotency_conflict"
    status_code = 409


class CheckoutExceeded(UsageError):
    code = "checkout_exceeded"
    status_code = 409


class CheckoutExists(UsageError):
    code = "checkout_exists"
    status_code = 409


# Transport-level errors of the HTTP API (same JSON shape).


class PayloadTooLarge(UsageError):
    code = "payload_too_large"
    status_code = 413


class RateLimited(UsageError):
    code = "rate_limited"
    status_code = 429

    def __init__(self, message: str, *, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(UsageError):
    code = "unavailable"
    status_code = 503


# The messages every write path shares (the Python services, the batch, the SQL fast path
# and the API's product lookup): one wording each.


def insufficient_balance(unit: str, code: str, requested: int, available: int) -> InsufficientBalance:
    return InsufficientBalance(f"Not enough {unit} of {code}: {requested} requested, {available} available.",
                               available=available)


def key_reused() -> IdempotencyConflict:
    return IdempotencyConflict("This idempotency key was already used with a different request body.")


def returnable_not_consumable(code: str) -> InvalidRequest:
    return InvalidRequest(f"{code} is returnable capacity: use checkout and return.")


def unknown_product(code: str) -> NotFound:
    return NotFound(f"Unknown product {code!r}.")
