"""A `Worker` process for the drain tests: handles AGENT's deliveries by
sleeping SLEEP seconds, then handing a WorkerResult to DOWNSTREAM; stops on
SIGTERM with drain timeout DRAIN.

    python drain_worker.py ADDR AGENT DOWNSTREAM SLEEP DRAIN
"""

from __future__ import annotations

import asyncio
import json
import sys

from handoff import Client, Context, Handoff, Worker, agent
from handoff.demo.v1.demo_pb2 import Subtask, WorkerResult


async def main(addr: str, name: str, downstream: str, sleep: str, drain: str) -> None:
    client = await Client.connect(addr)

    @agent(name, accepts=Subtask, emits=[WorkerResult])
    async def handle(task: Subtask, ctx: Context) -> Handoff:
        print(json.dumps({"step": "handling", "handoff_id": ctx.handoff_id}), flush=True)
        await asyncio.sleep(float(sleep))
        return Handoff(downstream, WorkerResult(index=task.index, summary="slept"))

    worker = Worker(client, [handle], register=False, drain_timeout=float(drain))
    print(json.dumps({"step": "running"}), flush=True)
    await worker.run(instances=1)
    print(json.dumps({"step": "stopped"}), flush=True)
    await client.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
