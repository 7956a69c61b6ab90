"""How a missing prerequisite is reported.

Outside CI a test whose prerequisites are missing is skipped with the reason.
In CI (``CI=true``) it fails instead, naming what is missing: a skipped test
proves nothing.
"""

from __future__ import annotations

import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def require(condition: bool, missing: str) -> None:
    """Skip (or in CI, fail) the current test when *condition* is false."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing in CI: {missing}", pytrace=False)
    pytest.skip(f"prerequisite missing: {missing}")


def require_tool(name: str, package: str) -> str:
    """The path of the program *name*, required from Debian package *package*."""
    path = shutil.which(name)
    require(path is not None, f"{name} (apt-get install {package})")
    assert path is not None
    return path


def require_root() -> None:
    require(os.geteuid() == 0, "root (the vm tier drives the system libvirtd)")
