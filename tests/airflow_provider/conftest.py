"""The Airflow tests: a real Airflow 3.3 with its SQLite metadata DB in a temporary AIRFLOW_HOME; DAGs run
with ``dag.test()`` in a subprocess (tests/airflow_provider/harness.py), so each run is a fresh Airflow process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("airflow", reason="the Airflow tests run in their own tox env: tox -e airflow")

from tests import leftovers

HERE = Path(__file__).parent
REPO = HERE.parents[1]
STATE = Path(os.environ.get("OFFLOAD_TESTSITE_DIR", "/var/lib/offload-testsite"))


@pytest.fixture(autouse=True)
def leftovers_guard(request):
    """No test leaves a job or a process behind (tests/leftovers.py)."""
    yield from leftovers.guard(request.node.nodeid, leftovers.site_user(STATE / "offload.toml"))


def pytest_sessionfinish(session, exitstatus):
    leftovers.check_session(session, leftovers.site_user(STATE / "offload.toml"))


def site_jobs(name_prefix: str, running: bool = False) -> list[str]:
    """The site user's jobs whose name starts with ``name_prefix`` that are not over (``running``: that run), on
    either of the site's schedulers, read with their own tools (tests/leftovers.py)."""
    user = leftovers.site_user(STATE / "offload.toml")
    jobs = leftovers.site_jobs(user) if user else {}
    return [key for key, job in jobs.items() if job.name.startswith(name_prefix) and (job.running or not running)]


def accounted_jobs(name_prefix: str, since: str) -> list[str]:
    """Jobs of the site's accounting whose name starts with ``name_prefix``, started since ``since`` (local time,
    ``YYYY-MM-DDTHH:MM:SS``), also those ended long ago: SLURM's sacct, then Grid Engine's qacct (``ge:NUMBER``)."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", "--allusers", f"--starttime={since}", "--format=JobID,JobName"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    found = [line.split("|")[0] for line in out.splitlines() if line.split("|")[-1].startswith(name_prefix)]
    begin = time.strftime("%Y%m%d%H%M.%S", time.strptime(since, "%Y-%m-%dT%H:%M:%S"))
    # qacct takes a job name pattern; none found: no record lines
    qacct = subprocess.run(["qacct", "-b", begin, "-j", f"{name_prefix}*"], capture_output=True, text=True,
                           env={**os.environ, **leftovers.GE_ENV}).stdout  # fmt: skip
    found += [leftovers.GE_PREFIX + line.split()[1] for line in qacct.splitlines() if line.startswith("jobnumber ")]
    return found


@pytest.fixture(scope="session")
def airflow_env(tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("airflow-home")
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "OFFLOAD_STATE_DIR": str(home / "offload-state"),
    }
    result = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return env


@pytest.fixture(scope="session")
def testsite_env(airflow_env) -> dict[str, str]:
    config = STATE / "offload.toml"
    up = config.exists() and subprocess.run([str(REPO / "scripts" / "testsite"), "status"],
                                            capture_output=True).returncode == 0  # fmt: skip
    if not up:
        if os.environ.get("CI"):
            pytest.fail(f"the test site is not up ({config})")
        pytest.skip("the test site is not up: run 'scripts/testsite up' as root")
    return {**airflow_env, "OFFLOAD_CONFIG": str(config), "OFFLOAD_SITE": "testsite"}


@pytest.fixture
def site_env(testsite_env, site_name) -> dict[str, str]:
    """:func:`testsite_env` with ``$OFFLOAD_SITE`` the test's site (``site_name``, tests/conftest.py)."""
    return {**testsite_env, "OFFLOAD_SITE": site_name}


def unique_date() -> str:
    """A logical date (hence run id, hence job names) no earlier test run on this site has used."""
    import datetime

    return datetime.datetime.now(datetime.UTC).isoformat()


def run_dag(env: dict[str, str], dag_file: Path, when: str | None = None):
    """Run a DAG file to the end; return (results, combined output)."""
    when = when or unique_date()
    env = {**env, "AIRFLOW__CORE__DAGS_FOLDER": str(dag_file.parent)}
    proc = subprocess.run([sys.executable, str(HERE / "harness.py"), str(dag_file), when], env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    output = proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("HARNESS ")]
    assert lines, f"the DAG run did not finish:\n{output[-6000:]}"
    return json.loads(lines[-1].removeprefix("HARNESS ")), output
