"""A LangGraph graph run as a broker agent, no LLM needed.

The "planner" agent is a compiled graph: each delivery's Subtask and the run
state become its input, its output is handed off to the "writer" agent (a
plain `@agent` handler) with what the graph changed as a state delta; the
writer completes the run.

    python examples/langgraph_agent.py [BROKER_ADDR]     # default 127.0.0.1:7233
"""

from __future__ import annotations

import asyncio
import operator
import sys
from typing import Annotated, Any, TypedDict

from langgraph.graph import END, START, StateGraph

from handoff import Client, Context, Handoff, Worker, agent
from handoff.adapters.langgraph import graph_agent
from handoff.demo.v1.demo_pb2 import Report, Subtask
from handoff.v1 import handoff_pb2 as pb


class Plan(TypedDict, total=False):
    """The graph's state."""

    instruction: str  # from the payload (Subtask.instruction)
    steps: Annotated[list[str], operator.add]  # a reducer key: appended to the run state
    outline: str  # a plain key: set in the run state


async def plan(state: Plan) -> dict[str, Any]:
    """The graph's one node: steps from the instruction."""
    steps = [f"read {part.strip()}" for part in state["instruction"].split(",")]
    return {"steps": steps, "outline": " then ".join(steps)}


def build_graph() -> Any:
    """START -> plan -> END."""
    builder = StateGraph(Plan)
    builder.add_node("plan", plan)
    builder.add_edge(START, "plan")
    builder.add_edge("plan", END)
    return builder.compile()


planner = graph_agent(
    build_graph(),
    "planner",
    accepts=Subtask,
    emits=[Subtask],
    # The graph's output decides the next hop; the delta (steps appended,
    # outline set) rides along with the handoff.
    route=lambda out, ctx: Handoff("writer", Subtask(instruction=out["outline"])),
)


@agent("writer", accepts=Subtask, emits=[Report])
async def write(task: Subtask, ctx: Context) -> Report:
    """The writer: the run's result, from the plan and the run state."""
    steps = ctx.state.get("steps")
    count = len(steps) if isinstance(steps, list) else 0
    return Report(answer=f"{ctx.pinned.ask}: {task.instruction} ({count} steps in the state)")


async def main(addr: str) -> None:
    """Runs both agents, starts a run and prints its result and state."""
    async with await Client.connect(addr) as client:
        await client.register_contract(Subtask, require=["instruction"])
        await client.register_contract(Report)
        worker = Worker(client, [planner, write])
        running = asyncio.create_task(worker.run())
        await worker.ready.wait()
        run = await client.start_run("example", ask="Summarise", state={"steps": ["start"]})
        await client.handoff(run.id, "planner", Subtask(instruction="page 1, page 2"))
        for _ in range(100):
            got = await client.get_run(run.id)
            if got.run.status != pb.RUN_STATUS_RUNNING:
                break
            await asyncio.sleep(0.1)
        report = Report()
        got.run.result.Unpack(report)
        print("result:", report.answer)
        print("state:", (await client.get_state(run.id)).values)
        worker.stop()
        await running


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:7233"))
