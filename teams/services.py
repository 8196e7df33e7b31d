from __future__ import annotations

from datetime import datetime

from django.utils import timezone

from .models import ApiKey, Membership, Team


def api_key_create(*, team: Team, name: str = "default", created_by=None) -> tuple[ApiKey, str]:
    """Create a key; returns it with the raw secret, which is never stored or shown again."""
    key = ApiKey(team=team, name=name or "default", created_by=created_by)
    raw = key.set_new_secret()
    key.save()
    return key, raw


def membership_mark_seen(*, membership: Membership, now: datetime | None = None) -> None:
    """Remember when the member last opened a team page (``/`` returns them there)."""
    now = now or timezone.now()
    # A single UPDATE of one column: concurrent page loads cannot clobber other fields.
    Membership.objects.filter(pk=membership.pk).update(last_seen_at=now)
    membership.last_seen_at = now
