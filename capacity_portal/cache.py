"""Django's Redis cache with one client per pool and a one-round-trip counter.

Django's ``RedisCacheClient.get_client`` builds a new ``redis.Redis`` for every call (its
``__init__`` fills a table of about 170 response callbacks), and ``incr`` costs two round
trips (``EXISTS``, then ``INCRBY``). The API's per-key rate limit does that on every
request. Here a client is built once per connection pool (``redis.Redis`` is safe to share:
each command takes a connection from the pool), and ``count`` is one atomic round trip.
Everything else is Django's backend unchanged.

``count`` runs on every API request when the rate limit is counted in the cache (the
database is not PostgreSQL; on PostgreSQL it is counted there, see ``usage.api.check_rate``),
so it talks to its own connection (one per thread and process, made from the pool's
settings) directly: redis-py's command path (taking and returning a pooled connection, a
readiness poll, its retry wrapper and argument checks) cost about three times the round
trip itself. A broken connection is reconnected and the
command sent once more; a timeout is not retried (the server may have counted already).
"""

from __future__ import annotations

import hashlib
import os
import threading

from django.core.cache.backends import redis as django_redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

# INCR creates a missing key at 1; only then does it get its time to live. Atomic: a Lua
# script runs alone, so no other client sees the key without its expiry.
_COUNT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return n
"""
_COUNT_SHA = hashlib.sha1(_COUNT.encode()).hexdigest()


class RedisCacheClient(django_redis.RedisCacheClient):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._clients = {}
        self._counter = threading.local()

    def get_client(self, key=None, *, write=False):
        index = self._get_connection_pool_index(write)
        client = self._clients.get(index)
        if client is None:
            if index not in self._pools:
                self._pools[index] = self._pool_class.from_url(self._servers[index], **self._pool_options)
            client = self._clients[index] = self._client(connection_pool=self._pools[index])
        return client

    def count(self, key, timeout):
        connection = self._counter_connection()
        try:
            return self._count_on(connection, key, timeout)
        except RedisConnectionError:
            # A server restart or an idle connection dropped: once more. (Not after a
            # timeout: the server may have counted already, and one request must count once.)
            connection.disconnect()
            return self._count_on(connection, key, timeout)

    @staticmethod
    def _count_on(connection, key, timeout) -> int:
        try:  # the script by its digest: the server keeps scripts it has run
            connection.send_command("EVALSHA", _COUNT_SHA, 1, key, int(timeout))
            return int(connection.read_response())
        except NoScriptError:  # a new, restarted or flushed server: EVAL runs it and keeps it
            connection.send_command("EVAL", _COUNT, 1, key, int(timeout))
            return int(connection.read_response())

    def _counter_connection(self):
        """This thread's counter connection (a new one in a forked child); it connects on
        first use."""
        local = self._counter
        if getattr(local, "pid", None) != os.getpid():
            self.get_client(write=True)  # makes the pool
            pool = self._pools[self._get_connection_pool_index(True)]
            local.connection = pool.connection_class(**pool.connection_kwargs)
            local.pid = os.getpid()
        return local.connection


class RedisCache(django_redis.RedisCache):
    def __init__(self, server, params):
        super().__init__(server, params)
        self._class = RedisCacheClient

    def count(self, key, timeout, version=None) -> int:
        """Add one to ``key`` and return the new value; a new key starts at 1 and expires
        ``timeout`` seconds later (later counts do not extend it)."""
        if not isinstance(timeout, int) or timeout <= 0:
            raise ValueError(f"count() needs a time to live in whole seconds > 0, not {timeout!r}")
        key = self.make_and_validate_key(key, version=version)
        return self._cache.count(key, timeout)
