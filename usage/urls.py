"""Usage pages under /teams/<slug>/ (mounted at the site root)."""

from django.urls import path

from . import views

app_name = "usage"

urlpatterns = [
    path("teams/<slug:slug>/products/<slug:code>/", views.product_detail, name="product_detail"),
    path("teams/<slug:slug>/products/<slug:code>/export.csv", views.product_export, name="product_export"),
    path("teams/<slug:slug>/my-usage/", views.my_usage, name="my_usage"),
]
