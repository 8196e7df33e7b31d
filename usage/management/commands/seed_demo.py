"""Demo data: teams, a user per role, four products, 90 days of usage via the services.

Idempotent: a second run finds the demo teams and changes nothing.
"""

from __future__ import annotations

import random
from datetime import timedelta

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction
from django.utils import timezone

from products.models import CapacityType, Product, Refresh, Source
from products.services import grant_create, subscription_gift_plan
from teams.models import Membership, Role, Team
from usage.actors import Actor
from usage.errors import InsufficientBalance
from usage.services import job_refund, usage_checkout, usage_consume, usage_metered, usage_return

PASSWORD = "demo-pass-2026"
SERVICES = ["rendering", "simulation", "analysis", "optimization", "model_creation"]

PRODUCTS = [
    dict(code="asset-pool", name="Pooled design assets", unit="assets", capacity_type=CapacityType.RETURNABLE,
         description="Returnable: check assets out of the pool, return them when done."),
    dict(code="processing-allowance", name="Cloud processing allowance", unit="tokens",
         capacity_type=CapacityType.EXHAUSTIBLE, description="Monthly allowance: unused tokens do not roll over."),
    dict(code="cloud-tokens", name="Cloud tokens", unit="tokens", capacity_type=CapacityType.EXHAUSTIBLE,
         description="Token wallet: subscription gift plus purchased tokens."),
    dict(code="render-api", name="Rendering API", unit="units", capacity_type=CapacityType.EXHAUSTIBLE,
         metered=True, charge_unit_size=20, raw_unit="processing minutes",
         description="Metered API: one unit per 20 processing minutes."),
]

TEAMS = [
    # slug, name, tz, usage intensity per product (fraction of capacity used over 90 days)
    ("acme", "Acme Engineering", "America/New_York",
     {"asset-pool": 0.85, "processing-allowance": 0.5, "cloud-tokens": 0.9, "render-api": 0.4}),
    ("globex", "Globex Studio", "Europe/Berlin",
     {"asset-pool": 0.4, "processing-allowance": 0.95, "cloud-tokens": 0.3, "render-api": 0.85}),
    ("initech", "Initech", "UTC",
     {"asset-pool": 0.2, "processing-allowance": 0.3, "cloud-tokens": 0.5, "render-api": 0.2}),
]

USERS = [
    # username, team, role
    ("alice", "acme", Role.PRIMARY_ADMIN),
    ("bob", "acme", Role.SECONDARY_ADMIN),
    ("carol", "acme", Role.SSO_ADMIN),
    ("dave", "acme", Role.USER),
    ("erin", "globex", Role.PRIMARY_ADMIN),
    ("alice", "globex", Role.SECONDARY_ADMIN),
    ("frank", "globex", Role.USER),
    ("grace", "initech", Role.PRIMARY_ADMIN),
]


class Command(BaseCommand):
    help = "Load demo teams, users, products and 90 days of usage (idempotent)."

    def add_arguments(self, parser):
        parser.add_argument("--days", type=int, default=90)

    def handle(self, *args, days: int, **options):
        User = get_user_model()
        if Team.objects.filter(slug="acme").exists():
            self.stdout.write("Demo data already present: nothing to do.")
        else:
            with transaction.atomic():  # all or nothing: a failed seed leaves no half world
                self._seed(User, days)
        self.stdout.write("")
        self.stdout.write(f"Demo logins (password for all: {PASSWORD})")
        self.stdout.write("  admin  staff superuser          -> /admin/")
        for username, slug, role in USERS:
            self.stdout.write(f"  {username:<6} {role.label:<16} of {slug}")

    def _seed(self, User, days: int) -> None:
        rng = random.Random(2026)
        now = timezone.now()
        start = now - timedelta(days=days)
        if True:
            admin = User.objects.filter(username="admin").first()
            if admin is None:
                User.objects.create_superuser("admin", "admin@example.com", PASSWORD)
            products = {}
            for spec in PRODUCTS:
                products[spec["code"]], _ = Product.objects.get_or_create(code=spec["code"], defaults=spec)
            teams = {}
            for slug, name, tz, _ in TEAMS:
                teams[slug], _ = Team.objects.get_or_create(slug=slug, defaults={"name": name, "timezone": tz})
            for username, slug, role in USERS:
                user = User.objects.filter(username=username).first()
                if user is None:
                    user = User.objects.create_user(username, f"{username}@example.com", PASSWORD,
                                                    first_name=username.title())
                Membership.objects.get_or_create(user=user, team=teams[slug], defaults={"role": role})

        for slug, _, _, intensity in TEAMS:
            team = teams[slug]
            members = [m.user.email for m in Membership.objects.filter(team=team).select_related("user")]
            self.stdout.write(f"Seeding {team.name}: grants and {days} days of usage...")
            self._grants(team, products, start, now)
            self._usage(team, products, intensity, members, start, now, days, rng)

    def _grants(self, team, products, start, now) -> None:
        year = timedelta(days=365)
        grant_create(team=team, product=products["asset-pool"], quantity=150, source=Source.PURCHASE,
                     starts_at=start, ends_at=start + year, note="Pool licence")
        grant_create(team=team, product=products["processing-allowance"], quantity=2000, refresh=Refresh.MONTHLY,
                     source=Source.PURCHASE, starts_at=start, ends_at=start + year, note="Monthly allowance")
        gift = subscription_gift_plan(licences=5, term="annual", starts_at=start, team=team)
        grant_create(team=team, product=products["cloud-tokens"], quantity=gift.quantity,
                     source=Source.SUBSCRIPTION_GIFT, starts_at=gift.starts_at, ends_at=gift.ends_at,
                     note="5 licences x Annual subscription")
        grant_create(team=team, product=products["cloud-tokens"], quantity=1000, source=Source.PURCHASE,
                     starts_at=start, ends_at=start + timedelta(days=180), note="Token pack")
        grant_create(team=team, product=products["render-api"], quantity=600, source=Source.PURCHASE,
                     starts_at=start, ends_at=start + year, note="API plan")

    def _usage(self, team, products, intensity, members, start, now, days, rng) -> None:
        actor = Actor.system("seed_demo")
        capacity = {"processing-allowance": 2000 / 30, "cloud-tokens": 1500 / days, "render-api": 600 * 20 / days}
        open_checkouts: list[tuple[str, int]] = []
        n = 0
        for day in range(days):
            day_start = start + timedelta(days=day)
            for code, per_day in capacity.items():
                product = products[code]
                target = per_day * intensity[code]
                for _ in range(rng.randint(1, 4)):
                    at = day_start + timedelta(minutes=rng.randint(0, 24 * 60 - 1))
                    if at >= now:
                        continue
                    qty = max(1, int(rng.uniform(0.3, 0.7) * target))
                    n += 1
                    job = f"job-{team.slug}-{n}"
                    kwargs = dict(team=team, product=product, quantity=qty, idempotency_key=f"seed-{n}",
                                  actor=actor, user=rng.choice(members), service=rng.choice(SERVICES),
                                  job_id=job, occurred_at=at, now=at)
                    try:
                        (usage_metered if product.metered else usage_consume)(**kwargs)
                    except InsufficientBalance:
                        continue
                    if not product.metered and rng.random() < 0.04:
                        job_refund(team=team, job_id=job, idempotency_key=f"seed-refund-{n}", actor=actor,
                                   reason="failed", now=at + timedelta(minutes=5))
            # Returnable pool: check out during the day, return some later.
            pool = products["asset-pool"]
            at = day_start + timedelta(hours=rng.randint(8, 17))
            if at < now:
                n += 1
                qty = rng.randint(1, 12)
                try:
                    usage_checkout(team=team, product=pool, quantity=qty, checkout_id=f"co-{n}",
                                   idempotency_key=f"seed-{n}", actor=actor, user=rng.choice(members),
                                   service=rng.choice(SERVICES), occurred_at=at, now=at)
                    open_checkouts.append((f"co-{n}", qty))
                except InsufficientBalance:
                    pass
                keep = intensity["asset-pool"]
                while open_checkouts and rng.random() > keep:
                    checkout_id, qty = open_checkouts.pop(0)
                    n += 1
                    back = at + timedelta(hours=1)
                    usage_return(team=team, product=pool, quantity=qty, checkout_id=checkout_id,
                                 idempotency_key=f"seed-{n}", actor=actor, occurred_at=back, now=back)
