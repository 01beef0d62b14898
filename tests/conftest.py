from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def pool4():
    """Four gloo ranks shared by the tests of one module."""
    from tests.distributed import DistributedPool

    pool = DistributedPool(4)
    yield pool
    pool.close()
