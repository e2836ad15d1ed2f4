"""User story 2: ``offload jupyter`` on the test site, loaded in a real headless Chromium, a cell run through
the Jupyter server's own API; and ``offload shell`` into a running job's container."""

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest

from .conftest import queued_jobs, wait_for_state

ARTIFACTS = Path(__file__).parents[2] / "test-artifacts"
OFFLOAD = [sys.executable, "-m", "offload.cli"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(url: str, *args: str, profile: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--window-size=1280,800", "--virtual-time-budget=20000"]  # fmt: skip
    return subprocess.run([CHROMIUM, *flags, *args, url], capture_output=True, text=True, timeout=120)


def run_cell(base: str, token: str, code: str) -> str:
    """Execute ``code`` in a new kernel through the Jupyter server's REST and websocket API; its stdout. The
    token goes in the Authorization header (a hub's single-user server refuses tokens in URLs for writes)."""
    headers = {"Authorization": f"token {token}"}
    request = urllib.request.Request(f"{base}/api/kernels", data=b"{}", method="POST", headers=headers)
    kernel = json.loads(urllib.request.urlopen(request, timeout=60).read())
    return asyncio.run(_execute(f"{base.replace('http', 'ws')}/api/kernels/{kernel['id']}/channels", code, headers))


async def _execute(channels: str, code: str, headers: dict[str, str]) -> str:
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    ws = await websocket_connect(HTTPRequest(channels, headers=headers))
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


def test_detach_returns_at_once_and_attach_leaves_the_server_running(testsite_config, site_user):
    detached = subprocess.run([*OFFLOAD, "jupyter", "--site", "testsite", "--no-browser", "--detach"],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    assert detached.returncode == 0, detached.stderr
    job_id = detached.stdout.strip()
    assert f"offload jupyter --attach {job_id}" in detached.stderr
    try:
        urls = []
        for _ in range(2):  # attach, disconnect, attach again: the same server, the same token
            attached = subprocess.Popen([*OFFLOAD, "jupyter", "--attach", job_id, "--no-browser"],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
            url = attached.stdout.readline().strip()
            base, token = url.split("/lab?token=")
            with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=30) as response:
                assert response.status == 200
            attached.send_signal(signal.SIGINT)
            _, err = attached.communicate(timeout=60)
            assert attached.returncode == 0 and f"left job {job_id} running" in err
            assert queued_jobs(site_user, "jupyter") == [job_id]
            urls.append(url)
        assert urls[0].split("token=")[1] == urls[1].split("token=")[1]
    finally:
        subprocess.run([*OFFLOAD, "cancel", job_id], capture_output=True, timeout=60)
    assert queued_jobs(site_user, "jupyter") == []


def test_a_notebook_saved_in_one_session_is_there_in_the_next(testsite_config, site_user):
    name = f"kept-{uuid.uuid4().hex[:8]}.ipynb"
    notebook = {"type": "notebook", "content": {"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}}
    for session in range(2):
        proc = subprocess.Popen([*OFFLOAD, "jupyter", "--site", "testsite", "--no-browser"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            base, token = proc.stdout.readline().strip().split("/lab?token=")
            if session == 0:
                request = urllib.request.Request(f"{base}/api/contents/{name}?token={token}", method="PUT",
                                                 data=json.dumps(notebook).encode())  # fmt: skip
                urllib.request.urlopen(request, timeout=30).close()
            else:
                with urllib.request.urlopen(f"{base}/api/contents?token={token}", timeout=30) as response:
                    assert name in [item["name"] for item in json.loads(response.read())["content"]]
        finally:
            proc.send_signal(signal.SIGINT)  # each session ends its job
            proc.communicate(timeout=60)
        assert queued_jobs(site_user, "jupyter") == []


def test_the_server_listens_on_its_nodes_loopback_only(site, site_user):
    import offload
    from offload import jupyter as jl

    job, token = jl.start(site)
    try:
        session = jl.connect(job, token)
        info = json.loads(job.get("jupyter.json"))
        node_ip = "10.231.77.1" + info["host"].removeprefix("node")  # the test site's addressing
        with pytest.raises(OSError):  # not on the node's address: other users of the node cannot reach it
            socket.create_connection((node_ip, int(info["port"])), timeout=5).close()
        session.close(cancel=True)
    finally:
        job.cancel()
    assert job.status().state is offload.JobState.CANCELLED


def test_shell_inside_a_running_jobs_container(site, site_user):
    import offload

    job = site.submit(offload.JobSpec(["sleep", "120"], resources=offload.Resources(gpus=2), name="shelltest"))
    try:
        wait_for_state(job, offload.JobState.RUNNING)
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


def test_shell_without_a_terminal(site):
    import offload

    job = site.submit(offload.JobSpec(["sleep", "120"], name="shellpipe"))
    try:
        wait_for_state(job, offload.JobState.RUNNING)
        piped = subprocess.run([*OFFLOAD, "shell", job.id, "--", "sh", "-c", "cat; echo done"], input="from a pipe\n",
                               capture_output=True, text=True, timeout=120)  # fmt: skip
        assert piped.returncode == 0, piped.stderr
        assert piped.stdout.splitlines() == ["from a pipe", "done"]
        with open(os.devnull) as devnull:  # cron, nohup: stdin is /dev/null
            quiet = subprocess.run([*OFFLOAD, "shell", job.id, "--", "echo", "no terminal"], stdin=devnull,
                                   capture_output=True, text=True, timeout=120)  # fmt: skip
            assert quiet.returncode == 0 and quiet.stdout.strip() == "no terminal", quiet.stderr
            idle = subprocess.run([*OFFLOAD, "shell", job.id], stdin=devnull, capture_output=True, text=True,
                                  timeout=120)  # a login shell that reads end-of-file: it ends  # fmt: skip
            assert idle.returncode == 0, idle.stderr
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
