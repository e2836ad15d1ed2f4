"""The Airflow tests: a real Airflow 3.3 with its SQLite metadata DB in a temporary AIRFLOW_HOME; DAGs run
with ``dag.test()`` in a subprocess (tests/airflow_provider/harness.py), so each run is a fresh Airflow process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
