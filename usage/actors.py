from __future__ import annotations

from dataclasses import dataclass

from teams.models import ApiKey


@dataclass(frozen=True)
class Actor:
    """Who performs a write: a signed-in user (staff, admin) or an API key."""

    user: object | None = None
    api_key: ApiKey | None = None
    label: str = ""

    @classmethod
    def for_user(cls, user) -> Actor:
        if user is None or not getattr(user, "is_authenticated", False):
            return cls(label="system")
        return cls(user=user, label=f"user:{user.get_username()}")

    @classmethod
    def for_api_key(cls, api_key: ApiKey) -> Actor:
        return cls(api_key=api_key, label=f"api_key:{api_key.prefix}")

    @classmethod
    def system(cls, what: str = "system") -> Actor:
        return cls(label=what)

    def entry_fields(self) -> dict:
        return {"actor": self.label, "actor_user": self.user, "actor_api_key": self.api_key}
