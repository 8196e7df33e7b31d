"""The one way a view resolves its team: 404 to outsiders, 403 to the wrong role."""

from __future__ import annotations

from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest

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
    membership = Membership.objects.select_related("team").filter(team__slug=slug, user=user).first()
    if membership is None:
        raise Http404("No such team.")
    if admin and not membership.is_admin:
        raise PermissionDenied("Team admins only.")
    return membership.team, membership
