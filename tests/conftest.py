"""Shared test setup: every test run gets its own job records, so runs never see each other's jobs; the test
site's schedulers for the tests that run on each."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("OFFLOAD_STATE_DIR", tempfile.mkdtemp(prefix="offload-test-state-"))

# The test site's two schedulers, by their profile names: its SLURM cluster and its Grid Engine cell.
SITES = ("testsite", "gridengine")
# An adapter's end-to-end tests, the ones that show it works on a scheduler, run on both: mark them with this (it
# sets ``site_name``). The rest of an adapter's tests stay on SLURM, each module saying why.
both_sites = pytest.mark.parametrize("site_name", SITES)


@pytest.fixture
def site_name() -> str:
    """The site profile a test uses: SLURM's ``testsite``, or each of :data:`SITES` for a test marked
    :data:`both_sites`."""
    return "testsite"
