"""A small, typed, async Chrome DevTools Protocol driver for the browser tests.

Standard library plus `websockets`; no Playwright, Selenium or Node. One
headless Chromium per `Browser`, one websocket to it, and each `Page` a
flattened session on that websocket (its messages carry a `sessionId`).
Commands get increasing ids; a reader task hands each response to the future
waiting on its id and each event to whoever subscribed to it. Every command
has a timeout, every wait is a poll with a deadline, and Chromium is stopped by
its PID with its profile directory removed. All traffic stays on 127.0.0.1.

    async with await Browser.launch() as browser:
        page = await browser.new_page()
        await page.goto("http://127.0.0.1:8080/")
        await page.wait_for("document.querySelector('#ready')")
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

__all__ = [
    "COMMAND_TIMEOUT",
    "Browser",
    "CdpError",
    "Page",
    "find_chromium",
]

JsonObject = dict[str, Any]

COMMAND_TIMEOUT = 15.0
"""Seconds a CDP command may take before it fails with `TimeoutError`."""

LAUNCH_TIMEOUT = 30.0
"""Seconds Chromium may take to open its DevTools endpoint."""

NAVIGATION_TIMEOUT = 30.0
"""Seconds `Page.goto` waits for the page's load event."""

_POLL = 0.05
_STOP_GRACE = 5.0
_STDERR_TAIL = 4000
_ERROR_KEY = "__cdp_error__"

_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    # Headless Chromium draws classic scrollbars: without this the layout (and
    # a full-page screenshot) is 15 px narrower than the viewport asked for.
    "--hide-scrollbars",
    "--remote-debugging-port=0",
)


class CdpError(Exception):
    """A CDP command failed, the page's JavaScript threw, an element was not
    found, or the browser (or a page's session) went away."""


def find_chromium(binary: str | None = None) -> str | None:
    """The Chromium executable to run, or None if there is none.

    `binary`, else the environment's `CHROMIUM_BIN`, must name an executable
    (a path, or a name on PATH): if it names nothing, this raises `CdpError`
    rather than quietly running some other browser. Without either: `chromium`
    on PATH, else `/usr/bin/chromium`, else None.
    """
    chosen = binary or os.environ.get("CHROMIUM_BIN")
    if chosen:
        found = shutil.which(chosen)
        if found is None:
            origin = "the binary argument" if binary else "CHROMIUM_BIN"
            raise CdpError(f"{origin} names {chosen!r}, which is not an executable")
        return found
    found = shutil.which("chromium")
    if found is not None:
        return found
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return None


class _Connection:
    """The browser's websocket: commands out, responses and events in."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[str, str | None, asyncio.Future[JsonObject]]] = {}
        self._subscribers: dict[tuple[str | None, str], list[asyncio.Queue[JsonObject]]] = {}
        self._dead_sessions: dict[str, str] = {}
        self._closed: str | None = None
        self._reader = asyncio.create_task(self._read(), name="cdp-reader")

    async def send(
        self,
        method: str,
        params: JsonObject | None = None,
        session_id: str | None = None,
        timeout: float = COMMAND_TIMEOUT,
    ) -> JsonObject:
        """Sends a command and returns its result; `CdpError` if it failed."""
        if self._closed is not None:
            raise CdpError(f"{method}: {self._closed}")
        if session_id is not None and session_id in self._dead_sessions:
            raise CdpError(f"{method}: {self._dead_sessions[session_id]}")
        command_id = next(self._ids)
        message: JsonObject = {"id": command_id, "method": method, "params": params or {}}
        if session_id is not None:
            message["sessionId"] = session_id
        reply: asyncio.Future[JsonObject] = asyncio.get_running_loop().create_future()
        self._pending[command_id] = (method, session_id, reply)
        try:
            try:
                await self._ws.send(json.dumps(message))
            except ConnectionClosed as exc:
                raise CdpError(f"{method}: the connection to the browser closed") from exc
            try:
                return await asyncio.wait_for(reply, timeout)
            except asyncio.TimeoutError:
                raise TimeoutError(
                    f"{method}: no reply from the browser within {timeout:g} s"
                ) from None
        finally:
            self._pending.pop(command_id, None)

    @contextlib.contextmanager
    def events(self, method: str, session_id: str | None) -> Iterator[asyncio.Queue[JsonObject]]:
        """A queue of the `method` events' params (of one session, or of the
        browser if None) for as long as the block runs; read it with
        `next_event`. Subscribe before sending the command that causes them."""
        queue: asyncio.Queue[JsonObject] = asyncio.Queue()
        key = (session_id, method)
        self._subscribers.setdefault(key, []).append(queue)
        if self._closed is not None:
            queue.put_nowait({_ERROR_KEY: self._closed})
        elif session_id is not None and session_id in self._dead_sessions:
            queue.put_nowait({_ERROR_KEY: self._dead_sessions[session_id]})
        try:
            yield queue
        finally:
            queues = self._subscribers.get(key, [])
            if queue in queues:
                queues.remove(queue)
            if not queues:
                self._subscribers.pop(key, None)

    @staticmethod
    async def next_event(queue: asyncio.Queue[JsonObject], timeout: float, what: str) -> JsonObject:
        """The next event from an `events` queue; `TimeoutError` naming `what`
        after `timeout` seconds, `CdpError` if the browser or session went away."""
        try:
            params = await asyncio.wait_for(queue.get(), max(timeout, 0.0))
        except asyncio.TimeoutError:
            raise TimeoutError(f"{what}: no event within the deadline") from None
        if _ERROR_KEY in params:
            raise CdpError(f"{what}: {params[_ERROR_KEY]}")
        return params

    async def close(self) -> None:
        """Closes the websocket and waits for the reader to finish."""
        with contextlib.suppress(Exception):
            await self._ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader
        self._shut("the browser was closed")

    async def _read(self) -> None:
        reason = "the connection to the browser closed"
        try:
            async for raw in self._ws:
                self._dispatch(json.loads(raw))
        except ConnectionClosed:
            pass
        except Exception as exc:  # a bad message must fail the waiters, not hang them
            reason = f"reading from the browser failed: {exc!r}"
        finally:
            self._shut(reason)

    def _dispatch(self, message: JsonObject) -> None:
        if "id" in message:
            entry = self._pending.get(message["id"])
            if entry is None:  # its command timed out
                return
            method, _, reply = entry
            if reply.done():
                return
            error = message.get("error")
            if error is not None:
                detail = f" ({error['data']})" if error.get("data") else ""
                reply.set_exception(
                    CdpError(f"{method}: {error.get('message')} [code {error.get('code')}]{detail}")
                )
            else:
                reply.set_result(message.get("result", {}))
            return
        event = message.get("method")
        if not isinstance(event, str):
            return
        session_id = message.get("sessionId")
        params: JsonObject = message.get("params", {})
        if event == "Target.detachedFromTarget" and session_id is None:
            self._end_session(
                params.get("sessionId"), "the page's session ended (closed or crashed)"
            )
        elif event == "Inspector.targetCrashed":
            self._end_session(session_id, "the page crashed")
        for queue in self._subscribers.get((session_id, event), ()):
            queue.put_nowait(params)

    def _end_session(self, session_id: str | None, reason: str) -> None:
        if session_id is None or session_id in self._dead_sessions:
            return
        self._dead_sessions[session_id] = reason
        for method, session, reply in list(self._pending.values()):
            if session == session_id and not reply.done():
                reply.set_exception(CdpError(f"{method}: {reason}"))
        for (session, _), queues in self._subscribers.items():
            if session == session_id:
                for queue in queues:
                    queue.put_nowait({_ERROR_KEY: reason})

    def _shut(self, reason: str) -> None:
        if self._closed is not None:
            return
        self._closed = reason
        for method, _, reply in list(self._pending.values()):
            if not reply.done():
                reply.set_exception(CdpError(f"{method}: {reason}"))
        for queues in self._subscribers.values():
            for queue in queues:
                queue.put_nowait({_ERROR_KEY: reason})


class Browser:
    """A headless Chromium of its own (new profile in a temporary directory),
    driven over one DevTools websocket. Make one with `Browser.launch`; close
    it with `close` or `async with`."""

    def __init__(self, process: asyncio.subprocess.Process, conn: _Connection, root: Path) -> None:
        self._process = process
        self._conn = conn
        self._root = root
        self._closed = False

    @property
    def pid(self) -> int:
        """The Chromium browser process's PID."""
        return self._process.pid

    @classmethod
    async def launch(cls, binary: str | None = None, *, timeout: float = LAUNCH_TIMEOUT) -> Browser:
        """Starts Chromium (see `find_chromium` for which) and connects to it.

        Raises `CdpError` if there is no Chromium or it exits early, and
        `TimeoutError` if it has not opened DevTools within `timeout` seconds;
        the last two carry the end of Chromium's stderr.
        """
        executable = find_chromium(binary)
        if executable is None:
            raise CdpError(
                "no Chromium: set CHROMIUM_BIN, put `chromium` on PATH or install "
                "/usr/bin/chromium (Debian: apt-get install chromium)"
            )
        root = Path(tempfile.mkdtemp(prefix="handoff-cdp-"))
        profile = root / "profile"
        stderr_path = root / "chromium.stderr"
        process: asyncio.subprocess.Process | None = None
        try:
            stderr = await asyncio.to_thread(stderr_path.open, "wb")
            try:
                process = await asyncio.create_subprocess_exec(
                    executable,
                    *_FLAGS,
                    f"--user-data-dir={profile}",
                    "about:blank",
                    stdin=subprocess.DEVNULL,
                    stdout=stderr,
                    stderr=stderr,
                )
            finally:
                stderr.close()
            url = await _devtools_url(process, profile / "DevToolsActivePort", stderr_path, timeout)
            ws = await connect(
                url,
                proxy=None,
                compression=None,
                max_size=None,
                ping_interval=None,
                open_timeout=timeout,
                close_timeout=2,
            )
        except BaseException:
            if process is not None:
                await _stop(process)
            await asyncio.to_thread(_remove_tree, root)
            raise
        return cls(process, _Connection(ws), root)

    async def new_page(self, width: int = 1280, height: int = 800) -> Page:
        """A new tab at about:blank with a `width` x `height` CSS-pixel viewport."""
        created = await self._conn.send("Target.createTarget", {"url": "about:blank"})
        target_id: str = created["targetId"]
        attached = await self._conn.send(
            "Target.attachToTarget", {"targetId": target_id, "flatten": True}
        )
        page = Page(self._conn, target_id, attached["sessionId"])
        await page._send("Page.enable")
        await page._send("Page.setLifecycleEventsEnabled", {"enabled": True})
        await page.set_viewport(width, height)
        return page

    async def close(self) -> None:
        """Closes the connection, stops Chromium (SIGTERM, then SIGKILL after
        5 s) and removes its profile. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._conn.close()
        finally:
            try:
                await _stop(self._process)
            finally:
                await asyncio.to_thread(_remove_tree, self._root)

    async def __aenter__(self) -> Browser:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class Page:
    """One tab of a `Browser` (made by `Browser.new_page`)."""

    def __init__(self, conn: _Connection, target_id: str, session_id: str) -> None:
        self._conn = conn
        self._target_id = target_id
        self._session_id = session_id
        self._closed = False

    @property
    def target_id(self) -> str:
        """The tab's CDP target id."""
        return self._target_id

    async def _send(
        self, method: str, params: JsonObject | None = None, timeout: float = COMMAND_TIMEOUT
    ) -> JsonObject:
        return await self._conn.send(method, params, self._session_id, timeout)

    async def goto(self, url: str, *, timeout: float = NAVIGATION_TIMEOUT) -> None:
        """Navigates to `url` and waits for that document's load event.

        `CdpError` if the navigation failed (e.g. net::ERR_CONNECTION_REFUSED;
        an HTTP error status is not a failure), `TimeoutError` if the page has
        not loaded within `timeout` seconds.
        """
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        with self._conn.events("Page.lifecycleEvent", self._session_id) as lifecycle:
            result = await self._send("Page.navigate", {"url": url}, timeout=timeout)
            if result.get("errorText"):
                raise CdpError(f"goto {url}: {result['errorText']}")
            loader_id = result.get("loaderId")
            if loader_id is None:  # a same-document navigation: no new load
                return
            frame_id = result.get("frameId")
            while True:
                event = await self._conn.next_event(
                    lifecycle, end - loop.time(), f"goto {url}: waiting for the load event"
                )
                if (
                    event.get("name") == "load"
                    and event.get("loaderId") == loader_id
                    and event.get("frameId") == frame_id
                ):
                    return

    async def evaluate(self, expression: str, *, timeout: float = COMMAND_TIMEOUT) -> Any:
        """The value of a JavaScript expression (promises awaited), as JSON
        turned into Python; undefined is None, NaN/Infinity are floats, BigInts
        ints. `CdpError` with the exception's text if it threw."""
        result = await self._send(
            "Runtime.evaluate",
            {
                "expression": expression,
                "returnByValue": True,
                "awaitPromise": True,
                "userGesture": True,
            },
            timeout=timeout,
        )
        details = result.get("exceptionDetails")
        if details is not None:
            raise CdpError(f"JavaScript threw: {_exception_text(details)}")
        return _python_value(result.get("result", {}))

    async def wait_for(self, expression: str, timeout: float = 10.0) -> Any:
        """Polls a JavaScript expression every 50 ms until it is truthy (in
        JavaScript's sense) and returns its value, which must be JSON-able:
        wrap DOM nodes as `!!(...)`. Errors while polling (e.g. during a
        navigation) are retried. `TimeoutError` after `timeout` seconds, naming
        the expression, the page's URL and the start of its text."""
        probe = (
            f"(async () => {{ const v = await ({expression}\n);"
            " return v ? [true, v] : [false]; })()"
        )
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        last_error: str | None = None
        while True:
            remaining = end - loop.time()
            try:
                outcome = await self.evaluate(
                    probe, timeout=min(COMMAND_TIMEOUT, max(remaining, _POLL))
                )
                if outcome[0]:
                    return outcome[1] if len(outcome) > 1 else None
                last_error = None
            except (CdpError, TimeoutError) as exc:
                last_error = str(exc)
            remaining = end - loop.time()
            if remaining <= 0:
                raise TimeoutError(await self._wait_failure(expression, timeout, last_error))
            await asyncio.sleep(min(_POLL, remaining))

    async def _wait_failure(self, expression: str, timeout: float, last_error: str | None) -> str:
        try:
            url = await self.url()
        except (CdpError, TimeoutError) as exc:
            url = f"(unknown: {exc})"
        try:
            text = await self.evaluate("document.body ? document.body.innerText : ''", timeout=2.0)
            text = str(text)[:2000]
        except (CdpError, TimeoutError) as exc:
            text = f"(unreadable: {exc})"
        lines = [
            f"wait_for: {expression!r} was not truthy within {timeout:g} s",
            f"  url: {url}",
        ]
        if last_error is not None:
            lines.append(f"  last error: {last_error}")
        lines.append("  page text (first 2000 characters):")
        lines.append(text)
        return "\n".join(lines)

    async def click(self, selector: str) -> None:
        """Scrolls the first element matching a CSS selector into view and
        clicks it (element.click()); `CdpError` if nothing matches."""
        found = await self.evaluate(
            f"""(() => {{
                const el = document.querySelector({json.dumps(selector)});
                if (!el) return false;
                el.scrollIntoView({{block: 'center', inline: 'center'}});
                el.click();
                return true;
            }})()"""
        )
        if not found:
            raise CdpError(f"click: no element matches {selector!r}")

    async def fill(self, selector: str, value: str) -> None:
        """Sets the value of the first input, textarea or select matching a
        CSS selector (through the native setter, so frameworks see it) and
        dispatches input and change events; `CdpError` if nothing matches."""
        outcome = await self.evaluate(
            f"""(() => {{
                const el = document.querySelector({json.dumps(selector)});
                if (!el) return 'missing';
                if (!('value' in el)) return 'no value';
                el.scrollIntoView({{block: 'center', inline: 'center'}});
                el.focus();
                const setter = Object.getOwnPropertyDescriptor(Object.getPrototypeOf(el), 'value');
                if (setter && setter.set) setter.set.call(el, {json.dumps(value)});
                else el.value = {json.dumps(value)};
                el.dispatchEvent(new Event('input', {{bubbles: true}}));
                el.dispatchEvent(new Event('change', {{bubbles: true}}));
                return 'ok';
            }})()"""
        )
        if outcome == "missing":
            raise CdpError(f"fill: no element matches {selector!r}")
        if outcome != "ok":
            raise CdpError(f"fill: {selector!r} has no value to set")

    async def submit(self, selector: str) -> None:
        """Submits the form matching a CSS selector, or the form of the
        element matching it, with form.requestSubmit() (so validation and
        submit handlers run); `CdpError` if there is no such form."""
        outcome = await self.evaluate(
            f"""(() => {{
                const el = document.querySelector({json.dumps(selector)});
                if (!el) return 'missing';
                const form = el instanceof HTMLFormElement ? el : (el.form || el.closest('form'));
                if (!form) return 'no form';
                form.requestSubmit();
                return 'ok';
            }})()"""
        )
        if outcome == "missing":
            raise CdpError(f"submit: no element matches {selector!r}")
        if outcome != "ok":
            raise CdpError(f"submit: {selector!r} is not in a form")

    async def screenshot(self, path: Path, full_page: bool = True) -> None:
        """Writes a PNG of the viewport, or of the whole page if `full_page`."""
        params: JsonObject = {"format": "png"}
        if full_page:
            metrics = await self._send("Page.getLayoutMetrics")
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            params["clip"] = {
                "x": 0,
                "y": 0,
                "width": math.ceil(size["width"]),
                "height": math.ceil(size["height"]),
                "scale": 1,
            }
            params["captureBeyondViewport"] = True
        result = await self._send("Page.captureScreenshot", params)
        await asyncio.to_thread(Path(path).write_bytes, base64.b64decode(result["data"]))

    async def set_viewport(self, width: int, height: int, mobile: bool = False) -> None:
        """Emulates a `width` x `height` CSS-pixel viewport at device scale 1."""
        await self._send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile},
        )

    async def cookies(self) -> list[dict[str, Any]]:
        """The cookies the page's URL would send (HttpOnly ones included), as
        CDP's Network.Cookie objects (name, value, domain, httpOnly, sameSite...)."""
        result = await self._send("Network.getCookies")
        cookies: list[dict[str, Any]] = result["cookies"]
        return cookies

    async def url(self) -> str:
        """The URL of the document the tab shows."""
        result = await self._conn.send("Target.getTargetInfo", {"targetId": self._target_id})
        url: str = result["targetInfo"]["url"]
        return url

    async def close(self) -> None:
        """Closes the tab. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        await self._conn.send("Target.closeTarget", {"targetId": self._target_id})


def _exception_text(details: JsonObject) -> str:
    text = str(details.get("text", "exception"))
    exception = details.get("exception") or {}
    if exception.get("description"):
        return f"{text} {exception['description']}"
    if "value" in exception:
        return f"{text} {json.dumps(exception['value'])}"
    return text


def _python_value(remote: JsonObject) -> Any:
    if "value" in remote:
        return remote["value"]
    unserializable = remote.get("unserializableValue")
    if isinstance(unserializable, str):
        if unserializable.endswith("n"):
            return int(unserializable[:-1])
        return float(unserializable)  # NaN, Infinity, -Infinity, -0
    return None


def _remove_tree(root: Path) -> None:
    try:
        shutil.rmtree(root)
    except OSError:  # a Chromium helper still writing as it exits: once more, then give up
        shutil.rmtree(root, ignore_errors=True)


def _lines_of(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError:
        return []


def _stderr_tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(unreadable: {exc})"
    return text[-_STDERR_TAIL:].strip() or "(empty)"


async def _devtools_url(
    process: asyncio.subprocess.Process, port_file: Path, stderr_path: Path, timeout: float
) -> str:
    """Polls Chromium's DevToolsActivePort file (port, then the browser's
    websocket path) until it is complete."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        if process.returncode is not None:
            raise CdpError(
                f"Chromium exited with status {process.returncode} before opening DevTools; "
                f"its stderr:\n{_stderr_tail(stderr_path)}"
            )
        lines = await asyncio.to_thread(_lines_of, port_file)
        if len(lines) >= 2 and lines[0].strip().isdigit() and lines[1].startswith("/"):
            return f"ws://127.0.0.1:{int(lines[0])}{lines[1].strip()}"
        if loop.time() >= end:
            raise TimeoutError(
                f"Chromium did not write {port_file} within {timeout:g} s; "
                f"its stderr:\n{_stderr_tail(stderr_path)}"
            )
        await asyncio.sleep(_POLL)


async def _stop(process: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL if it has not exited within a grace period."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), _STOP_GRACE)
            return
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
    await process.wait()
