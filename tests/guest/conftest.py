"""Fixtures for booting the test guest (scripts/build_guest.sh) from blixfs mounts."""

from __future__ import annotations

import pytest

from tests.conftest import fuse_available
from tests.guest.qemu import Guest, GuestError, build_guest, qemu_missing


@pytest.fixture(scope="session")
def guest() -> Guest:
    """The guest, built once per session (and cached across sessions by the script itself).

    Skips when the guest could not boot from a mount here anyway (no FUSE, no qemu); a
    failed build fails the tests that need it: CI installs everything it needs.
    """
    reason = fuse_available() or qemu_missing()
    if reason:
        pytest.skip(reason)
    try:
        return build_guest()
    except GuestError as exc:
        pytest.fail(str(exc))
