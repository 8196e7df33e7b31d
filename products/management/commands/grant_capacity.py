from datetime import datetime

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from products.models import Product, Refresh, Source
from products.services import grant_create
from teams.models import Team
from usage.errors import UsageError


def _parse(value: str, team: Team, what: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise CommandError(f"--{what} {value!r} is not an ISO 8601 date or datetime.") from exc
    if timezone.is_naive(parsed):
        parsed = parsed.replace(tzinfo=team.tzinfo)  # a bare date means the team's local midnight
    return parsed


class Command(BaseCommand):
    help = "Grant capacity to a team through the grant service (same path as the admin)."

    def add_arguments(self, parser):
        parser.add_argument("team_slug")
        parser.add_argument("product_code")
        parser.add_argument("quantity", type=int)
        parser.add_argument("--source", default=Source.PURCHASE, choices=Source.values)
        parser.add_argument("--refresh", default=Refresh.NEVER, choices=Refresh.values)
        parser.add_argument("--starts", help="ISO date/datetime (default: now)")
        parser.add_argument("--ends", help="ISO date/datetime (default: one year after the start)")
        parser.add_argument("--note", default="")

    def handle(self, *args, team_slug, product_code, quantity, source, refresh, starts, ends, note, **options):
        team = Team.objects.filter(slug=team_slug).first()
        if team is None:
            raise CommandError(f"No team with slug {team_slug!r}.")
        product = Product.objects.filter(code=product_code).first()
        if product is None:
            raise CommandError(f"No product with code {product_code!r}.")
        if quantity <= 0:
            raise CommandError("quantity must be a positive whole number.")
        starts_at = _parse(starts, team, "starts") if starts else timezone.now()
        if ends:
            ends_at = _parse(ends, team, "ends")
        else:
            local = starts_at.astimezone(team.tzinfo)
            try:
                ends_at = local.replace(year=local.year + 1)
            except ValueError:  # 29 February
                ends_at = local.replace(year=local.year + 1, day=28)
        try:
            grant = grant_create(
                team=team, product=product, quantity=quantity, source=source, refresh=refresh,
                starts_at=starts_at, ends_at=ends_at, note=note or "granted with grant_capacity",
            )
        except UsageError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(
            f"Granted {grant.quantity} {product.unit} of {product.code} to {team.slug} "
            f"({grant.source}, refresh {grant.refresh}) from {grant.starts_at.isoformat()} to {grant.ends_at.isoformat()}; grant id {grant.pk}"
        )
