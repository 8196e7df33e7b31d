from django.contrib import admin, messages
from django.utils import timezone

from .models import ApiKey, Membership, Team


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 1
    autocomplete_fields = ["user"]


@admin.register(Team)
class TeamAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "timezone", "created_at"]
    search_fields = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}
    inlines = [MembershipInline]


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["user", "team", "role"]
    list_filter = ["role", "team"]
    search_fields = ["user__username", "user__email", "team__name"]
    autocomplete_fields = ["user", "team"]


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ["name", "team", "prefix", "created_at", "last_used_at", "revoked_at"]
    list_filter = ["team", ("revoked_at", admin.EmptyFieldListFilter)]
    search_fields = ["name", "prefix", "team__name"]
    readonly_fields = ["prefix", "created_at", "created_by", "last_used_at", "revoked_at"]
    fields = ["team", "name", "prefix", "created_at", "created_by", "last_used_at", "revoked_at"]
    actions = ["revoke_keys"]

    def get_readonly_fields(self, request, obj=None):
        return self.readonly_fields + (["team"] if obj else [])

    def save_model(self, request, obj, form, change):
        if change:
            obj.save(update_fields=["name"])
            return
        obj.created_by = request.user
        raw = obj.set_new_secret()
        obj.save()
        messages.warning(
            request,
            f"New API key for {obj.team}: {raw} (copy it now: it is shown only once and stored hashed).",
        )

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.action(description="Revoke selected API keys")
    def revoke_keys(self, request, queryset):
        n = queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
        self.message_user(request, f"Revoked {n} key(s).")
