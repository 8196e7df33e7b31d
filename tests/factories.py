from __future__ import annotations

from datetime import timedelta

import factory
from django.contrib.auth import get_user_model
from django.utils import timezone

from products.models import CapacityType, Product, Refresh, Source
from products.services import grant_create
from teams.models import Membership, Role, Team


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda o: f"{o.username}@example.com")
    password = factory.django.Password("password")


class TeamFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Team

    name = factory.Sequence(lambda n: f"Team {n}")
    slug = factory.Sequence(lambda n: f"team-{n}")
    timezone = "UTC"


class MembershipFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Membership

    user = factory.SubFactory(UserFactory)
    team = factory.SubFactory(TeamFactory)
    role = Role.SECONDARY_ADMIN


class ProductFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Product
        django_get_or_create = ("code",)

    code = factory.Sequence(lambda n: f"product-{n}")
    name = factory.LazyAttribute(lambda o: o.code.replace("-", " ").title())
    unit = "tokens"
    capacity_type = CapacityType.EXHAUSTIBLE


def make_grant(team, product, quantity, *, source=Source.PURCHASE, refresh=Refresh.NEVER, starts_at=None,
               ends_at=None, days=365, now=None, **kwargs):
    """A grant through the real service (lot and ledger row included)."""
    now = now or timezone.now()
    starts_at = starts_at or now - timedelta(days=1)
    ends_at = ends_at or starts_at + timedelta(days=days)
    return grant_create(team=team, product=product, quantity=quantity, source=source, refresh=refresh,
                        starts_at=starts_at, ends_at=ends_at, now=now, **kwargs)
