"""LangGraph and the broker: hand a graph's state off durably, and run a
compiled graph as a broker agent. Needs `pip install 'handoff[langgraph]'`.

Three pieces:

- `command_to_delta(command, graph)`: a LangGraph `Command(update=...)` (or a
  node's update dict) as a `StateDelta`;
- `handoff_node(target, payload, graph=...)`: a node that hands off to a broker
  agent, in the spirit of LangGraph's `create_handoff_tool`, except that the
  handoff is a durable `client.handoff` (or, when the graph runs as a broker
  agent, the complete-and-handoff of its delivery) and the graph's state goes
  along as a run-state delta;
- `graph_agent(graph, name, accepts=...)`: a compiled graph as an `@agent`
  handler for `handoff.Worker`: each delivery's payload and run state become
  the graph's input, its output becomes the complete-and-handoff (target and
  payload chosen by `route`, or the run's final `result`), and the keys it
  changed a delta based on the delivery's revision.

The state mapping, key by key (the key's channel in the graph decides):

===========================================  ===============================
graph channel of the key                     in the `StateDelta`
===========================================  ===============================
plain (`LastValue`, no reducer)              `set(key, value)`
reducer `operator.add` / `operator.concat` /  `append(key, items)` (a list)
`add_messages`
any other reducer                            `set(key, value)`
an `Overwrite(value)` update                 `set(key, value)`
===========================================  ===============================

In a `Command(update=...)` the value is the update itself (for an append key,
the items to add). Comparing a state before and after (`state_delta`), a
changed plain key is set; an append key whose new list extends the old one
appends the new items, otherwise it is set. Values are made JSON-like: LangChain
messages in LangChain's own serialized form (`message_to_dict`, an id assigned
when one has none, restored by `from_json` as the same messages, which is how
`graph_agent` hands the run state to its graph), other pydantic models through
`model_dump(mode="json")`,
protobuf messages through `MessageToDict`, dataclasses through `asdict`; any
other non-JSON value is refused (`InvalidArgumentError` naming the key).

Example::

    graph = StateGraph(Trip)
    graph.add_node("plan", plan)
    graph.add_node("to_writer", handoff_node("writer", lambda s: Subtask(instruction=s["city"]),
                                             graph=Trip))
    ...
    await Worker(client, [graph_agent(compiled, "planner", accepts=Ask, result=Report)]).run()
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from google.protobuf import json_format
from google.protobuf.message import Message

from .._client import Client
from .._errors import ErrorKind, error
from .._handoff import Final, Handoff, Receipt
from .._state import StateDelta
from .._subscription import Delivery
from .._values import JsonValue, Seconds, langchain_message
from .._worker import AgentHandler, Context, Outcome, agent

try:
    from langchain_core.messages import messages_from_dict
    from langchain_core.runnables import RunnableConfig
    from langgraph.channels.base import BaseChannel
    from langgraph.channels.binop import BinaryOperatorAggregate
    from langgraph.graph import END, StateGraph
    from langgraph.graph.message import add_messages
    from langgraph.graph.state import CompiledStateGraph
    from langgraph.types import Command, Overwrite
    from pydantic import BaseModel
except ImportError as e:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "handoff.adapters.langgraph needs LangGraph: pip install 'handoff[langgraph]'"
    ) from e

__all__ = [
    "SPILLED",
    "BrokerContext",
    "DistributedGraph",
    "GraphRunFailed",
    "command_to_delta",
    "distribute",
    "from_json",
    "graph_agent",
    "handoff_node",
    "state_delta",
    "to_json",
]

P = TypeVar("P", bound=Message)

GraphLike = StateGraph[Any, Any, Any, Any] | CompiledStateGraph[Any, Any, Any, Any] | type
"""A `StateGraph`, a compiled one, or a state schema (a `TypedDict`, a
dataclass or a pydantic model): where the adapter reads each key's reducer."""

CONFIG_KEY = "handoff"
"""The `configurable` key `graph_agent` puts its `BrokerContext` under."""

_APPENDING: tuple[Callable[..., Any], ...] = (
    operator.add,
    operator.iadd,
    operator.concat,
    operator.iconcat,
    add_messages,
)


@dataclass
class BrokerContext:
    """What a graph run by `graph_agent` knows of its delivery, in its config
    (`config["configurable"]["handoff"]`): nodes such as `handoff_node` use it
    to hand off as the complete-and-handoff of the delivery."""

    client: Client
    """The worker's client."""
    delivery: Delivery
    """The delivery being handled."""
    before: dict[str, JsonValue]
    """The run state the delivery carried (what deltas are computed against)."""
    exclude: frozenset[str] = field(default_factory=frozenset)
    """Keys that never go into a delta (the payload's fields, the pinned keys)."""

    @property
    def run_id(self) -> str:
        """The run."""
        return self.delivery.run_id


def broker_context(config: RunnableConfig | None) -> BrokerContext | None:
    """The `BrokerContext` in a node's config, when the graph runs as a broker agent."""
    if not config:
        return None
    found = (config.get("configurable") or {}).get(CONFIG_KEY)
    return found if isinstance(found, BrokerContext) else None


# ---------------------------------------------------------------- values


def to_json(value: Any, key: str = "") -> JsonValue:
    """`value` as a JSON-like value (see the module's doc for what converts).

    Example::

        to_json(AIMessage(content="hi", id="m1"))["data"]["content"] == "hi"
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): to_json(v, key) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v, key) for v in value]
    message = langchain_message(value)
    if message is not None:
        return message
    if isinstance(value, BaseModel):
        return cast(JsonValue, value.model_dump(mode="json"))
    if isinstance(value, Message):
        return cast(JsonValue, json_format.MessageToDict(value, preserving_proto_field_name=True))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_json(dataclasses.asdict(value), key)
    where = f" (state key {key!r})" if key else ""
    raise error(
        ErrorKind.INVALID_ARGUMENT,
        f"a {type(value).__name__}{where} is not a JSON-like value and cannot go into run state",
    )


def from_json(value: JsonValue) -> Any:
    """A run-state value as the graph holds it: LangChain messages stored in
    their serialized form (`{"type": ..., "data": {...}}`, as `to_json` writes
    them) restored as the same messages, ids included; anything else as is.

    Example::

        from_json(to_json(AIMessage(content="hi", id="m1"))) == AIMessage(content="hi", id="m1")
    """
    if isinstance(value, list):
        return [from_json(v) for v in value]
    if (
        isinstance(value, dict)
        and set(value) == {"type", "data"}
        and isinstance(value["type"], str)
        and isinstance(value["data"], dict)
    ):
        try:
            return messages_from_dict([value])[0]
        except (KeyError, ValueError, TypeError):
            return value
    return value


def _channels(graph: GraphLike) -> Mapping[str, BaseChannel[Any, Any, Any]]:
    if isinstance(graph, CompiledStateGraph):
        return graph.builder.channels
    if isinstance(graph, StateGraph):
        return graph.channels
    return StateGraph(graph).channels


def _appends(channel: BaseChannel[Any, Any, Any] | None) -> bool:
    return isinstance(channel, BinaryOperatorAggregate) and any(
        channel.operator is op for op in _APPENDING
    )


def _state_keys(graph: GraphLike) -> list[str]:
    return [k for k in _channels(graph) if not k.startswith(("__", "branch:"))]


# ---------------------------------------------------------------- deltas


def command_to_delta(
    command: Command[Any] | Mapping[str, Any] | Sequence[tuple[str, Any]],
    graph: GraphLike,
    *,
    base_revision: int | None = None,
) -> StateDelta:
    """The `StateDelta` of a `Command(update=...)` (or of an update dict, as a
    node returns): `set` for plain keys, `append` for keys whose channel has an
    `operator.add`-style reducer, `set` for an `Overwrite`. `base_revision`
    makes the broker refuse it when another handoff changed a key it sets.

    Example::

        cmd = Command(update={"city": "Rome", "notes": ["booked"]})
        delta = command_to_delta(cmd, TripState)   # set city, append notes
    """
    update: Any = command.update if isinstance(command, Command) else command
    if update is None:
        pairs: list[tuple[str, Any]] = []
    elif isinstance(update, Mapping):
        pairs = list(update.items())
    elif isinstance(update, (list, tuple)) and all(
        isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in update
    ):
        pairs = list(update)
    elif isinstance(update, BaseModel):
        pairs = [(k, getattr(update, k)) for k in update.model_fields_set]
    else:
        raise error(
            ErrorKind.INVALID_ARGUMENT,
            f"a Command update of type {type(update).__name__} has no keys to map to a delta",
        )
    channels = _channels(graph)
    delta = StateDelta(base_revision)
    for key, value in pairs:
        if isinstance(value, Overwrite):
            delta.set(key, to_json(value.value, key))
        elif _appends(channels.get(key)):
            items = value if isinstance(value, (list, tuple)) else [value]
            delta.append(key, [to_json(v, key) for v in items])
        else:
            delta.set(key, to_json(value, key))
    return delta


def state_delta(
    graph: GraphLike,
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    *,
    keys: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    base_revision: int | None = None,
) -> StateDelta:
    """The delta that turns `before` (a run state) into `after` (a graph's
    state) on `keys` (default: the graph's state keys), leaving out `exclude`:
    a changed plain key is set; an append key whose list grew is appended the
    new items, one that changed otherwise is set. Keys absent from `after` are
    left alone.

    Example::

        delta = state_delta(TripState, delivery.state, output,
                            base_revision=delivery.state_revision)
    """
    channels = _channels(graph)
    skip = set(exclude)
    delta = StateDelta(base_revision)
    for key in keys if keys is not None else _state_keys(graph):
        if key in skip or key not in after:
            continue
        new = to_json(after[key], key)
        if key in before:
            old = to_json(before[key], key)
            if old == new:
                continue
            if (
                _appends(channels.get(key))
                and isinstance(old, list)
                and isinstance(new, list)
                and new[: len(old)] == old
            ):
                delta.append(key, new[len(old) :])
                continue
        delta.set(key, new)
    return delta


# ---------------------------------------------------------------- the node


def handoff_node(
    target: str,
    payload: Callable[[Any], Message],
    *,
    graph: GraphLike,
    client: Client | None = None,
    run_id: str | Callable[[Any], str] | None = None,
    keys: Iterable[str] | None = None,
    source_agent: str | None = None,
    idempotency_key: Callable[[Any], str] | None = None,
    goto: str | Sequence[str] = END,
    receipt_key: str | None = None,
) -> Callable[[Any, RunnableConfig], Awaitable[Command[str]]]:
    """A graph node that hands the graph off to broker agent `target`: the
    payload is `payload(state)`, and the state's `keys` (default: every key of
    `graph`'s state) go along as a run-state delta. Then the graph goes to
    `goto` (default `END`), with the handoff id written to `receipt_key` if
    given.

    Run by `graph_agent`, the handoff is the complete-and-handoff of the
    delivery (the worker then settles nothing more) and the delta holds what
    the graph changed, based on the delivery's revision. Otherwise it is a
    `client.handoff` in `run_id` (a string, a function of the state, or
    `config["configurable"]["run_id"]`), and the delta sets each key to the
    graph's current value (a snapshot).

    Example::

        builder.add_node("to_writer", handoff_node(
            "writer", lambda s: Subtask(instruction=s["topic"]), graph=State, client=client,
            run_id=lambda s: s["run_id"], keys=["topic", "notes"]))
    """
    key_list = list(keys) if keys is not None else None

    async def node(state: Any, config: RunnableConfig) -> Command[str]:
        values: Mapping[str, Any] = state if isinstance(state, Mapping) else _as_mapping(state)
        message = payload(state)
        key = idempotency_key(state) if idempotency_key is not None else None
        ctx = broker_context(config)
        receipt: Receipt
        if ctx is not None:
            d = ctx.delivery
            delta = state_delta(
                graph,
                ctx.before,
                values,
                keys=key_list,
                exclude=ctx.exclude,
                base_revision=d.state_revision,
            )
            receipt = await d.handoff(
                target,
                message,
                idempotency_key=key,
                state_delta=None if delta.is_empty() else delta,
            )
        else:
            conf = (config or {}).get("configurable") or {}
            use = client if client is not None else conf.get("handoff_client")
            if not isinstance(use, Client):
                raise error(
                    ErrorKind.INVALID_ARGUMENT,
                    "handoff_node needs a client (client=, or configurable['handoff_client'])",
                )
            rid = run_id(state) if callable(run_id) else run_id or conf.get("run_id")
            if not isinstance(rid, str) or not rid:
                raise error(
                    ErrorKind.INVALID_ARGUMENT,
                    "handoff_node needs a run id (run_id=, or configurable['run_id'])",
                )
            delta = StateDelta()
            for k in key_list if key_list is not None else _state_keys(graph):
                if k in values:
                    delta.set(k, to_json(values[k], k))
            receipt = await use.handoff(
                rid,
                target,
                message,
                idempotency_key=key,
                source_agent=source_agent,
                state_delta=None if delta.is_empty() else delta,
            )
        update = {receipt_key: receipt.handoff_id} if receipt_key else None
        return Command(goto=goto, update=update)

    return node


def _as_mapping(state: Any) -> Mapping[str, Any]:
    if isinstance(state, BaseModel):
        return {k: getattr(state, k) for k in type(state).model_fields}
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    raise error(
        ErrorKind.INVALID_ARGUMENT,
        f"a graph state of type {type(state).__name__} is not a mapping, dataclass or model",
    )


# ---------------------------------------------------------------- the agent

Route = Callable[[dict[str, Any], Context], Handoff | Final | Message]
"""Chooses what a graph's output becomes: a `Handoff(target, payload)`, a
`Final(payload)`, or a message (the run's final result)."""


def graph_agent(
    graph: CompiledStateGraph[Any, Any, Any, Any],
    name: str,
    *,
    accepts: type[P],
    emits: Sequence[type[Message]] = (),
    route: Route | None = None,
    result: type[Message] | None = None,
    to_input: Callable[[P, Context], dict[str, Any]] | None = None,
    keys: Iterable[str] | None = None,
    lease: Seconds | None = None,
    max_attempts: int = 0,
    fallback: str | None = None,
    reads: Sequence[str] = (),
) -> AgentHandler[P]:
    """A compiled graph as the handler of broker agent `name`, for `Worker`.

    Per delivery: the input state is the run state's keys the graph knows,
    overlaid with the payload's fields of the same names (or `to_input(payload,
    ctx)`); the graph runs with a `BrokerContext` in its config; its output
    becomes `route(output, ctx)` (a `Handoff`, a `Final` or a message for the
    run's result), or, without `route`, a `Final` of `result` filled from the
    output's keys of its fields' names. The keys the graph changed (`keys`,
    default all of its state keys but the payload's fields and the pinned keys)
    go along as a delta based on the delivery's revision, unless the outcome
    carries its own. A `handoff_node` that already handed the delivery off
    settles it: nothing more is sent. An exception in the graph nacks the
    delivery (the worker's rule).

    Example::

        planner = graph_agent(compiled, "planner", accepts=Ask, emits=[Subtask],
                              route=lambda out, ctx: Handoff("writer", Subtask(
                                  instruction=out["plan"])))
        await Worker(client, [planner]).run()
    """
    if route is None and result is None:
        raise error(ErrorKind.INVALID_ARGUMENT, "graph_agent needs route= or result=")
    channels = set(_state_keys(graph))
    fields = {f.name for f in accepts.DESCRIPTOR.fields}
    key_list = list(keys) if keys is not None else None
    emitted = list(emits) or ([result] if result is not None else [])

    async def run_graph(payload: P, ctx: Context) -> Outcome:
        d = ctx.delivery
        before = dict(ctx.state)
        if to_input is not None:
            state = to_input(payload, ctx)
        else:
            state = {k: from_json(v) for k, v in before.items() if k in channels}
            mapped = json_format.MessageToDict(
                payload,
                preserving_proto_field_name=True,
                always_print_fields_with_no_presence=True,
            )
            state.update({k: v for k, v in mapped.items() if k in channels})
        pinned = set(d.raw.state.pinned_keys) if d.raw.HasField("state") else set()
        exclude = frozenset((fields if key_list is None else set()) | pinned)
        bctx = BrokerContext(client=ctx.client, delivery=d, before=before, exclude=exclude)
        config: RunnableConfig = {
            "configurable": {CONFIG_KEY: bctx, "run_id": d.run_id, "handoff_client": ctx.client}
        }
        output = await graph.ainvoke(state, config)
        if d.settled:
            return None  # a handoff_node handed the delivery off
        if not isinstance(output, Mapping):
            raise error(
                ErrorKind.INVALID_ARGUMENT,
                f"graph of {name} returned a {type(output).__name__}, not a state mapping",
            )
        out = dict(output)
        delta = state_delta(
            graph,
            before,
            out,
            keys=key_list,
            exclude=exclude,
            base_revision=d.state_revision,
        )
        outcome: Handoff | Final | Message
        if route is not None:
            outcome = route(out, ctx)
        else:
            assert result is not None
            outcome = Final(_fill(result, out))
        if isinstance(outcome, Message):
            outcome = Final(outcome)
        if outcome.state_delta is None and not delta.is_empty():
            outcome.state_delta = delta
        return outcome

    return agent(
        name,
        accepts=accepts,
        emits=emitted,
        lease=lease,
        max_attempts=max_attempts,
        fallback=fallback,
        reads=reads,
    )(run_graph)


def _fill(cls: type[P], values: Mapping[str, Any]) -> P:
    """A `cls` from the values of the keys named like its fields."""
    names = {f.name for f in cls.DESCRIPTOR.fields}
    data = {k: to_json(v, k) for k, v in values.items() if k in names}
    msg = cls()
    try:
        json_format.ParseDict(data, msg)
    except json_format.ParseError as e:
        raise error(
            ErrorKind.INVALID_ARGUMENT,
            f"the graph's output does not fill a {cls.DESCRIPTOR.full_name}: {e}",
        ) from e
    return msg


# ---------------------------------------------------------------- a whole graph


def distribute(
    graph: CompiledStateGraph[Any, Any, Any, Any],
    *,
    prefix: str,
    names: Mapping[str, str] | None = None,
    lease: Seconds | None = None,
    max_attempts: int = 0,
    value_limit: int = 65536,
    state_limit: int = 262144,
    input_timeout: Seconds = 3600,
    config: RunnableConfig | None = None,
) -> DistributedGraph:
    """A compiled `StateGraph` across the broker: each node becomes broker
    agent `<prefix>-<node>` (or `names[node]`), and the graph runs as a
    broker run with LangGraph's own rules.

    - **State**: the run state, one key per state key, values as `to_json`
      writes them (LangChain messages in LangChain's form, ids kept). Each
      hop's delta holds what the node changed: a reducer key appended only
      its new items, a plain key set. Each node's writes are applied through
      the graph's own channels (its reducers), as LangGraph applies them.
    - **Control**: a node's `Command(goto=...)`, its edges and its
      conditional edges name the next superstep. One node: a handoff to its
      agent. Several (parallel edges, `Send`s): a fan-out with a barrier, one
      branch per node run. The join applies every branch's writes in
      LangGraph's order (pulled nodes by name, then `Send`s in order), then
      runs the node they all lead to. `END`, or nowhere left to go: the run
      completes.
    - **Large state**: a value over `value_limit` bytes (the broker's
      `max_state_value_bytes`), or the keys that bring the document over
      `state_limit` (`max_state_bytes`), travel in the hop's payload. That is
      by reference once over the broker's `max_inline_payload`. The run state
      holds a marker (`{SPILLED: {"bytes": n}}`) for each.
    - **interrupt()**: the run waits for its owner's input (`AwaitInput`, up
      to `input_timeout`). `ainvoke` answers the state with `__interrupt__`,
      and `ainvoke(Command(resume=value), config)` answers it. This works
      once per node run, on the graph's own state. Elsewhere the delivery is
      rejected `INTERRUPT_UNSUPPORTED`: in a parallel branch, in a node run by
      `Send`, in the node a join runs, or with state in the payload.
    - **Threads**: the thread id is the run id, and a graph runs once per
      thread. `ainvoke` on a thread still running waits for that run (it never
      starts the graph twice); on a thread that ended it raises `RUN_CLOSED`.
    - **Values** cross the broker as JSON (`to_json` / `from_json`): a pydantic
      model or a dataclass inside the state, or as a `Send` argument, reaches
      the next node as a dict; tuples become lists.
    - **Config**: nodes get `config` given here, not the one given to
      `ainvoke` (it runs on other machines).
    - **Not distributed**, refused here: edges that wait for several nodes
      (`add_edge([a, b], c)`), deferred nodes, error-handler nodes, managed
      values, a root (non-mapping) state. `Command(graph=PARENT)` is rejected
      when returned. A node's own retry policy is not applied: the broker
      retries instead (`max_attempts`). What a node raises is handled like any
      handler's failure: a terminal refusal (an update a reducer refuses, a
      state that does not fit the node's schema) fails the run at once,
      anything else is retried with backoff.

    Two lines change to run a graph across the broker::

        graph = distribute(builder.compile(), prefix="travel")
        out = await graph.ainvoke({"messages": [("user", "hi")]}, client=client)

    with its agents served by `graph.worker(client).run()` (it registers the
    payload contracts, then the agents), in this process or split across
    many (`graph.worker(client, nodes=[...])`).
    """
    return DistributedGraph(
        graph,
        prefix=prefix,
        names=names,
        lease=lease,
        max_attempts=max_attempts,
        value_limit=value_limit,
        state_limit=state_limit,
        input_timeout=input_timeout,
        config=config,
    )


from ._distribute import SPILLED, DistributedGraph, GraphRunFailed  # noqa: E402
