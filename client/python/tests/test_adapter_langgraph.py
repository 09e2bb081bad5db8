"""The LangGraph adapter against a real broker: a node that hands the graph's
state off, `Command(update=...)` as a delta, a compiled graph as a broker agent."""

from __future__ import annotations

import asyncio
import operator
from typing import Annotated, Any, TypedDict

import pytest

pytest.importorskip("langgraph")

from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.types import Command, Overwrite

from handoff import Client, Worker
from handoff._values import from_value, to_value
from handoff.adapters.langgraph import (
    command_to_delta,
    from_json,
    graph_agent,
    handoff_node,
    state_delta,
    to_json,
)
from handoff.demo.v1.demo_pb2 import Report, Subtask
from handoff.v1 import handoff_pb2 as pb

from .conftest import WAIT, bounded, uniq, until


class Trip(TypedDict, total=False):
    instruction: str
    city: str
    notes: Annotated[list[str], operator.add]
    answer: str


class Chat(TypedDict):
    messages: Annotated[list[Any], add_messages]
    topic: str


def test_command_update_maps_to_set_and_append() -> None:
    delta = command_to_delta(Command(update={"city": "Rome", "notes": ["booked"]}), Trip)
    d = delta.to_proto()
    assert {k: from_value(v) for k, v in d.set.items()} == {"city": "Rome"}
    assert {k: [from_value(x) for x in v.values] for k, v in d.append.items()} == {
        "notes": ["booked"]
    }
    assert delta.base_revision is None

    # An Overwrite of a reducer key sets it; a plain update dict works as a Command.
    over = command_to_delta({"notes": Overwrite(["only"])}, Trip, base_revision=4).to_proto()
    assert list(over.append) == [] and from_value(over.set["notes"]) == ["only"]
    assert over.base_revision == 4

    # add_messages appends; messages go in LangChain's serialized form.
    chat = command_to_delta(
        Command(update={"messages": [AIMessage(content="hi")], "topic": "t"}), Chat
    ).to_proto()
    (msg,) = [from_value(x) for x in chat.append["messages"].values]
    assert isinstance(msg, dict) and msg["type"] == "ai"
    assert isinstance(msg["data"], dict) and msg["data"]["content"] == "hi"
    assert msg["data"]["id"], "an id is assigned before the first hop"
    assert from_value(chat.set["topic"]) == "t"


def test_state_diff_appends_the_new_items_and_sets_changed_keys() -> None:
    before = {"city": "Rome", "notes": ["a"], "answer": "x"}
    after = {"city": "Oslo", "notes": ["a", "b", "c"], "answer": "x", "instruction": "go"}
    d = state_delta(Trip, before, after, exclude=["instruction"], base_revision=7).to_proto()
    assert {k: from_value(v) for k, v in d.set.items()} == {"city": "Oslo"}
    assert [from_value(x) for x in d.append["notes"].values] == ["b", "c"]
    assert d.base_revision == 7
    # A reducer key that was rewritten, not extended, is set.
    d2 = state_delta(Trip, {"notes": ["a"]}, {"notes": ["z"]}).to_proto()
    assert from_value(d2.set["notes"]) == ["z"] and not d2.append


def _through_the_broker(value: Any) -> Any:
    """`value` as run state stores and answers it (a protobuf Value)."""
    return from_value(to_value(to_json(value)))


def test_langchain_messages_survive_run_state_exactly() -> None:
    messages = [
        HumanMessage(content="Plan a trip to Lisbon", id="h1"),
        AIMessage(
            content="",
            id="a1",
            tool_calls=[{"name": "search", "args": {"city": "Lisbon"}, "id": "call-1"}],
            additional_kwargs={"refusal": None},
            response_metadata={"model_name": "scripted", "finish_reason": "tool_calls"},
        ),
        ToolMessage(content="sunny", tool_call_id="call-1", id="t1"),
        AIMessage(content="Book the hotel near the river.", id="a2", name="travel_advisor"),
    ]
    back = from_json(_through_the_broker(messages))
    assert back == messages
    assert [type(m) for m in back] == [type(m) for m in messages]


def test_a_hop_appends_only_its_new_messages() -> None:
    old = [HumanMessage(content="hi", id="h1"), AIMessage(content="hello", id="a1")]
    before = {"messages": _through_the_broker(old), "topic": "t"}
    # What the graph holds after the hop: the restored messages, and its own.
    after = {
        "messages": [*from_json(before["messages"]), AIMessage(content="more", id="a2")],
        "topic": "t",
    }
    d = state_delta(Chat, before, after, base_revision=3).to_proto()
    assert not d.set
    (new,) = [from_value(x) for x in d.append["messages"].values]
    assert from_json([new]) == [AIMessage(content="more", id="a2")]


async def test_start_run_takes_langchain_messages_with_their_ids(client: Client) -> None:
    run = await client.start_run(
        "tests", state={"messages": [HumanMessage(content="hi"), HumanMessage(content="x", id="k")]}
    )
    stored = from_json((await client.get_state(run.id)).values["messages"])
    assert [m.content for m in stored] == ["hi", "x"]
    assert stored[0].id and stored[1].id == "k"
    assert all(isinstance(m, HumanMessage) for m in stored)


async def test_handoff_node_stores_a_durable_handoff_with_the_graph_state(
    client: Client,
) -> None:
    writer, planner = uniq("writer"), uniq("planner")
    await client.register_agent(writer, accepts=Subtask)
    await client.register_agent(planner, emits=[Subtask])
    run = await client.start_run("tests", ask="plan a trip", state={"budget": 100})

    async def plan(state: Trip) -> dict[str, Any]:
        return {"city": "Rome", "notes": ["picked Rome"]}

    builder = StateGraph(Trip)
    builder.add_node("plan", plan)
    builder.add_node(
        "to_writer",
        handoff_node(
            writer,
            lambda s: Subtask(instruction=f"write about {s['city']}"),
            graph=builder,
            client=client,
            run_id=run.id,
            keys=["city", "notes"],
            source_agent=planner,
            receipt_key="answer",
        ),
    )
    builder.add_edge(START, "plan")
    builder.add_edge("plan", "to_writer")
    graph = builder.compile()

    out = await bounded(graph.ainvoke({"instruction": "go", "notes": []}))
    handoff_id = out["answer"]
    assert handoff_id

    async with await client.subscribe(writer, "w1") as sub:
        d = await sub.next(WAIT)
        assert d is not None, "no delivery in time"
        assert d.handoff_id == handoff_id and d.source_agent == planner
        assert d.payload(Subtask).instruction == "write about Rome"
        await d.ack()

    state = await client.get_state(run.id)
    assert state.handoff_id == handoff_id
    assert state.values == {"budget": 100, "city": "Rome", "notes": ["picked Rome"]}


async def test_a_graph_runs_as_a_broker_agent_and_completes_the_run(client: Client) -> None:
    name = uniq("graph-agent")

    async def plan(state: Trip) -> dict[str, Any]:
        seen = len(state.get("notes", []))
        return {
            "city": "Rome",
            "notes": [f"planned {state['instruction']}"],
            "answer": f"{state['instruction']} in Rome after {seen} note(s)",
        }

    builder = StateGraph(Trip)
    builder.add_node("plan", plan)
    builder.add_edge(START, "plan")
    builder.add_edge("plan", END)
    planner = graph_agent(builder.compile(), name, accepts=Subtask, result=Report, lease=30)

    worker = Worker(client, [planner])
    running = asyncio.create_task(worker.run(handle_signals=False))
    try:
        await bounded(worker.ready.wait())
        run = await client.start_run(
            "tests", ask="a trip", state={"notes": ["seed"]}, pinned_state={"order": "A-1"}
        )
        sent = await client.handoff(run.id, name, Subtask(instruction="a weekend"))

        async def completed() -> pb.GetRunResponse | None:
            got = await client.get_run(run.id)
            return got if got.run.status == pb.RUN_STATUS_COMPLETED else None

        got = await until(completed)
        report = Report()
        assert got.run.result.Unpack(report)
        assert report.answer == "a weekend in Rome after 1 note(s)"

        state = await client.get_state(run.id)
        # The graph's changes, as a delta on the delivery's revision: city set,
        # one note appended; the payload's field and the pinned key untouched.
        assert state.values == {
            "notes": ["seed", "planned a weekend"],
            "city": "Rome",
            "answer": "a weekend in Rome after 1 note(s)",
            "order": "A-1",
        }
        assert state.revision == sent.state_revision + 1
        assert state.source_agent == name
    finally:
        worker.stop()
        await bounded(running)


async def test_a_graph_agent_hands_off_through_its_handoff_node(client: Client) -> None:
    name, writer = uniq("graph-agent"), uniq("writer")
    await client.register_agent(writer, accepts=Subtask)

    async def plan(state: Trip) -> dict[str, Any]:
        return {"city": "Oslo", "notes": ["cold"]}

    builder = StateGraph(Trip)
    builder.add_node("plan", plan)
    builder.add_node(
        "to_writer",
        handoff_node(writer, lambda s: Subtask(instruction=s["city"]), graph=builder),
    )
    builder.add_edge(START, "plan")
    builder.add_edge("plan", "to_writer")
    planner = graph_agent(
        builder.compile(),
        name,
        accepts=Subtask,
        emits=[Subtask],
        route=lambda out, ctx: Report(answer="unused: the node handed off"),
    )

    worker = Worker(client, [planner])
    running = asyncio.create_task(worker.run(handle_signals=False))
    try:
        await bounded(worker.ready.wait())
        run = await client.start_run("tests", state={"notes": ["seed"]})
        first = await client.handoff(run.id, name, Subtask(instruction="plan"))
        async with await client.subscribe(writer, "w1") as sub:
            d = await sub.next(WAIT)
            assert d is not None, "no delivery in time"
            assert d.payload(Subtask).instruction == "Oslo"
            assert d.source_agent == name and d.depth == first.depth + 1
            assert d.state == {"notes": ["seed", "cold"], "city": "Oslo"}
            await d.ack()
        state = await client.get_state(run.id)
        assert state.values == {"notes": ["seed", "cold"], "city": "Oslo"}
        # The node's handoff was the complete-and-handoff: the run is still
        # running and the planner's delivery is not redelivered.
        assert (await client.get_run(run.id)).run.status == pb.RUN_STATUS_RUNNING
        assert await client.dead_letters(name) == []
    finally:
        worker.stop()
        await bounded(running)


async def test_a_conversation_past_the_depth_cap_fails_at_once_naming_it(client: Client) -> None:
    a, b = uniq("talker-a"), uniq("talker-b")
    turns: list[str] = []

    def talker(me: str, other: str) -> Any:
        async def speak(state: Chat) -> dict[str, Any]:
            turns.append(me)
            return {"messages": [AIMessage(content=f"{me} turn {len(turns)}")]}

        builder = StateGraph(Chat)
        builder.add_node("speak", speak)
        builder.add_node(
            "pass", handoff_node(other, lambda s: Subtask(instruction="your turn"), graph=builder)
        )
        builder.add_edge(START, "speak")
        builder.add_edge("speak", "pass")
        return graph_agent(
            builder.compile(),
            me,
            accepts=Subtask,
            emits=[Subtask],
            route=lambda out, ctx: Report(answer="unused"),
        )

    await client.register_agent(a, accepts=Subtask, emits=[Subtask])
    await client.register_agent(b, accepts=Subtask, emits=[Subtask])
    worker = Worker(client, [talker(a, b), talker(b, a)])
    running = asyncio.create_task(worker.run(handle_signals=False))
    try:
        await bounded(worker.ready.wait())
        run = await client.start_run(
            "tests", max_depth=5, state={"messages": [HumanMessage(content="talk")]}
        )
        await client.handoff(run.id, a, Subtask(instruction="start"))

        async def ended() -> pb.GetRunResponse | None:
            got = await client.get_run(run.id)
            return got if got.run.status != pb.RUN_STATUS_RUNNING else None

        got = await until(ended)
        assert got.run.status == pb.RUN_STATUS_FAILED
        assert "DEPTH_CAP depth=6 max_depth=5" in got.run.failure, got.run.failure
        kinds = [e.kind for e in got.timeline]
        assert kinds.count(pb.EVENT_KIND_REJECTED) == 1
        assert pb.EVENT_KIND_NACKED not in kinds and pb.EVENT_KIND_REDELIVERED not in kinds
        # Five turns, each node ran once for its turn.
        assert turns == [a, b, a, b, a]
        history = from_json((await client.get_state(run.id)).values["messages"])
        assert [m.content for m in history] == ["talk"] + [
            f"{t} turn {i}" for i, t in enumerate(turns[:4], 1)
        ]
    finally:
        worker.stop()
        await bounded(running)
