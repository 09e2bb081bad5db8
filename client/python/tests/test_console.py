"""The web console in a real headless Chromium against a real broker: live
runs list, the demo pipeline's run page, the five signals, actions by grant,
causal timelines, sign-in, and the README's screenshots.

Screenshots of every page go to `target/console-screenshots/`; with
`HANDOFF_UPDATE_SCREENSHOTS=1` they also replace the README's under
`tests/screenshots/`."""

from __future__ import annotations

import asyncio
import datetime as dt
import http.client
import ipaddress
import json
import os
import re
import shutil
import ssl
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from handoff import Client, StateDelta
from handoff.demo.v1.demo_pb2 import Ask, Report, Subtask
from handoff.v1 import handoff_pb2 as pb

from .cdp import Browser, Page, find_chromium
from .conftest import (
    REPO,
    WAIT,
    Broker,
    Nats,
    _stop,
    pipeline_bin,
    register_contracts,
    start_broker,
    start_nats,
    uniq,
    until,
)

if find_chromium() is None and not os.environ.get("HANDOFF_REQUIRE_BROWSER"):
    pytest.skip("no Chromium here (./dev test installs Debian's chromium)", allow_module_level=True)

SHOTS = REPO / "target" / "console-screenshots"
README_SHOTS = REPO / "tests" / "screenshots"
ADMIN_TOKEN = "console-test-admin-token-0123456789abcdef"
DEMO_RUNS = 100


# ------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def open_broker(nats: Nats) -> Iterator[Broker]:
    """A broker without auth, its console on a free port."""
    b = start_broker(nats.url, {"HANDOFF_CONSOLE_LISTEN": "127.0.0.1:0"})
    assert b.console, "the broker did not report its console address"
    try:
        yield b
    finally:
        _stop(b.proc)


@pytest.fixture(scope="module")
def secured_broker(nats: Nats) -> Iterator[Broker]:
    """A broker with auth (a bootstrap admin token), its console on a free port."""
    with tempfile.TemporaryDirectory(prefix="handoff-console-") as d:
        token_file = Path(d) / "admin-token"
        token_file.write_text(ADMIN_TOKEN + "\n")
        token_file.chmod(0o600)
        b = start_broker(
            nats.url,
            {"HANDOFF_CONSOLE_LISTEN": "127.0.0.1:0", "HANDOFF_AUTH_TOKEN_FILE": str(token_file)},
        )
        assert b.console
        try:
            yield b
        finally:
            _stop(b.proc)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """A headless Chromium of its own for each test (it starts in ~0.3 s)."""
    b = await Browser.launch()
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A fresh tab at 1280x800."""
    p = await browser.new_page(1280, 800)
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
async def open_client(open_broker: Broker) -> AsyncIterator[Client]:
    c = await Client.connect(open_broker.addr)
    await register_contracts(c)
    try:
        yield c
    finally:
        await c.close()


# ------------------------------------------------------------ helpers


def url(broker: Broker, path: str) -> str:
    return f"http://{broker.console}{path}"


async def shot(page: Page, name: str, *, phone: bool = False) -> None:
    """Saves a screenshot of the page (and, on request, the README's copy)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    if phone:
        await page.set_viewport(390, 844, mobile=True)
    path = SHOTS / f"{name}.png"
    await page.screenshot(path, full_page=not phone)
    if phone:
        await page.set_viewport(1280, 800)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("HANDOFF_UPDATE_SCREENSHOTS"):
        README_SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, README_SHOTS / f"{name}.png")


async def live(page: Page) -> None:
    """Waits until the page's event stream is open."""
    await page.wait_for("document.body.getAttribute('data-live-open') === '1'", WAIT)


def get(broker: Broker, path: str, cookie: str | None = None) -> tuple[int, str, str]:
    """A GET without a browser: status, final URL and body (redirects followed)."""
    req = urllib.request.Request(url(broker, path))
    if cookie:
        req.add_header("Cookie", cookie)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=WAIT) as resp:
            return resp.status, resp.geturl(), resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.geturl(), e.read().decode()


TIMELINE_ITEM = re.compile(
    r'<li data-kind="([a-z_]+)" data-seq="(\d+)"[^>]*data-handoff-id="([^"]*)"'
)


def console_timeline(body: str) -> list[tuple[str, int, str]]:
    """(kind, sequence, handoff id) of each timeline entry of a run page, in order."""
    return [(m.group(1), int(m.group(2)), m.group(3)) for m in TIMELINE_ITEM.finditer(body)]


def causal_problems(timeline: list[tuple[str, int, str, str]]) -> list[str]:
    """Where a timeline of (kind, sequence, handoff id, barrier id) puts an
    effect before its cause: a delivery or arrival before its handoff's
    `handoff_accepted`, a release before an arrival it counts."""
    problems = []
    accepted: set[str] = set()
    arrived_at: dict[str, list[int]] = {}
    released: dict[str, int] = {}
    for i, (kind, _seq, hid, barrier) in enumerate(timeline):
        if kind in ("handoff_accepted", "barrier_released"):
            # A release is the acceptance of the handoff it makes.
            accepted.add(hid)
        elif kind in ("delivered", "redelivered", "branch_arrived") and hid not in accepted:
            problems.append(f"#{i} {kind} of {hid} before its handoff_accepted")
        if kind == "branch_arrived":
            arrived_at.setdefault(barrier, []).append(i)
        if kind == "barrier_released":
            released[barrier] = i
    for barrier, at in released.items():
        late = [i for i in arrived_at.get(barrier, []) if i > at]
        if late:
            problems.append(f"barrier {barrier} released at #{at} before arrivals {late}")
    return problems


async def fanned_out(client: Client, items: list[Subtask], **options: Any) -> tuple[pb.Run, str]:
    """A run whose planner fanned `items` out to a worker, joined for a third
    agent that accepts Report; the run and the worker's name."""
    planner, worker, joiner = uniq("planner"), uniq("worker"), uniq("joiner")
    await client.register_agent(planner, accepts=Ask, emits=[Subtask])
    await client.register_agent(worker, accepts=Subtask, emits=[Report])
    await client.register_agent(joiner, accepts=Report)
    run = await client.start_run(uniq("fan-out"), ask="fan out")
    await client.handoff(run.id, planner, Ask(question="split"))
    async with await client.subscribe(planner, "p-1") as sub:
        d = await sub.next(WAIT)
        assert d is not None
        await d.fan_out(worker, items, aggregator=joiner, **options)
    return run, worker


# ------------------------------------------------------------ 1. the live runs list


async def test_the_runs_list_shows_a_new_run_and_its_completion_without_reload(
    open_broker: Broker, open_client: Client, page: Page
) -> None:
    client = open_client
    agent = uniq("closer")
    await client.register_agent(agent, accepts=Subtask, emits=[Report])
    await page.goto(url(open_broker, "/"))
    await live(page)
    await page.evaluate("window.__noReload = 'still here'")

    run = await client.start_run(uniq("live-owner"), ask="show me live")
    row = f"document.querySelector('#runs tr[data-run-id=\"{run.id}\"]')"
    await page.wait_for(f"{row} !== null && {row}.dataset.status === 'running'", WAIT)

    await client.handoff(run.id, agent, Subtask(instruction="finish"))
    async with await client.subscribe(agent, "console-1") as sub:
        d = await sub.next(WAIT)
        assert d is not None
        await d.final(Report(answer="done"))
    await page.wait_for(f"{row} !== null && {row}.dataset.status === 'completed'", WAIT)
    assert await page.evaluate("window.__noReload") == "still here"
    await shot(page, "runs")
    await shot(page, "runs-phone", phone=True)


# ------------------------------------------------------------ 2 and 5. the demo pipeline


@pytest.fixture(scope="module")
def demo_broker() -> Iterator[Broker]:
    """A broker on a NATS of its own, for the demo pipeline (whose contracts
    carry rules the other tests' versions of them lack)."""
    with tempfile.TemporaryDirectory(prefix="handoff-console-demo-") as store:
        server = start_nats(Path(store))
        try:
            b = start_broker(server.url, {"HANDOFF_CONSOLE_LISTEN": "127.0.0.1:0"})
            try:
                yield b
            finally:
                _stop(b.proc)
        finally:
            _stop(server.proc)


@pytest.fixture
async def demo_client(demo_broker: Broker) -> AsyncIterator[Client]:
    c = await Client.connect(demo_broker.addr)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture(scope="module")
def demo_runs(demo_broker: Broker) -> list[str]:
    """Runs the demo pipeline (planner -> 4 workers -> barrier -> aggregator)
    DEMO_RUNS times against the demo broker; their run ids."""
    binary = pipeline_bin()
    out = subprocess.run(
        [
            str(binary),
            "--addr",
            f"http://{demo_broker.addr}",
            "--runs",
            str(DEMO_RUNS),
            "--work-ms",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = re.findall(r"^run (\S+) started by demo-user$", out.stdout, re.M)
    assert len(runs) == DEMO_RUNS, out.stdout[-2000:]
    return runs


async def test_demo_timelines_put_each_cause_first_in_get_run_and_the_console(
    demo_broker: Broker, demo_client: Client, demo_runs: list[str]
) -> None:
    checked = 0
    for run_id in demo_runs:
        got = await demo_client.get_run(run_id)
        assert got.run.status == pb.RUN_STATUS_COMPLETED
        kinds = {e.kind for e in got.timeline}
        assert pb.EVENT_KIND_BARRIER_RELEASED in kinds
        names = [
            (
                pb.EventKind.Name(e.kind).removeprefix("EVENT_KIND_").lower(),
                e.sequence,
                e.handoff_id,
                e.barrier_id,
            )
            for e in got.timeline
        ]
        assert causal_problems(names) == [], (run_id, names)
        assert all(e.position > 0 for e in got.timeline)

        status, _, body = get(demo_broker, f"/runs/{run_id}")
        assert status == 200
        shown = console_timeline(body)
        # The console shows the same events in the same order as GetRun.
        assert [s for _, s, _ in shown] == [e.sequence for e in got.timeline]
        checked += 1
    assert checked == DEMO_RUNS


async def test_a_demo_run_page_draws_the_graph_timeline_state_and_payloads(
    demo_broker: Broker, demo_client: Client, demo_runs: list[str], page: Page
) -> None:
    run_id = demo_runs[-1]
    got = await demo_client.get_run(run_id)
    await page.goto(url(demo_broker, f"/runs/{run_id}"))
    graph = await page.evaluate(
        """(() => {
          const g = document.querySelector('svg#graph');
          const barrier = g.querySelector('g.node[data-kind="barrier"]');
          return {
            agents: [...g.querySelectorAll('g.node[data-kind="agent"]')].map(n => n.dataset.agent),
            branches: barrier
              ? [...barrier.querySelectorAll('g.branch')].map(b => [b.dataset.key,
                b.dataset.status])
              : [],
            release: g.querySelectorAll('g.edge[data-kind="release"]').length,
            fanout: [...g.querySelectorAll('g.edge[data-kind="branch"]')]
              .map(e => Number(e.dataset.count)),
          };
        })()"""
    )
    assert {"planner", "worker", "aggregator"} <= set(graph["agents"])
    assert sorted(graph["branches"]) == [[k, "arrived"] for k in ("0", "1", "2", "3")]
    assert graph["release"] == 1 and graph["fanout"] == [4]

    # Every event, in GetRun's order.
    items = await page.evaluate(
        "[...document.querySelectorAll('#timeline li')].map(li => Number(li.dataset.seq))"
    )
    assert items == [e.sequence for e in got.timeline]

    # State: a revision per worker and one by the aggregator, each with its diff.
    revisions = await page.evaluate(
        """[...document.querySelectorAll('#state .revision')].map(r => ({
             revision: Number(r.dataset.revision),
             added: [...r.querySelectorAll('tr.added')].map(t => t.dataset.key),
           }))"""
    )
    assert sorted(r["revision"] for r in revisions) == [1, 2, 3, 4, 5]
    added = sorted(k for r in revisions for k in r["added"])
    assert added == ["report", "summary.0", "summary.1", "summary.2", "summary.3"]

    # The result, decoded through the registered Report contract.
    text = await page.evaluate(
        "document.querySelector('.handoff.result pre.payload-json').innerText"
    )
    report = json.loads(text)
    assert report["answer"] == "Brief for leadership: 4 reports summarised"
    assert len(report["results"]) == 4

    # The timeline filter narrows it to one kind.
    await page.evaluate(
        "(() => { const s = document.getElementById('timeline-filter');"
        " s.value = 'branch_arrived'; s.dispatchEvent(new Event('change')); })()"
    )
    visible = await page.evaluate(
        "[...document.querySelectorAll('#timeline li')]"
        ".filter(li => !li.hidden).map(li => li.dataset.kind)"
    )
    assert visible == ["branch_arrived"] * 4
    await page.evaluate(
        "(() => { const s = document.getElementById('timeline-filter');"
        " s.value = ''; s.dispatchEvent(new Event('change')); })()"
    )
    await shot(page, "run")
    await shot(page, "run-phone", phone=True)


async def test_an_event_reaches_an_open_run_page(
    open_broker: Broker, open_client: Client, page: Page
) -> None:
    client = open_client
    agent = uniq("slow")
    await client.register_agent(agent, accepts=Subtask, emits=[Report])
    run = await client.start_run(uniq("watcher"), ask="watch me")
    await page.goto(url(open_broker, f"/runs/{run.id}"))
    await live(page)
    receipt = await client.handoff(run.id, agent, Subtask(instruction="step"))
    await page.wait_for(
        f'document.querySelector(\'#timeline li[data-kind="handoff_accepted"]'
        f'[data-handoff-id="{receipt.handoff_id}"]\') !== null',
        WAIT,
    )
    async with await client.subscribe(agent, "w-1") as sub:
        d = await sub.next(WAIT)
        assert d is not None
        await d.final(Report(answer="ok"))
    await page.wait_for(
        "document.querySelector('#run-header').dataset.status === 'completed'", WAIT
    )


# ------------------------------------------------------------ 3. signals


async def test_a_run_shows_its_dropped_field_reask_and_drifted_judge_score(
    open_broker: Broker, open_client: Client, page: Page
) -> None:
    client = open_client
    first, second, judge = uniq("first"), uniq("second"), uniq("judge")
    await client.register_agent(first, accepts=Subtask, emits=[Subtask])
    await client.register_agent(second, accepts=Subtask, emits=[Report])
    await client.register_agent(judge)
    run = await client.start_run(
        uniq("signals"), ask="summarise the sources", state={"topic": "q3"}, judge=(judge, 0.8)
    )
    await client.handoff(run.id, first, Subtask(instruction="read", sources=["a.pdf", "b.pdf"]))
    async with await client.subscribe(first, "f-1") as sub:
        d = await sub.next(WAIT)
        assert d is not None
        # Drops `sources`, and asks for `topic`, which the state already holds.
        await d.handoff(second, Subtask(instruction="write"), asks_for=["topic"])
    async with await client.subscribe(second, "s-1") as sub:
        d = await sub.next(WAIT)
        assert d is not None
        await d.final(Report(answer="off topic"))
    async with await client.subscribe(judge, "j-1") as sub:
        d = await sub.next(WAIT)
        assert d is not None and d.judge_request() is not None
        await d.judge(0.2, "the report ignores the sources")

    async def drifted() -> bool:
        r = (await client.get_run(run.id)).run
        return r.HasField("intent") and r.intent.drift

    await until(drifted)
    await page.goto(url(open_broker, f"/runs/{run.id}"))
    signals = await page.evaluate(
        """(() => {
          const s = n => document.querySelector(`#signals [data-signal="${n}"]`);
          return {
            dropped: [s('dropped_fields').dataset.count, s('dropped_fields').innerText],
            reasks: [s('reasks').dataset.count, s('reasks').innerText],
            drift: [s('intent_drift').dataset.drift,
                    document.querySelector('[data-field="judge_score"]').innerText],
            handoffs: s('handoffs').dataset.count,
            dropped_note: [...document.querySelectorAll('#state .dropped')].map(p => p.innerText),
          };
        })()"""
    )
    assert signals["dropped"][0] == "1" and "sources" in signals["dropped"][1]
    assert signals["reasks"][0] == "1" and "topic" in signals["reasks"][1]
    assert signals["drift"] == ["true", "0.20"]
    assert signals["handoffs"] == "3"
    await shot(page, "signals")


# ------------------------------------------------------------ 4 and 6. actions, grants, sign-in


async def admin(broker: Broker) -> Client:
    c = await Client.connect(broker.addr, token=ADMIN_TOKEN)
    await register_contracts(c)
    return c


async def principal(
    admin_client: Client, name: str, grants: list[tuple[pb.GrantAction.ValueType, str]]
) -> str:
    """Stores a principal with `grants` and returns a new token of it (the
    SDK has no admin calls: they are made on its channel)."""

    def call(method: str, resp: Any) -> Any:
        return admin_client._channel.unary_unary(
            f"/handoff.v1.HandoffBroker/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=resp.FromString,
        )

    p = pb.Principal(name=name, grants=[pb.Grant(action=a, pattern=pat) for a, pat in grants])
    await admin_client._call(
        call("PutPrincipal", pb.PutPrincipalResponse), pb.PutPrincipalRequest(principal=p)
    )
    made = await admin_client._call(
        call("CreateToken", pb.CreateTokenResponse),
        pb.CreateTokenRequest(principal=name, description="console"),
    )
    return str(made.secret)


async def sign_in(page: Page, broker: Broker, token: str) -> None:
    await page.goto(url(broker, "/signin"))
    await page.fill("#token", token)
    await page.submit("#signin")
    await page.wait_for(
        "location.pathname === '/' && document.querySelector('#runs') !== null", WAIT
    )


async def sign_out(page: Page) -> None:
    await page.submit("form.signout")
    await page.wait_for("location.pathname === '/signin'", WAIT)


async def forged_post(page: Page, path: str, body: str) -> int:
    """A POST made by script in the page, without the form's CSRF token."""
    return int(
        await page.evaluate(
            f"fetch({json.dumps(path)}, {{method: 'POST', credentials: 'same-origin',"
            f" headers: {{'Content-Type': 'application/x-www-form-urlencoded'}},"
            f" body: {json.dumps(body)}}}).then(r => r.status)"
        )
    )


def test_without_auth_the_console_answers_only_to_its_own_host(open_broker: Broker) -> None:
    port = (open_broker.console or "").rsplit(":", 1)[-1]
    for host, expected in (
        (f"127.0.0.1:{port}", 200),
        (f"localhost:{port}", 200),
        (f"evil.example:{port}", 421),
        (f"127.0.0.1.nip.io:{port}", 421),
    ):
        req = urllib.request.Request(url(open_broker, "/"), headers={"Host": host})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=WAIT) as resp:
                status = resp.status
        except urllib.error.HTTPError as e:
            status = e.code
        assert status == expected, host


def live_lines(broker: Broker, cookie: str, until: str, limit: float = WAIT) -> list[str]:
    """The `data:` lines of the console's live stream of every run, read
    until one contains `until`."""
    host, port = (broker.console or "").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=limit)
    conn.request("GET", "/live", headers={"Cookie": cookie, "Accept": "text/event-stream"})
    resp = conn.getresponse()
    assert resp.status == 200
    seen = []
    try:
        while True:
            line = resp.readline().decode()
            if not line:
                break
            if line.startswith("data: "):
                seen.append(line.strip())
                if until in line:
                    break
    finally:
        conn.close()
    return seen


async def test_without_a_token_only_the_sign_in_page_and_another_owner_sees_nothing(
    secured_broker: Broker, page: Page
) -> None:
    admin_client = await admin(secured_broker)
    try:
        alice_run = await admin_client.start_run("alice", ask="alice's secret plan")
        bob = await principal(admin_client, "bob", [(pb.GRANT_ACTION_OWN, "bob")])
        await admin_client.start_run("bob", ask="bob's own")
    finally:
        await admin_client.close()

    for path in ("/", f"/runs/{alice_run.id}", "/agents", "/contracts", "/barriers"):
        await page.goto(url(secured_broker, path))
        assert urllib.parse.urlparse(await page.url()).path == "/signin"
        assert await page.evaluate("document.querySelector('form#signin') !== null")
        assert await page.evaluate("document.querySelector('#runs, #run-header') === null")
    await shot(page, "signin")
    status, _, _ = get(secured_broker, "/live")
    assert status == 401

    # A wrong token is refused on the sign-in page.
    await page.fill("#token", "hot_not_a_token")
    await page.submit("#signin")
    await page.wait_for(
        "document.querySelector('[data-reason=\"UNAUTHENTICATED\"]') !== null", WAIT
    )

    await sign_in(page, secured_broker, bob)
    cookie = next(c for c in await page.cookies() if c["name"] == "handoff_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    body = await page.evaluate("document.documentElement.outerHTML")
    assert bob not in body and ADMIN_TOKEN not in body
    owners = await page.evaluate(
        "[...document.querySelectorAll('#runs tbody tr[data-run-id]')]"
        ".map(r => r.children[2].innerText)"
    )
    assert owners and set(owners) == {"bob"}
    # Bob's live stream carries his runs' events, not alice's (started first).
    session = f"handoff_session={cookie['value']}"
    admin_client = await admin(secured_broker)
    try:
        reader = asyncio.get_running_loop().run_in_executor(
            None, live_lines, secured_broker, session, "LIVE-END"
        )
        await asyncio.sleep(0.5)
        other = await admin_client.start_run("alice", ask="alice again")
        mine = await admin_client.start_run("bob", ask="bob again")
        marker = await admin_client.start_run("bob", run_id=f"LIVE-END-{uniq('r')}")
        seen = await asyncio.wait_for(reader, WAIT)
    finally:
        await admin_client.close()
    assert any(mine.id in line for line in seen) and any(marker.id in line for line in seen)
    assert not any(other.id in line for line in seen), seen

    await page.goto(url(secured_broker, f"/runs/{alice_run.id}"))
    assert await page.evaluate("document.querySelector('[data-reason=\"RUN_NOT_FOUND\"]') !== null")
    assert "secret plan" not in await page.evaluate("document.body.innerText")
    # Reading every agent needs `read`, which bob lacks.
    await page.goto(url(secured_broker, "/agents"))
    assert await page.evaluate("document.querySelector('[data-reason=\"NOT_GRANTED\"]') !== null")
    await sign_out(page)


async def test_actions_from_the_browser_and_none_without_the_grant(
    secured_broker: Broker, page: Page
) -> None:
    admin_client = await admin(secured_broker)
    owner = "carol"
    stuck, asker, flaky, fixed = uniq("stuck"), uniq("asker"), uniq("flaky"), uniq("fixed")
    try:
        for name, kw in (
            (stuck, {}),
            (asker, {}),
            (flaky, {"max_attempts": 1}),
            (fixed, {}),
        ):
            await admin_client.register_agent(
                name,
                accepts=Subtask,
                emits=[Subtask, Report],
                **kw,  # type: ignore[arg-type]
            )
        carol = await principal(admin_client, owner, [(pb.GRANT_ACTION_OWN, owner)])
        reader = await principal(admin_client, uniq("reader"), [(pb.GRANT_ACTION_READ, "")])

        # A run waiting in an inbox (to cancel), one waiting for input, one
        # with a dead letter, and a completed one with state (to fork).
        to_cancel = await admin_client.start_run(owner, ask="cancel me")
        await admin_client.handoff(to_cancel.id, stuck, Subtask(instruction="wait"))

        waiting = await admin_client.start_run(owner, ask="ask me")
        await admin_client.handoff(waiting.id, asker, Subtask(instruction="ask"))
        async with await admin_client.subscribe(asker, "a-1") as sub:
            d = await sub.next(WAIT)
            assert d is not None
            await d.await_input("Which city?", timeout=600, answer=Ask)

        dead_run = await admin_client.start_run(owner, ask="fail once")
        dead_receipt = await admin_client.handoff(dead_run.id, flaky, Subtask(instruction="x"))

        async def letter() -> pb.DeadLetter | None:
            found = [
                d
                for d in await admin_client.dead_letters(flaky)
                if d.handoff.id == dead_receipt.handoff_id
            ]
            return found[0] if found else None

        async with await admin_client.subscribe(flaky, "f-1") as sub:
            d = await sub.next(WAIT)
            assert d is not None
            await d.nack()
            await until(letter)

        done = await admin_client.start_run(owner, ask="fork me", state={"step": 1})
        await admin_client.handoff(
            done.id, fixed, Subtask(instruction="x"), state_delta=StateDelta().set("step", 2)
        )
        async with await admin_client.subscribe(fixed, "x-1") as sub:
            d = await sub.next(WAIT)
            assert d is not None
            await d.final(Report(answer="done"))

        # A reader sees the runs but no action, and its forged POST is refused.
        await sign_in(page, secured_broker, reader)
        for r in (to_cancel, waiting, dead_run, done):
            await page.goto(url(secured_broker, f"/runs/{r.id}"))
            assert await page.evaluate("document.querySelector('#run-header') !== null")
            assert await page.evaluate("document.querySelectorAll('form.action').length") == 0
        assert await forged_post(page, f"/runs/{to_cancel.id}/cancel", "reason=x") == 403
        csrf_less = await forged_post(page, f"/runs/{to_cancel.id}/cancel", "csrf=guess&reason=x")
        assert csrf_less == 403
        # With the session's own CSRF token the use case refuses it: the
        # reader may read the run, not act in it.
        csrf = await page.evaluate("document.querySelector('form.signout input[name=csrf]').value")
        for path, body in (
            (f"/runs/{to_cancel.id}/cancel", "reason=x"),
            (f"/runs/{done.id}/fork", "revision=1&agent=" + fixed + "&payload=%7B%7D"),
            (f"/runs/{waiting.id}/inputs/x", "field.question=x"),
        ):
            assert await forged_post(page, path, f"csrf={csrf}&{body}") in (403, 404)
        assert (await admin_client.get_run(to_cancel.id)).run.status == pb.RUN_STATUS_RUNNING
        done_kinds = [e.kind for e in (await admin_client.get_run(done.id)).timeline]
        assert pb.EVENT_KIND_RUN_FORKED not in done_kinds
        await sign_out(page)

        await sign_in(page, secured_broker, carol)
        # Cancel.
        await page.goto(url(secured_broker, f"/runs/{to_cancel.id}"))
        await shot(page, "run-actions")
        assert await forged_post(page, f"/runs/{to_cancel.id}/cancel", "reason=forged") == 403
        await page.fill('form[data-action="cancel"] input[name="reason"]', "no longer needed")
        await page.submit('form[data-action="cancel"]')
        await page.wait_for(
            "document.querySelector('#run-header').dataset.status === 'cancelled'", WAIT
        )
        run = (await admin_client.get_run(to_cancel.id)).run
        assert run.status == pb.RUN_STATUS_CANCELLED and run.failure == "no longer needed"

        # Answer the waiting input with the form built from Ask.
        await page.goto(url(secured_broker, f"/runs/{waiting.id}"))
        form = 'form[data-action="input"]'
        await page.wait_for(
            f"document.querySelector('{form} input[name=\"field.question\"]') !== null", WAIT
        )
        await page.fill(f'{form} input[name="field.question"]', "Lisbon")
        await page.fill(f'{form} input[name="field.max_subtasks"]', "2")
        await page.submit(form)
        await page.wait_for(
            "document.querySelector('#run-header').dataset.status === 'running'", WAIT
        )
        async with await admin_client.subscribe(asker, "a-2") as sub:
            d = await sub.next(WAIT)
            assert d is not None
            answer = d.payload(Ask)
            assert (answer.question, answer.max_subtasks) == ("Lisbon", 2)
            await d.final(Report(answer="Lisbon"))

        # Redrive the dead letter to the fixed agent.
        await page.goto(url(secured_broker, f"/runs/{dead_run.id}"))
        redrive = 'form[data-action="redrive"]'
        await page.fill(f'{redrive} input[name="to_agent"]', fixed)
        await page.submit(redrive)
        await page.wait_for(
            "document.querySelector('#timeline li[data-kind=\"handoff_redriven\"]') !== null", WAIT
        )
        async with await admin_client.subscribe(fixed, "x-2") as sub:
            d = await sub.next(WAIT)
            assert d is not None and d.handoff_id == dead_receipt.handoff_id
            await d.final(Report(answer="redriven"))

        # Fork the completed run from its first revision.
        await page.goto(url(secured_broker, f"/runs/{done.id}"))
        fork = 'form[data-action="fork"]'
        await page.evaluate(
            f"document.querySelector('{fork} select[name=\"revision\"]').value = '1'"
        )
        await page.fill(f'{fork} input[name="agent"]', fixed)
        await page.fill(f'{fork} textarea[name="payload"]', '{"instruction": "again"}')
        await page.submit(fork)
        await page.wait_for(
            f"location.pathname.startsWith('/runs/') && location.pathname !== '/runs/{done.id}'",
            WAIT,
        )
        forked_id = urllib.parse.unquote((await page.url()).rsplit("/", 1)[-1])
        forked = (await admin_client.get_run(forked_id)).run
        assert forked.parent_run_id == done.id and forked.forked_at_revision == 1
        assert (await admin_client.get_state(forked_id)).values == {"step": 1}
        await sign_out(page)
    finally:
        await admin_client.close()


# ------------------------------------------------------------ the other pages


async def test_agents_contracts_and_barriers_pages(
    open_broker: Broker, open_client: Client, page: Page
) -> None:
    client = open_client
    run, worker = await fanned_out(client, [Subtask(instruction=f"part {i}") for i in range(3)])
    async with await client.subscribe(worker, "w-1", 1) as wsub:
        d = await wsub.next(WAIT)
        assert d is not None
        await d.to_barrier(Report(answer="part"))

        await page.goto(url(open_broker, "/barriers"))
        row = await page.evaluate(
            "[...document.querySelectorAll('#barriers tr[data-barrier]')]"
            f".filter(r => r.innerText.includes({json.dumps(run.id[:8])})).map(r => r.innerText)"
        )
        assert len(row) == 1 and "1 / 3" in row[0]
        await shot(page, "barriers")

        await page.goto(url(open_broker, f"/agents/{worker}"))
        instances = await page.evaluate(
            "[...document.querySelectorAll('#instances tr[data-instance]')]"
            ".map(r => r.dataset.instance)"
        )
        assert instances == ["w-1"]
    await page.goto(url(open_broker, "/agents"))
    assert await page.evaluate(
        f"document.querySelector('#agents tr[data-agent=\"{worker}\"]') !== null"
    )
    await shot(page, "agents")
    await page.goto(url(open_broker, "/contracts"))
    assert await page.evaluate(
        "document.querySelector('section.contract[data-type=\"handoff.demo.v1.Subtask\"]') !== null"
    )
    await shot(page, "contracts")


def test_screenshots_are_png_and_readable(tmp_path: Path) -> None:
    """The README's screenshots exist and are PNG."""
    for name in (
        "runs",
        "run",
        "signals",
        "run-actions",
        "agents",
        "contracts",
        "barriers",
        "signin",
        "runs-phone",
        "run-phone",
    ):
        path = README_SHOTS / f"{name}.png"
        assert path.is_file(), (
            f"{path} is missing: run the console tests with HANDOFF_UPDATE_SCREENSHOTS=1"
        )
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------ TLS


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (CA, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "console test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = (directory / "ca.pem", directory / "server.pem", directory / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def test_with_tls_the_console_serves_https_and_its_cookie_is_secure(nats: Nats) -> None:
    with tempfile.TemporaryDirectory(prefix="handoff-console-tls-") as d:
        ca, cert, key = _certificates(Path(d))
        token_file = Path(d) / "admin-token"
        token_file.write_text(ADMIN_TOKEN + "\n")
        token_file.chmod(0o600)
        b = start_broker(
            nats.url,
            {
                "HANDOFF_CONSOLE_LISTEN": "127.0.0.1:0",
                "HANDOFF_AUTH_TOKEN_FILE": str(token_file),
                "HANDOFF_TLS_CERT": str(cert),
                "HANDOFF_TLS_KEY": str(key),
            },
        )
        try:
            context = ssl.create_default_context(cafile=str(ca))
            opener = urllib.request.build_opener(
                urllib.request.ProxyHandler({}),
                urllib.request.HTTPSHandler(context=context),
                _NoRedirect(),
            )
            with opener.open(f"https://{b.console}/signin", timeout=WAIT) as resp:
                assert resp.status == 200 and "form" in resp.read().decode()
            form = urllib.parse.urlencode({"token": ADMIN_TOKEN}).encode()
            # As a browser posts it: with the console's own origin.
            signin = urllib.request.Request(
                f"https://{b.console}/signin", data=form, headers={"Origin": f"https://{b.console}"}
            )
            try:
                opener.open(signin, timeout=WAIT)
                raise AssertionError("sign-in did not redirect")
            except urllib.error.HTTPError as e:
                assert e.code == 303
                cookie = e.headers["Set-Cookie"]
            attributes = {a.strip().split("=")[0] for a in cookie.split(";")}
            assert {"HttpOnly", "Secure", "SameSite", "Max-Age"} <= attributes
            assert "SameSite=Strict" in cookie
            # Plain HTTP on the TLS port gets no page.
            status, _, _ = (0, "", "")
            try:
                status, _, _ = get(b, "/signin")
            except (urllib.error.URLError, ConnectionError, http.client.HTTPException):
                status = 0
            assert status != 200
        finally:
            _stop(b.proc)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Leaves redirects to the caller (to read their Set-Cookie)."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


async def test_a_timed_out_barrier_times_out_before_its_release_after_its_arrival(
    open_client: Client,
) -> None:
    client = open_client
    run, worker = await fanned_out(
        client,
        [Subtask(instruction="a"), Subtask(instruction="b")],
        timeout=1.0,
        release_partial=True,
    )
    async with await client.subscribe(worker, "w-1") as wsub:
        d = await wsub.next(WAIT)
        assert d is not None
        await d.to_barrier(Report(answer="one"))

        async def released() -> list[str]:
            timeline = (await client.get_run(run.id)).timeline
            kinds = [
                pb.EventKind.Name(e.kind).removeprefix("EVENT_KIND_").lower() for e in timeline
            ]
            return kinds if "barrier_released" in kinds else []

        kinds = await until(released)
    assert kinds.index("branch_arrived") < kinds.index("barrier_timed_out")
    assert kinds.index("barrier_timed_out") < kinds.index("barrier_released")
