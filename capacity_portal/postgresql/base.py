"""Django's PostgreSQL backend with a connection health check that costs no round trip.

``CONN_HEALTH_CHECKS`` makes Django check a persistent connection before a request's
first query. Django checks with ``SELECT 1``: a round trip on every request, about a
quarter of a worker's time on a consume under load. Here an idle connection is checked
by polling its socket instead: a server that shuts down or terminates the backend
sends an error and closes the socket, which makes it readable. Only then (or when the
connection is not idle) is Django's ``SELECT 1`` run to decide.

The trade: a peer that vanished without closing the connection (a host rebooted, a
dropped NAT entry) leaves the socket quiet, so it is found by the request's first query,
which fails (one error per worker connection, then Django reconnects); Django's
``SELECT 1`` would have met the reset first and reconnected. A server restart or a
terminated backend is caught as before.
"""

from __future__ import annotations

import select

from django.db.backends.postgresql import base
from psycopg import pq


class DatabaseWrapper(base.DatabaseWrapper):
    def is_usable(self) -> bool:
        conn = self.connection
        if conn is None or conn.closed:
            return False
        if conn.info.transaction_status != pq.TransactionStatus.IDLE:
            return super().is_usable()
        poller = select.poll()  # (select.select refuses descriptors past 1023)
        try:
            poller.register(conn.fileno(), select.POLLIN)
            events = poller.poll(0)
        except (OSError, ValueError):
            return False
        if events:  # the server spoke while the connection was idle (usually goodbye), or hung up
            return super().is_usable()
        return True
