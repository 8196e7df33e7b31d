from __future__ import annotations

from .models import ApiKey, Team


def api_key_create(*, team: Team, name: str = "default", created_by=None) -> tuple[ApiKey, str]:
    """Create a key; returns it with the raw secret, which is never stored or shown again."""
    key = ApiKey(team=team, name=name or "default", created_by=created_by)
    raw = key.set_new_secret()
    key.save()
    return key, raw
