"""An OpenAI Agents SDK agent handing off durably through the broker.

The "triage" agent has one handoff, to the broker agent "writer": when its
model calls it, the typed Subtask is stored by the broker (with a state delta)
and the Agents SDK run ends with the receipt; the writer, a broker agent in
this process (it could be anywhere), receives the Subtask and completes the
run. With OPENAI_API_KEY set, triage uses a real model; without, a scripted
one that calls the handoff, so the example runs offline.

    python examples/openai_agents_handoff.py [BROKER_ADDR]   # default 127.0.0.1:7233
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

from agents import Agent, Handoff, set_tracing_disabled
from agents.items import ModelResponse, TResponseStreamEvent
from agents.models.interface import Model
from agents.usage import Usage
from google.protobuf.message import Message
from openai.types.responses import ResponseFunctionToolCall

from handoff import Client, Context, StateDelta, Worker, agent
from handoff.adapters.openai_agents import broker_handoff, run
from handoff.demo.v1.demo_pb2 import Report, Subtask


class CallsTheHandoff(Model):
    """Stands in for an LLM: calls the first handoff it is offered."""

    async def get_response(self, *args: Any, **kwargs: Any) -> ModelResponse:
        """A call of the first handoff offered, with a canned Subtask."""
        handoffs: list[Handoff[Any, Any]] = args[5] if len(args) > 5 else kwargs["handoffs"]
        arguments = {"index": 0, "of": 1, "instruction": "summarise page 1", "sources": ["a.pdf"]}
        call = ResponseFunctionToolCall(
            id="call-1",
            call_id="call-1",
            type="function_call",
            name=handoffs[0].tool_name,
            arguments=json.dumps(arguments),
        )
        return ModelResponse(output=[call], usage=Usage(), response_id=None)

    def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[TResponseStreamEvent]:
        """Not used here."""
        raise NotImplementedError


@agent("writer", accepts=Subtask, emits=[Report])
async def write(task: Subtask, ctx: Context) -> Report:
    """The broker agent behind the handoff: completes the run."""
    return Report(answer=f"wrote {task.instruction!r} from {list(task.sources)}")


async def main(addr: str) -> None:
    """Runs the writer, then the triage agent, and prints what each ended with."""
    if not os.environ.get("OPENAI_API_KEY"):
        set_tracing_disabled(True)
    async with await Client.connect(addr) as client:
        await client.register_contract(Subtask, require=["instruction"])
        await client.register_contract(Report)
        await client.register_agent("triage", emits=[Subtask])
        worker = Worker(client, [write])
        running = asyncio.create_task(worker.run())
        await worker.ready.wait()

        def remember(ctx: Any, msg: Message) -> StateDelta:
            assert isinstance(msg, Subtask)
            return StateDelta().set("topic", msg.instruction)

        to_writer = broker_handoff(
            client, "writer", contract=Subtask, source_agent="triage", state_delta=remember
        )
        offline = not os.environ.get("OPENAI_API_KEY")
        model: str | Model = CallsTheHandoff() if offline else "gpt-4o-mini"
        triage = Agent[Any](
            name="triage",
            instructions="Hand every request to the writer.",
            handoffs=[to_writer],
            model=model,
        )
        # The broker run is started for the agents (its ask is their input),
        # and its id reaches the handoff through the run context.
        done = await run(client, triage, "Please summarise page 1", owner="example")
        print("agents run ended with:", done.result.final_output)
        report = await done.answer(Report)
        print("broker run result:", report.answer)
        print("state:", (await client.get_state(done.run_id)).values)
        worker.stop()
        await running


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:7233"))
