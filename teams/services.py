from __future__ import annotations

from datetime import datetime, timedelta

from django.db.models import Exists, OuterRef, Q
from django.utils import timezone

from .models import ApiKey, Membership, Team


def api_key_create(*, team: Team, name: str = "default", created_by=None) -> tuple[ApiKey, str]:
    """Create a key; returns it with the raw secret, which is never stored or shown again."""
    key = ApiKey(team=team, name=name or "default", created_by=created_by)
    raw = key.set_new_secret()
    key.save()
    return key, raw


SEEN_GRANULARITY = timedelta(minutes=5)


def membership_needs_mark(membership: Membership, others_seen: list, now: datetime) -> bool:
    """Whether opening this team changes what ``/`` answers (saves a write on reloads)."""
    seen = membership.last_seen_at
    if seen is None or seen < now - SEEN_GRANULARITY:
        return True
    return any(other is not None and other >= seen for other in others_seen)


def membership_mark_seen(*, membership: Membership, now: datetime | None = None) -> None:
    """Remember when the member last opened a team page (``/`` returns them there).

    Written only when it changes the answer: the mark is older than a few minutes, or
    another of the user's teams was seen more recently. Reloading one dashboard then
    writes nothing (the UPDATE matches no row: no commit to flush).
    """
    now = now or timezone.now()
    newer_elsewhere = Membership.objects.filter(user_id=membership.user_id, last_seen_at__gte=OuterRef("last_seen_at"))
    newer_elsewhere = newer_elsewhere.exclude(pk=membership.pk)
    # A single conditional UPDATE of one column: concurrent page loads cannot clobber other fields.
    Membership.objects.filter(pk=membership.pk).filter(
        Q(last_seen_at__isnull=True) | Q(last_seen_at__lt=now - SEEN_GRANULARITY) | Exists(newer_elsewhere)
    ).update(last_seen_at=now)
    membership.last_seen_at = now
