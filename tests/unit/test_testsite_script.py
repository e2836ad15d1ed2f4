"""scripts/testsite's install step, the path a fresh machine takes, in both of Debian's policy-rc.d cases; and
its promise never to end without saying why. apt-get and dpkg-query are stand-ins on PATH (the seam); the
script itself is the real one. The real install runs in every CI run (.ci/run removes a package first)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "scripts" / "testsite"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="scripts/testsite runs as root")

# Every package counts as installed but one, so the install branch runs for it alone.
DPKG_QUERY = """#!/bin/sh
for last; do :; done
[ "$last" = mmdebstrap ] && exit 1
printf 'install ok installed'
"""
# Notes what policy-rc.d said while the packages were installed; fails the install when told to.
APT_GET = """#!/bin/sh
[ "$1" = update ] && exit 0
if [ -e "$POLICY" ]; then cat "$POLICY" > "$SEEN"; else echo absent > "$SEEN"; fi
echo "apt-get $*" >> "$SEEN.args"
exit "${APT_EXIT:-0}"
"""


def run(tmp_path: Path, *, policy_before: str | None, apt_exit: int = 0, extra_bin: dict[str, str] | None = None):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in {"dpkg-query": DPKG_QUERY, "apt-get": APT_GET, "npm": "#!/bin/sh\n", **(extra_bin or {})}.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    policy = tmp_path / "policy-rc.d"
    if policy_before is not None:
        policy.write_text(policy_before)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OFFLOAD_TESTSITE_POLICY_RC": str(policy),
           "POLICY": str(policy), "SEEN": str(tmp_path / "seen"), "APT_EXIT": str(apt_exit)}  # fmt: skip
    result = subprocess.run([str(SCRIPT), "install"], env=env, capture_output=True, text=True, timeout=60)
    return result, policy, tmp_path / "seen"


def test_without_a_policy_the_script_adds_one_for_the_install_and_removes_it(tmp_path):
    result, policy, seen = run(tmp_path, policy_before=None)
    assert result.returncode == 0, result.stderr
    assert "exit 101" in seen.read_text()  # no daemon started by the packages
    assert not policy.exists()
    assert "installed: mmdebstrap" in result.stderr
    assert "mmdebstrap" in (tmp_path / "seen.args").read_text()


def test_a_policy_that_was_there_stays_as_it_was(tmp_path):
    """Debian's container images ship one: the case that ended the script silently."""
    mine = "#!/bin/sh\n# the machine's own\nexit 101\n"
    result, policy, seen = run(tmp_path, policy_before=mine)
    assert result.returncode == 0, result.stderr
    assert seen.read_text() == mine
    assert policy.read_text() == mine
    assert "installed: mmdebstrap" in result.stderr


def test_a_failed_install_says_so_and_cleans_its_policy(tmp_path):
    result, policy, _ = run(tmp_path, policy_before=None, apt_exit=100)
    assert result.returncode != 0
    assert "apt-get install mmdebstrap failed (exit 100" in result.stderr
    assert not policy.exists()


def test_any_failing_step_names_its_line_and_command(tmp_path):
    result, _, _ = run(tmp_path, policy_before=None, extra_bin={"mktemp": "#!/bin/sh\nexit 7\n"})
    assert result.returncode == 7
    assert "[testsite] error: line" in result.stderr and "mktemp" in result.stderr and "exited with 7" in result.stderr


PIDFILE_LIB = SCRIPT.parent / "testsite-pidfile.sh"


def pid_alive(pidfile: Path) -> bool:
    check = f'set -euo pipefail; . "{PIDFILE_LIB}"; pid_alive "$1"'
    return subprocess.run(["bash", "-c", check, "pid_alive", str(pidfile)], timeout=30).returncode == 0


def test_a_pid_file_whose_number_went_to_another_process_is_not_a_running_daemon(tmp_path):
    """Seen on this machine: pids wrapped around, the second cluster's stale slurmdbd.pid named a process that
    had just started, and `up` skipped slurmdbd ("already running") then failed. `down` would have killed it."""
    for script in ("testsite", "testsite-slurm2", "testsite-gridengine"):
        assert '. "$(dirname "$(readlink -f "$0")")/testsite-pidfile.sh"' in (SCRIPT.parent / script).read_text()
    daemon = tmp_path / "slurmdbd"  # a program named as the site's daemon is
    daemon.write_bytes(Path("/bin/sleep").read_bytes())
    daemon.chmod(0o755)
    pidfile = tmp_path / "daemon.pid"
    with subprocess.Popen([str(daemon), "60"]) as named, subprocess.Popen(["sleep", "60"]) as other:
        try:
            pidfile.write_text(f"{named.pid}\n")
            assert pid_alive(pidfile)
            pidfile.write_text(f"{other.pid}\n")  # the number now belongs to an unrelated process
            assert not pid_alive(pidfile)
            pidfile.write_text("not a pid\n")
            assert not pid_alive(pidfile)
        finally:
            named.kill()
            other.kill()
    assert not pid_alive(tmp_path / "absent.pid")
