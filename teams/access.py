"""The one way a view resolves its team: 404 to outsiders, 403 to the wrong role."""

from __future__ import annotations

from django.core.exceptions import PermissionDenied
from django.db import connection
from django.http import Http404, HttpRequest

from capacity_portal.postgresql.rows import columns, from_row

from .models import Membership, Team


def get_team_for_user(request: HttpRequest, slug: str, *, admin: bool = True) -> tuple[Team, Membership]:
    """Resolve ``slug`` to a team the signed-in user belongs to.

    Non-members (staff included: they use /admin/) get 404, so a team's existence
    never leaks; members without an admin role get 403 when ``admin`` is required.
    Views must be wrapped in ``login_required`` so anonymous users go to login.
    """
    user = request.user
    if not user.is_authenticated:
        raise Http404
    membership = _membership(slug, user.pk)
    if membership is None:
        raise Http404("No such team.")
    if admin and not membership.is_admin:
        raise PermissionDenied("Team admins only.")
    return membership.team, membership


def _membership(slug: str, user_id: int) -> Membership | None:
    """The user's membership of the team ``slug``, with its team (one query).

    PostgreSQL: fixed SQL (building and compiling the queryset took longer than running
    it, on every page); the ORM elsewhere. tests/test_access_matrix.py runs on both.
    """
    if connection.vendor != "postgresql":
        return Membership.objects.select_related("team").filter(team__slug=slug, user_id=user_id).first()
    with connection.cursor() as cursor:
        cursor.execute(_MEMBERSHIP_SQL, [slug, user_id])
        row = cursor.fetchone()
    if row is None:
        return None
    n = len(_MEMBERSHIP_FIELDS)
    membership = from_row(Membership, _MEMBERSHIP_FIELDS, row[:n])
    Membership._meta.get_field("team").set_cached_value(membership, from_row(Team, _TEAM_FIELDS, row[n:]))
    return membership


_MEMBERSHIP_FIELDS = Membership._meta.concrete_fields
_TEAM_FIELDS = Team._meta.concrete_fields
# (user, team) is unique: at most one row.
_MEMBERSHIP_SQL = (
    f"SELECT {columns(_MEMBERSHIP_FIELDS, 'm')}, {columns(_TEAM_FIELDS, 't')}"
    " FROM teams_membership m JOIN teams_team t ON t.id = m.team_id WHERE t.slug = %s AND m.user_id = %s"
)
