"""The OpenAI Agents SDK adapter against a real broker: a `Handoff` the model
calls, made durable and typed through the broker. The model is scripted (no
network, no LLM)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

pytest.importorskip("agents")

from agents import (
    Agent,
    Handoff,
    ModelBehaviorError,
    RunContextWrapper,
    Runner,
    set_tracing_disabled,
)
from agents.agent_output import AgentOutputSchemaBase
from agents.items import (
    ModelResponse,
    TResponseInputItem,
    TResponseOutputItem,
    TResponseStreamEvent,
)
from agents.model_settings import ModelSettings
from agents.models.interface import Model, ModelTracing
from agents.testing import ScriptedModel, assistant_message, function_call
from agents.tool import Tool
from agents.usage import Usage
from google.protobuf.message import Message
from openai.types.responses import (
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseOutputText,
)
from openai.types.responses.response_prompt_param import ResponsePromptParam
from pydantic import BaseModel, Field

from handoff import Client, InvalidArgumentError, Receipt, StateDelta, Worker
from handoff.adapters.openai_agents import (
    agent_worker,
    broker_handoff,
    contract_model,
    run,
    to_contract,
)
from handoff.demo.v1.demo_pb2 import Report, Subtask, WorkerResult
from handoff.v1 import handoff_pb2 as pb

from .conftest import WAIT, bounded, uniq

set_tracing_disabled(True)


def tool_call(name: str, arguments: dict[str, Any]) -> TResponseOutputItem:
    return ResponseFunctionToolCall(
        id="call-1",
        call_id="call-1",
        type="function_call",
        name=name,
        arguments=json.dumps(arguments),
    )


def say(text: str) -> TResponseOutputItem:
    return ResponseOutputMessage(
        id="msg-1",
        type="message",
        role="assistant",
        status="completed",
        content=[ResponseOutputText(text=text, type="output_text", annotations=[], logprobs=[])],
    )


class Scripted(Model):
    """Answers each call with the next canned output; records what it was offered."""

    def __init__(self, *turns: list[TResponseOutputItem]) -> None:
        self.turns = list(turns)
        self.offered: list[list[str]] = []

    async def get_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff[Any, Any]],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: ResponsePromptParam | None,
    ) -> ModelResponse:
        self.offered.append([h.tool_name for h in handoffs])
        return ModelResponse(output=self.turns.pop(0), usage=Usage(), response_id=None)

    def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[TResponseStreamEvent]:
        raise NotImplementedError


@dataclass
class Ctx:
    run_id: str


def test_a_contract_becomes_a_strict_input_schema() -> None:
    schema = contract_model(WorkerResult).model_json_schema()
    assert schema["required"] == ["index", "of", "summary", "citations"]
    cit = schema["$defs"]["Citation"]
    assert cit["required"] == ["source", "quote"]
    value = contract_model(WorkerResult).model_validate(
        {"index": 1, "of": 2, "summary": "s", "citations": [{"source": "a", "quote": "q"}]}
    )
    msg = to_contract(value, WorkerResult)
    cites = [{"source": "a", "quote": "q"}]
    assert msg == WorkerResult(index=1, of=2, summary="s", citations=cites)

    class Extra(BaseModel):
        instruction: str
        colour: str

    with pytest.raises(InvalidArgumentError):
        broker_handoff(None, "x", contract=Subtask, input_type=Extra, run_id="r")  # type: ignore[arg-type]


async def test_the_handoff_is_durable_typed_and_carries_state(client: Client) -> None:
    writer, triage = uniq("writer"), uniq("triage")
    await client.register_agent(writer, accepts=Subtask)
    await client.register_agent(triage, emits=[Subtask])
    run = await client.start_run("tests", ask="summarise", state={"budget": 3})
    seen: list[tuple[Message, Receipt]] = []

    def note(ctx: RunContextWrapper[Any], msg: Message) -> StateDelta:
        assert isinstance(msg, Subtask)
        return StateDelta().set("topic", msg.instruction).append("sources", list(msg.sources))

    async def on_handoff(ctx: RunContextWrapper[Any], msg: Message, r: Receipt) -> None:
        seen.append((msg, r))

    to_writer = broker_handoff(
        client,
        writer,
        contract=Subtask,
        source_agent=triage,
        run_id=lambda ctx: ctx.context.run_id,
        state_delta=note,
        on_handoff=on_handoff,
    )
    args = {"index": 0, "of": 1, "instruction": "page 1", "sources": ["a.pdf"]}
    model = Scripted([tool_call(to_writer.tool_name, args)])
    agent = Agent[Ctx](name=triage, instructions="route", handoffs=[to_writer], model=model)

    result = await bounded(Runner.run(agent, "Summarise page 1", context=Ctx(run.id)))

    assert model.offered == [[to_writer.tool_name]]
    receipt = json.loads(result.final_output)
    assert result.last_agent.name == writer
    assert receipt["run_id"] == run.id and receipt["target"] == writer
    assert not receipt["duplicate"]
    ((msg, r),) = seen
    assert msg == Subtask(index=0, of=1, instruction="page 1", sources=["a.pdf"])
    assert r.handoff_id == receipt["handoff_id"]

    async with await client.subscribe(writer, "w1") as sub:
        d = await sub.next(WAIT)
        assert d is not None, "no delivery in time"
        assert d.handoff_id == receipt["handoff_id"] and d.source_agent == triage
        assert d.payload(Subtask) == Subtask(index=0, of=1, instruction="page 1", sources=["a.pdf"])
        await d.ack()

    state = await client.get_state(run.id)
    assert state.handoff_id == receipt["handoff_id"]
    assert state.values == {"budget": 3, "topic": "page 1", "sources": ["a.pdf"]}


class Cite(BaseModel):
    source: str
    quote: str


class Finding(BaseModel):
    """A pydantic input type of one's own, named like the contract's fields."""

    summary: str = Field(description="What was found")
    citations: list[Cite] = Field(description="Where it was found")


async def test_a_pydantic_input_type_maps_to_the_contract(client: Client) -> None:
    agg, worker = uniq("aggregator"), uniq("worker")
    await client.register_agent(agg, accepts=WorkerResult)
    await client.register_agent(worker, emits=[WorkerResult])
    run = await client.start_run("tests")
    back = Agent[Ctx](name=worker, model=Scripted([say("handed off, done")]))
    to_agg = broker_handoff(
        client,
        agg,
        contract=WorkerResult,
        input_type=Finding,
        source_agent=worker,
        run_id=run.id,
        then=back,
    )
    assert to_agg.input_json_schema["properties"]["summary"]["description"] == "What was found"
    args = {"summary": "s", "citations": [{"source": "x", "quote": "q"}]}
    model = Scripted([tool_call(to_agg.tool_name, args)])
    agent = Agent[Ctx](name=worker, handoffs=[to_agg], model=model)

    result = await bounded(Runner.run(agent, "go", context=Ctx(run.id)))
    assert result.final_output == "handed off, done" and result.last_agent is back

    async with await client.subscribe(agg, "a1") as sub:
        d = await sub.next(WAIT)
        assert d is not None, "no delivery in time"
        got = d.payload(WorkerResult)
        assert got.summary == "s" and [(c.source, c.quote) for c in got.citations] == [("x", "q")]
        await d.ack()


async def test_arguments_that_do_not_fit_are_refused_and_nothing_is_sent(
    client: Client,
) -> None:
    writer = uniq("writer")
    await client.register_agent(writer, accepts=Subtask)
    run = await client.start_run("tests")
    to_writer = broker_handoff(client, writer, contract=Subtask, run_id=run.id)
    model = Scripted([tool_call(to_writer.tool_name, {"instruction": 5})])
    agent = Agent[Ctx](name="triage", handoffs=[to_writer], model=model)
    with pytest.raises(ModelBehaviorError):
        await bounded(Runner.run(agent, "go", context=Ctx(run.id)))
    async with await client.subscribe(writer, "w1") as sub:
        assert await sub.next(1.0) is None


def _writer_and_editor(client: Client, writer: str, editor: str) -> tuple[Agent[Any], Agent[Any]]:
    """A writer `Agent` that hands its draft to the editor through the broker,
    and an editor that answers; both scripted."""
    to_editor = broker_handoff(client, editor, contract=Subtask, source_agent=writer)
    writer_agent = Agent[Any](
        name=writer,
        handoffs=[to_editor],
        model=ScriptedModel(
            [
                [
                    function_call(
                        to_editor.tool_name,
                        {"index": 0, "of": 1, "instruction": "edit: draft", "sources": []},
                        call_id="c2",
                    )
                ]
            ]
        ),
    )
    editor_agent = Agent[Any](
        name=editor, model=ScriptedModel([[assistant_message("Edited: page 1 is about trips")]])
    )
    return writer_agent, editor_agent


@pytest.mark.parametrize("streamed", [False, True])
async def test_runner_hands_off_through_the_broker_and_waits_for_the_answer(
    client: Client, streamed: bool
) -> None:
    triage, writer, editor = uniq("triage"), uniq("writer"), uniq("editor")
    await client.register_agent(triage, emits=[Subtask])
    to_writer = broker_handoff(client, writer, contract=Subtask, source_agent=triage)
    triage_agent = Agent[Any](
        name=triage,
        handoffs=[to_writer],
        model=ScriptedModel(
            [
                [
                    function_call(
                        to_writer.tool_name,
                        {"index": 0, "of": 1, "instruction": "page 1", "sources": []},
                        call_id="c1",
                    )
                ]
            ]
        ),
    )
    writer_agent, editor_agent = _writer_and_editor(client, writer, editor)
    worker = Worker(
        client,
        [
            agent_worker(writer_agent, writer, accepts=Subtask, emits=[Subtask]),
            agent_worker(
                editor_agent,
                editor,
                accepts=Subtask,
                emits=[Report],
                result=lambda text: Report(answer=text),
            ),
        ],
    )
    running = asyncio.create_task(worker.run(handle_signals=False))
    try:
        await bounded(worker.ready.wait())
        events: list[Any] = []
        done = await bounded(
            run(
                client,
                triage_agent,
                "Summarise page 1",
                owner="tests",
                streamed=streamed,
                on_event=events.append,
            )
        )
        assert done.receipt is not None and done.receipt["target"] == writer
        assert done.receipt["run_id"] == done.run_id
        if streamed:
            assert events, "the stream's events were handed on"
        report = await bounded(done.answer(Report))
        assert report.answer == "Edited: page 1 is about trips"
        got = await client.get_run(done.run_id)
        assert got.run.pinned.ask == "Summarise page 1", "the ask from the Runner's input"
        hops = [
            (e.source_agent, e.agent)
            for e in got.timeline
            if e.kind == pb.EVENT_KIND_HANDOFF_ACCEPTED and e.agent
        ]
        assert hops == [(triage, writer), (writer, editor)]
    finally:
        worker.stop()
        await bounded(running)
