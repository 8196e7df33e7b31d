from __future__ import annotations

import hashlib
import secrets
import zoneinfo
from functools import cached_property

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q


def validate_timezone(value: str) -> None:
    if value not in zoneinfo.available_timezones():
        raise ValidationError(f"{value!r} is not an IANA time zone name.")


class TeamQuerySet(models.QuerySet):
    def for_user(self, user) -> TeamQuerySet:
        """Teams the user is a member of (any role)."""
        if not user.is_authenticated:
            return self.none()
        return self.filter(memberships__user=user)

    def administered_by(self, user) -> TeamQuerySet:
        if not user.is_authenticated:
            return self.none()
        return self.filter(memberships__user=user, memberships__role__in=ADMIN_ROLES)


class Team(models.Model):
    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=80, unique=True)
    timezone = models.CharField(max_length=64, default="UTC", validators=[validate_timezone])
    # Extra alert thresholds, as "percent used" integers (e.g. [50, 80]).
    alert_thresholds = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = TeamQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @cached_property
    def tzinfo(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.timezone)

    def clean(self) -> None:
        thresholds = self.alert_thresholds or []
        if not isinstance(thresholds, list) or not all(
            isinstance(t, int) and 0 < t < 100 for t in thresholds
        ):
            raise ValidationError(
                {"alert_thresholds": "A list of whole percentages used, between 1 and 99."}
            )


class Role(models.TextChoices):
    PRIMARY_ADMIN = "primary_admin", "Primary admin"
    SECONDARY_ADMIN = "secondary_admin", "Secondary admin"
    SSO_ADMIN = "sso_admin", "SSO admin"
    USER = "user", "User"


ADMIN_ROLES = (Role.PRIMARY_ADMIN, Role.SECONDARY_ADMIN, Role.SSO_ADMIN)


class MembershipQuerySet(models.QuerySet):
    def for_team(self, team: Team) -> MembershipQuerySet:
        return self.filter(team=team)

    def admins(self) -> MembershipQuerySet:
        return self.filter(role__in=ADMIN_ROLES)


class Membership(models.Model):
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships", db_index=False
    )
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=20, choices=Role.choices, default=Role.USER)
    last_seen_at = models.DateTimeField(null=True, blank=True)

    objects = MembershipQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "team"], name="membership_user_team_unique"),
            # Exactly one primary admin: the database refuses a second one.
            models.UniqueConstraint(
                fields=["team"],
                condition=Q(role="primary_admin"),
                name="membership_one_primary_admin_per_team",
            ),
            models.CheckConstraint(
                condition=Q(role__in=[c.value for c in Role]), name="membership_role_valid"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.user} @ {self.team} ({self.get_role_display()})"

    @property
    def is_admin(self) -> bool:
        return self.role in ADMIN_ROLES


class ApiKeyQuerySet(models.QuerySet):
    def for_team(self, team: Team) -> ApiKeyQuerySet:
        return self.filter(team=team)


class ApiKey(models.Model):
    """A team's key for the usage API. Only a SHA-256 of the secret is stored."""

    PREFIX_LEN = 12

    team = models.ForeignKey(Team, on_delete=models.PROTECT, related_name="api_keys")
    name = models.CharField(max_length=100, default="default")
    prefix = models.CharField(max_length=PREFIX_LEN, unique=True, editable=False)
    hashed_key = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @staticmethod
    def hash(raw_key: str) -> str:
        return hashlib.sha256(raw_key.encode()).hexdigest()

    def set_new_secret(self) -> str:
        """Give the key a fresh secret; returns the raw secret (stored only hashed)."""
        raw = "cp_" + secrets.token_urlsafe(32)
        self.prefix = raw[: self.PREFIX_LEN]
        self.hashed_key = self.hash(raw)
        return raw
