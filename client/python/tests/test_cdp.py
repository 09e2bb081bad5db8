"""The CDP driver (tests/cdp.py) against a real headless Chromium and a
local http.server on 127.0.0.1.

Skipped when there is no Chromium, unless HANDOFF_REQUIRE_BROWSER is set (then
it fails, naming what is missing)."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from .cdp import Browser, CdpError, find_chromium


def _have_chromium() -> bool:
    try:
        return find_chromium() is not None
    except CdpError:  # CHROMIUM_BIN names nothing: run, and fail saying so
        return True


pytestmark = pytest.mark.skipif(
    not _have_chromium() and not os.environ.get("HANDOFF_REQUIRE_BROWSER"),
    reason="no Chromium (set CHROMIUM_BIN or install chromium; "
    "HANDOFF_REQUIRE_BROWSER=1 makes this a failure)",
)

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>cdp self-test</title></head>
<body>
<p id="status">loading</p>
<form id="form" action="/submitted" method="get">
  <input id="name" name="name">
  <button id="greet" type="button">Greet</button>
</form>
<div style="height: 2400px">tall</div>
<script>
  const status = document.getElementById('status');
  const name = document.getElementById('name');
  name.addEventListener('input', () => { name.dataset.typed = name.value; });
  document.getElementById('greet').addEventListener('click', () => {
    status.textContent = 'hello ' + name.value;
  });
  setTimeout(() => { status.textContent = 'ready'; }, 100);
</script>
</body></html>
"""

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class _Site(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.path == "/":
            self._send(200, PAGE, [("Set-Cookie", "a=b; HttpOnly; SameSite=Strict")])
        elif parts.path == "/submitted":
            name = parse_qs(parts.query).get("name", [""])[0]
            self._send(200, f"<!doctype html><p id='done'>submitted {json.dumps(name)}</p>", [])
        else:
            self._send(404, "not found", [])

    def _send(self, status: int, body: str, headers: list[tuple[str, str]]) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def site() -> Iterator[str]:
    """The test page's base URL, served from a thread."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Site)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


async def test_page_round_trip(site: str, tmp_path: Path) -> None:
    async with await Browser.launch() as browser:
        page = await browser.new_page(width=1024, height=700)
        await page.goto(f"{site}/")
        assert await page.url() == f"{site}/"
        assert await page.evaluate("document.title") == "cdp self-test"
        assert (
            await page.wait_for(
                "document.getElementById('status').textContent === 'ready' && 'yes'"
            )
            == "yes"
        )

        await page.fill("#name", "Ada")
        assert await page.evaluate("document.getElementById('name').dataset.typed") == "Ada"
        await page.click("#greet")
        await page.wait_for("document.getElementById('status').textContent === 'hello Ada'")

        shot = tmp_path / "page.png"
        await page.screenshot(shot)
        png = shot.read_bytes()
        assert png[:8] == PNG_SIGNATURE
        width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
        assert width == 1024
        assert height > 2400  # the whole page, not the 700-pixel viewport
        await page.screenshot(tmp_path / "viewport.png", full_page=False)
        assert struct.unpack(">II", (tmp_path / "viewport.png").read_bytes()[16:24]) == (
            1024,
            700,
        )

        cookies = {c["name"]: c for c in await page.cookies()}
        assert cookies["a"]["value"] == "b"
        assert cookies["a"]["httpOnly"] is True
        assert cookies["a"]["sameSite"] == "Strict"
        assert await page.evaluate("document.cookie") == ""  # HttpOnly

        await page.submit("#name")
        assert await page.wait_for("document.getElementById('done')?.textContent") == (
            'submitted "Ada"'
        )
        assert await page.url() == f"{site}/submitted?name=Ada"

        await page.set_viewport(800, 600)
        assert await page.evaluate("[innerWidth, innerHeight]") == [800, 600]
        await page.set_viewport(390, 844, mobile=True)
        # A mobile viewport without <meta name=viewport> lays out 980 px wide.
        assert await page.evaluate("[screen.width, innerWidth]") == [390, 980]
        await page.close()


async def test_failures_say_what_happened(site: str) -> None:
    async with await Browser.launch() as browser:
        page = await browser.new_page()
        await page.goto(f"{site}/")

        with pytest.raises(CdpError, match="boom"):
            await page.evaluate("(() => { throw new Error('boom'); })()")
        with pytest.raises(CdpError, match="no element matches '#nope'"):
            await page.click("#nope")
        with pytest.raises(CdpError, match="no element matches"):
            await page.fill("#nope", "x")

        with pytest.raises(TimeoutError) as timed_out:
            await page.wait_for("window.never === true", timeout=0.3)
        message = str(timed_out.value)
        assert "window.never === true" in message
        assert f"{site}/" in message
        assert "tall" in message  # the page's text

        with socket.socket() as s:  # a port nothing listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with pytest.raises(CdpError, match="ERR_CONNECTION_REFUSED"):
            await page.goto(f"http://127.0.0.1:{port}/")

        with pytest.raises(CdpError, match=r"Runtime\.evaluate"):
            await page._send("Runtime.evaluate", {"expression": 1})
