"""``make bench``: seed a big PostgreSQL database, serve the app with gunicorn, load it, compare.

Speed is judged by ratios measured side by side in one run (the machine is shared and
noisy; absolute numbers are not comparable across runs). See ``python -m bench --help``.

Modules: :mod:`bench.goals` (result keys, goals, table; pure), :mod:`bench.database`
(refuse SQLite, create/drop the bench database, seed marker), :mod:`bench.seed` (COPY
seeding), :mod:`bench.server` (gunicorn), :mod:`bench.wrk` (wrk + Lua load),
:mod:`bench.loadgen` (Python load generator for the batch endpoint, run as a separate
process), :mod:`bench.measure` (the measurements), :mod:`bench.__main__` (CLI).
"""
