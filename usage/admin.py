from django.contrib import admin

from products.admin import ReadOnlyAdminMixin

from .models import Checkout, Event, LedgerEntry


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
