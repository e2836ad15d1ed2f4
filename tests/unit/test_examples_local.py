"""Every example runs on the built-in local site with no HPC at all."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parents[2] / "examples"


def test_gpu_job_example_runs_locally(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OFFLOAD_STATE_DIR": str(tmp_path / "state"),
           "OFFLOAD_CONFIG": str(tmp_path / "sites.toml")}  # fmt: skip
    (tmp_path / "sites.toml").write_text("")
    result = subprocess.run([sys.executable, str(EXAMPLES / "gpu_job.py")], capture_output=True, text=True,
                            env=env, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "GPUs visible:" in result.stdout
    assert "COMPLETED" in result.stderr


def test_executor_example_runs_locally(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OFFLOAD_STATE_DIR": str(tmp_path / "state"),
           "OFFLOAD_CONFIG": str(tmp_path / "sites.toml")}  # fmt: skip
    (tmp_path / "sites.toml").write_text("")
    result = subprocess.run([sys.executable, str(EXAMPLES / "executor_map.py")], capture_output=True, text=True,
                            env=env, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "pi is about 3.1" in result.stdout and "(16 calls in 4 tasks)" in result.stdout
    assert "the site raised: ValueError('seeds are non-negative, got -1')" in result.stdout
