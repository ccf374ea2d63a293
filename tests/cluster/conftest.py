"""The cluster suite's fixtures (issue #19): one scaled setup for the
session (tests/cluster/harness.py), accounts created through ``mailctl``.

Each drill gets ``cluster`` after every instance is running again, so a
drill that stopped one without restarting it does not fail the next.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster.harness import DOMAIN, Cluster, running_cluster


@pytest.fixture(scope="session")
def cluster_session() -> Iterator[Cluster]:
    with running_cluster() as cluster:  # raises (the suite fails) if a server cannot start
        yield cluster


@pytest.fixture
def cluster(cluster_session: Cluster) -> Cluster:
    cluster_session.ensure_running()
    return cluster_session


# Each drill's accounts, address -> shard, so that a drill's check by
# Message-ID sees only its own mail.
ACCOUNTS = {
    f"{role}_{shard}@{DOMAIN}": shard
    for role in ("kill", "outage", "dir", "promote")
    for shard in ("a", "b")
} | {f"move@{DOMAIN}": "a", f"resume_copy@{DOMAIN}": "b", f"resume_fenced@{DOMAIN}": "b"}


@pytest.fixture(scope="session")
def accounts(cluster_session: Cluster) -> dict[str, str]:
    cluster_session.add_accounts(ACCOUNTS)
    return ACCOUNTS
