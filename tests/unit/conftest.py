"""Fixtures several unit test modules share."""

from __future__ import annotations

import pytest

from tests.support import debian
from tests.support.prereq import require


@pytest.fixture(scope="session")
def cloud_kernel() -> debian.CloudKernel:
    """Debian's cloud kernel, unpacked with its modules (downloaded once)."""
    try:
        return debian.cloud_kernel()
    except debian.FixtureError as err:
        require(False, f"Debian's cloud kernel ({err})")
        raise
