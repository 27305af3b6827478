"""Debian binaries the tests run for real (Prometheus, promtool, Chromium): skipped where
they are missing, failed under CI (CI=true), whose `.ci/run` installs them."""

import os
import shutil

import pytest

PACKAGE = {"prometheus": "prometheus", "promtool": "prometheus", "chromium": "chromium"}


def require(binary: str) -> str:
    """The path of `binary`, one of PACKAGE's."""
    path = shutil.which(binary)
    if path is not None:
        return path
    message = f"no {binary} binary (Debian: apt-get install --no-install-recommends "
    message += f"{PACKAGE[binary]})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI runs the tests that need it", pytrace=False)
    pytest.skip(message)
