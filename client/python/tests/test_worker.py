"""The worker API: `@agent` handlers run by a `Worker`."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import signal
import sys
from pathlib import Path

import pytest

from handoff import (
    Client,
    Context,
    Delivery,
    Final,
    Handoff,
    HandoffError,
    Reject,
    UnavailableError,
    Worker,
    agent,
)
from handoff.demo.v1.demo_pb2 import Report, Subtask, WorkerResult
from handoff.v1 import handoff_pb2 as pb

from .conftest import WAIT, Broker, bounded, uniq, until

CHILD = Path(__file__).parent / "children" / "drain_worker.py"


async def collect(client: Client, agent_name: str, expect: int) -> list[Delivery]:
    out: list[Delivery] = []
    async with await client.subscribe(agent_name, "down", 8) as sub:
        while True:
            d = await sub.next(WAIT if len(out) < expect else 1.5)
            if d is None:
                return out
            out.append(d)
            await d.ack()


async def status(client: Client, run_id: str) -> int:
    return (await client.get_run(run_id)).run.status


async def test_handlers_return_values_exceptions_and_rejects(client: Client) -> None:
    name, down = uniq("worker"), uniq("down")
    await client.register_agent(down, accepts=WorkerResult)
    calls: dict[int, int] = {}

    @agent(name, accepts=Subtask, emits=[WorkerResult, Report], then=down, lease=30)
    async def handle(task: Subtask, ctx: Context) -> WorkerResult | Handoff | Final | None:
        calls[task.index] = calls.get(task.index, 0) + 1
        assert ctx.pinned.ask == "do it"
        if task.index == 0:
            return WorkerResult(index=0, summary="plain")  # to `then`
        if task.index == 1:
            if ctx.attempt == 1:
                raise RuntimeError("flaky")  # nacked, redelivered
            return Handoff(down, WorkerResult(index=1, summary="retried"), confidence=0.5)
        if task.index == 2:
            raise Reject("not my job")
        return Final(Report(answer="done"))

    worker = Worker(client, [handle], retry_delay=0.1)
    running = asyncio.create_task(worker.run(instances=2, handle_signals=False))
    try:
        await bounded(worker.ready.wait())
        runs = []
        for i in range(4):
            run = await client.start_run("tests", ask="do it")
            await client.handoff(run.id, name, Subtask(index=i, instruction="x"))
            runs.append(run.id)
        got = await collect(client, down, 2)
        summaries = sorted(d.payload(WorkerResult).summary for d in got)
        assert summaries == ["plain", "retried"]
        assert calls[1] == 2
        await until(lambda: _is(client, runs[2], pb.RUN_STATUS_FAILED))
        await until(lambda: _is(client, runs[3], pb.RUN_STATUS_COMPLETED))
        assert "not my job" in (await client.get_run(runs[2])).run.failure
    finally:
        worker.stop()
        await bounded(running)


async def _is(client: Client, run_id: str, want: int) -> bool:
    return await status(client, run_id) == want


async def test_the_lease_is_extended_while_a_handler_runs(client: Client) -> None:
    name, down = uniq("worker"), uniq("down")
    await client.register_agent(down, accepts=WorkerResult)
    calls = 0

    @agent(name, accepts=Subtask, emits=[WorkerResult], then=down, lease=dt.timedelta(seconds=1))
    async def slow(task: Subtask, ctx: Context) -> WorkerResult:
        nonlocal calls
        calls += 1
        await asyncio.sleep(3.0)  # three leases
        return WorkerResult(index=task.index, summary="slow")

    worker = Worker(client, [slow])
    running = asyncio.create_task(worker.run(instances=2, handle_signals=False))
    try:
        await bounded(worker.ready.wait())  # the agent is registered before the handoff
        run = await client.start_run("tests")
        await client.handoff(run.id, name, Subtask(instruction="x"))
        got = await collect(client, down, 1)
        assert len(got) == 1 and calls == 1
        kinds = [e.kind for e in (await client.get_run(run.id)).timeline]
        assert pb.EVENT_KIND_REDELIVERED not in kinds
    finally:
        worker.stop()
        await bounded(running)


async def spawn_drain_worker(
    broker: Broker, name: str, down: str, sleep: float, drain: float
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(CHILD),
        broker.addr,
        name,
        down,
        str(sleep),
        str(drain),
        stdout=asyncio.subprocess.PIPE,
    )


async def wait_step(proc: asyncio.subprocess.Process, step: str) -> dict[str, str]:
    assert proc.stdout is not None
    while True:
        line = await bounded(proc.stdout.readline())
        assert line, f"the worker ended before {step!r}"
        if line.startswith(b"{"):
            fields: dict[str, str] = json.loads(line)
            if fields.get("step") == step:
                return fields


async def test_sigterm_lets_the_running_handler_finish(client: Client, broker: Broker) -> None:
    name, down = uniq("worker"), uniq("down")
    await client.register_agent(name, accepts=Subtask, emits=[WorkerResult])
    await client.register_agent(down, accepts=WorkerResult)
    run = await client.start_run("tests")
    await client.handoff(run.id, name, Subtask(index=7, instruction="x"))
    proc = await spawn_drain_worker(broker, name, down, sleep=1.5, drain=10)
    try:
        await wait_step(proc, "handling")
        proc.send_signal(signal.SIGTERM)
        await wait_step(proc, "stopped")
        assert await bounded(proc.wait()) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    got = await collect(client, down, 1)
    assert [d.payload(WorkerResult).index for d in got] == [7]


async def test_sigterm_nacks_a_handler_past_the_drain_timeout(
    client: Client, broker: Broker
) -> None:
    name, down = uniq("worker"), uniq("down")
    # A short lease bounds the wait should the broker pull the nacked
    # handoff again for the closing session (it is then left to its lease).
    await client.register_agent(
        name, accepts=Subtask, emits=[WorkerResult], lease=dt.timedelta(seconds=2)
    )
    await client.register_agent(down, accepts=WorkerResult)
    run = await client.start_run("tests")
    await client.handoff(run.id, name, Subtask(index=3, instruction="x"))
    proc = await spawn_drain_worker(broker, name, down, sleep=60, drain=0.5)
    try:
        handling = await wait_step(proc, "handling")
        proc.send_signal(signal.SIGTERM)
        assert await bounded(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    kinds = [e.kind for e in (await client.get_run(run.id)).timeline]
    assert pb.EVENT_KIND_NACKED in kinds
    # Another instance takes it.
    async with await client.subscribe(name, "next") as sub:
        d = await sub.next(WAIT)
        assert d is not None and d.handoff_id == handling["handoff_id"]
        # A later attempt (even were JetStream to count it from 1 again),
        # settled by its ack.
        assert d.attempt >= 2
        await d.ack()


async def test_cancel_run_cancels_the_running_handler_and_acks_its_delivery(
    client: Client,
) -> None:
    name = uniq("worker")
    started = asyncio.Event()
    stopped: list[str] = []

    @agent(name, accepts=Subtask, lease=30)
    async def handle(task: Subtask, ctx: Context) -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            stopped.append(ctx.delivery.cancel_reason or "")
            raise

    worker = Worker(client, [handle])
    running = asyncio.create_task(worker.run(handle_signals=False))
    try:
        await bounded(worker.ready.wait())
        run = await client.start_run("tests", ask="long job")
        receipt = await client.handoff(run.id, name, Subtask(index=0, instruction="x"))
        await bounded(started.wait())
        ended = await client.cancel_run(run.id, "no longer wanted")
        assert ended.status == pb.RUN_STATUS_CANCELLED
        assert ended.failure == "no longer wanted"

        async def acked() -> bool:
            timeline = (await client.get_run(run.id)).timeline
            return any(
                e.kind == pb.EVENT_KIND_ACKED and e.handoff_id == receipt.handoff_id
                for e in timeline
            )

        # The handler saw CancelledError with the reason; the worker acked
        # the delivery (nothing is redelivered or nacked).
        assert await until(acked)
        assert stopped == ["no longer wanted"]
        timeline = (await client.get_run(run.id)).timeline
        assert not any(e.kind == pb.EVENT_KIND_NACKED for e in timeline)
        assert sum(e.kind == pb.EVENT_KIND_RUN_CANCELLED for e in timeline) == 1
        with pytest.raises(HandoffError) as closed:
            await client.cancel_run(run.id)
        assert closed.value.reason == "RUN_CLOSED"
    finally:
        worker.stop()
        await bounded(running)


async def test_a_terminal_refusal_rejects_once_and_a_retryable_failure_backs_off(
    client: Client,
) -> None:
    name = uniq("worker")
    calls: dict[str, int] = {}

    @agent(name, accepts=Subtask, emits=[Subtask], lease=30)
    async def handle(task: Subtask, ctx: Context) -> Handoff | None:
        calls[task.instruction] = calls.get(task.instruction, 0) + 1
        if task.instruction == "deeper":
            # One hop further than the run allows: DEPTH_CAP, terminal.
            return Handoff(name, Subtask(instruction="deeper"))
        if calls[task.instruction] == 1:
            raise UnavailableError("NATS is down", reason="NATS_UNAVAILABLE")
        return None

    worker = Worker(client, [handle], retry_delay=0.2)
    running = asyncio.create_task(worker.run(handle_signals=False))
    try:
        await bounded(worker.ready.wait())
        deep = await client.start_run("tests", max_depth=1)
        await client.handoff(deep.id, name, Subtask(instruction="deeper"))
        flaky = await client.start_run("tests")
        await client.handoff(flaky.id, name, Subtask(instruction="flaky"))

        await until(lambda: _is(client, deep.id, pb.RUN_STATUS_FAILED))
        failed = await client.get_run(deep.id)
        assert "DEPTH_CAP depth=2 max_depth=1" in failed.run.failure
        kinds = [e.kind for e in failed.timeline]
        assert kinds.count(pb.EVENT_KIND_REJECTED) == 1
        assert pb.EVENT_KIND_NACKED not in kinds and pb.EVENT_KIND_REDELIVERED not in kinds
        assert calls["deeper"] == 1, "the node ran once"

        async def retried() -> list[pb.Event] | None:
            timeline = (await client.get_run(flaky.id)).timeline
            acked = [e for e in timeline if e.kind == pb.EVENT_KIND_ACKED]
            return timeline if acked else None

        timeline = await until(retried)
        nacked = [e for e in timeline if e.kind == pb.EVENT_KIND_NACKED]
        again = [e for e in timeline if e.kind == pb.EVENT_KIND_REDELIVERED]
        assert len(nacked) == 1 and len(again) == 1 and calls["flaky"] == 2
        waited = again[0].at.ToDatetime() - nacked[0].at.ToDatetime()
        assert waited >= dt.timedelta(milliseconds=90), waited
    finally:
        worker.stop()
        await bounded(running)
