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


def test_dask_example_on_the_test_site(testsite_config):
    result = subprocess.run([sys.executable, str(EXAMPLES / "dask_gpu.py"), "--site", "testsite"],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "4 GPU workers ready" in result.stdout
    # 2 GPUs per node on the test site: the four workers span both GPU nodes
    assert "chunks per node/GPU: {'node1/0': " in result.stdout and "'node2/1': " in result.stdout


def test_custom_image_example_on_the_test_site(testsite_config):
    from .conftest import STATE

    result = subprocess.run([sys.executable, str(EXAMPLES / "custom_image.py"), "--site", "testsite", "--base",
                             str(STATE / "images" / "default"), "--name", "example-myapp"],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "job: myapp in the image says 42" in result.stdout
    assert "dask worker: 42" in result.stdout
    subprocess.run([sys.executable, "-m", "offload.cli", "image", "rm", "example-myapp", "--site", "testsite"],
                   capture_output=True, timeout=60)  # fmt: skip


def test_executor_example_on_the_test_site(testsite_config):
    result = subprocess.run([sys.executable, str(EXAMPLES / "executor_map.py"), "--site", "testsite", "--gpus", "1"],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "calls run with CPython 3.11" in result.stderr and "in the image" in result.stderr
    assert "pi is about 3.1" in result.stdout and "(16 calls in 4 tasks)" in result.stdout
    assert "ran on: node" in result.stdout  # on the GPU nodes, in one array of four tasks
    assert "GPUs seen: ['0'" in result.stdout or "GPUs seen: ['1'" in result.stdout
    assert "the site raised: ValueError('seeds are non-negative, got -1')" in result.stdout
