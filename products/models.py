from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import F, Q

from teams.models import Team


class CapacityType(models.TextChoices):
    RETURNABLE = "returnable", "Returnable"
    EXHAUSTIBLE = "exhaustible", "Exhaustible"


class Product(models.Model):
    """A capacity-based product of the catalog (staff-managed)."""

    code = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    unit = models.CharField(max_length=64, default="tokens", help_text='e.g. "tokens", "assets"')
    capacity_type = models.CharField(
        max_length=12, choices=CapacityType.choices, default=CapacityType.EXHAUSTIBLE
    )
    metered = models.BooleanField(
        default=False,
        help_text="Metered API product: raw usage is charged in units of charge_unit_size.",
    )
    charge_unit_size = models.PositiveIntegerField(
        default=1, help_text="Raw usage per charged unit (e.g. 20 processing minutes)."
    )
    raw_unit = models.CharField(
        max_length=64, blank=True, help_text='Label of raw usage for metered products, e.g. "minutes".'
    )
    description = models.TextField(blank=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(condition=Q(charge_unit_size__gte=1), name="product_charge_unit_positive"),
            models.CheckConstraint(
                condition=Q(capacity_type__in=["returnable", "exhaustible"]),
                name="product_capacity_type_valid",
            ),
            models.CheckConstraint(
                condition=Q(metered=False) | Q(capacity_type="exhaustible"),
                name="product_metered_is_exhaustible",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.code})"

    @property
    def is_returnable(self) -> bool:
        return self.capacity_type == CapacityType.RETURNABLE


class TeamProductQuerySet(models.QuerySet):
    def for_team(self, team: Team) -> TeamProductQuerySet:
        return self.filter(team=team)


class TeamProduct(models.Model):
    """A product a team has ever been granted: the row that serialises its writes.

    Every write for (team, product) locks this row first, so consumers, refunds,
    refreshes and grants of one balance run one at a time while other balances
    proceed in parallel. It also carries the metered remainder and the amount
    currently checked out.
    """

    team = models.ForeignKey(Team, on_delete=models.PROTECT, related_name="team_products", db_index=False)
    product = models.ForeignKey(Product, on_delete=models.PROTECT, related_name="team_products")
    metered_carry = models.BigIntegerField(default=0, help_text="Raw usage not yet charged.")
    checked_out = models.BigIntegerField(default=0, help_text="Capacity currently checked out.")
    # Cache for the write path: when the next monthly lot may be due (see ensure_current_lots).
    refresh_checked_at = models.DateTimeField(null=True, blank=True, editable=False)
    refresh_due_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = TeamProductQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["team", "product"], name="teamproduct_unique"),
            models.CheckConstraint(condition=Q(metered_carry__gte=0), name="teamproduct_carry_nonneg"),
            models.CheckConstraint(condition=Q(checked_out__gte=0), name="teamproduct_checked_out_nonneg"),
        ]

    def __str__(self) -> str:
        return f"{self.team} / {self.product.code}"


class Source(models.TextChoices):
    FREE_TIER = "free_tier", "Free tier"
    SUBSCRIPTION_GIFT = "subscription_gift", "Subscription gift"
    PROMOTION = "promotion", "Promotion"
    FLEX = "flex", "Flex"
    PURCHASE = "purchase", "Purchase"
    ADJUSTMENT = "adjustment", "Adjustment"


# Consumption order: the lower the number, the earlier a source is spent.
SOURCE_PRIORITY = {
    Source.FREE_TIER: 0,
    Source.SUBSCRIPTION_GIFT: 1,
    Source.PROMOTION: 2,
    Source.FLEX: 3,
    Source.PURCHASE: 4,
    Source.ADJUSTMENT: 5,
}


class Refresh(models.TextChoices):
    MONTHLY = "monthly", "Monthly"
    NEVER = "never", "Never"


class GrantQuerySet(models.QuerySet):
    def for_team(self, team: Team) -> GrantQuerySet:
        return self.filter(team=team)

    def unrevoked(self) -> GrantQuerySet:
        return self.filter(revoked_at__isnull=True)

    def active_at(self, now) -> GrantQuerySet:
        return self.unrevoked().filter(starts_at__lte=now, ends_at__gt=now)


class Grant(models.Model):
    """Capacity given to a team for a product. Never deleted; revoking is a ledger event."""

    team = models.ForeignKey(Team, on_delete=models.PROTECT, related_name="grants", db_index=False)
    product = models.ForeignKey(Product, on_delete=models.PROTECT, related_name="grants")
    quantity = models.PositiveBigIntegerField()
    source = models.CharField(max_length=20, choices=Source.choices, default=Source.PURCHASE)
    starts_at = models.DateTimeField()
    ends_at = models.DateTimeField()
    refresh = models.CharField(max_length=8, choices=Refresh.choices, default=Refresh.NEVER)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    note = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = GrantQuerySet.as_manager()

    class Meta:
        ordering = ["-starts_at", "-id"]
        indexes = [models.Index(fields=["team", "product", "ends_at"], name="grant_team_product_end")]
        constraints = [
            models.CheckConstraint(condition=Q(quantity__gt=0), name="grant_quantity_positive"),
            models.CheckConstraint(condition=Q(ends_at__gt=F("starts_at")), name="grant_ends_after_start"),
            models.CheckConstraint(
                condition=Q(source__in=[c.value for c in Source]), name="grant_source_valid"
            ),
            models.CheckConstraint(
                condition=Q(refresh__in=["monthly", "never"]), name="grant_refresh_valid"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.quantity} {self.product.unit} of {self.product.code} for {self.team} ({self.get_source_display()})"

    @property
    def priority(self) -> int:
        return SOURCE_PRIORITY[self.source]


class LotQuerySet(models.QuerySet):
    def for_team(self, team: Team) -> LotQuerySet:
        return self.filter(team=team)

    def active_at(self, now) -> LotQuerySet:
        return self.filter(
            period_start__lte=now, expires_at__gt=now, grant__revoked_at__isnull=True
        )

    def in_consumption_order(self) -> LotQuerySet:
        # DESIGN: source priority, earliest expiry, smallest remaining, oldest.
        return self.order_by("priority", "expires_at", "remaining", "created_at", "id")


class Lot(models.Model):
    """One spendable slice of a grant: the whole grant, or one monthly period of it."""

    grant = models.ForeignKey(Grant, on_delete=models.PROTECT, related_name="lots", db_index=False)
    team = models.ForeignKey(Team, on_delete=models.PROTECT, related_name="+", db_index=False)
    product = models.ForeignKey(Product, on_delete=models.PROTECT, related_name="+")
    period_index = models.PositiveIntegerField(default=0)
    period_start = models.DateTimeField()
    expires_at = models.DateTimeField()
    priority = models.PositiveSmallIntegerField(help_text="Source priority, copied from the grant.")
    quantity = models.PositiveBigIntegerField()
    remaining = models.BigIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)
    # Set when the expiry (or revocation) of this lot has been written to the ledger.
    closed_at = models.DateTimeField(null=True, blank=True)

    objects = LotQuerySet.as_manager()

    class Meta:
        ordering = ["period_start", "id"]
        indexes = [
            models.Index(fields=["team", "product", "expires_at"], name="lot_team_product_expiry"),
            models.Index(fields=["expires_at"], condition=Q(closed_at__isnull=True), name="lot_open_expiry"),
        ]
        constraints = [
            models.UniqueConstraint(fields=["grant", "period_start"], name="lot_grant_period_unique"),
            models.CheckConstraint(
                condition=Q(remaining__gte=0) & Q(remaining__lte=F("quantity")),
                name="lot_remaining_within_quantity",
            ),
            models.CheckConstraint(condition=Q(expires_at__gt=F("period_start")), name="lot_expires_after_start"),
        ]

    def __str__(self) -> str:
        return f"Lot {self.pk} of grant {self.grant_id}: {self.remaining}/{self.quantity}"

    def is_active_at(self, now) -> bool:
        return self.period_start <= now < self.expires_at and self.closed_at is None
