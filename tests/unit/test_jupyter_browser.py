"""``offload jupyter`` opens the browser without putting the token on a command line."""

from __future__ import annotations

import stat
import webbrowser
from types import SimpleNamespace

from offload.jupyter import Session


def test_the_browser_gets_a_private_page_not_the_token(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_STATE_DIR", str(tmp_path / "state"))
    opened: list[str] = []
    monkeypatch.setattr(webbrowser, "open", opened.append)  # the seam: what the browser's argv would hold
    closed: list[bool] = []
    job = SimpleNamespace(id="42", site=SimpleNamespace(name="leonardo"), cancel=lambda: None)
    forward = SimpleNamespace(close=lambda: closed.append(True))
    session = Session(job, "s3cret-token", forward, "http://127.0.0.1:8123/lab?token=s3cret-token")
    session.open_browser()
    (url,) = opened
    assert "s3cret-token" not in url and url.startswith("file://")
    page = session._page()
    assert stat.S_IMODE(page.stat().st_mode) == 0o600
    assert "http://127.0.0.1:8123/lab?token=s3cret-token" in page.read_text()
    session.close(cancel=False)
    assert closed and not page.exists()
