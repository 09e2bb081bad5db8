"""The client against a real broker: every call and the guarantees."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest

from handoff import (
    AlreadyExistsError,
    Client,
    ConflictError,
    Delivery,
    ErrorKind,
    FailedPreconditionError,
    HandoffError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    StateDelta,
    Subscription,
    ToolResult,
    intent_digest,
)
from handoff.demo.v1.demo_pb2 import Ask, Citation, Report, Subtask, WorkerResult
from handoff.v1 import handoff_pb2 as pb

from .conftest import WAIT, bounded, uniq, until


async def reg(client: Client, name: str, **kw: Any) -> pb.AgentSpec:
    """Registers `name`, emitting the demo contracts (other tests register them)."""
    return await client.register_agent(name, emits=[Subtask, WorkerResult, Report], **kw)


async def take(sub: Subscription, timeout: float = WAIT) -> Delivery:
    d = await sub.next(timeout)
    assert d is not None, "no delivery in time"
    return d


async def kinds_of(client: Client, run_id: str) -> list[int]:
    return [e.kind for e in (await client.get_run(run_id)).timeline]


async def test_handoff_is_idempotent_and_delivered_once(client: Client) -> None:
    agent = uniq("worker")
    spec = await reg(client, agent, lease=dt.timedelta(seconds=30), max_attempts=3)
    assert spec.name == agent and spec.max_attempts == 3 and spec.lease.seconds == 30
    assert agent in [a.name for a in await client.list_agents()]
    run = await client.start_run("tests", ask="say hi")
    first = await client.handoff(run.id, agent, Subtask(instruction="hi"), idempotency_key="k1")
    again = await client.handoff(run.id, agent, Subtask(instruction="hi"), idempotency_key="k1")
    assert not first.duplicate and again.duplicate
    assert again.handoff_id == first.handoff_id and first.depth == 1
    async with await client.subscribe(agent, "i1") as sub:
        d = await take(sub)
        assert d.handoff_id == first.handoff_id and d.attempt == 1
        assert d.payload(Subtask).instruction == "hi"
        await d.ack()
        assert await sub.next(1.0) is None


async def test_one_delivery_among_competing_instances(client: Client) -> None:
    agent = uniq("worker")
    await reg(client, agent)
    run = await client.start_run("tests")
    sent = {
        (await client.handoff(run.id, agent, Subtask(index=i, instruction="x"))).handoff_id
        for i in range(12)
    }
    subs = [await client.subscribe(agent, f"i{i}", 2) for i in range(3)]
    seen: list[str] = []

    async def drain(sub: Subscription) -> None:
        async for d in sub:
            seen.append(d.handoff_id)
            await d.ack()

    tasks = [asyncio.create_task(drain(s)) for s in subs]
    await until(lambda: _true(len(seen) >= len(sent)))
    await asyncio.sleep(1.0)  # anything delivered twice would show by now
    for s in subs:
        await s.close()
    await bounded(asyncio.gather(*tasks))
    assert sorted(seen) == sorted(sent)


async def _true(v: bool) -> bool:
    return v


async def test_contract_refusals_name_their_reason(client: Client) -> None:
    again = await client.register_contract(Subtask, require=["instruction"], max_tokens=200)
    assert not again.created and again.version >= 1
    agent = uniq("worker")
    await client.register_agent(agent, accepts=Subtask, emits=[WorkerResult])
    run = await client.start_run("tests")
    with pytest.raises(FailedPreconditionError) as missing:
        await client.handoff(run.id, agent, Subtask(index=1))
    assert missing.value.reason == "MISSING_REQUIRED_FIELDS"
    assert "instruction" in missing.value.metadata["fields"]
    with pytest.raises(FailedPreconditionError) as mismatch:
        await client.handoff(run.id, agent, Ask(question="?"))
    assert mismatch.value.reason == "CONTRACT_MISMATCH"
    assert mismatch.value.metadata["payload_type"] == "handoff.demo.v1.Ask"
    with pytest.raises(FailedPreconditionError) as budget:
        await client.handoff(run.id, agent, Subtask(instruction="word " * 400))
    assert budget.value.reason == "OVER_TOKEN_BUDGET"
    assert int(budget.value.metadata["count"]) > int(budget.value.metadata["budget"])
    with pytest.raises(PermissionDeniedError) as undeclared:
        await client.handoff(
            run.id, agent, Subtask(instruction="x"), source_agent=await _agent(client)
        )
    assert undeclared.value.reason == "UNDECLARED_EMIT"
    with pytest.raises(NotFoundError) as unknown:
        await client.handoff(run.id, uniq("nobody"), Subtask(instruction="x"))
    assert unknown.value.reason == "AGENT_NOT_FOUND"
    with pytest.raises(InvalidArgumentError) as bad_name:
        await client.handoff(run.id, "not.a.name", Subtask(instruction="x"))
    assert bad_name.value.reason == "INVALID_NAME"
    with pytest.raises(NotFoundError) as no_run:
        await client.handoff(uniq("run"), agent, Subtask(instruction="x"))
    assert no_run.value.reason == "RUN_NOT_FOUND"
    with pytest.raises(AlreadyExistsError) as taken:
        await client.start_run("someone-else", run_id=run.id)
    assert taken.value.reason == "RUN_EXISTS"
    # Nothing refused was stored: the inbox holds only what passes.
    ok = await client.handoff(run.id, agent, Subtask(instruction="fine"))
    async with await client.subscribe(agent, "i1") as sub:
        d = await take(sub)
        assert d.handoff_id == ok.handoff_id
        assert d.contract == ("handoff.demo.v1.Subtask", again.version)
        await d.ack()


async def _agent(client: Client) -> str:
    name = uniq("source")
    await client.register_agent(name)  # emits nothing
    return name


async def test_depth_cap_and_pinned_context_on_every_hop(client: Client) -> None:
    a, b, c = uniq("a"), uniq("b"), uniq("c")
    for name in (a, b, c):
        await reg(client, name)
    run = await client.start_run(
        "tests", ask="Find a flight to Oslo", pinned={"budget": "300 EUR"}, max_depth=3
    )
    await client.handoff(
        run.id,
        a,
        Subtask(instruction="plan"),
        tool_results=[ToolResult("search", dt.datetime.now(dt.timezone.utc), Citation(source="s"))],
        confidence=0.9,
        warnings=["first"],
    )
    hops = [(a, b), (b, c), (c, a)]
    for agent, nxt in hops:
        async with await client.subscribe(agent, "i1") as sub:
            d = await take(sub)
            assert d.pinned.ask == "Find a flight to Oslo"
            assert d.pinned.fields == {"budget": "300 EUR"}
            assert d.intent_intact()
            if d.depth == 3:
                with pytest.raises(FailedPreconditionError) as cap:
                    await d.handoff(nxt, Subtask(instruction="more"))
                assert cap.value.reason == "DEPTH_CAP"
                assert cap.value.metadata["max_depth"] == "3"
                await d.final(Subtask(instruction="done"))
            else:
                r = await d.handoff(nxt, Subtask(instruction="next"))
                assert r.depth == d.depth + 1
    got = await client.get_run(run.id)
    assert got.run.status == pb.RUN_STATUS_COMPLETED
    assert got.run.pinned.ask == "Find a flight to Oslo"


async def test_intent_digest_matches_the_brokers(client: Client) -> None:
    agent = uniq("worker")
    await reg(client, agent)
    run = await client.start_run(
        "tests",
        ask="Book the trip, économie",
        pinned={"b": "2", "a": "1", "ü": "x"},
        pinned_state={
            "order": "A-1",
            "nights": 3,
            "price": 12.5,
            "tags": ["x", 1, None, False],
            "who": {"name": "Ann", "age": 41, "ok": True, "nested": {"z": [1.5]}},
        },
        state={"city": "Oslo"},
    )
    await client.handoff(run.id, agent, Subtask(instruction="x"))
    async with await client.subscribe(agent, "i1") as sub:
        d = await take(sub)
        assert d.raw.pinned_digest, "the broker attaches a digest"
        assert intent_digest(d.raw.pinned, d.raw.state) == d.raw.pinned_digest
        assert d.intent_intact()
        assert d.state["who"] == {"name": "Ann", "age": 41, "ok": True, "nested": {"z": [1.5]}}
        d.raw.pinned.ask = "Book a hotel"  # altered on the way: noticed
        assert not d.intent_intact()
        await d.ack()


async def test_state_deltas_conflicts_history_and_answers(client: Client) -> None:
    agent = uniq("worker")
    await reg(client, agent)
    run = await client.start_run(
        "tests",
        state={"city": "Oslo", "notes": []},
        pinned_state={"order": "A-1"},
        policies={"notes": "APPEND"},
    )
    seed = await client.get_state(run.id)
    assert seed.revision == 1 and seed.values["city"] == "Oslo" and seed.pinned_keys == ["order"]
    r1 = await client.handoff(
        run.id,
        agent,
        Subtask(instruction="x"),
        state_delta=_delta(1).set("city", "Rome").set("notes", "booked"),
    )
    assert r1.state_revision == 2
    with pytest.raises(ConflictError) as stale:
        await client.handoff(
            run.id, agent, Subtask(instruction="x"), state_delta=_delta(1).set("city", "Paris")
        )
    assert stale.value.kind is ErrorKind.CONFLICT and stale.value.reason == "STATE_CONFLICT"
    assert "city" in stale.value.metadata["keys"]
    # Appends and disjoint keys combine with a stale base.
    r2 = await client.handoff(
        run.id,
        agent,
        Subtask(instruction="x"),
        state_delta=_delta(1).append("notes", ["paid"]).merge("extra", {"k": 1}),
        asks_for=["city", "unknown"],
    )
    assert r2.state_revision == 3
    assert r2.answers == {"city": "Rome"}
    with pytest.raises(FailedPreconditionError) as pinned:
        await client.handoff(
            run.id, agent, Subtask(instruction="x"), state_delta=_delta(None).set("order", "B")
        )
    assert pinned.value.reason == "PINNED_KEY"
    latest = await client.get_state(run.id)
    assert latest.revision == 3 and latest.latest_revision == 3
    assert latest.values == {
        "city": "Rome",
        "notes": ["booked", "paid"],
        "order": "A-1",
        "extra": {"k": 1},
    }
    two = await client.get_state(run.id, 2)
    assert two.values["city"] == "Rome" and two.handoff_id == r1.handoff_id
    assert "city" in two.changed
    with pytest.raises(NotFoundError) as gone:
        await client.get_state(run.id, 99)
    assert gone.value.reason == "STATE_REVISION_NOT_FOUND"
    # A delivery carries the revision its handoff handed over, and deltas
    # made from it are based on it.
    async with await client.subscribe(agent, "i1") as sub:
        d = await take(sub)
        assert d.state_revision == 2 and d.state["city"] == "Rome"
        assert d.state_delta().base_revision == 2
        with pytest.raises(ConflictError):
            delta = d.state_delta().unset("extra")
            await d.handoff(agent, Subtask(instruction="y"), state_delta=delta)
        assert (await d.get_state())["extra"] == {"k": 1}
        await d.ack()


def _delta(base: int | None) -> StateDelta:
    return StateDelta(base_revision=base)


async def test_watch_resumes_from_a_sequence(client: Client) -> None:
    agent = uniq("worker")
    await reg(client, agent)
    run = await client.start_run("tests")
    await client.handoff(run.id, agent, Subtask(instruction="x"))
    timeline = (await client.get_run(run.id)).timeline
    assert [e.kind for e in timeline][:2] == [
        pb.EVENT_KIND_RUN_STARTED,
        pb.EVENT_KIND_HANDOFF_ACCEPTED,
    ]
    watch = client.watch(run_id=run.id, from_sequence=timeline[1].sequence)
    async with watch:
        first = await bounded(watch.__anext__())
        assert first.sequence == timeline[1].sequence
        assert first.kind == pb.EVENT_KIND_HANDOFF_ACCEPTED
        assert watch.next_sequence == first.sequence + 1
        # Live events after it, filtered by kind.
        async with await client.subscribe(agent, "i1") as sub:
            d = await take(sub)
            await d.final(Subtask(instruction="done"))
        completed = client.watch(
            run_id=run.id, kinds=["run_completed"], from_sequence=watch.next_sequence
        )
        async with completed:
            event = await bounded(completed.__anext__())
            assert event.kind == pb.EVENT_KIND_RUN_COMPLETED and event.run_id == run.id


async def test_nack_extend_reject(client: Client) -> None:
    agent = uniq("worker")
    await reg(client, agent, lease=dt.timedelta(seconds=10))
    run = await client.start_run("tests")
    await client.handoff(run.id, agent, Subtask(instruction="x"))
    async with await client.subscribe(agent, "i1") as sub:
        d = await take(sub)
        before = d.lease_deadline
        await asyncio.sleep(0.2)
        after = await d.extend()
        assert before is not None and after is not None and after > before
        await d.nack(0.1)
        again = await take(sub)
        assert again.handoff_id == d.handoff_id and again.attempt == 2
        with pytest.raises(HandoffError) as old:
            await d.ack()  # the first attempt's lease was superseded
        assert old.value.reason in ("LEASE_SUPERSEDED", "ALREADY_SETTLED")
        await again.reject("cannot do it")
    got = await until(lambda: _status(client, run.id, pb.RUN_STATUS_FAILED))
    assert "cannot do it" in got.run.failure


async def _status(client: Client, run_id: str, status: int) -> pb.GetRunResponse | None:
    got = await client.get_run(run_id)
    return got if got.run.status == status else None


async def test_a_finished_handoff_delivered_again_is_acked_silently(client: Client) -> None:
    agent = uniq("worker")
    await reg(client, agent, lease=dt.timedelta(seconds=1))
    run = await client.start_run("tests")
    await client.handoff(run.id, agent, Subtask(instruction="x"))
    async with await client.subscribe(agent, "i1") as sub:
        d = await take(sub)
        # As if this process had finished it and its ack were lost.
        client._mark_finished(agent, d.handoff_id)
        assert await sub.next(3.0) is None  # the redelivery never reaches the application
        await until(lambda: _has(client, run.id, pb.EVENT_KIND_ACKED))
    kinds = await kinds_of(client, run.id)
    assert pb.EVENT_KIND_REDELIVERED in kinds or kinds.count(pb.EVENT_KIND_DELIVERED) >= 2


async def _has(client: Client, run_id: str, kind: int) -> bool:
    return kind in await kinds_of(client, run_id)


async def test_complete_and_handoff_continues_the_trace(client: Client) -> None:
    a, b, c = uniq("a"), uniq("b"), uniq("c")
    for name in (a, b, c):
        await reg(client, name)
    run = await client.start_run("tests")
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    await client.handoff(
        run.id,
        a,
        Subtask(instruction="x"),
        trace_context={"traceparent": parent, "tracestate": "k=v"},
    )
    async with await client.subscribe(a, "i1") as sub:
        d = await take(sub)
        assert d.traceparent == parent
        first = await d.handoff(b, Subtask(instruction="y"), idempotency_key="one", fan_out=True)
        with pytest.raises(InvalidArgumentError):
            await d.handoff(b, Subtask(instruction="y"), idempotency_key="one", fan_out=True)
        second = await d.handoff(c, Subtask(instruction="z"), idempotency_key="two", fan_out=True)
        assert first.handoff_id != second.handoff_id
        await d.ack()
    async with await client.subscribe(b, "i1") as sub:
        d = await take(sub)
        assert d.traceparent == parent and d.trace_context.get("tracestate") == "k=v"
        assert d.source_agent == a and d.depth == 2
        await d.ack()


async def test_unknown_subscriber_and_connect_failure(client: Client) -> None:
    with pytest.raises(NotFoundError) as e:
        await client.subscribe(uniq("nobody"), "i1")
    assert e.value.reason == "AGENT_NOT_FOUND"
    from handoff import ConnectError

    with pytest.raises(ConnectError):
        await Client.connect("127.0.0.1:1", connect_timeout=0.5)


async def test_list_instances_shows_live_subscriptions_until_they_close(client: Client) -> None:
    agent = uniq("worker")
    await reg(client, agent)
    async with await client.subscribe(agent, "py-1", max_in_flight=3):

        async def listed() -> list[pb.Instance]:
            return await client.list_instances(agent)

        found = await until(listed)
        assert [(i.agent, i.instance, i.max_in_flight) for i in found] == [(agent, "py-1", 3)]
        assert found[0].replica and found[0].session
        assert found[0].HasField("connected_since")
        assert agent in {i.agent for i in await client.list_instances()}

    async def gone() -> bool:
        return not await client.list_instances(agent)

    assert await until(gone)
    with pytest.raises(InvalidArgumentError) as bad:
        await client.list_instances("no.dots")
    assert bad.value.reason == "INVALID_NAME"


async def test_agent_status_tells_pending_and_unattended_work(client: Client) -> None:
    agent = uniq("worker")
    await reg(client, agent)
    run = await client.start_run("tests")
    await client.handoff(run.id, agent, Subtask(instruction="wait"))

    async def waiting() -> pb.AgentStatus | None:
        found = [s for s in await client.agent_status() if s.name == agent]
        return found[0] if found and found[0].pending == 1 else None

    status = await until(waiting)
    assert status.instances == 0 and status.in_flight == 0 and status.unattended
    assert status.HasField("oldest_pending_age")
    async with await client.subscribe(agent, "py-1") as sub:
        d = await take(sub)

        async def taken() -> pb.AgentStatus | None:
            found = [s for s in await client.agent_status() if s.name == agent]
            return found[0] if found and found[0].in_flight == 1 and found[0].instances else None

        status = await until(taken)
        assert status.pending == 0 and not status.unattended
        await d.ack()


async def test_list_runs_pages_and_filters(client: Client) -> None:
    owner = uniq("owner")
    started = [await client.start_run(owner) for _ in range(5)]
    await client.cancel_run(started[1].id, "stop")
    await client.cancel_run(started[3].id, "stop")

    async def cancelled() -> list[str] | None:
        page = await client.list_runs(owner=owner, status=[pb.RUN_STATUS_CANCELLED])
        ids = [s.run.id for s in page.runs]
        return ids if len(ids) == 2 else None

    assert sorted(await until(cancelled)) == sorted([started[1].id, started[3].id])
    first = await client.list_runs(owner=owner, page_size=2)
    assert len(first.runs) == 2 and first.next_page_token
    every = [s.run.id async for s in client.runs(owner=owner, page_size=2)]
    assert sorted(every) == sorted(r.id for r in started)
    assert every[:2] == [s.run.id for s in first.runs]
    after = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
    assert not (await client.list_runs(owner=owner, started_after=after)).runs
    with pytest.raises(InvalidArgumentError) as bad:
        await client.list_runs(page_size=501)
    assert bad.value.reason == "MALFORMED_REQUEST"


async def test_await_input_parks_the_run_and_provide_input_resumes_the_asker(
    client: Client,
) -> None:
    agent = uniq("asker")
    await reg(client, agent)
    run = await client.start_run("tests", ask="plan a trip")
    await client.handoff(run.id, agent, Subtask(instruction="plan"))
    async with await client.subscribe(agent, "py-1") as sub:
        asking = await take(sub)
        request = await asking.await_input("Which city?", timeout=600, answer=Subtask)
        assert asking.settled

        async def waiting() -> pb.Run | None:
            r = (await client.get_run(run.id)).run
            return r if r.status == pb.RUN_STATUS_WAITING_INPUT else None

        parked = await until(waiting)
        assert [w.id for w in parked.waiting] == [request.id]
        with pytest.raises(HandoffError) as bad:
            await client.provide_input(run.id, request.id, Subtask())
        assert bad.value.reason == "MISSING_REQUIRED_FIELDS"
        await client.provide_input(run.id, request.id, Subtask(instruction="Lisbon"))
        with pytest.raises(HandoffError) as again:
            await client.provide_input(run.id, request.id, Subtask(instruction="Oslo"))
        assert again.value.reason == "ALREADY_SETTLED"
        answered = await take(sub)
        assert answered.envelope.input_request_id == request.id
        assert answered.payload(Subtask).instruction == "Lisbon"
        assert answered.pinned.ask == "plan a trip"
        await answered.ack()
    status = (await client.get_handoff(answered.handoff_id, run.id)).status
    assert status == pb.HANDOFF_STATUS_ACKED


async def test_redrive_a_dead_letter_and_fork_a_run(client: Client) -> None:
    flaky, fixed = uniq("flaky"), uniq("fixed")
    await reg(client, flaky, max_attempts=1)
    await reg(client, fixed)
    run = await client.start_run("tests", state={"step": 1})
    receipt = await client.handoff(
        run.id, flaky, Subtask(instruction="x"), state_delta=StateDelta().set("step", 2)
    )

    async def letter() -> pb.DeadLetter | None:
        found = [d for d in await client.dead_letters(flaky) if d.handoff.id == receipt.handoff_id]
        return found[0] if found else None

    # Subscribed until the letter is made: the nacked attempt comes back to
    # an instance, which finds it out of attempts.
    async with await client.subscribe(flaky, "py-1") as sub:
        await (await take(sub)).nack()
        dead = await until(letter)
    redriven = await client.redrive_dead_letter(dead.sequence, fixed)
    assert redriven.resumed and redriven.run.status == pb.RUN_STATUS_RUNNING
    with pytest.raises(HandoffError) as twice:
        await client.redrive_dead_letter(dead.sequence)
    assert twice.value.reason == "ALREADY_SETTLED"
    async with await client.subscribe(fixed, "py-1") as sub:
        d = await take(sub)
        assert d.handoff_id == receipt.handoff_id

    fork = await client.fork_run(run.id, 1, fixed, Subtask(instruction="again"))
    assert fork.run.parent_run_id == run.id and fork.run.forked_at_revision == 1
    assert (await client.get_state(fork.run.id)).values == {"step": 1}
    assert (await client.get_state(run.id)).values == {"step": 2}
