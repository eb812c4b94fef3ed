"""Shared test configuration.

Real servers (a Milvus standalone server, a SeaweedFS S3 server) are started by session
fixtures in ``tests/fixtures``; tests that need them ask for the fixture by name.
"""

from __future__ import annotations

import os

import pytest
import torch

# CI machines have 2 cores; more threads only adds contention between tests and servers.
torch.set_num_threads(int(os.environ.get("DNS_TEST_THREADS", "2")))

pytest_plugins = [
    "tests.fixtures.data",
    "tests.fixtures.s3",
    "tests.fixtures.milvus_server",
    "tests.fixtures.engine",
]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
