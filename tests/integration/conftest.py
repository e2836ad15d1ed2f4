"""Integration tests run against the local test site (``scripts/testsite up``): real SLURM, real sshd, real
Charliecloud. Nothing here is stubbed. Without the site they skip, except in CI, where that is a failure."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests import leftovers

# A shell that starts a run in the background (as CI harnesses do) ignores SIGINT, and every child inherits
# that: offload's CLI would then never see the Ctrl-C these tests press. A handler here is not inherited (only
# "ignore" is), so the CLIs the tests start get SIGINT's default again, and Python's KeyboardInterrupt.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

STATE = Path(os.environ.get("OFFLOAD_TESTSITE_DIR", "/var/lib/offload-testsite"))
CONFIG = STATE / "offload.toml"


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def testsite_config():
    up = CONFIG.exists() and subprocess.run([str(Path(__file__).parents[2] / "scripts" / "testsite"), "status"],
                                            capture_output=True).returncode == 0  # fmt: skip
    if not up:
        message = f"the test site is not up ({CONFIG}): run 'scripts/testsite up' as root"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    os.environ["OFFLOAD_CONFIG"] = str(CONFIG)
    os.environ.pop("OFFLOAD_SITE", None)
    return CONFIG


@pytest.fixture
def site(testsite_config, site_name):
    """The site ``site_name`` names (tests/conftest.py): SLURM's, or each site for a test marked ``both_sites``."""
    import offload

    return offload.load_site(site_name)


@pytest.fixture(params=["slurm", "gridengine"])
def any_site(request, testsite_config):
    """The test site's SLURM cluster, then its Grid Engine cell (``scripts/testsite up`` brings both up and names
    both in its profile): for the tests of what a scheduler plugin must do alike. A job a test leaves on either is
    the leftovers guard's to cancel (tests/leftovers.py), as for every test."""
    import offload

    return offload.load_site("testsite" if request.param == "slurm" else "gridengine")


@pytest.fixture(scope="session")
def site_user():
    import tomllib

    return tomllib.loads(CONFIG.read_text())["sites"]["testsite"]["user"]


@pytest.fixture(autouse=True)
def leftovers_guard(request):
    """No test leaves a job or a process behind (tests/leftovers.py)."""
    yield from leftovers.guard(request.node.nodeid, leftovers.site_user(CONFIG))


def pytest_sessionfinish(session, exitstatus):
    leftovers.check_session(session, leftovers.site_user(CONFIG))


def wait_for_state(job, *states, timeout: float = 120):
    """Wait (with a deadline, sleeping between looks) until ``job`` is in one of ``states``; on timeout, fail
    saying the last state and reason seen."""
    deadline = time.monotonic() + timeout
    while (status := job.status()).state not in states:
        assert time.monotonic() < deadline, (
            f"job {job.id} not {'/'.join(s.value for s in states)} after {timeout} s: last seen {status.describe()}"
        )
        time.sleep(0.5)
    return status


def queued_jobs(user: str, name: str | None = None) -> list[str]:
    """Jobs still pending or running on the test site, on either scheduler, read with their own tools (not
    offload's): SLURM's by id, Grid Engine's as ``ge:NUMBER`` (tests/leftovers.py)."""
    return [key for key, job in leftovers.site_jobs(user).items() if name is None or job.name == name]


def wait_until(predicate, timeout: float = 120, interval: float = 0.3, what: str = "condition"):
    """Poll ``predicate`` until it returns something true (returned); fail saying ``what`` was awaited and the
    last value seen."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what} (last: {value!r})"
        time.sleep(interval)
    return value
