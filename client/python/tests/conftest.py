"""Real servers for the tests: a `nats-server` with JetStream on a random port
and a `handoffd` process against it (the binary named by `HANDOFF_BIN`,
default `<repo>/target/debug/handoffd`), both read for readiness from their
logs, never slept for, and stopped by PID at teardown. `HANDOFF_TEST_BROKER_LOG`
names a file the broker's log is appended to."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest

from handoff import Client
from handoff.demo.v1.demo_pb2 import Ask, Report, Subtask, WorkerResult

REPO = Path(__file__).resolve().parents[3]
T = TypeVar("T")

# Every wait in the tests is bounded by this (seconds) unless it says otherwise.
WAIT = 20.0


def _lines(stream: IO[bytes], into: queue.Queue[str], keep: Path | None) -> None:
    """Reads a child's log until it closes (so its pipe never fills)."""
    sink = keep.open("a") if keep else None
    try:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            into.put(line)
            if sink:
                sink.write(line + "\n")
                sink.flush()
    finally:
        if sink:
            sink.close()


def _wait_for_line(
    proc: subprocess.Popen[bytes],
    lines: queue.Queue[str],
    pattern: re.Pattern[str],
    what: str,
    seen: list[str] | None = None,
) -> re.Match[str]:
    seen = [] if seen is None else seen
    end = time.monotonic() + WAIT
    while time.monotonic() < end:
        try:
            line = lines.get(timeout=max(0.0, end - time.monotonic()))
        except queue.Empty:
            break
        seen.append(line)
        m = pattern.search(line)
        if m:
            return m
        if proc.poll() is not None and lines.empty():
            break
    proc.kill()
    raise RuntimeError(f"{what} did not report readiness; its log:\n" + "\n".join(seen))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM by PID, then SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@dataclass
class Nats:
    """A running nats-server."""

    url: str
    proc: subprocess.Popen[bytes]


@dataclass
class Broker:
    """A running handoffd."""

    addr: str
    proc: subprocess.Popen[bytes]
    console: str | None = None
    """The console's `host:port`, when it serves."""


def start_nats(store: Path) -> Nats:
    """nats-server with JetStream on a random loopback port, its store in `store`."""
    binary = shutil.which("nats-server")
    if binary is None:
        # A missing server fails the suite: a skipped broker test proves
        # nothing (./dev test installs nats-server first).
        pytest.fail("nats-server is not on PATH: install it (./dev test does)", pytrace=False)
    proc = subprocess.Popen(
        [binary, "-js", "-a", "127.0.0.1", "-p", "-1", "-sd", str(store)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stderr, lines, None), daemon=True).start()
    m = _wait_for_line(
        proc,
        lines,
        re.compile(r"Listening for client connections on 127\.0\.0\.1:(\d+)"),
        "nats-server",
    )
    return Nats(url=f"nats://127.0.0.1:{m.group(1)}", proc=proc)


# The line handoffd logs once it serves, with the address it bound (the
# fields may come in either order).
SERVING = re.compile(
    r'"message":"handoffd serving".*?"addr":"([^"]+)"'
    r'|"addr":"([^"]+)".*?"message":"handoffd serving"'
)


CONSOLE = re.compile(r'"console":"([^"]+)"')


def start_broker(nats_url: str, extra_env: dict[str, str] | None = None) -> Broker:
    """handoffd against `nats_url` on a random loopback port, its JSON log read
    for the address it bound."""
    binary = Path(os.environ.get("HANDOFF_BIN", REPO / "target" / "debug" / "handoffd"))
    if not binary.is_file():
        pytest.fail(
            f"no broker binary at {binary}: build it (cargo build -p handoffd) or set HANDOFF_BIN",
            pytrace=False,
        )
    env = dict(os.environ)
    env.update(
        {
            "HANDOFF_NATS_URL": nats_url,
            "HANDOFF_LISTEN": "127.0.0.1:0",
            "HANDOFF_LOG_FORMAT": "json",
            "RUST_LOG": "info",
            # No console unless a test asks for one (with "127.0.0.1:0").
            "HANDOFF_CONSOLE_LISTEN": "",
        }
    )
    env.update(extra_env or {})
    keep = os.environ.get("HANDOFF_TEST_BROKER_LOG")
    proc = subprocess.Popen(
        [str(binary)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        cwd=tempfile.gettempdir(),
    )
    assert proc.stderr is not None
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(
        target=_lines, args=(proc.stderr, lines, Path(keep) if keep else None), daemon=True
    ).start()
    seen: list[str] = []
    m = _wait_for_line(proc, lines, SERVING, "handoffd", seen)
    console = next((c.group(1) for c in map(CONSOLE.search, seen) if c), None)
    return Broker(addr=m.group(1) or m.group(2), proc=proc, console=console)


def pipeline_bin() -> Path:
    """The demo pipeline example (`HANDOFF_PIPELINE_BIN`, default
    `<repo>/target/debug/examples/pipeline`); a missing one fails the test."""
    binary = Path(
        os.environ.get("HANDOFF_PIPELINE_BIN", REPO / "target" / "debug" / "examples" / "pipeline")
    )
    if not binary.is_file():
        pytest.fail(
            f"no demo pipeline at {binary}: cargo build -p handoffctl --example pipeline",
            pytrace=False,
        )
    return binary


@pytest.fixture(scope="session")
def nats() -> Iterator[Nats]:
    """One nats-server for the session."""
    with tempfile.TemporaryDirectory(prefix="handoff-py-nats-") as store:
        server = start_nats(Path(store))
        try:
            yield server
        finally:
            _stop(server.proc)


@pytest.fixture(scope="session")
def broker(nats: Nats) -> Iterator[Broker]:
    """One handoffd for the session (tests use names of their own)."""
    b = start_broker(nats.url)
    try:
        yield b
    finally:
        _stop(b.proc)


@pytest.fixture
async def client(broker: Broker) -> AsyncIterator[Client]:
    """A client of the session's broker."""
    c = await Client.connect(broker.addr)
    await register_contracts(c)
    try:
        yield c
    finally:
        await c.close()


def uniq(prefix: str) -> str:
    """A name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def bounded(aw: Awaitable[T], timeout: float = WAIT) -> T:
    """`aw`, or a failure after `timeout` seconds."""
    return await asyncio.wait_for(aw, timeout)


async def until(check: Callable[[], Awaitable[Any]], timeout: float = WAIT) -> Any:
    """Polls `check` until it returns something truthy, within `timeout`."""

    async def loop() -> Any:
        while True:
            value = await check()
            if value:
                return value
            await asyncio.sleep(0.1)

    return await bounded(loop(), timeout)


async def register_contracts(client: Client) -> None:
    """The demo contracts (the same content again is a no-op): a Subtask needs
    an instruction and fits in 200 tokens."""
    await client.register_contract(Ask)
    await client.register_contract(Subtask, require=["instruction"], max_tokens=200)
    await client.register_contract(WorkerResult)
    await client.register_contract(Report)
