"""Per-hop latency of a LangGraph graph distributed across the broker
(`handoff.adapters.langgraph.distribute`), next to a chain of plain `@agent`
handlers, against one broker in the same run.

    cargo build --release -p handoffd
    target/python-venv/bin/python bench/langgraph_hop.py          # about a minute

It starts one `handoffd` (`HANDOFF_BIN`, default `target/release/handoffd`) as
`python_hop.py` does, and serves both chains from one `Worker` each, in this
process:

- `@agent`: agents `lg-agent-0` .. `lg-agent-<N-1>`; each hands a `Subtask`
  with a `--payload`-byte instruction to the next with a state delta that
  appends the same bytes to `notes`; the last one ends the run.
- graph: a `StateGraph` of N nodes in a line (edges), each appending
  `--payload` bytes to `notes` (an `operator.add` key), distributed with one
  agent per node and run with `ainvoke`.

A hop is the time between two consecutive `delivered` events of a run (the
broker's clock), so both chains are measured the same way. The runs go one
after another; the first `--warmup` of each are not measured. It prints the
p50, p90 and p99 of each and the ratio graph / `@agent`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import operator
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Annotated, Any, TypedDict

sys.path.insert(0, str(Path(__file__).resolve().parent))

from langgraph.graph import END, START, StateGraph
from python_hop import REPO, Figures, percentile, start_broker, stop

from handoff import Client, Context, Final, Handoff, Worker, agent
from handoff.adapters.langgraph import distribute
from handoff.demo.v1.demo_pb2 import Subtask
from handoff.v1 import handoff_pb2 as pb


class Notes(TypedDict, total=False):
    """The graph's state."""

    notes: Annotated[list[str], operator.add]


async def hops_of(client: Client, run_id: str) -> list[int]:
    """Microseconds between consecutive deliveries of a run."""
    got = await client.get_run(run_id)
    at = [
        e.at.seconds * 1_000_000 + e.at.nanos // 1000
        for e in got.timeline
        if e.kind == pb.EVENT_KIND_DELIVERED
    ]
    at.sort()
    return [b - a for a, b in itertools.pairwise(at)]


def figures(name: str, hops: list[int]) -> Figures:
    """The percentiles of `hops` (microseconds)."""
    hops.sort()
    return Figures(
        name, len(hops), percentile(hops, 0.5), percentile(hops, 0.9), percentile(hops, 0.99)
    )


async def wait_done(client: Client, run_id: str) -> None:
    """Until the run ends (polled: the bench measures the broker's clock)."""
    for _ in range(100_000):
        if (await client.get_run(run_id)).run.status != pb.RUN_STATUS_RUNNING:
            return
        await asyncio.sleep(0.01)
    raise RuntimeError(f"run {run_id} did not end")


async def agent_chain(client: Client, agents: int, runs: int, warmup: int, text: str) -> Figures:
    """The chain of plain `@agent` handlers."""
    names = [f"lg-agent-{i}" for i in range(agents)]
    handlers = []
    for i in range(agents):

        def make(i: int) -> Any:
            @agent(names[i], accepts=Subtask, emits=[Subtask])
            async def hop(task: Subtask, ctx: Context) -> Handoff | Final:
                delta = ctx.state_delta().append("notes", [text])
                if i + 1 < agents:
                    return Handoff(names[i + 1], task, state_delta=delta)
                return Final(task, state_delta=delta)

            return hop

        handlers.append(make(i))
    await client.register_contract(Subtask)
    worker = Worker(client, handlers)
    running = asyncio.create_task(worker.run(handle_signals=False))
    await worker.ready.wait()
    hops: list[int] = []
    try:
        for n in range(warmup + runs):
            run = await client.start_run("bench", max_depth=agents + 1, state={"notes": []})
            await client.handoff(run.id, names[0], Subtask(instruction=text))
            await wait_done(client, run.id)
            if n >= warmup:
                hops.extend(await hops_of(client, run.id))
    finally:
        worker.stop()
        await running
    return figures("@agent", hops)


async def graph_chain(client: Client, nodes: int, runs: int, warmup: int, text: str) -> Figures:
    """The same chain as a distributed LangGraph graph."""
    builder = StateGraph(Notes)

    async def note(state: Notes) -> dict[str, Any]:
        return {"notes": [text]}

    for i in range(nodes):
        builder.add_node(f"n{i}", note)
        builder.add_edge(START if i == 0 else f"n{i - 1}", f"n{i}")
    builder.add_edge(f"n{nodes - 1}", END)
    graph = distribute(builder.compile(), prefix="lg-graph")
    worker = graph.worker(client)
    running = asyncio.create_task(worker.run(handle_signals=False))
    await worker.ready.wait()
    hops: list[int] = []
    try:
        for n in range(warmup + runs):
            run_id = f"lg-graph-{uuid.uuid4().hex[:12]}"
            await graph.ainvoke(
                {"notes": []}, {"configurable": {"thread_id": run_id}}, client=client
            )
            if n >= warmup:
                hops.extend(await hops_of(client, run_id))
    finally:
        worker.stop()
        await running
    return figures("graph", hops)


async def bench(addr: str, args: argparse.Namespace) -> None:
    """Both chains in turns, `--rounds` times."""
    text = "x" * args.payload
    async with await Client.connect(addr) as client:
        print(f"{'':<14}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}   hops", flush=True)
        for r in range(args.rounds):
            a = await agent_chain(client, args.agents, args.runs, args.warmup, text)
            g = await graph_chain(client, args.agents, args.runs, args.warmup, text)
            for f in (a, g):
                name = f"{f.sdk} ({r + 1})"
                print(f"{name:<14}{f.p50:>9.3f}{f.p90:>9.3f}{f.p99:>9.3f}   {f.hops}")
            print(
                f"{'graph/@agent':<14}{g.p50 / a.p50:>8.2f}x{g.p90 / a.p90:>8.2f}x"
                f"{g.p99 / a.p99:>8.2f}x",
                flush=True,
            )


def main() -> int:
    """Parses the arguments, starts the broker, runs the chains."""
    parser = argparse.ArgumentParser(description="distributed LangGraph node vs @agent hop")
    parser.add_argument("--agents", type=int, default=5, help="agents (nodes) in the chain")
    parser.add_argument("--runs", type=int, default=200, help="measured runs per chain")
    parser.add_argument("--warmup", type=int, default=10, help="runs not measured first")
    parser.add_argument("--payload", type=int, default=1024, help="bytes appended per hop")
    parser.add_argument("--rounds", type=int, default=2, help="turns of both chains")
    args = parser.parse_args()
    broker_bin = Path(os.environ.get("HANDOFF_BIN", REPO / "target/release/handoffd"))
    if not broker_bin.is_file():
        print(f"langgraph_hop: no {broker_bin} (build it, or name it)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        proc, addr = start_broker(broker_bin, Path(tmp))
        try:
            print(
                f"handoffd {broker_bin} on {addr}; chains of {args.agents}, "
                f"{args.payload} bytes appended per hop, {args.runs} runs per chain",
                flush=True,
            )
            asyncio.run(bench(addr, args))
        finally:
            stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
