from __future__ import annotations

from django.contrib import admin, messages
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse

from usage.errors import UsageError

from .forms import GrantForm, SubscriptionGiftForm
from .models import Grant, Lot, Product, Source, TeamProduct
from .services import grant_create, grant_revoke, subscription_gift_plan


@admin.register(Product)
class ProductAdmin(admin.ModelAdmin):
    list_display = ["code", "name", "unit", "capacity_type", "metered", "charge_unit_size"]
    list_filter = ["capacity_type", "metered"]
    search_fields = ["code", "name"]


class ReadOnlyAdminMixin:
    """Rows written only by the ledger services: staff may look, never edit."""

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class LotInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = Lot
    fields = ["period_index", "period_start", "expires_at", "quantity", "remaining", "closed_at"]
    readonly_fields = fields
    extra = 0
    can_delete = False


@admin.register(Grant)
class GrantAdmin(admin.ModelAdmin):
    list_display = ["id", "team", "product", "quantity", "source", "refresh", "starts_at", "ends_at", "revoked_at"]
    list_filter = ["source", "refresh", "product", "team", ("revoked_at", admin.EmptyFieldListFilter)]
    search_fields = ["team__name", "team__slug", "product__code", "note"]
    date_hierarchy = "starts_at"
    readonly_fields = [f.name for f in Grant._meta.fields]
    inlines = [LotInline]
    actions = ["revoke_grants"]
    change_list_template = "admin/products/grant/change_list.html"

    def has_change_permission(self, request, obj=None):
        # Grants are never edited: the change page is a read-only view, revoke is an action.
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def get_urls(self):
        urls = super().get_urls()
        custom = [
            path("add/", self.admin_site.admin_view(self.add_grant_view), name="products_grant_add"),
            path("gift/", self.admin_site.admin_view(self.gift_view), name="products_grant_gift"),
        ]
        return custom + urls

    def _render(self, request, form, title):
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "form": form,
            "title": title,
        }
        return TemplateResponse(request, "admin/products/grant/grant_form.html", context)

    def add_grant_view(self, request):
        if not self.has_add_permission(request):
            return redirect("admin:index")
        form = GrantForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            try:
                grant = grant_create(created_by=request.user, **form.cleaned_data)
            except UsageError as exc:
                form.add_error(None, exc.message)
            else:
                messages.success(request, f"Granted {grant}.")
                return redirect(reverse("admin:products_grant_change", args=[grant.pk]))
        return self._render(request, form, "Grant capacity")

    def gift_view(self, request):
        if not self.has_add_permission(request):
            return redirect("admin:index")
        form = SubscriptionGiftForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            data = form.cleaned_data
            try:
                plan = subscription_gift_plan(
                    licences=data["licences"], term=data["term"], starts_at=data["starts_at"], team=data["team"]
                )
                grant = grant_create(
                    team=data["team"], product=data["product"], quantity=plan.quantity,
                    source=Source.SUBSCRIPTION_GIFT, starts_at=plan.starts_at, ends_at=plan.ends_at,
                    created_by=request.user,
                    note=data["note"] or f"{data['licences']} licence(s) x {plan.term_label} subscription",
                )
            except UsageError as exc:
                form.add_error(None, exc.message)
            else:
                messages.success(request, f"Subscription gift: {grant}, ends {grant.ends_at:%Y-%m-%d}.")
                return redirect(reverse("admin:products_grant_change", args=[grant.pk]))
        return self._render(request, form, "Subscription gift")

    @admin.action(description="Revoke selected grants (zeroes their open lots in the ledger)")
    def revoke_grants(self, request, queryset):
        count = 0
        for grant in queryset.filter(revoked_at__isnull=True).select_related("team", "product"):
            grant_revoke(grant=grant, revoked_by=request.user)
            count += 1
        self.message_user(request, f"Revoked {count} grant(s).")


@admin.register(Lot)
class LotAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["id", "team", "product", "grant", "period_start", "expires_at", "quantity", "remaining", "closed_at"]
    list_filter = ["product", "team", "priority"]
    date_hierarchy = "period_start"
    list_select_related = ["team", "product", "grant"]


@admin.register(TeamProduct)
class TeamProductAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["team", "product", "checked_out", "metered_carry", "created_at"]
    list_filter = ["product", "team"]
