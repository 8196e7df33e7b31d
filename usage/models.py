from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import F, Q

from products.models import Grant, Lot, Product
from teams.models import ApiKey, Team


class LedgerImmutableError(Exception):
    """Raised on any attempt to change or delete a ledger row."""


class Kind(models.TextChoices):
    GRANT = "grant", "Grant"
    CONSUME = "consume", "Consume"
    CHECKOUT = "checkout", "Checkout"
    RETURN = "return", "Return"
    REFUND = "refund", "Refund"
    EXPIRE = "expire", "Expire"
    REFRESH = "refresh", "Refresh"
    REVOKE = "revoke", "Revoke"
    ADJUST = "adjust", "Adjust"


class EventQuerySet(models.QuerySet):
    def for_team(self, team: Team) -> EventQuerySet:
        return self.filter(team=team)


class Event(models.Model):
    """One write request and its outcome: the idempotency record.

    Unique per (team, key). A retry with the same key and the same fingerprint gets
    ``status_code``/``response`` back; a different fingerprint is a conflict.
    Rejected requests (e.g. insufficient balance) roll back with their event, so a
    retry after a top-up can succeed.
    """

    team = models.ForeignKey(Team, on_delete=models.PROTECT, related_name="events", db_index=False)
    key = models.CharField(max_length=255)
    fingerprint = models.CharField(max_length=64)
    operation = models.CharField(max_length=32)
    request = models.JSONField(default=dict)
    status_code = models.PositiveSmallIntegerField(default=0)
    response = models.JSONField(default=dict)
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    # Set for a signed-in user's requests only (not the API's): indexed where set (Meta).
    actor_user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+", db_index=False
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    objects = EventQuerySet.as_manager()

    class Meta:
        indexes = [
            models.Index(fields=["actor_user"], condition=Q(actor_user__isnull=False), name="event_actor_user_set"),
        ]
        constraints = [
            models.UniqueConstraint(fields=["team", "key"], name="event_team_key_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.operation} {self.key}"


class Checkout(models.Model):
    """Returnable capacity held by a caller under a checkout_id of its choosing."""

    team = models.ForeignKey(Team, on_delete=models.PROTECT, related_name="+", db_index=False)
    product = models.ForeignKey(Product, on_delete=models.PROTECT, related_name="+")
    checkout_id = models.CharField(max_length=255)
    quantity = models.PositiveBigIntegerField()
    returned = models.PositiveBigIntegerField(default=0)
    user = models.CharField(max_length=254, blank=True)
    service = models.CharField(max_length=100, blank=True)
    occurred_at = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["team", "product", "checkout_id"], name="checkout_id_unique"),
            models.CheckConstraint(condition=Q(returned__lte=F("quantity")), name="checkout_returned_le_quantity"),
        ]

    def __str__(self) -> str:
        return f"checkout {self.checkout_id} ({self.quantity - self.returned} of {self.quantity} out)"

    @property
    def outstanding(self) -> int:
        return self.quantity - self.returned


class LedgerQuerySet(models.QuerySet):
    def for_team(self, team: Team) -> LedgerQuerySet:
        return self.filter(team=team)

    def update(self, **kwargs):
        raise LedgerImmutableError("Ledger entries are append-only: they cannot be updated.")

    def delete(self):
        raise LedgerImmutableError("Ledger entries are append-only: they cannot be deleted.")


class LedgerEntry(models.Model):
    """An append-only record of one change to one lot (or of a grant).

    For every lot: ``quantity + sum(delta of its entries) == remaining``. Creation
    rows (``grant``/``refresh``) carry the new capacity as ``delta`` on the grant and
    are not attached to the lot, so the per-lot invariant counts movements only, and
    the sum of a team's deltas for a product equals what its unexpired lots hold.
    ``amount`` is the size of the operation even when it changed nothing (a refund
    to an expired lot is recorded with delta 0).
    """

    team = models.ForeignKey(Team, on_delete=models.PROTECT, related_name="+", db_index=False)
    product = models.ForeignKey(Product, on_delete=models.PROTECT, related_name="+")
    lot = models.ForeignKey(Lot, null=True, blank=True, on_delete=models.PROTECT, related_name="entries")
    grant = models.ForeignKey(Grant, null=True, blank=True, on_delete=models.PROTECT, related_name="entries")
    kind = models.CharField(max_length=10, choices=Kind.choices)
    delta = models.BigIntegerField()
    amount = models.PositiveBigIntegerField(default=0)
    occurred_at = models.DateTimeField()
    recorded_at = models.DateTimeField(auto_now_add=True)
    actor = models.CharField(max_length=300, blank=True, help_text="Who wrote it: user or API key.")
    # actor_user, member and checkout are mostly empty (the API's rows have no signed-in
    # user; only checkouts have a checkout): indexed where set (Meta), for the foreign key
    # checks of a delete, so that the empty ones write no index entry.
    actor_user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+", db_index=False
    )
    actor_api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    user = models.CharField(max_length=254, blank=True, help_text="Whose usage, as the service sent it.")
    member = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="usage_entries",
        db_index=False,
    )
    service = models.CharField(max_length=100, blank=True)
    job_id = models.CharField(max_length=255, blank=True)
    event = models.ForeignKey(Event, null=True, blank=True, on_delete=models.PROTECT, related_name="entries")
    checkout = models.ForeignKey(
        Checkout, null=True, blank=True, on_delete=models.PROTECT, related_name="entries", db_index=False
    )
    reverses = models.OneToOneField(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="reversed_by",
        help_text="For refunds: the consume entry given back (at most once).",
    )
    note = models.CharField(max_length=500, blank=True)

    objects = LedgerQuerySet.as_manager()

    class Meta:
        verbose_name_plural = "ledger entries"
        ordering = ["-occurred_at", "-id"]
        indexes = [
            models.Index(fields=["team", "product", "occurred_at"], name="ledger_team_product_time"),
            models.Index(fields=["team", "job_id"], condition=~Q(job_id=""), name="ledger_team_job"),
            models.Index(fields=["actor_user"], condition=Q(actor_user__isnull=False), name="ledger_actor_user_set"),
            models.Index(fields=["member"], condition=Q(member__isnull=False), name="ledger_member_set"),
            models.Index(fields=["checkout"], condition=Q(checkout__isnull=False), name="ledger_checkout_set"),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(kind__in=[c.value for c in Kind]), name="ledger_kind_valid"),
            # Movements are attached to a lot; creation rows to a grant.
            models.CheckConstraint(
                condition=Q(kind__in=["grant", "refresh"], grant__isnull=False, lot__isnull=True)
                | (~Q(kind__in=["grant", "refresh"]) & Q(lot__isnull=False)),
                name="ledger_row_target",
            ),
            models.CheckConstraint(
                condition=~Q(kind__in=["consume", "checkout"]) | Q(delta__lt=0),
                name="ledger_consume_negative",
            ),
            models.CheckConstraint(
                condition=~Q(kind__in=["refund", "return"]) | Q(delta__gte=0),
                name="ledger_refund_nonnegative",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.delta:+d} ({self.product_id}) at {self.occurred_at:%Y-%m-%d %H:%M}"

    def save(self, *args, **kwargs):
        if self.pk is not None and not self._state.adding:
            raise LedgerImmutableError("Ledger entries are append-only: they cannot be updated.")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise LedgerImmutableError("Ledger entries are append-only: they cannot be deleted.")


class RollupQuerySet(models.QuerySet):
    def for_team(self, team: Team) -> RollupQuerySet:
        return self.filter(team=team)


class DailyRollup(models.Model):
    """Per team, product and local day: totals kept exact by the write transaction."""

    team = models.ForeignKey(Team, on_delete=models.PROTECT, related_name="+", db_index=False)
    product = models.ForeignKey(Product, on_delete=models.PROTECT, related_name="+")
    day = models.DateField(help_text="Day in the team's time zone.")
    consumed = models.BigIntegerField(default=0)
    refunded = models.BigIntegerField(default=0)
    checked_out = models.BigIntegerField(default=0)
    returned = models.BigIntegerField(default=0)
    raw_usage = models.BigIntegerField(default=0)
    peak_checked_out = models.BigIntegerField(default=0)
    closing_checked_out = models.BigIntegerField(default=0)
    # Capacity movements of the day (grant/refresh added; expire/revoke removed): with
    # consumed and refunded they give the balance over time without reading the ledger.
    granted = models.BigIntegerField(default=0, db_default=0)
    expired = models.BigIntegerField(default=0, db_default=0)

    objects = RollupQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["team", "product", "day"], name="rollup_day_unique"),
        ]
        indexes = [
            # The dashboard's forecast sums the last 30 days of every product of a team.
            models.Index(fields=["team", "day"], include=["product", "consumed", "refunded"],
                         name="rollup_team_day"),
        ]

    def __str__(self) -> str:
        return f"{self.product_id} on {self.day}"


class DailyBreakdown(models.Model):
    """Per team, product, local day, service and user: consumption for the breakdowns."""

    team = models.ForeignKey(Team, on_delete=models.PROTECT, related_name="+", db_index=False)
    product = models.ForeignKey(Product, on_delete=models.PROTECT, related_name="+")
    day = models.DateField()
    service = models.CharField(max_length=100, blank=True)
    user = models.CharField(max_length=254, blank=True)
    consumed = models.BigIntegerField(default=0)
    refunded = models.BigIntegerField(default=0)
    checked_out = models.BigIntegerField(default=0)
    returned = models.BigIntegerField(default=0)
    raw_usage = models.BigIntegerField(default=0)

    objects = RollupQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["team", "product", "day", "service", "user"], name="breakdown_unique"
            ),
        ]
        indexes = [models.Index(fields=["team", "product", "user", "day"], name="breakdown_user_day")]

    def __str__(self) -> str:
        return f"{self.product_id} on {self.day} ({self.service or '-'}/{self.user or '-'})"


# -- periodic work (usage.tasks) ------------------------------------------------------


class AlertState(models.Model):
    """Whether one alert condition of a balance is currently crossed (and was told).

    One row per (team, product, key): ``low``, ``empty``, ``used:<pct>`` or
    ``grant_ending:<grant id>``. Firing claims the row with a conditional UPDATE
    (``active=False -> True``), so a crossing is emailed once however many checkers
    run; recovering resets it, so the next crossing is emailed again.
    """

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="+", db_index=False)
    product = models.ForeignKey(Product, on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=64)
    active = models.BooleanField(default=False)
    fired_at = models.DateTimeField(null=True, blank=True)
    cleared_at = models.DateTimeField(null=True, blank=True)
    times_fired = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["team", "product", "key"], name="alertstate_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.team_id}/{self.product_id} {self.key} ({'on' if self.active else 'off'})"


class ReconciliationRun(models.Model):
    """One sweep of the ledger invariant over every lot (one check per balance)."""

    started_at = models.DateTimeField()
    balances_expected = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["-started_at", "-id"]

    def __str__(self) -> str:
        return f"Reconciliation {self.pk} at {self.started_at:%Y-%m-%d %H:%M}"


class ReconciliationCheck(models.Model):
    """One balance checked in a run; unique, so a rerun of the same unit is a no-op."""

    run = models.ForeignKey(ReconciliationRun, on_delete=models.CASCADE, related_name="checks", db_index=False)
    team_product = models.ForeignKey("products.TeamProduct", on_delete=models.CASCADE, related_name="+")
    checked_at = models.DateTimeField()
    lots_checked = models.PositiveIntegerField(default=0)
    drift_count = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["run", "team_product"], name="reconcile_check_unique"),
        ]

    def __str__(self) -> str:
        return f"run {self.run_id}: balance {self.team_product_id} ({self.drift_count} drift)"


class Drift(models.Model):
    """A broken invariant found by periodic work. Must stay empty; shown to staff."""

    class Kind(models.TextChoices):
        LOT = "lot", "Lot: quantity + sum(deltas) != remaining"
        ROLLUP = "rollup", "Daily rollup differs from the ledger"

    kind = models.CharField(max_length=8, choices=Kind.choices)
    run = models.ForeignKey(ReconciliationRun, null=True, blank=True, on_delete=models.CASCADE,
                            related_name="drifts")
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="+")
    product = models.ForeignKey(Product, on_delete=models.CASCADE, related_name="+")
    lot = models.ForeignKey(Lot, null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    day = models.DateField(null=True, blank=True)
    expected = models.JSONField(default=dict, help_text="What the ledger says.")
    actual = models.JSONField(default=dict, help_text="What the row held.")
    found_at = models.DateTimeField()
    fixed = models.BooleanField(default=False, help_text="Rollups are rewritten from the ledger; lots never are.")

    class Meta:
        ordering = ["-found_at", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["run", "lot"], condition=Q(kind="lot"), name="drift_run_lot_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} ({self.team_id}/{self.product_id})"
