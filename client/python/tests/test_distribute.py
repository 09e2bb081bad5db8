"""LangGraph graphs distributed across a real broker (`distribute`), each
compared with the same graph run in one process: LangGraph's multi-agent
network how-to, its map-reduce how-to (`Send`), a conversation too large for
one run-state value, and `interrupt()`."""

from __future__ import annotations

import asyncio
import operator
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Literal, TypedDict

import pytest

pytest.importorskip("langgraph")

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.types import Command, Send, interrupt

from handoff import Client, HandoffError
from handoff.adapters.langgraph import SPILLED, DistributedGraph, distribute, from_json
from handoff.v1 import handoff_pb2 as pb

from .conftest import bounded, uniq

# ---------------------------------------------------------------- a scripted model


class ScriptedModel:
    """A chat model for the how-to's nodes: its answer depends only on how
    many AI messages the conversation holds, so a graph run twice (locally and
    across the broker) gets the same answers, ids included."""

    def __init__(self, script: Sequence[AIMessage]) -> None:
        self.script = list(script)
        self.calls = 0

    def bind_tools(self, tools: Sequence[Any]) -> ScriptedModel:
        return self

    def invoke(self, messages: Sequence[Any]) -> AIMessage:
        self.calls += 1
        said = sum(1 for m in messages if isinstance(m, AIMessage))
        return self.script[said].model_copy(deep=True)


def call(name: str, n: int) -> dict[str, Any]:
    return {"name": name, "args": {}, "id": f"call-{n}", "type": "tool_call"}


# ---------------------------------------------------------------- the network how-to
# LangGraph's "How to build a multi-agent network" (custom agent
# implementation): three advisors over MessagesState, each returning
# Command(goto=..., update={"messages": [...]}) to hand off. The only change:
# the tool message the how-to builds as a dict is given an id, so that two
# runs can be compared ids included (LangGraph would mint a random one).


@tool
def transfer_to_travel_advisor() -> None:
    """Ask travel advisor for help."""


@tool
def transfer_to_sightseeing_advisor() -> None:
    """Ask sightseeing advisor for help."""


@tool
def transfer_to_hotel_advisor() -> None:
    """Ask hotel advisor for help."""


def network(model: ScriptedModel) -> StateGraph[Any, Any, Any, Any]:
    def advisor(state: MessagesState, prompt: str, tools: list[Any]) -> Any:
        messages = [{"role": "system", "content": prompt}, *state["messages"]]
        ai_msg = model.bind_tools(tools).invoke(messages)
        if len(ai_msg.tool_calls) > 0:
            tool_call_id = ai_msg.tool_calls[-1]["id"]
            tool_msg = {
                "role": "tool",
                "content": "Successfully transferred",
                "tool_call_id": tool_call_id,
                "id": f"tool-{tool_call_id}",
            }
            goto = ai_msg.tool_calls[0]["name"].removeprefix("transfer_to_")
            return Command(goto=goto, update={"messages": [ai_msg, tool_msg]})
        return {"messages": [ai_msg]}

    def travel_advisor(
        state: MessagesState,
    ) -> Command[Literal["sightseeing_advisor", "hotel_advisor", "__end__"]]:
        return advisor(
            state,
            "You are a general travel expert that can recommend travel destinations.",
            [transfer_to_sightseeing_advisor, transfer_to_hotel_advisor],
        )

    def sightseeing_advisor(
        state: MessagesState,
    ) -> Command[Literal["travel_advisor", "hotel_advisor", "__end__"]]:
        return advisor(
            state,
            "You are a travel expert that can provide specific sightseeing recommendations.",
            [transfer_to_travel_advisor, transfer_to_hotel_advisor],
        )

    def hotel_advisor(
        state: MessagesState,
    ) -> Command[Literal["travel_advisor", "sightseeing_advisor", "__end__"]]:
        return advisor(
            state,
            "You are a hotel expert that can provide hotel recommendations.",
            [transfer_to_travel_advisor, transfer_to_sightseeing_advisor],
        )

    builder = StateGraph(MessagesState)
    builder.add_node("travel_advisor", travel_advisor)
    builder.add_node("sightseeing_advisor", sightseeing_advisor)
    builder.add_node("hotel_advisor", hotel_advisor)
    builder.add_edge(START, "travel_advisor")
    return builder


NETWORK_SCRIPT = [
    AIMessage(content="", id="ai-1", tool_calls=[call("transfer_to_sightseeing_advisor", 1)]),
    AIMessage(content="", id="ai-2", tool_calls=[call("transfer_to_hotel_advisor", 2)]),
    AIMessage(content="", id="ai-3", tool_calls=[call("transfer_to_travel_advisor", 3)]),
    AIMessage(content="Aruba: Eagle Beach by day, the Bucuti & Tara resort by night.", id="ai-4"),
]


def ask(text: str) -> dict[str, Any]:
    return {"messages": [HumanMessage(content=text, id="human-1")]}


async def served(client: Client, graph: DistributedGraph) -> tuple[Any, asyncio.Task[None]]:
    worker = graph.worker(client)
    running = asyncio.create_task(worker.run(handle_signals=False))
    await bounded(worker.ready.wait())
    return worker, running


async def test_the_network_how_to_ends_as_it_does_in_one_process(client: Client) -> None:
    question = ask(
        "I want somewhere warm in the Caribbean: where to go, what to see, where to stay?"
    )
    local_model = ScriptedModel(NETWORK_SCRIPT)
    local = await network(local_model).compile().ainvoke(question)

    model = ScriptedModel(NETWORK_SCRIPT)
    graph = distribute(network(model).compile(), prefix=uniq("net"))
    worker, running = await served(client, graph)
    run_id = uniq("run")
    try:
        out = await bounded(
            graph.ainvoke(question, {"configurable": {"thread_id": run_id}}, client=client)
        )
    finally:
        worker.stop()
        await bounded(running)

    # The same messages, LangChain's equality, ids included.
    assert out["messages"] == local["messages"]
    assert all(m.id for m in out["messages"])
    assert [type(m) for m in out["messages"]] == [type(m) for m in local["messages"]]
    assert model.calls == local_model.calls == 4

    # Every hop appended only its new messages: no revision sets the list.
    state = await client.get_state(run_id)
    appended: list[BaseMessage] = []
    agents = []
    for rev in range(2, state.latest_revision + 1):
        r = await client.get_state(run_id, rev)
        assert "messages" not in r.raw.delta.set, f"revision {rev} sets messages"
        assert list(r.raw.delta.append) == ["messages"]
        items = [from_json(_py(v)) for v in r.raw.delta.append["messages"].values]
        appended.extend(items)
        agents.append(r.source_agent)
    assert appended == local["messages"][1:]
    assert agents == [
        graph.names[n]
        for n in ("travel_advisor", "sightseeing_advisor", "hotel_advisor", "travel_advisor")
    ]
    run = (await client.get_run(run_id)).run
    assert run.status == pb.RUN_STATUS_COMPLETED


def _py(v: Any) -> Any:
    from handoff._values import from_value

    return from_value(v)


# ---------------------------------------------------------------- the map-reduce how-to
# LangGraph's "How to create map-reduce branches for parallel execution":
# a conditional edge returns one Send per subject, each joke lands in an
# operator.add key, and best_joke runs once all are in.


class OverallState(TypedDict, total=False):
    topic: str
    subjects: list[str]
    jokes: Annotated[list[str], operator.add]
    best_selected_joke: str


class JokeState(TypedDict):
    subject: str


def map_reduce() -> StateGraph[Any, Any, Any, Any]:
    def generate_topics(state: OverallState) -> dict[str, Any]:
        return {"subjects": ["lions", "elephants", "penguins", "otters"]}

    async def generate_joke(state: JokeState) -> dict[str, Any]:
        # The first subject finishes last: the join must not keep arrival order.
        await asyncio.sleep({"lions": 0.3, "elephants": 0.2}.get(state["subject"], 0.0))
        return {"jokes": [f"Why don't {state['subject']} play cards? Too many cheetahs."]}

    def continue_to_jokes(state: OverallState) -> list[Send]:
        return [Send("generate_joke", {"subject": s}) for s in state["subjects"]]

    def best_joke(state: OverallState) -> dict[str, Any]:
        return {"best_selected_joke": state["jokes"][1]}

    builder = StateGraph(OverallState)
    builder.add_node("generate_topics", generate_topics)
    builder.add_node("generate_joke", generate_joke)
    builder.add_node("best_joke", best_joke)
    builder.add_edge(START, "generate_topics")
    builder.add_conditional_edges("generate_topics", continue_to_jokes, ["generate_joke"])
    builder.add_edge("generate_joke", "best_joke")
    builder.add_edge("best_joke", END)
    return builder


async def test_send_fans_out_and_joins_at_a_barrier_as_locally(client: Client) -> None:
    local = await map_reduce().compile().ainvoke({"topic": "animals"})

    graph = distribute(map_reduce().compile(), prefix=uniq("mr"))
    worker, running = await served(client, graph)
    run_id = uniq("run")
    try:
        out = await bounded(
            graph.ainvoke(
                {"topic": "animals"}, {"configurable": {"thread_id": run_id}}, client=client
            )
        )
    finally:
        worker.stop()
        await bounded(running)
    assert out == local
    assert len(out["jokes"]) == 4

    got = await client.get_run(run_id)
    kinds = [e.kind for e in got.timeline]
    assert kinds.count(pb.EVENT_KIND_BARRIER_OPENED) == 1
    assert kinds.count(pb.EVENT_KIND_BARRIER_RELEASED) == 1
    assert kinds.count(pb.EVENT_KIND_BRANCH_ARRIVED) == 4
    # The branches wrote nothing to the run state; the join appended the four
    # jokes at once, in Send order.
    state = await client.get_state(run_id)
    joins = []
    for rev in range(2, state.latest_revision + 1):
        r = await client.get_state(run_id, rev)
        if "jokes" in r.raw.delta.append:
            joins.append([_py(v) for v in r.raw.delta.append["jokes"].values])
    assert joins == [local["jokes"]]


# ---------------------------------------------------------------- a large conversation


class Chat(TypedDict):
    messages: Annotated[list[Any], operator.add]


def long_talk(turns: int, size: int) -> StateGraph[Any, Any, Any, Any]:
    def speaker(me: str, other: str) -> Any:
        def speak(state: Chat) -> Command[Any]:
            said = len(state["messages"])
            text = f"{me} {said}: " + ("la " * size)[:size]
            goto = END if said >= turns else other
            return Command(goto=goto, update={"messages": [AIMessage(content=text, id=f"m{said}")]})

        return speak

    builder = StateGraph(Chat)
    builder.add_node("alice", speaker("alice", "bob"))
    builder.add_node("bob", speaker("bob", "alice"))
    builder.add_edge(START, "alice")
    return builder


async def test_a_conversation_over_the_state_value_limit_completes(client: Client) -> None:
    # 7 turns of 11,500 characters: 80,500 characters, past the broker's
    # 64 KiB per run-state value.
    start = {"messages": [HumanMessage(content="talk", id="h")]}
    local = await long_talk(7, 11_500).compile().ainvoke(start)
    assert sum(len(m.content) for m in local["messages"]) > 80_000

    graph = distribute(long_talk(7, 11_500).compile(), prefix=uniq("talk"))
    worker, running = await served(client, graph)
    run_id = uniq("run")
    try:
        out = await bounded(
            graph.ainvoke(start, {"configurable": {"thread_id": run_id}}, client=client)
        )
    finally:
        worker.stop()
        await bounded(running)
    assert out["messages"] == local["messages"]
    # The list went in the hops' payloads once it outgrew a run-state value;
    # the run state holds the marker.
    state = await client.get_state(run_id)
    marker = state.values["messages"]
    assert isinstance(marker, dict) and set(marker) == {SPILLED}
    run = (await client.get_run(run_id)).run
    assert run.status == pb.RUN_STATUS_COMPLETED
    assert pb.EVENT_KIND_NACKED not in [e.kind for e in (await client.get_run(run_id)).timeline]


# ---------------------------------------------------------------- interrupt()


class Trip(TypedDict, total=False):
    request: str
    city: str
    plan: str


def asking() -> StateGraph[Any, Any, Any, Any]:
    def ask_city(state: Trip) -> dict[str, Any]:
        city = interrupt({"question": "Which city?", "for": state["request"]})
        return {"city": city}

    def plan(state: Trip) -> dict[str, Any]:
        return {"plan": f"{state['request']} in {state['city']}"}

    builder = StateGraph(Trip)
    builder.add_node("ask_city", ask_city)
    builder.add_node("plan", plan)
    builder.add_edge(START, "ask_city")
    builder.add_edge("ask_city", "plan")
    builder.add_edge("plan", END)
    return builder


async def test_interrupt_waits_for_the_owner_and_resumes_as_locally(client: Client) -> None:
    local_graph = asking().compile(checkpointer=InMemorySaver())
    config: Any = {"configurable": {"thread_id": str(uuid.uuid4())}}
    asked = await local_graph.ainvoke({"request": "a weekend"}, config)
    local = await local_graph.ainvoke(Command(resume="Lisbon"), config)

    graph = distribute(asking().compile(), prefix=uniq("ask"))
    worker, running = await served(client, graph)
    run_id = uniq("run")
    conf: Any = {"configurable": {"thread_id": run_id}}
    try:
        waiting = await bounded(graph.ainvoke({"request": "a weekend"}, conf, client=client))
        assert (await client.get_run(run_id)).run.status == pb.RUN_STATUS_WAITING_INPUT
        assert [i.value for i in waiting["__interrupt__"]] == [
            i.value for i in asked["__interrupt__"]
        ]
        assert {k: v for k, v in waiting.items() if k != "__interrupt__"} == {
            k: v for k, v in asked.items() if k != "__interrupt__"
        }
        out = await bounded(graph.ainvoke(Command(resume="Lisbon"), conf, client=client))
    finally:
        worker.stop()
        await bounded(running)
    assert out == local == {"request": "a weekend", "city": "Lisbon", "plan": "a weekend in Lisbon"}


# ---------------------------------------------------------------- LangGraph's reading rules


class Counted(TypedDict, total=False):
    q: str
    xs: Annotated[list[int], operator.add]


def counting() -> StateGraph[Any, Any, Any, Any]:
    def first(state: Counted) -> dict[str, Any]:
        # A reducer key nobody wrote yet reads as its empty value.
        return {"xs": [len(state["xs"])]}

    def second(state: Counted) -> dict[str, Any]:
        return {"xs": [len(state["xs"])], "q": state["q"] + "!"}

    builder = StateGraph(Counted)
    builder.add_node("first", first)
    builder.add_node("second", second)
    builder.add_edge(START, "first")
    builder.add_edge("first", "second")
    return builder


async def test_empty_reducer_keys_and_a_repeated_call_read_as_locally(client: Client) -> None:
    local = await counting().compile().ainvoke({"q": "hi"})
    graph = distribute(counting().compile(), prefix=uniq("count"))
    worker, running = await served(client, graph)
    run_id = uniq("run")
    conf: Any = {"configurable": {"thread_id": run_id}}
    try:
        out = await bounded(graph.ainvoke({"q": "hi"}, conf, client=client))
        assert out == local == {"q": "hi!", "xs": [0, 1]}
        # The thread ran: a second call is refused, and starts nothing.
        with pytest.raises(HandoffError) as refused:
            await graph.ainvoke({"q": "again"}, conf, client=client)
        assert refused.value.reason == "RUN_CLOSED"
        kinds = [e.kind for e in (await client.get_run(run_id)).timeline]
        # The first handoff, first -> second, and the final result: once each.
        assert kinds.count(pb.EVENT_KIND_HANDOFF_ACCEPTED) == 3
    finally:
        worker.stop()
        await bounded(running)


def test_what_cannot_run_across_the_broker_is_refused_up_front() -> None:
    builder = StateGraph(Counted)
    builder.add_node("first", lambda s: {})
    builder.add_node("later", lambda s: {}, defer=True)
    builder.add_edge(START, "first")
    builder.add_edge("first", "later")
    with pytest.raises(HandoffError) as deferred:
        distribute(builder.compile(), prefix="x")
    assert deferred.value.kind.name == "INVALID_ARGUMENT"

    joined = StateGraph(Counted)
    joined.add_node("a", lambda s: {})
    joined.add_node("b", lambda s: {})
    joined.add_node("c", lambda s: {})
    joined.add_edge(START, "a")
    joined.add_edge(START, "b")
    joined.add_edge(["a", "b"], "c")
    with pytest.raises(HandoffError):
        distribute(joined.compile(), prefix="x")
