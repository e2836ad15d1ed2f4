"""The examples move from the local site to the test site by naming it."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parents[2] / "examples"


def test_gpu_job_example_on_the_test_site(testsite_config):
    result = subprocess.run([sys.executable, str(EXAMPLES / "gpu_job.py"), "--site", "testsite", "--gpus", "2"],
                            capture_output=True, text=True, timeout=180)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "GPUs visible: 0,1" in result.stdout
    assert "CPython 3.11" in result.stdout
