"""User story 2: ``offload jupyter`` on the test site, loaded in a real headless Chromium, a cell run through
the Jupyter server's own API; and ``offload shell`` into a running job's container."""

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest

from .conftest import queued_jobs

ARTIFACTS = Path(__file__).parents[2] / "test-artifacts"
OFFLOAD = [sys.executable, "-m", "offload.cli"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(url: str, *args: str, profile: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--window-size=1280,800", "--virtual-time-budget=20000"]  # fmt: skip
    return subprocess.run([CHROMIUM, *flags, *args, url], capture_output=True, text=True, timeout=120)


def run_cell(base: str, token: str, code: str) -> str:
    """Execute ``code`` in a new kernel through the Jupyter server's REST and websocket API; its stdout."""
    request = urllib.request.Request(f"{base}/api/kernels?token={token}", data=b"{}", method="POST")
    kernel = json.loads(urllib.request.urlopen(request, timeout=60).read())
    return asyncio.run(_execute(f"{base.replace('http', 'ws')}/api/kernels/{kernel['id']}/channels?token={token}",
                                code))  # fmt: skip


async def _execute(channels: str, code: str) -> str:
    from tornado.websocket import websocket_connect

    ws = await websocket_connect(channels)
    msg_id = uuid.uuid4().hex
    ws.write_message(json.dumps({
        "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test", "session": uuid.uuid4().hex,
                   "version": "5.3"},
        "parent_header": {}, "metadata": {}, "channel": "shell",
        "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True},
    }))  # fmt: skip
    out = []
    while True:
        msg = json.loads(await asyncio.wait_for(ws.read_message(), 120))
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            raise AssertionError("\n".join(msg["content"]["traceback"]))
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return "".join(out)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/testsite up installs it)")
def test_jupyterlab_on_two_gpus_in_a_real_browser(testsite_config, tmp_path, site_user):
    ARTIFACTS.mkdir(exist_ok=True)
    proc = subprocess.Popen([*OFFLOAD, "jupyter", "--site", "testsite", "--gpus", "2", "--no-browser"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and "/lab?token=" in url, proc.stderr.read()
        base, token = url.split("/lab?token=")
        shot = ARTIFACTS / "jupyterlab.png"
        chromium(url, f"--screenshot={shot}", profile=tmp_path / "shot")
        assert shot.exists() and shot.stat().st_size > 10_000
        dom = chromium(url, "--dump-dom", profile=tmp_path / "dom").stdout
        assert "jp-LabShell" in dom or 'id="main"' in dom, dom[:2000]
        (ARTIFACTS / "jupyterlab.html").write_text(dom)
        printed = run_cell(base, token, "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])")
        assert printed.strip() == "0,1"
        assert queued_jobs(site_user, "jupyter")
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C ends the session and the job
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "cancelled job" in err
    assert queued_jobs(site_user, "jupyter") == []


def test_detach_then_attach_with_the_same_token(testsite_config, site_user):
    first = subprocess.Popen([*OFFLOAD, "jupyter", "--site", "testsite", "--no-browser", "--detach"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    url = first.stdout.readline().strip()
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=60)
    job_id = err.split("left job ")[1].split()[0]
    assert queued_jobs(site_user, "jupyter") == [job_id]  # still running
    second = subprocess.Popen([*OFFLOAD, "jupyter", "--attach", job_id, "--no-browser"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    again = second.stdout.readline().strip()
    assert again.split("token=")[1] == url.split("token=")[1]  # same token, new forward
    base = again.split("/lab?")[0]
    with urllib.request.urlopen(f"{base}/api/status?{again.split('?')[1]}", timeout=30) as response:
        assert response.status == 200
    second.send_signal(signal.SIGINT)
    second.communicate(timeout=60)
    assert queued_jobs(site_user, "jupyter") == []


def test_shell_inside_a_running_jobs_container(site, site_user):
    import offload

    job = site.submit(offload.JobSpec(["sleep", "120"], resources=offload.Resources(gpus=2), name="shelltest"))
    try:
        while job.state is not offload.JobState.RUNNING:
            pass
        primary, secondary = os.openpty()  # a terminal, as a user would have
        code = (
            "import os, platform; "
            "print('SHELL', os.environ.get('CUDA_VISIBLE_DEVICES'), platform.freedesktop_os_release()['ID'])"
        )
        result = subprocess.run([*OFFLOAD, "shell", job.id, "--", "python3", "-c", code], stdin=secondary,
                                capture_output=True, timeout=120)  # fmt: skip
        os.close(primary)
        os.close(secondary)
        assert result.returncode == 0, result.stderr.decode()
        assert b"SHELL 0,1 debian" in result.stdout
    finally:
        job.cancel()


def test_the_jupyter_example_script(testsite_config, site_user):
    script = Path(__file__).parents[2] / "examples" / "jupyter_session.sh"
    env = {**os.environ, "NO_BROWSER": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen([str(script), "testsite", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)  # fmt: skip
    url = proc.stdout.readline().strip()
    base, token = url.split("/lab?token=")
    with urllib.request.urlopen(f"{base}/api/contents?token={token}", timeout=30) as response:
        listing = json.loads(response.read())
    assert "secrets.env" not in [item["name"] for item in listing["content"]]  # it serves a notebook dir
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert queued_jobs(site_user, "jupyter") == []


def test_the_jupyter_example_on_the_local_site(tmp_path):
    pytest.importorskip("jupyterlab")
    script = Path(__file__).parents[2] / "examples" / "jupyter_session.sh"
    (tmp_path / "sites.toml").write_text("")
    env = {
        **os.environ,
        "NO_BROWSER": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "OFFLOAD_CONFIG": str(tmp_path / "sites.toml"),
        "OFFLOAD__LOCAL__WORKDIR": str(tmp_path / "work"),
        # a proxy that answers nothing: the readiness probe must go straight to the server, never through it
        "http_proxy": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
    }
    proc = subprocess.Popen([str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = proc.stdout.readline().strip()
    assert "/lab?token=" in url, proc.stderr.read() if proc.poll() is not None else url
    base, token = url.split("/lab?token=")
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with direct.open(f"{base}/api/status?token={token}", timeout=30) as response:
        assert response.status == 200
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert "cancelled job" in err
