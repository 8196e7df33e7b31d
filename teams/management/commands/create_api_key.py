from django.core.management.base import BaseCommand, CommandError

from teams.models import Team
from teams.services import api_key_create


class Command(BaseCommand):
    help = "Create an API key for a team. The key is printed alone on the last line, once."

    def add_arguments(self, parser):
        parser.add_argument("team_slug")
        parser.add_argument("--name", default="default")

    def handle(self, *args, team_slug, name, **options):
        team = Team.objects.filter(slug=team_slug).first()
        if team is None:
            raise CommandError(f"No team with slug {team_slug!r}.")
        key, raw = api_key_create(team=team, name=name)
        self.stdout.write(f"API key {key.name!r} ({key.prefix}…) for team {team.slug}; shown once, store it now:")
        self.stdout.write(raw)
