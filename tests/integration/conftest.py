"""Integration tests run against the local test site (``scripts/testsite up``): real SLURM, real sshd, real
Charliecloud. Nothing here is stubbed. Without the site they skip, except in CI, where that is a failure."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

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
def site(testsite_config):
    import offload

    return offload.load_site("testsite")


@pytest.fixture(scope="session")
def site_user():
    import tomllib

    return tomllib.loads(CONFIG.read_text())["sites"]["testsite"]["user"]


def queued_jobs(user: str, name: str | None = None) -> list[str]:
    """Jobs still pending or running on the test site, read with SLURM's own squeue (not offload's)."""
    argv = ["squeue", "--noheader", "--array", f"--user={user}", "--states=PENDING,RUNNING,CONFIGURING,COMPLETING",
            "--format=%i %j"]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip() and (name is None or line.split()[1] == name)]


def wait_until(predicate, timeout: float = 120, interval: float = 0.3, what: str = "condition") -> None:
    """Poll ``predicate`` until it holds; fail saying ``what`` was awaited."""
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)
