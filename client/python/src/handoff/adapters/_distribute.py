"""`distribute(graph)`: a compiled LangGraph `StateGraph` run across the
broker, one broker agent per node. See `handoff.adapters.langgraph.distribute`."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from google.protobuf import any_pb2, struct_pb2

from .._barrier import ALL, default_barrier_id
from .._client import Client, new_run_id
from .._errors import ErrorKind, HandoffError, error
from .._handoff import Final, Handoff
from .._state import StateDelta
from .._subscription import Delivery
from .._values import JsonValue, Seconds, from_value, pack, to_value, unpack
from .._worker import AgentHandler, Context, Outcome, Reject, Worker, agent
from ..langgraph.v1 import langgraph_pb2 as lg
from ..v1 import handoff_pb2 as pb

try:
    from langchain_core.runnables import Runnable, RunnableConfig
    from langchain_core.runnables.config import var_child_runnable_config
    from langgraph._internal import _constants as lgc
    from langgraph._internal._fields import get_update_as_tuples
    from langgraph._internal._scratchpad import PregelScratchpad
    from langgraph._internal._typing import MISSING
    from langgraph.channels.base import BaseChannel
    from langgraph.errors import EmptyChannelError, GraphInterrupt, InvalidUpdateError
    from langgraph.graph import END, START
    from langgraph.graph.state import CompiledStateGraph
    from langgraph.types import Command, Interrupt, Send
    from pydantic import BaseModel, ValidationError
except ImportError as e:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "handoff.adapters.langgraph needs LangGraph: pip install 'handoff[langgraph]'"
    ) from e

SPILLED = "$handoff.spilled"
"""The run-state marker of a key whose value travels in the hop's payload:
`{"$handoff.spilled": {"bytes": <encoded size>}}`."""

_AGENT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


@dataclass
class _Task:
    """One node run of the next superstep: a pull of `node` (its input the
    graph state) or a `Send` (its input `arg`)."""

    node: str
    arg: Any = None
    is_send: bool = False


@dataclass
class _Ran:
    """What a node run produced: its writes in order and where the graph goes."""

    writes: list[tuple[str, Any]] = field(default_factory=list)
    goto: list[_Task] = field(default_factory=list)


class GraphRunFailed(HandoffError):
    """A distributed graph's run ended without completing: `run` says how
    (its `status` and `failure`)."""

    def __init__(self, run: pb.Run) -> None:
        status = pb.RunStatus.Name(run.status)
        super().__init__(
            f"run {run.id} ended {status}: {run.failure}",
            kind=ErrorKind.FAILED_PRECONDITION,
            reason="RUN_FAILED",
        )
        self.run = run
        """The run as it ended."""


class DistributedGraph:
    """A compiled `StateGraph` whose nodes run as broker agents: `agents` are
    their handlers (serve them with `Worker`, all in one process or split
    across many), `ainvoke` runs the graph as a broker run and answers its
    final state as the graph would. Made by `distribute`."""

    def __init__(
        self,
        graph: CompiledStateGraph[Any, Any, Any, Any],
        *,
        prefix: str,
        names: Mapping[str, str] | None,
        lease: Seconds | None,
        max_attempts: int,
        value_limit: int,
        state_limit: int,
        input_timeout: Seconds,
        config: RunnableConfig | None,
    ) -> None:
        builder = graph.builder
        if builder.waiting_edges:
            joined = sorted(f"{list(s)} -> {t}" for s, t in builder.waiting_edges)
            raise error(
                ErrorKind.INVALID_ARGUMENT,
                f"edges that wait for several nodes ({', '.join(joined)}) are not distributed: "
                "route the branches with Send or a node's Command instead",
            )
        refused = []
        if "__root__" in graph.channels:
            refused.append("a root state (StateGraph over a non-mapping type)")
        if builder.managed:
            refused.append(f"managed values ({', '.join(sorted(builder.managed))})")
        deferred = sorted(n for n, spec in builder.nodes.items() if spec.defer)
        if deferred:
            refused.append(f"deferred nodes ({', '.join(deferred)})")
        handlers = sorted(n for n, spec in builder.nodes.items() if spec.is_error_handler)
        if handlers:
            refused.append(f"error handler nodes ({', '.join(handlers)})")
        if refused:
            raise error(
                ErrorKind.INVALID_ARGUMENT,
                f"this graph has {'; '.join(refused)}, which distribute does not run across "
                "the broker",
            )
        self.graph = graph
        """The graph distributed."""
        self._builder = builder
        self._value_limit = value_limit
        self._state_limit = state_limit
        self._input_timeout = input_timeout
        self._config: dict[str, Any] = dict(config or {})
        self._keys = [k for k in graph.channels if not k.startswith(("__", "branch:"))]
        self.names: dict[str, str] = {}
        """Each node's broker agent."""
        for node in builder.nodes:
            name = (names or {}).get(node, f"{prefix}-{node}")
            if not _AGENT_NAME.match(name):
                raise error(
                    ErrorKind.INVALID_ARGUMENT,
                    f"node {node!r} would be agent {name!r}, which is not [A-Za-z0-9_-]{{1,128}}: "
                    "name it with names={node: agent}",
                )
            self.names[node] = name
        self._edges: dict[str, list[str]] = {}
        for src, dst in sorted(builder.edges):
            self._edges.setdefault(src, []).append(dst)
        self.agents: list[AgentHandler[Any]] = [
            agent(
                self.names[node],
                accepts=None,
                emits=[lg.Step],
                lease=lease,
                max_attempts=max_attempts,
            )(self._handler(node))
            for node in builder.nodes
        ]
        """One handler per node, for `Worker`."""

    # ------------------------------------------------------------ setup

    async def register(self, client: Client) -> None:
        """Registers the payload contracts and every node's agent."""
        await client.register_contract(lg.Step)
        await client.register_contract(lg.Resume)
        for handler in self.agents:
            await client.register_agent(handler.name, emits=[lg.Step])

    def worker(self, client: Client, nodes: Sequence[str] | None = None) -> Worker:
        """A `Worker` serving the agents of `nodes` (default: every node); it
        registers the payload contracts before the agents."""
        chosen = set(nodes) if nodes is not None else set(self.names)
        unknown = chosen - set(self.names)
        if unknown:
            raise error(ErrorKind.INVALID_ARGUMENT, f"no such nodes: {sorted(unknown)}")
        names = {self.names[n] for n in chosen}
        return _GraphWorker(client, [h for h in self.agents if h.name in names])

    # ------------------------------------------------------------ the caller's side

    async def ainvoke(
        self,
        input: Any,
        config: RunnableConfig | None = None,
        *,
        client: Client,
        owner: str = "langgraph",
        ask: str | None = None,
        max_depth: int | None = None,
        timeout: Seconds | None = None,
    ) -> dict[str, Any]:
        """Runs the graph as a broker run and answers its final state (the
        graph's output keys), as `graph.ainvoke(input, config)` would.

        The run id is `config["configurable"]["thread_id"]` when given (else a
        new one). The run's depth cap is `max_depth`, else the config's
        `recursion_limit`, else 25, LangGraph's default. When a node called
        `interrupt()`, the state comes back with `__interrupt__` (one
        `Interrupt` whose `id` is the broker's input request), and
        `ainvoke(Command(resume=value), config)` with the same thread answers
        it. A run that fails or is cancelled raises `GraphRunFailed`."""
        conf = (config or {}).get("configurable") or {}
        run_id = str(conf.get("thread_id") or new_run_id())
        if isinstance(input, Command):
            if input.resume is None:
                raise error(
                    ErrorKind.INVALID_ARGUMENT,
                    "ainvoke takes a Command only to resume: Command(resume=value)",
                )
            got = await client.get_run(run_id)
            waiting = list(got.run.waiting)
            if not waiting:
                raise error(
                    ErrorKind.FAILED_PRECONDITION,
                    f"run {run_id} waits for no input",
                    reason="INPUT_NOT_FOUND",
                )
            if input.update is not None or input.goto:
                raise error(
                    ErrorKind.INVALID_ARGUMENT,
                    "a distributed graph resumes with Command(resume=value) only (no update, goto)",
                )
            value = input.resume
            if isinstance(value, dict) and set(value) == {waiting[0].id}:
                value = value[waiting[0].id]  # the form keyed by interrupt id
            answer = lg.Resume(value=to_value(_json(value)))
            await client.provide_input(run_id, waiting[0].id, answer)
            return await self.wait(client, run_id, timeout=timeout)
        try:
            existing = await client.get_run(run_id)
        except HandoffError as e:
            if e.kind is not ErrorKind.NOT_FOUND:
                raise
        else:
            if existing.run.status in (pb.RUN_STATUS_RUNNING, pb.RUN_STATUS_WAITING_INPUT):
                # A repeated call (a retry after a timeout) waits for the run
                # it started; it never starts the graph a second time.
                return await self.wait(client, run_id, timeout=timeout)
            raise error(
                ErrorKind.FAILED_PRECONDITION,
                f"thread {run_id} already ran (run {pb.RunStatus.Name(existing.run.status)}): "
                "a distributed graph runs once per thread; use a new thread_id",
                reason="RUN_CLOSED",
            )
        try:
            values = self._apply({}, self._input_writes(input))
            tasks = _superstep_order(await self._route(START, values))
        except Reject as r:
            raise error(ErrorKind.INVALID_ARGUMENT, r.reason) from r
        if not tasks:
            raise error(ErrorKind.INVALID_ARGUMENT, "the graph goes nowhere from START")
        limit = (config or {}).get("recursion_limit")
        depth = max_depth or (limit if isinstance(limit, int) else 25)
        state, spilled = self._encode(values)
        await client.start_run(
            owner,
            run_id=run_id,
            ask=ask,
            max_depth=depth,
            timeout=timeout,
            state=cast(dict[str, JsonValue | object], state),
        )
        if len(tasks) == 1:
            t = tasks[0]
            await client.handoff(
                run_id,
                self.names[t.node],
                self._step(t, spilled),
                idempotency_key=f"langgraph-start-{run_id}",
            )
        else:
            req = self._fan_out(run_id, tasks, spilled, consumed=None, source="")
            await client._send_fan_out(req)
        return await self.wait(client, run_id, timeout=timeout)

    async def wait(
        self, client: Client, run_id: str, *, timeout: Seconds | None = None
    ) -> dict[str, Any]:
        """Waits for run `run_id` of this graph to complete or wait for input,
        and answers its state as `ainvoke` does."""
        deadline = None if timeout is None else time.monotonic() + _seconds(timeout)
        pause = 0.005
        while True:
            got = await client.get_run(run_id)
            run = got.run
            if run.status == pb.RUN_STATUS_COMPLETED:
                state = (await client.get_state(run_id)).values
                result = lg.Step()
                if run.HasField("result_ref"):
                    result = unpack(await client.get_payload(run_id, run.result_ref), lg.Step)
                elif run.HasField("result"):
                    result = unpack(run.result, lg.Step)
                return self._output(self._decode(state, result.state))
            if run.status == pb.RUN_STATUS_WAITING_INPUT and run.waiting:
                state = (await client.get_state(run_id)).values
                out = self._output(self._decode(state, struct_pb2.Struct()))
                out["__interrupt__"] = [
                    Interrupt(value=_prompt(w.prompt), id=w.id) for w in run.waiting
                ]
                return out
            if run.status not in (pb.RUN_STATUS_RUNNING, pb.RUN_STATUS_WAITING_INPUT):
                raise GraphRunFailed(run)
            if deadline is not None and time.monotonic() > deadline:
                raise error(ErrorKind.TIMEOUT, f"run {run_id} still running")
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.2)

    # ------------------------------------------------------------ the agents' side

    def _handler(self, node: str) -> Any:
        async def handle(payload: any_pb2.Any, ctx: Context) -> Outcome:
            d = ctx.delivery
            try:
                if d.is_release():
                    return await self._join(node, d)
                return await self._hop(node, d, payload)
            except GraphInterrupt as gi:
                raise Reject(
                    f"INTERRUPT_UNSUPPORTED node {node} called interrupt() where the broker "
                    f"cannot wait for input ({gi})"
                ) from gi

        handle.__name__ = f"run_{node}"
        return handle

    async def _hop(self, node: str, d: Delivery, payload: any_pb2.Any) -> Outcome:
        before_json = dict(d.state)
        resume: list[Any] = []
        if d.envelope.input_request_id:
            # The answer to this node's interrupt(): the node runs again with it.
            resume = [from_value(unpack(payload, lg.Resume).value)]
            step = lg.Step(node=node)
        else:
            step = unpack(payload, lg.Step)
        values = self._decode(before_json, step.state)
        task = _Task(node)
        if step.HasField("send"):
            task = _Task(node, _from_json(from_value(step.send)), True)
        try:
            ran = await self._run(task, values, resume)
        except GraphInterrupt as gi:
            return await self._interrupt(node, d, step, gi, resume)
        after = self._apply(values, ran.writes)
        tasks = _superstep_order(ran.goto + await self._route(node, after))
        if d.barrier_branch is not None:
            # A parallel branch: its writes go to the join, which applies every
            # branch's in LangGraph's order for a superstep.
            result = lg.Step(
                node=node,
                state=step.state,
                order=step.order,
            )
            result.writes.extend(self._write_protos(ran.writes))
            for t in tasks:
                if t.is_send:
                    result.sends.add(node=t.node, arg=to_value(_json(t.arg)))
                else:
                    result.next.append(t.node)
            await d.to_barrier(result)
            return None
        return await self._dispatch(node, d, before_json, after, tasks)

    async def _join(self, node: str, d: Delivery) -> Outcome:
        """A barrier's release: every branch's writes applied in order, then the
        next superstep (this node's run when it is all there is)."""
        join = d.join(lg.Step)
        branches = list(join.branches)
        failed = [b for b in branches if b.status != pb.BRANCH_STATUS_ARRIVED]
        if failed:
            raise Reject(
                "BRANCH_FAILED "
                + ", ".join(f"{b.key}={pb.BranchStatus.Name(b.status)}" for b in failed)
            )
        results = sorted(
            (b.result for b in branches if b.result is not None), key=lambda s: s.order
        )
        before_json = dict(d.state)
        first = results[0] if results else lg.Step()
        values = self._decode(before_json, first.state)
        writes: list[tuple[str, Any]] = []
        tasks: list[_Task] = []
        for r in results:
            writes.extend(self._writes_of(r.writes))
            for n in r.next:
                if not any(t.node == n and not t.is_send for t in tasks):
                    tasks.append(_Task(n))
            for s in r.sends:
                tasks.append(_Task(s.node, _from_json(from_value(s.arg)), True))
        after = self._apply(values, writes)
        tasks = _superstep_order(tasks)
        if len(tasks) == 1 and tasks[0].node == node and not tasks[0].is_send:
            ran = await self._run(tasks[0], after, [])
            final = self._apply(after, ran.writes)
            nxt = _superstep_order(ran.goto + await self._route(node, final))
            return await self._dispatch(node, d, before_json, final, nxt)
        return await self._dispatch(node, d, before_json, after, tasks)

    async def _interrupt(
        self, node: str, d: Delivery, step: lg.Step, gi: GraphInterrupt, resume: list[Any]
    ) -> Outcome:
        """A node's `interrupt()`: the run waits for its owner's answer, which
        comes back to this node as its resume value."""
        where = None
        if d.barrier_branch is not None:
            where = "in a parallel branch"
        elif step.HasField("send"):
            where = "in a node run by Send"
        elif step.state.fields:
            where = "with state that travels in the payload"
        elif resume:
            where = "a second time in one node run"
        if where is not None:
            raise Reject(
                f"INTERRUPT_UNSUPPORTED node {node} called interrupt() {where}; across the "
                "broker a node may interrupt once per run of it, on the graph's own state"
            )
        found = gi.args[0] if gi.args else ()
        value = found[0].value if found else None
        await d.await_input(
            json.dumps(_json(value)),
            timeout=self._input_timeout,
            answer=lg.Resume,
        )
        return None

    async def _dispatch(
        self,
        node: str,
        d: Delivery,
        before_json: Mapping[str, JsonValue],
        after: Mapping[str, Any],
        tasks: list[_Task],
    ) -> Outcome:
        """Hands the graph on from a node that ran: the state it changed as a
        delta, to the next node, to a fan-out of the next superstep, or the
        run's end."""
        if len(tasks) > 1:
            # The branches read the state as this node left it: what it
            # changed travels with each branch and reaches the run state with
            # the join, whose delta then holds this superstep's and theirs.
            carried = self._carried(before_json, after)
            req = self._fan_out(d.run_id, tasks, carried, consumed=d, source=d.agent)
            client = d._sub._client
            await client._send_fan_out(req)
            # Settled by the broker once every branch is stored.
            client._mark_finished(d.agent, d.handoff_id)
            d._settled = True
            return None
        delta, spilled = self._delta(before_json, after, d.state_revision)
        sd = None if delta.is_empty() else delta
        if not tasks:
            return Final(lg.Step(node=END, state=spilled), state_delta=sd)
        t = tasks[0]
        return Handoff(self.names[t.node], self._step(t, spilled), state_delta=sd)

    def _carried(
        self, before_json: Mapping[str, JsonValue], after: Mapping[str, Any]
    ) -> struct_pb2.Struct:
        """The keys of `after` the run state does not hold as they are."""
        state, spilled = self._encode(after)
        for key, value in state.items():
            if not _is_marker(value) and before_json.get(key, _ABSENT) != value:
                spilled.fields[key].CopyFrom(to_value(value))
        return spilled

    # ------------------------------------------------------------ the graph's rules

    async def _run(self, task: _Task, values: Mapping[str, Any], resume: list[Any]) -> _Ran:
        """Runs one node as LangGraph's runtime would: its input (the state, or
        a Send's argument), its config, its output read as writes and gotos."""
        spec = self._builder.nodes[task.node]
        node_input = task.arg if task.is_send else self._coerce(spec.input_schema, values)
        config = self._node_config(task.node, resume)
        # What `get_config()` (and so `interrupt()`) reads inside the node.
        token = var_child_runnable_config.set(config)
        try:
            runnable = cast(Runnable[Any, Any], spec.runnable)
            out = await runnable.ainvoke(node_input, config)
        finally:
            var_child_runnable_config.reset(token)
        return self._read_output(task.node, out)

    def _node_config(self, node: str, resume: list[Any]) -> RunnableConfig:
        conf: dict[str, Any] = dict(self._config.get("configurable") or {})
        # What `interrupt()` reads: the resume values of this node run.
        counter = iter(range(1_000_000))
        conf[lgc.CONFIG_KEY_SCRATCHPAD] = PregelScratchpad(
            step=0,
            stop=1,
            call_counter=lambda: 0,
            interrupt_counter=lambda: next(counter),
            get_null_resume=_no_resume,
            resume=list(resume),
            subgraph_counter=lambda: 0,
        )
        conf[lgc.CONFIG_KEY_SEND] = lambda writes: None
        conf[lgc.CONFIG_KEY_CHECKPOINT_NS] = node
        config = dict(self._config)
        config["configurable"] = conf
        return cast(RunnableConfig, config)

    def _read_output(self, node: str, out: Any) -> _Ran:
        ran = _Ran()
        items = out if isinstance(out, (list, tuple)) and not _is_pairs(out) else [out]
        for item in items:
            if item is None:
                continue
            if isinstance(item, Command):
                if item.graph is not None:
                    raise Reject(
                        f"UNSUPPORTED_COMMAND node {node} returned a Command to graph "
                        f"{item.graph!r}: a distributed graph has no parent"
                    )
                ran.writes.extend(item._update_as_tuples())
                gotos = item.goto if isinstance(item.goto, (list, tuple)) else [item.goto]
                for g in gotos:
                    if isinstance(g, Send):
                        ran.goto.append(_Task(g.node, g.arg, True))
                    elif g != END:
                        ran.goto.append(_Task(str(g)))
            elif isinstance(item, Mapping):
                ran.writes.extend((k, v) for k, v in item.items() if k in self._keys)
            elif isinstance(item, BaseModel) or (
                dataclasses.is_dataclass(item) and not isinstance(item, type)
            ):
                ran.writes.extend(get_update_as_tuples(item, self._keys))
            elif isinstance(item, (list, tuple)):
                ran.writes.extend(item)
            else:
                raise Reject(
                    f"INVALID_GRAPH_NODE_RETURN_VALUE node {node} returned a "
                    f"{type(item).__name__}: return a dict, a Command or None"
                )
        for t in ran.goto:
            if t.node not in self.names:
                raise Reject(
                    f"UNKNOWN_NODE node {node} goes to {t.node!r}, not a node of the graph"
                )
        return ran

    async def _route(self, node: str, after: Mapping[str, Any]) -> list[_Task]:
        """The nodes a node's edges and conditional edges lead to, from the
        state with its writes."""
        tasks: list[_Task] = [_Task(n) for n in self._edges.get(node, []) if n != END]
        for spec in self._builder.branches.get(node, {}).values():
            start = self._builder.nodes.get(node)
            schema = spec.input_schema or (
                start.input_schema if start is not None else self._builder.state_schema
            )
            got = await spec.path.ainvoke(
                self._coerce(schema, after), cast(RunnableConfig, self._config)
            )
            found = got if isinstance(got, (list, tuple)) else [got]
            for r in found:
                if isinstance(r, Send):
                    tasks.append(_Task(r.node, r.arg, True))
                    continue
                dest = spec.ends[r] if spec.ends else r
                if dest != END:
                    tasks.append(_Task(str(dest)))
        for t in tasks:
            if t.node not in self.names:
                raise Reject(
                    f"UNKNOWN_NODE node {node} goes to {t.node!r}, not a node of the graph"
                )
        return tasks

    def _apply(
        self, values: Mapping[str, Any], writes: Sequence[tuple[str, Any]]
    ) -> dict[str, Any]:
        """`values` with `writes` applied through each key's channel (its
        reducer), as LangGraph applies one superstep's writes."""
        out = dict(values)
        by_key: dict[str, list[Any]] = {}
        for key, value in writes:
            if key not in self._keys:
                continue
            by_key.setdefault(key, []).append(value)
        for key, vals in by_key.items():
            base = self._channel(key)
            channel = base.from_checkpoint(out[key] if key in out else MISSING)
            try:
                channel.update(vals)
            except (InvalidUpdateError, TypeError, ValueError) as e:
                raise Reject(f"INVALID_UPDATE key={key}: {e}") from e
            try:
                out[key] = channel.get()
            except EmptyChannelError:
                out.pop(key, None)
        return out

    def _channel(self, key: str) -> BaseChannel[Any, Any, Any]:
        return cast(BaseChannel[Any, Any, Any], self.graph.channels[key])

    def _input_writes(self, input: Any) -> list[tuple[str, Any]]:
        if isinstance(input, Mapping):
            return [(k, v) for k, v in input.items() if k in self._keys]
        if isinstance(input, BaseModel) or (
            dataclasses.is_dataclass(input) and not isinstance(input, type)
        ):
            return get_update_as_tuples(input, self._keys)
        raise error(
            ErrorKind.INVALID_ARGUMENT,
            f"a graph input of type {type(input).__name__} is not a mapping, dataclass or model",
        )

    def _full(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """`values` and, for keys they lack, what an empty channel holds (a
        reducer key's `[]`), as LangGraph's channels read."""
        out = dict(values)
        for key in self._keys:
            if key not in out:
                channel = self._channel(key).from_checkpoint(MISSING)
                if channel.is_available():
                    out[key] = channel.get()
        return out

    def _coerce(self, schema: Any, values: Mapping[str, Any]) -> Any:
        keys = self._builder.schemas.get(schema, {})
        picked = {k: v for k, v in self._full(values).items() if not keys or k in keys}
        try:
            if isinstance(schema, type) and issubclass(schema, BaseModel):
                return schema(**picked)
            if isinstance(schema, type) and dataclasses.is_dataclass(schema):
                return schema(**picked)
        except (ValidationError, TypeError) as e:
            raise Reject(f"INVALID_STATE the state does not fit {schema.__name__}: {e}") from e
        return picked

    def _output(self, values: Mapping[str, Any]) -> dict[str, Any]:
        keys = self._builder.schemas.get(self._builder.output_schema, {})
        return {k: v for k, v in self._full(values).items() if not keys or k in keys}

    # ------------------------------------------------------------ state on the wire

    def _encode(self, values: Mapping[str, Any]) -> tuple[dict[str, JsonValue], struct_pb2.Struct]:
        """The run state of `values`, keys over the limits replaced by markers,
        and those keys' values for the payload."""
        from .langgraph import to_json

        state: dict[str, JsonValue] = {}
        spilled = struct_pb2.Struct()
        sizes: dict[str, int] = {}
        for key, value in values.items():
            j = to_json(value, key)
            size = len(to_value(j).SerializeToString())
            state[key] = j
            sizes[key] = size
        # The broker's measure: keys and encoded values; a margin for what
        # else its document holds (the keys of removed values).
        limit = self._state_limit - _STATE_MARGIN
        total = sum(sizes[k] + len(k) for k in state)
        for key in sorted(state, key=lambda k: -sizes[k]):
            if sizes[key] <= self._value_limit and total <= limit:
                break
            spilled.fields[key].CopyFrom(to_value(state[key]))
            state[key] = {SPILLED: {"bytes": sizes[key]}}
            total += len(to_value(state[key]).SerializeToString()) - sizes[key]
        return state, spilled

    def _decode(self, state: Mapping[str, JsonValue], spilled: struct_pb2.Struct) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in state.items():
            if key in spilled.fields:
                value = from_value(spilled.fields[key])
            elif _is_marker(value):
                raise Reject(f"SPILLED_VALUE_MISSING key={key}: the payload does not carry it")
            out[key] = _from_json(value)
        for key in spilled.fields:
            if key not in out:
                out[key] = _from_json(from_value(spilled.fields[key]))
        return out

    def _delta(
        self, before_json: Mapping[str, JsonValue], after: Mapping[str, Any], revision: int
    ) -> tuple[StateDelta, struct_pb2.Struct]:
        from .langgraph import _appends

        state, spilled = self._encode(after)
        delta = StateDelta(revision)
        for key, new in state.items():
            old = before_json.get(key, _ABSENT)
            if old == new and not _is_marker(new):
                continue
            if old is _ABSENT and isinstance(new, list) and _appends(self._channel(key)):
                delta.append(key, new)
                continue
            if (
                isinstance(old, list)
                and isinstance(new, list)
                and _appends(self._channel(key))
                and new[: len(old)] == old
            ):
                if len(new) > len(old):
                    delta.append(key, new[len(old) :])
                continue
            if old != new:
                delta.set(key, new)
        for key in before_json:
            if key not in state and key in self._keys:
                delta.unset(key)
        return delta, spilled

    def _write_protos(self, writes: Sequence[tuple[str, Any]]) -> list[lg.Write]:
        return [lg.Write(key=k, value=to_value(_json(v, k))) for k, v in writes]

    def _writes_of(self, writes: Sequence[lg.Write]) -> list[tuple[str, Any]]:
        return [(w.key, _from_json(from_value(w.value))) for w in writes]

    def _step(self, t: _Task, state: struct_pb2.Struct) -> lg.Step:
        step = lg.Step(node=t.node, state=state)
        if t.is_send:
            step.send.CopyFrom(to_value(_json(t.arg)))
        return step

    def _fan_out(
        self,
        run_id: str,
        tasks: list[_Task],
        carried: struct_pb2.Struct,
        *,
        consumed: Delivery | None,
        source: str,
    ) -> pb.FanOutRequest:
        """One superstep of several node runs as a fan-out, joined at a
        barrier that releases to the agent of the node every branch leads to
        (when the graph says so up front), else to the first branch's."""
        target = self._join_node(tasks)
        steps = []
        for i, t in enumerate(tasks):
            step = self._step(t, carried)
            step.order = i
            steps.append(step)
        packed = [pack(s) for s in steps]
        keys = [str(i) for i in range(len(tasks))]
        bid = default_barrier_id(
            run_id=run_id,
            consumed_handoff_id=consumed.handoff_id if consumed is not None else None,
            worker="+".join(self.names[t.node] for t in tasks),
            aggregator=self.names[target],
            mode=ALL,
            named_keys=False,
            keys=keys,
            items=packed,
        )
        spec = pb.BarrierSpec(
            run_id=run_id,
            barrier_id=bid,
            branch_count=len(tasks),
            target_agent=self.names[target],
        )
        ALL.apply(spec)
        branches = []
        for t, payload, key in zip(tasks, packed, keys, strict=True):
            req = pb.HandoffRequest(
                run_id=run_id,
                source_agent=source,
                target_agent=self.names[t.node],
                payload=payload,
                barrier_id=bid,
                branch_key=key,
                idempotency_key=f"fan-out/{bid}/{key}",
                fan_out=consumed is not None,
                consumes=consumed.id if consumed is not None else "",
            )
            if consumed is not None:
                req.trace_context.update(dict(consumed.raw.handoff.trace_context))
            branches.append(req)
        return pb.FanOutRequest(barrier=spec, branches=branches)

    def _join_node(self, tasks: list[_Task]) -> str:
        after: set[str] = set()
        for t in tasks:
            spec = self._builder.nodes[t.node]
            if self._builder.branches.get(t.node) or spec.ends:
                return tasks[0].node
            after.update(self._edges.get(t.node, []))
        if len(after) == 1:
            only = next(iter(after))
            if only != END:
                return only
        return tasks[0].node


class _GraphWorker(Worker):
    """A `Worker` that registers the graph's payload contracts first."""

    async def run(self, instances: int = 1, *, handle_signals: bool = True) -> None:
        if self.register:
            await self.client.register_contract(lg.Step)
            await self.client.register_contract(lg.Resume)
        await super().run(instances, handle_signals=handle_signals)


_ABSENT: Any = object()
_STATE_MARGIN = 4096


def _superstep_order(tasks: list[_Task]) -> list[_Task]:
    """LangGraph's order of a superstep's tasks: the pulled nodes by name, then
    the Sends in the order they were made."""
    pulls: list[_Task] = []
    for t in tasks:
        if not t.is_send and not any(p.node == t.node for p in pulls):
            pulls.append(t)
    return sorted(pulls, key=lambda t: t.node) + [t for t in tasks if t.is_send]


def _no_resume(consume: bool = False) -> Any:
    """No resume value but those the node run was given."""
    return None


def _is_pairs(out: Any) -> bool:
    return bool(out) and all(
        isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in out
    )


def _is_marker(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {SPILLED}


def _json(value: Any, key: str = "") -> JsonValue:
    from .langgraph import to_json

    return to_json(value, key)


def _from_json(value: JsonValue) -> Any:
    from .langgraph import from_json

    return from_json(value)


def _prompt(text: str) -> Any:
    try:
        return _from_json(cast(JsonValue, json.loads(text)))
    except ValueError:
        return text


def _seconds(value: Seconds) -> float:
    from .._values import seconds

    return seconds(value)


__all__ = ["SPILLED", "DistributedGraph", "GraphRunFailed"]
