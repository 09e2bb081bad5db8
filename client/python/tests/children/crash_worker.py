"""A worker process for the crash tests: takes one delivery of AGENT and hands
off to DOWNSTREAM as MODE says, SIGKILLing itself where MODE says.

    python crash_worker.py ADDR AGENT DOWNSTREAM MODE

MODE: `die-before-settle` (receive, then die), `die-between-steps` (the first
of two fan-out handoffs, then die), `both-steps` (both, then ack), `handoff`
(one complete-and-handoff). Prints one JSON line per step.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

from handoff import Client
from handoff.demo.v1.demo_pb2 import WorkerResult


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def main(addr: str, agent: str, downstream: str, mode: str) -> None:
    client = await Client.connect(addr)
    sub = await client.subscribe(agent, f"crash-{os.getpid()}")
    d = await sub.next(30)
    if d is None:
        say(step="nothing")
        sys.exit(3)
    say(step="received", handoff_id=d.handoff_id, attempt=d.attempt)
    if mode == "die-before-settle":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "handoff":
        r = await d.handoff(downstream, WorkerResult(index=1, summary="done"))
        say(step="handoff", handoff_id=r.handoff_id, duplicate=r.duplicate)
    else:
        a = await d.handoff(
            downstream, WorkerResult(index=1, summary="a"), idempotency_key="a", fan_out=True
        )
        say(step="a", handoff_id=a.handoff_id, duplicate=a.duplicate)
        if mode == "die-between-steps":
            os.kill(os.getpid(), signal.SIGKILL)
        b = await d.handoff(
            downstream, WorkerResult(index=2, summary="b"), idempotency_key="b", fan_out=True
        )
        say(step="b", handoff_id=b.handoff_id, duplicate=b.duplicate)
        await d.ack()
        say(step="acked")
    await sub.close()
    await client.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
