from django.contrib import admin
from django.db.models import Count, Sum

from products.admin import ReadOnlyAdminMixin

from .models import AlertState, Checkout, Drift, Event, LedgerEntry, ReconciliationRun


@admin.register(LedgerEntry)
class LedgerEntryAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["id", "occurred_at", "team", "product", "kind", "delta", "amount", "lot", "user", "service", "job_id", "actor"]
    list_filter = ["kind", "product", "team", "occurred_at", "service"]
    search_fields = ["job_id", "user", "service", "actor", "event__key"]
    date_hierarchy = "occurred_at"
    list_select_related = ["team", "product", "lot"]
    show_full_result_count = False


@admin.register(Event)
class EventAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["id", "created_at", "team", "operation", "key", "status_code"]
    list_filter = ["operation", "status_code", "team"]
    search_fields = ["key"]
    date_hierarchy = "created_at"


@admin.register(Checkout)
class CheckoutAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["checkout_id", "team", "product", "quantity", "returned", "occurred_at"]
    list_filter = ["product", "team"]
    search_fields = ["checkout_id"]


# -- periodic work: written by usage.tasks only; staff may look -------------------------


@admin.register(Drift)
class DriftAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """Broken invariants found by reconciliation / rollup verification. Must stay empty."""

    list_display = ["id", "found_at", "kind", "team", "product", "lot", "day", "expected", "actual", "fixed", "run"]
    list_filter = ["kind", "fixed", "team", "product"]
    date_hierarchy = "found_at"
    list_select_related = ["team", "product", "lot", "run"]


@admin.register(ReconciliationRun)
class ReconciliationRunAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["id", "started_at", "balances_expected", "balances_checked", "lots_checked", "drift_found"]
    date_hierarchy = "started_at"

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(
            n_checked=Count("checks", distinct=True), n_lots=Sum("checks__lots_checked"),
            n_drift=Sum("checks__drift_count"),
        )

    @admin.display(description="balances checked")
    def balances_checked(self, obj):
        return obj.n_checked

    @admin.display(description="lots checked")
    def lots_checked(self, obj):
        return obj.n_lots or 0

    @admin.display(description="drift", boolean=False)
    def drift_found(self, obj):
        return obj.n_drift or 0


@admin.register(AlertState)
class AlertStateAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["team", "product", "key", "active", "fired_at", "cleared_at", "times_fired"]
    list_filter = ["active", "team", "product"]
    search_fields = ["key"]
