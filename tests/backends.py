"""Real Redis and PostgreSQL servers for the distributed-backend tests.

CI starts both and sets NIGHTSHIFT_TEST_REDIS_URL / NIGHTSHIFT_TEST_POSTGRES_URL, plus
NIGHTSHIFT_REQUIRE_SERVICES=1 so that a server missing there fails the run instead
of skipping its tests.
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager

import pytest


def _server_url(env: str) -> str:
    url = os.environ.get(env)
    if not url:
        if os.environ.get("NIGHTSHIFT_REQUIRE_SERVICES"):
            pytest.fail(f"{env} is not set but NIGHTSHIFT_REQUIRE_SERVICES is")
        pytest.skip(f"{env} not set (.ci/run starts the server)")
    return url


@contextmanager
def postgres_database():
    """A fresh, empty PostgreSQL database on the test server; dropped afterwards."""
    import sqlalchemy as sa

    server = _server_url("NIGHTSHIFT_TEST_POSTGRES_URL")
    name = f"nightshift_test_{secrets.token_hex(4)}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield server.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@contextmanager
def redis_queue():
    """A Redis URL on a database this test empties before and after."""
    import redis

    url = _server_url("NIGHTSHIFT_TEST_REDIS_URL")
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()
