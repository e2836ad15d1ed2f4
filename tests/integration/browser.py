"""Headless Chromium driven over the DevTools protocol: load a page with given cookies (a logged-in hub session),
wait for an element, take a screenshot. Debian's chromium; tornado's websocket client; nothing else."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    def __init__(self, ws) -> None:
        self._ws = ws
        self._id = 0

    async def call(self, method: str, **params):
        self._id += 1
        mine = self._id
        self._ws.write_message(json.dumps({"id": mine, "method": method, "params": params}))
        while True:
            message = json.loads(await asyncio.wait_for(self._ws.read_message(), 60))
            if message.get("id") == mine:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})


async def _drive(debugger: str, url: str, cookies: list[dict[str, str]], wait_for: str, timeout: float):
    """(found, screenshot PNG, final URL, HTML) of ``url`` loaded in the page at the DevTools URL ``debugger``."""
    from tornado.websocket import websocket_connect

    page = Page(await websocket_connect(debugger, max_message_size=64 << 20))
    await page.call("Network.enable")
    for cookie in cookies:
        await page.call("Network.setCookie", url=url, **cookie)
    await page.call("Page.navigate", url=url)
    deadline = time.time() + timeout
    found = False
    while not found and time.time() < deadline:
        result = await page.call("Runtime.evaluate", expression=f"!!document.querySelector({json.dumps(wait_for)})")
        found = bool(result.get("result", {}).get("value"))
        await asyncio.sleep(0.5)
    await asyncio.sleep(1)  # let it paint
    png = base64.b64decode((await page.call("Page.captureScreenshot", format="png"))["data"])
    html = (await page.call("Runtime.evaluate", expression="document.documentElement.outerHTML"))["result"]
    where = (await page.call("Runtime.evaluate", expression="location.href"))["result"].get("value", "")
    return found, png, where, html.get("value", "")


def visit(url: str, cookies: list[dict[str, str]], wait_for: str, shot: Path, profile: Path,
          timeout: float = 90) -> str:  # fmt: skip
    """Open ``url`` with ``cookies`` (``name``, ``value``, ``path``) set, wait until ``wait_for`` (a CSS
    selector) is on the page, save a screenshot at ``shot``; the page's HTML."""
    proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--disable-background-networking", "--disable-component-update", "--disable-sync",
                             f"--user-data-dir={profile}", "--remote-debugging-port=0", "--window-size=1280,800",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            assert time.time() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        debugger = next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"]
        found, png, where, html = asyncio.run(_drive(debugger, url, cookies, wait_for, timeout))
        shot.write_bytes(png)
        assert found, f"no {wait_for} at {where}:\n{html[:2000]}"
        return html
    finally:
        proc.terminate()
        proc.wait(timeout=30)
