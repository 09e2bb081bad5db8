"""Complete-and-handoff through crashes of a worker process (SIGKILL): the
input is redelivered, the redo's handoffs are recognised, downstream sees
each once."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import signal
import sys
from pathlib import Path
from typing import Any

from handoff import Client, Delivery
from handoff.demo.v1.demo_pb2 import Subtask, WorkerResult

from .conftest import WAIT, Broker, bounded, uniq

CHILD = Path(__file__).parent / "children" / "crash_worker.py"


async def run_child(broker: Broker, *args: str) -> tuple[int, list[dict[str, Any]]]:
    """Runs a crash worker to its end; its exit code and the steps it printed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(CHILD), broker.addr, *args, stdout=asyncio.subprocess.PIPE
    )
    try:
        out, _ = await bounded(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    steps = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    assert proc.returncode is not None
    return proc.returncode, steps


async def downstream_of(client: Client, agent: str, expect: int) -> list[Delivery]:
    """Every delivery to `agent`, acked, until `expect` arrived and a second
    passed without another."""
    out: list[Delivery] = []
    async with await client.subscribe(agent, "down", 8) as sub:
        while True:
            d = await sub.next(WAIT if len(out) < expect else 1.5)
            if d is None:
                return out
            out.append(d)
            await d.ack()


async def setup(client: Client) -> tuple[str, str, str]:
    worker, down = uniq("worker"), uniq("down")
    await client.register_agent(
        worker, accepts=Subtask, emits=[WorkerResult], lease=dt.timedelta(seconds=1)
    )
    await client.register_agent(down, accepts=WorkerResult)
    run = await client.start_run("tests")
    await client.handoff(run.id, worker, Subtask(instruction="work"))
    return run.id, worker, down


async def test_a_worker_killed_before_settling_is_redone_once(
    client: Client, broker: Broker
) -> None:
    _, worker, down = await setup(client)
    code, steps = await run_child(broker, worker, down, "die-before-settle")
    assert code == -signal.SIGKILL and steps[0]["attempt"] == 1
    code, steps = await run_child(broker, worker, down, "handoff")
    assert code == 0 and steps[0]["attempt"] == 2
    assert steps[1]["duplicate"] is False
    got = await downstream_of(client, down, 1)
    assert [d.payload(WorkerResult).summary for d in got] == ["done"]


async def test_a_worker_killed_between_two_handoffs_repeats_neither(
    client: Client, broker: Broker
) -> None:
    run_id, worker, down = await setup(client)
    code, first = await run_child(broker, worker, down, "die-between-steps")
    assert code == -signal.SIGKILL
    assert [s["step"] for s in first] == ["received", "a"]
    code, redo = await run_child(broker, worker, down, "both-steps")
    assert code == 0
    steps = {s["step"]: s for s in redo}
    assert steps["received"]["attempt"] == 2
    # The redo of the first handoff is recognised as the same handoff.
    assert steps["a"]["duplicate"] is True
    assert steps["a"]["handoff_id"] == first[1]["handoff_id"]
    assert steps["b"]["duplicate"] is False
    got = await downstream_of(client, down, 2)
    assert sorted(d.payload(WorkerResult).summary for d in got) == ["a", "b"]
    assert len({d.handoff_id for d in got}) == 2
    assert all(d.run_id == run_id for d in got)
