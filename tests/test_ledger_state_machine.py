"""Random operations through the real services; after each step every lot balances.

Invariant (DESIGN.md): for every lot, quantity + sum(deltas) == remaining, and
nothing is ever negative; the balance shown equals what the lots hold.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.db import transaction
from django.db.models import Sum
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from products.models import CapacityType, Lot, Product, Refresh, Source, TeamProduct
from products.selectors import product_balance
from products.services import grant_create, grant_revoke
from teams.models import Team
from usage.actors import Actor
from usage.errors import UsageError
from usage.models import Checkout, LedgerEntry
from usage.services import job_refund, usage_checkout, usage_consume, usage_metered, usage_return

T0 = datetime(2026, 1, 31, 15, 0, tzinfo=UTC)


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.now = T0
        self.n = 0
        self.jobs: list[str] = []
        self.checkouts: list[str] = []
        self.actor = Actor.system("hypothesis")
        # Each run happens in a savepoint rolled back by teardown: runs never see each other.
        self._atomic = transaction.atomic()
        self._atomic.__enter__()

    def teardown(self):
        transaction.set_rollback(True)
        self._atomic.__exit__(None, None, None)

    @initialize()
    def setup_world(self):
        self.team = Team.objects.create(name="SM", slug=f"sm-{id(self)}", timezone="Europe/Paris")
        self.tokens = Product.objects.get_or_create(code="sm-tokens", defaults={"name": "T"})[0]
        self.pool = Product.objects.get_or_create(
            code="sm-pool", defaults={"name": "P", "capacity_type": CapacityType.RETURNABLE})[0]
        self.api = Product.objects.get_or_create(
            code="sm-api", defaults={"name": "A", "metered": True, "charge_unit_size": 7})[0]
        # Start with capacity of every kind so that every rule has something to act on.
        for product, quantity, source, refresh in [
            (self.tokens, 100, Source.FREE_TIER, Refresh.NEVER),
            (self.tokens, 200, Source.PURCHASE, Refresh.MONTHLY),
            (self.pool, 60, Source.PURCHASE, Refresh.NEVER),
            (self.api, 80, Source.PROMOTION, Refresh.MONTHLY),
        ]:
            grant_create(team=self.team, product=product, quantity=quantity, source=source, refresh=refresh,
                         starts_at=self.now - timedelta(days=3), ends_at=self.now + timedelta(days=90),
                         now=self.now)

    def key(self) -> str:
        self.n += 1
        return f"k{self.n}"

    @rule(product=st.sampled_from(["tokens", "pool", "api"]), quantity=st.integers(1, 300),
          source=st.sampled_from(list(Source.values)), monthly=st.booleans(), days=st.integers(1, 120))
    def grant(self, product, quantity, source, monthly, days):
        grant_create(team=self.team, product=getattr(self, product), quantity=quantity, source=source,
                     refresh=Refresh.MONTHLY if monthly else Refresh.NEVER, starts_at=self.now - timedelta(hours=1),
                     ends_at=self.now + timedelta(days=days), now=self.now)

    def available(self, product) -> int:
        balance = product_balance(self.team, product, now=self.now)
        return balance.available if balance else 0

    @rule(data=st.data(), with_job=st.booleans())
    def consume(self, data, with_job):
        # Mostly affordable amounts, sometimes just over: both paths get exercised.
        quantity = data.draw(st.integers(1, self.available(self.tokens) + 3))
        job = f"job{self.n}" if with_job else ""
        try:
            usage_consume(team=self.team, product=self.tokens, quantity=quantity, idempotency_key=self.key(),
                          actor=self.actor, job_id=job, now=self.now)
            if job:
                self.jobs.append(job)
        except UsageError as exc:
            assert exc.code == "insufficient_balance"

    @rule(quantity=st.integers(1, 30))
    def metered(self, quantity):
        try:
            usage_metered(team=self.team, product=self.api, quantity=quantity, idempotency_key=self.key(),
                          actor=self.actor, now=self.now)
        except UsageError as exc:
            assert exc.code == "insufficient_balance"

    @rule(data=st.data())
    def checkout(self, data):
        quantity = data.draw(st.integers(1, self.available(self.pool) + 2))
        cid = f"c{self.n}"
        try:
            usage_checkout(team=self.team, product=self.pool, quantity=quantity, checkout_id=cid,
                           idempotency_key=self.key(), actor=self.actor, now=self.now)
            self.checkouts.append(cid)
        except UsageError as exc:
            assert exc.code == "insufficient_balance"

    @rule(data=st.data())
    def give_back(self, data):
        if not self.checkouts:
            return
        cid = data.draw(st.sampled_from(self.checkouts))
        outstanding = Checkout.objects.get(team=self.team, checkout_id=cid).outstanding
        quantity = data.draw(st.integers(1, outstanding + 2))
        try:
            usage_return(team=self.team, product=self.pool, quantity=quantity, checkout_id=cid,
                         idempotency_key=self.key(), actor=self.actor, now=self.now)
            assert quantity <= outstanding
        except UsageError as exc:
            assert exc.code == "checkout_exceeded" and quantity > outstanding

    @rule(data=st.data())
    def refund(self, data):
        if not self.jobs:
            return
        job = data.draw(st.sampled_from(self.jobs))
        job_refund(team=self.team, job_id=job, idempotency_key=self.key(), actor=self.actor, now=self.now)

    @rule(data=st.data())
    def revoke(self, data):
        grants = list(self.team.grants.filter(revoked_at__isnull=True).values_list("pk", flat=True))
        if len(grants) > 3:
            grant_revoke(grant=self.team.grants.get(pk=data.draw(st.sampled_from(grants))), now=self.now)

    @rule(hours=st.integers(1, 24 * 20))
    def time_passes(self, hours):
        self.now += timedelta(hours=hours)

    @invariant()
    def lots_balance(self):
        if not hasattr(self, "team"):
            return
        for lot in Lot.objects.filter(team=self.team):
            deltas = LedgerEntry.objects.filter(lot=lot).aggregate(s=Sum("delta"))["s"] or 0
            assert lot.quantity + deltas == lot.remaining, f"lot {lot.pk} drifted"
            assert 0 <= lot.remaining <= lot.quantity
        for tp in TeamProduct.objects.filter(team=self.team):
            assert tp.checked_out >= 0 and tp.metered_carry >= 0
            balance = product_balance(self.team, tp.product, now=self.now)
            assert 0 <= balance.available <= balance.total
            # Balance read at `now` equals what the payable lots hold (virtual monthly lots counted full).
            real = Lot.objects.filter(team=self.team, product=tp.product).active_at(self.now).aggregate(
                s=Sum("remaining"))["s"] or 0
            assert balance.available >= real


@pytest.mark.django_db
def test_ledger_invariants_hold_under_random_operations():
    run_state_machine_as_test(
        LedgerMachine,
        settings=settings(
            max_examples=25, stateful_step_count=30, deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
