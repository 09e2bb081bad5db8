"""The demo pipeline's workers in Python, between the Rust planner and the Rust
aggregator: planner (Rust) -> 4 parallel workers (this program) -> barrier ->
aggregator (Rust).

Run by `./dev demo --python`, which starts `handoffd` and runs both programs;
by hand, against a broker at 127.0.0.1:7233::

    cargo run -p handoffctl --example pipeline -- \\
        --addr http://127.0.0.1:7233 --external-workers &
    python client/python/examples/demo.py --addr 127.0.0.1:7233

The Rust example (`client/cli/examples/pipeline.rs`) registers the contracts
`handoff.demo.v1.{Ask, Subtask, WorkerResult}` and the agents planner, worker
and aggregator, shows two bad handoffs refused at the door, starts a run and
fans the ask out to the worker inbox; with `--external-workers` it runs no
worker itself. This program waits until the agent `worker` is declared (it
keeps the Rust declaration: `register=False`), runs two instances of it that
decode each delivery as the `Subtask` the broker checked, and answers each
branch to its barrier with a `WorkerResult`, its confidence and its tool
result, as the aggregator's contract requires. Once the barrier has released
to the Rust aggregator and the run has ended, it says how, and exits 0 if the
run completed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import sys
from collections.abc import Callable

from handoff import (
    Client,
    Context,
    HandoffError,
    Reject,
    ToolResult,
    Worker,
    agent,
)
from handoff.demo.v1.demo_pb2 import Citation, Report, Subtask, WorkerResult
from handoff.v1 import handoff_pb2 as pb

# How long to wait for the agent to be declared, and for a run to reach us.
START_WAIT = 60.0
# How long the run may take once a subtask has arrived.
RUN_WAIT = 30.0
# The work: long enough for the other instance to take the next subtask.
WORK = 0.2

# The run the subtasks came from, set by the first one.
first_run: asyncio.Future[str] | None = None


@agent("worker", accepts=Subtask, emits=[WorkerResult])
async def work(task: Subtask, ctx: Context) -> None:
    """Does one subtask and reports its result to the barrier of its branch."""
    delivery = ctx.delivery
    branch = delivery.barrier_branch
    if branch is None:
        raise Reject("the subtask came without its barrier branch")
    barrier, key = branch
    contract = delivery.contract
    checked = f"{contract[0]} v{contract[1]}" if contract else "unchecked"
    print(
        f"[py {delivery.agent}] received subtask {task.index + 1}/{task.of} on branch {key} "
        f"of {barrier} ({checked}, attempt {delivery.attempt})",
        flush=True,
    )
    if not ctx.pinned.ask:
        raise Reject("the pinned ask did not reach the worker")
    if first_run is not None and not first_run.done():
        first_run.set_result(ctx.run_id)
    await asyncio.sleep(WORK)
    source = task.sources[0] if task.sources else "nowhere"
    audience = ctx.pinned.fields.get("audience", "anyone")
    citation = Citation(source=source, quote=f"key figures of {source}")
    result = WorkerResult(
        index=task.index,
        of=task.of,
        summary=f"{source}: the points that matter to {audience} (Python worker)",
        citations=[citation],
    )
    # Checked at the barrier against the aggregator's contract: WorkerResult
    # wants a stated confidence of at least 0.5 and fresh tool results.
    receipt = await delivery.to_barrier(
        result,
        confidence=0.9,
        tool_results=[ToolResult("read_pdf", dt.datetime.now(dt.timezone.utc), citation)],
    )
    print(
        f"[py {delivery.agent}] reported branch {key} to the barrier "
        f"(handoff {receipt.handoff_id[:8]}, depth {receipt.depth})",
        flush=True,
    )


async def wait_for_agent(client: Client, name: str, within: float) -> None:
    """Waits until agent `name` is declared (by the program that owns the run)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while not any(a.name == name for a in await client.list_agents()):
        if loop.time() > end:
            raise TimeoutError(f"agent {name!r} was not declared within {within:.0f} s")
        await asyncio.sleep(0.2)


async def wait_for_end(client: Client, run_id: str) -> pb.Event:
    """The run's end event (replayed from the start, so a past end counts)."""
    ends = ["run_completed", "run_failed", "run_timed_out"]
    async with client.watch(run_id=run_id, kinds=ends, from_sequence=1) as events:
        async for event in events:
            return event
    raise RuntimeError(f"the event stream of run {run_id} ended before the run")


async def main(addr: str, instances: int) -> int:
    """Runs the worker until the run it served ends; 0 if it completed."""
    global first_run
    first_run = asyncio.get_running_loop().create_future()
    async with await Client.connect(addr) as client:
        await wait_for_agent(client, "worker", START_WAIT)
        worker = Worker(client, [work], register=False, instance_prefix="py")
        running = asyncio.create_task(worker.run(instances=instances))
        try:
            await asyncio.wait_for(worker.ready.wait(), START_WAIT)
            print(f"[py] {instances} worker instances subscribed to {addr}", flush=True)
            run_id = await asyncio.wait_for(asyncio.shield(first_run), START_WAIT)
            end = await asyncio.wait_for(wait_for_end(client, run_id), RUN_WAIT)
        finally:
            worker.stop()
            await running
        kind = pb.EventKind.Name(end.kind).removeprefix("EVENT_KIND_").lower()
        if end.kind != pb.EVENT_KIND_RUN_COMPLETED:
            print(f"[py] run {run_id} ended: {kind}", flush=True)
            return 1
        got = await client.get_run(run_id)
        report = Report()
        if not got.run.result.Unpack(report):
            print(f"[py] run {run_id} completed with a {got.run.result.type_url}", flush=True)
            return 1
        print(
            f"[py] run {run_id} completed: {report.answer} "
            f"({len(report.results)} results from the Python workers)",
            flush=True,
        )
        return 0


def export_traces() -> Callable[[], object] | None:
    """With OTEL_EXPORTER_OTLP_ENDPOINT set (and opentelemetry-sdk and its
    OTLP exporter installed), exports the SDK's spans there; returns what
    flushes them."""
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint:
        return None
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "handoff-demo-workers"}))
    insecure = endpoint.startswith("http://")
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint, insecure=insecure)))
    trace.set_tracer_provider(provider)
    return provider.shutdown


def cli() -> int:
    """Parses the arguments and runs `main`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--addr", default="127.0.0.1:7233", help="the broker (host:port)")
    parser.add_argument("--instances", type=int, default=2, help="worker instances")
    args = parser.parse_args()
    flush = export_traces()
    try:
        return asyncio.run(main(args.addr, args.instances))
    except (HandoffError, TimeoutError, RuntimeError) as e:
        print(f"demo.py: {e}", file=sys.stderr)
        return 1
    finally:
        if flush is not None:
            flush()


if __name__ == "__main__":
    sys.exit(cli())
