"""The worker side of a Dask job (dask_offload/launcher.py), run as it runs in a job: a plain Python program."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

pytest.importorskip("distributed")

from dask_offload import launcher

WAIT = textwrap.dedent("""
    import sys
    from dask_offload import launcher
    print(launcher.scheduler_address("file", float(sys.argv[1]) if sys.argv[1] != "none" else None))
""")


def test_pre_submitted_workers_end_after_death_timeout_when_no_address_comes(tmp_path):
    """The client died before it wrote scheduler.json: the workers' job ends instead of waiting forever."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", WAIT, "1"], env={"OFFLOAD_JOB_DIR": str(tmp_path)},
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert result.returncode == 3
    assert f"{launcher.MARK}_ERROR no scheduler address after death_timeout=1.0 s" in result.stdout
    assert time.monotonic() - started < 20


def test_the_address_is_read_once_the_client_writes_it(tmp_path):
    (tmp_path / "scheduler.json").write_text(json.dumps({"address": "tls://127.0.0.1:8786"}))
    result = subprocess.run([sys.executable, "-c", WAIT, "none"], env={"OFFLOAD_JOB_DIR": str(tmp_path)},
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "tls://127.0.0.1:8786"
