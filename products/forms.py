from __future__ import annotations

from django import forms
from django.utils import timezone

from teams.models import Team

from .models import Product, Refresh, Source
from .services import SUBSCRIPTION_GIFT_TABLE


class GrantForm(forms.Form):
    team = forms.ModelChoiceField(queryset=Team.objects.all())
    product = forms.ModelChoiceField(queryset=Product.objects.all())
    quantity = forms.IntegerField(min_value=1, max_value=10**12)
    source = forms.ChoiceField(choices=Source.choices, initial=Source.PURCHASE)
    refresh = forms.ChoiceField(choices=Refresh.choices, initial=Refresh.NEVER)
    starts_at = forms.DateTimeField(initial=timezone.now, help_text="UTC unless an offset is given.")
    ends_at = forms.DateTimeField(help_text="Expiry (required).")
    note = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 2}))

    def clean(self):
        data = super().clean()
        if data.get("starts_at") and data.get("ends_at") and data["ends_at"] <= data["starts_at"]:
            self.add_error("ends_at", "The grant must end after it starts.")
        return data


class SubscriptionGiftForm(forms.Form):
    team = forms.ModelChoiceField(queryset=Team.objects.all())
    product = forms.ModelChoiceField(queryset=Product.objects.filter(capacity_type="exhaustible"))
    licences = forms.IntegerField(min_value=1, max_value=100_000)
    term = forms.ChoiceField(
        choices=[(key, f"{label}: {tokens} tokens per licence") for key, (label, tokens, _) in SUBSCRIPTION_GIFT_TABLE.items()]
    )
    starts_at = forms.DateTimeField(initial=timezone.now, help_text="Start of the subscription term.")
    note = forms.CharField(required=False)
