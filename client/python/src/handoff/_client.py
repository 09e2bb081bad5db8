"""`Client`: one connection to a broker, shared by everything made from it."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

import grpc
import grpc.aio
from google.protobuf import any_pb2
from google.protobuf.message import Message

from . import _otel
from ._barrier import ALL, FanOutReceipt, JoinMode, fan_out_request, receipt_keys
from ._closing import Closing
from ._contract import Compatibility, RegisteredContract, contract_request, full_name
from ._errors import ErrorKind, HandoffError, error, from_rpc_error
from ._handoff import Receipt, ToolResult, build_request
from ._payload import check, sha256_hex
from ._rpc import Stub
from ._state import RunState, StateDelta
from ._subscription import Subscription
from ._values import JsonValue, Seconds, pack, to_duration, to_timestamp, to_value
from .v1 import handoff_pb2 as pb

R = TypeVar("R")
Q = TypeVar("Q", bound=Message)

MergePolicy = Literal["REPLACE", "APPEND", "MERGE"]
"""How a run-state key combines with what deltas write to it."""

_POLICIES: dict[str, pb.MergePolicy.ValueType] = {
    "REPLACE": pb.MERGE_POLICY_REPLACE,
    "APPEND": pb.MERGE_POLICY_APPEND,
    "MERGE": pb.MERGE_POLICY_MERGE,
}

# How many finished handoff ids a client remembers (per process).
_REMEMBERED = 65_536
# The broker's default max_payload_size (64 MiB) and room for the rest of a
# request.
_MAX_MESSAGE = (64 << 20) + (4 << 20)


@dataclass(frozen=True)
class TlsConfig:
    """TLS to the broker: the CA that issued its certificate (PEM; `None`: the
    system's roots), a client certificate chain and key for mTLS, and the name
    to verify the broker's certificate against when it is not the host."""

    ca: bytes | None = None
    """PEM of the CA to trust."""
    cert: bytes | None = None
    """PEM of the client certificate chain (mTLS)."""
    key: bytes | None = None
    """PEM of the client certificate's key (mTLS)."""
    domain_name: str | None = None
    """Name to verify the broker's certificate against."""

    def __repr__(self) -> str:
        # The key stays out of logs.
        return (
            f"TlsConfig(ca={self.ca is not None}, cert={self.cert is not None}, "
            f"key={'<redacted>' if self.key else None}, domain_name={self.domain_name!r})"
        )


def _target(addr: str, wants_tls: bool) -> tuple[str, bool]:
    """The gRPC target of `addr` and whether it speaks TLS."""
    if "://" in addr:
        scheme, rest = addr.split("://", 1)
        scheme = scheme.lower()
        if scheme not in ("http", "https"):
            raise error(ErrorKind.INVALID_ARGUMENT, f"{addr!r} is not a broker address")
        if scheme == "http" and wants_tls:
            raise error(
                ErrorKind.INVALID_ARGUMENT,
                f"{addr!r} is a plaintext address but TLS options are set: write https://",
            )
        return rest.rstrip("/"), scheme == "https"
    return addr, wants_tls


def new_run_id() -> str:
    """A fresh time-ordered run id (a UUIDv7)."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))


class Client(Closing):
    """A connection to one broker; cheap to share between tasks.

    Example::

        async with await Client.connect("127.0.0.1:7233") as client:
            await client.register_agent("worker", accepts=Subtask, emits=[WorkerResult])
            run = await client.start_run("me", ask="Summarise the report")
            await client.handoff(run.id, "worker", Subtask(instruction="page 1"))
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        token: str | None = None,
        request_timeout: float | None = 30.0,
    ) -> None:
        """Wraps an open channel; use `Client.connect` instead."""
        self._channel = channel
        self._stub = Stub(channel)
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token.strip()}"),) if token else ()
        )
        self._request_timeout = request_timeout
        self._finished: OrderedDict[tuple[str, str], None] = OrderedDict()

    @classmethod
    async def connect(
        cls,
        addr: str,
        *,
        token: str | None = None,
        tls: bytes | TlsConfig | None = None,
        connect_timeout: Seconds = 5.0,
        request_timeout: Seconds | None = 30.0,
    ) -> Client:
        """Connects to the broker at `addr` (`127.0.0.1:7233`, `http://...`,
        `https://...`).

        `token` is sent as `authorization: Bearer <token>` on every call, streams
        included. `tls` is the CA (PEM bytes) to trust, or a `TlsConfig` with a
        client certificate for mTLS; a bare `host:port` then speaks TLS. An
        `https://` address without `tls` trusts the system's roots. Raises
        `ConnectError` when the broker cannot be reached within `connect_timeout`.

        Example::

            client = await Client.connect("broker:7233", tls=open("ca.pem", "rb").read(),
                                          token=os.environ["HANDOFF_TOKEN"])
        """
        if isinstance(tls, bytes):
            tls = TlsConfig(ca=tls)
        target, secure = _target(addr, tls is not None)
        if token is not None and any(c in token.strip() for c in "\r\n\0"):
            raise error(ErrorKind.INVALID_ARGUMENT, "the token holds characters a header cannot")
        options: list[tuple[str, int | str]] = [
            ("grpc.max_send_message_length", _MAX_MESSAGE),
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        if secure:
            tls = tls or TlsConfig()
            if tls.domain_name:
                options.append(("grpc.ssl_target_name_override", tls.domain_name))
            creds = grpc.ssl_channel_credentials(
                root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert
            )
            channel = grpc.aio.secure_channel(target, creds, options=options)
        else:
            channel = grpc.aio.insecure_channel(target, options=options)
        from ._values import seconds

        try:
            await asyncio.wait_for(channel.channel_ready(), seconds(connect_timeout))
        except (asyncio.TimeoutError, grpc.RpcError) as e:
            await channel.close()
            raise error(ErrorKind.CONNECT, f"cannot reach the broker at {addr}: {e!r}") from e
        timeout = None if request_timeout is None else seconds(request_timeout)
        return cls(channel, token=token, request_timeout=timeout)

    async def close(self) -> None:
        """Closes the connection (subscriptions and watches on it end)."""
        await self._channel.close()

    # ------------------------------------------------------------ plumbing

    async def _call(
        self,
        fn: grpc.aio.UnaryUnaryMultiCallable[Q, R],
        request: Q,
    ) -> R:
        try:
            call: Awaitable[R] = fn(request, metadata=self._metadata, timeout=self._request_timeout)
            return await call
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def _mark_finished(self, agent: str, handoff_id: str) -> None:
        key = (agent, handoff_id)
        self._finished[key] = None
        self._finished.move_to_end(key)
        while len(self._finished) > _REMEMBERED:
            self._finished.popitem(last=False)

    def _is_finished(self, agent: str, handoff_id: str) -> bool:
        return (agent, handoff_id) in self._finished

    # ------------------------------------------------------------ contracts, agents

    async def register_contract(
        self,
        message_class: type[Message],
        *,
        version: int = 0,
        compatibility: Compatibility | None = None,
        require: Iterable[str] = (),
        max_tokens: int = 0,
        max_bytes: int = 0,
        min_confidence: float | None = None,
        max_tool_result_age: Seconds | None = None,
        carry: Iterable[str] = (),
    ) -> RegisteredContract:
        """Registers `message_class` as a contract, with its rules; its descriptors
        are taken from the class (its file and every file it imports).
        Registering the same content again is a no-op (`created` is False).

        Example::

            await client.register_contract(Subtask, require=["instruction"], max_tokens=500)
        """
        req = contract_request(
            message_class,
            version=version,
            compatibility=compatibility,
            require=require,
            max_tokens=max_tokens,
            max_bytes=max_bytes,
            min_confidence=min_confidence,
            max_tool_result_age=max_tool_result_age,
            carry=carry,
        )
        resp = await self._call(self._stub.register_contract, req)
        return RegisteredContract(contract=resp.contract, created=resp.created)

    async def register_agent(
        self,
        name: str,
        *,
        accepts: type[Message] | str | None = None,
        accepts_versions: tuple[int, int] = (0, 0),
        emits: Iterable[type[Message] | str] = (),
        lease: Seconds | None = None,
        max_attempts: int = 0,
        fallback: str | None = None,
        reads: Iterable[str] = (),
        max_queue_wait: Seconds | None = None,
        description: str = "",
    ) -> pb.AgentSpec:
        """Declares (or updates) an agent: the contract it accepts (registered
        first), the ones it emits, its lease, attempts, fallback and the run-state
        keys it reads. Returns the spec as stored, defaults filled in.

        Example::

            await client.register_agent("worker", accepts=Subtask, emits=[WorkerResult],
                                        lease=timedelta(seconds=60), max_attempts=3)
        """
        spec = pb.AgentSpec(
            name=name,
            max_attempts=max_attempts,
            fallback_agent=fallback or "",
            description=description,
            emits=list(dict.fromkeys(full_name(e) for e in emits)),
            reads=list(reads),
        )
        if accepts is not None:
            spec.accepts.message_type = full_name(accepts)
            spec.accepts.min_version, spec.accepts.max_version = accepts_versions
        if lease is not None:
            spec.lease.CopyFrom(to_duration(lease))
        if max_queue_wait is not None:
            spec.max_queue_wait.CopyFrom(to_duration(max_queue_wait))
        resp = await self._call(
            self._stub.register_agent,
            pb.RegisterAgentRequest(agent=spec),
        )
        return resp.agent

    async def list_agents(self) -> list[pb.AgentSpec]:
        """Every registered agent."""
        resp = await self._call(self._stub.list_agents, pb.ListAgentsRequest())
        return list(resp.agents)

    async def agent_status(self) -> list[pb.AgentStatus]:
        """What every registered agent is doing now: its live instances on
        every replica, its handoffs pending and in flight, how long the
        oldest pending one has waited, and whether work waits with no live
        instance to take it (``unattended``). Needs the ``read`` grant."""
        resp = await self._call(self._stub.list_agents, pb.ListAgentsRequest())
        return list(resp.status)

    async def list_instances(self, agent: str | None = None) -> list[pb.Instance]:
        """The live instances (subscribe sessions) of ``agent``, or of every
        agent when it is ``None``, on every replica of the broker: by agent,
        then by when they subscribed.

        A replica that died leaves its instances listed until the broker's
        ``instance_expiry`` after their last refresh. Needs the ``read``
        grant.
        """
        req = pb.ListInstancesRequest(agent=agent or "")
        resp = await self._call(self._stub.list_instances, req)
        return list(resp.instances)

    # ------------------------------------------------------------ runs

    async def start_run(
        self,
        owner: str,
        *,
        run_id: str | None = None,
        ask: str | None = None,
        pinned: Mapping[str, str] | None = None,
        timeout: Seconds | None = None,
        no_timeout: bool = False,
        max_depth: int = 0,
        pipeline: str | None = None,
        state: Mapping[str, JsonValue | object] | None = None,
        pinned_state: Mapping[str, JsonValue | object] | None = None,
        policies: Mapping[str, MergePolicy] | None = None,
        judge: tuple[str, float] | None = None,
    ) -> pb.Run:
        """Starts a run owned by `owner` (told when it completes, fails or times
        out). `ask` and `pinned` reach every delivery unchanged; `state` seeds the
        run state, `pinned_state` seeds keys no delta may change, `policies` sets
        per-key merge policies, `judge` is `(agent, threshold)`. Repeating it with
        the same `run_id` and owner answers the same run.

        Example::

            run = await client.start_run("me", ask="Book a trip", pinned_state={"order": "A-1"},
                                         state={"notes": []}, policies={"notes": "APPEND"})
        """
        req = pb.StartRunRequest(
            run_id=run_id or new_run_id(),
            owner=owner,
            max_depth=max_depth,
            no_timeout=no_timeout,
            pipeline=pipeline or "",
        )
        if ask is not None or pinned:
            req.pinned.ask = ask or ""
            req.pinned.fields.update(dict(pinned or {}))
        if timeout is not None:
            req.timeout.CopyFrom(to_duration(timeout))
        if state or pinned_state or policies:
            for key, value in {**(state or {}), **(pinned_state or {})}.items():
                req.state.values[key].CopyFrom(to_value(cast(JsonValue, value)))
            req.state.pinned_keys.extend(pinned_state or {})
            for key, policy in (policies or {}).items():
                mode = _POLICIES.get(policy.upper())
                if mode is None:
                    raise error(
                        ErrorKind.INVALID_ARGUMENT,
                        f"merge policy {policy!r} is not one of {sorted(_POLICIES)}",
                    )
                req.state.policies[key] = mode
        if judge is not None:
            req.judge.agent, req.judge.threshold = judge
        resp = await self._call(self._stub.start_run, req)
        return resp.run

    async def get_run(self, run_id: str) -> pb.GetRunResponse:
        """A run (status, owner, pinned context, result, stats) and its timeline."""
        return await self._call(
            self._stub.get_run,
            pb.GetRunRequest(run_id=run_id),
        )

    async def list_runs(
        self,
        *,
        owner: str | None = None,
        status: Iterable[pb.RunStatus.ValueType] = (),
        pipeline: str | None = None,
        agent: str | None = None,
        started_after: dt.datetime | None = None,
        started_before: dt.datetime | None = None,
        ended_after: dt.datetime | None = None,
        ended_before: dt.datetime | None = None,
        has_dead_letters: bool = False,
        drift: bool = False,
        page_size: int = 0,
        page_token: str = "",
    ) -> pb.ListRunsResponse:
        """One page of runs matching every filter given, newest first: the runs
        the caller may read (every run with the ``read`` grant, else those of
        the owners it has ``own`` on). ``status`` takes ``pb.RUN_STATUS_*``
        values; ``page_size`` is 50 by default and at most 500. Pass the
        answer's ``next_page_token`` as ``page_token`` for the next page; it is
        empty on the last one. See `runs` to iterate over every page.

        Example::

            page = await client.list_runs(owner="ops", status=[pb.RUN_STATUS_FAILED])
            for summary in page.runs:
                print(summary.run.id, summary.run.failure, list(summary.agents))
        """
        req = pb.ListRunsRequest(
            owner=owner or "",
            status=list(status),
            pipeline=pipeline or "",
            agent=agent or "",
            has_dead_letters=has_dead_letters,
            drift=drift,
            page_size=page_size,
            page_token=page_token,
        )
        for name, when in (
            ("started_after", started_after),
            ("started_before", started_before),
            ("ended_after", ended_after),
            ("ended_before", ended_before),
        ):
            if when is not None:
                getattr(req, name).CopyFrom(to_timestamp(when))
        return await self._call(self._stub.list_runs, req)

    async def runs(self, **filters: Any) -> AsyncIterator[pb.RunSummary]:
        """Every run matching `list_runs`'s filters (given by name), newest
        first, reading page after page as it goes."""
        token = ""
        while True:
            page = await self.list_runs(**filters, page_token=token)
            for summary in page.runs:
                yield summary
            if not page.next_page_token:
                return
            token = page.next_page_token

    async def get_handoff(self, handoff_id: str, run_id: str = "") -> pb.GetHandoffResponse:
        """A handoff by id: its envelope (while the inbox keeps it), its run,
        where its delivery stands (``status``: ``pb.HANDOFF_STATUS_*``, and
        ``attempts``) and every event about it. ``run_id`` may be left empty:
        the broker finds the run. Needs what reading the run needs."""
        req = pb.GetHandoffRequest(handoff_id=handoff_id, run_id=run_id)
        return await self._call(self._stub.get_handoff, req)

    async def redrive_dead_letter(
        self, sequence: int, to_agent: str | None = None
    ) -> pb.RedriveDeadLetterResponse:
        """Hands dead letter ``sequence`` (from `dead_letters`) again, once, to
        its agent or to ``to_agent`` (which must accept its contract). A failed
        run whose failure was that letter goes back to running (``resumed``). A
        second redrive raises `HandoffError` with reason ``ALREADY_SETTLED``.
        Needs ``own`` on the run's owner."""
        req = pb.RedriveDeadLetterRequest(sequence=sequence, to_agent=to_agent or "")
        return await self._call(self._stub.redrive_dead_letter, req)

    async def fork_run(
        self,
        run_id: str,
        at_revision: int,
        target: str,
        payload: Message,
        *,
        new_run_id: str | None = None,
        idempotency_key: str | None = None,
        timeout: Seconds | None = None,
    ) -> pb.ForkRunResponse:
        """Starts a new run from revision ``at_revision`` of run ``run_id``'s
        state (0: without state), whose first handoff gives ``payload`` to
        ``target``. The new run has the parent's owner, pinned context,
        pipeline, depth cap and judge, and names its parent
        (``parent_run_id``); the parent is left as it is. Needs ``own`` on the
        parent's owner.

        Example::

            fork = await client.fork_run(run.id, 3, "writer", fixed_task)
            print(fork.run.id, fork.run.parent_run_id)
        """
        req = pb.ForkRunRequest(
            run_id=run_id,
            at_revision=at_revision,
            new_run_id=new_run_id or "",
            handoff=build_request("", target, payload, idempotency_key=idempotency_key),
        )
        if timeout is not None:
            req.timeout.CopyFrom(to_duration(timeout))
        return await self._call(self._stub.fork_run, req)

    async def provide_input(
        self, run_id: str, request_id: str, answer: Message
    ) -> pb.ProvideInputResponse:
        """Answers input request ``request_id`` of run ``run_id`` (asked with
        `Delivery.await_input`): ``answer``, checked against the request's
        contract, goes to the agent that asked. Needs ``own`` on the run's
        owner; a request already answered or timed out raises `HandoffError`
        with reason ``ALREADY_SETTLED``."""
        req = pb.ProvideInputRequest(run_id=run_id, request_id=request_id, answer=pack(answer))
        return await self._call(self._stub.provide_input, req)

    async def cancel_run(self, run_id: str, reason: str = "") -> pb.Run:
        """Cancels a running run (needs ``own`` on its owner): it ends
        ``RUN_STATUS_CANCELLED`` with ``reason`` as its failure, its pending
        handoffs are never delivered, and the handlers working on it are
        cancelled (see `Delivery.cancelled`). A run that already ended raises
        `HandoffError` with reason ``RUN_CLOSED``."""
        resp = await self._call(
            self._stub.cancel_run, pb.CancelRunRequest(run_id=run_id, reason=reason)
        )
        return resp.run

    async def get_state(
        self, run_id: str, revision: int = 0, *, delivery_id: str | None = None
    ) -> RunState:
        """A run's state at `revision` (0: the latest), with the handoff that made
        it. `delivery_id` reads it as the agent holding that delivery of the run.

        Example::

            state = await client.get_state(run.id)
            print(state.revision, state.values["city"])
        """
        req = pb.GetStateRequest(run_id=run_id, revision=revision, delivery_id=delivery_id or "")
        resp = await self._call(self._stub.get_state, req)
        return RunState.from_proto(resp)

    async def get_payload(
        self, run_id: str, reference: pb.PayloadRef, *, delivery_id: str = ""
    ) -> any_pb2.Any:
        """The payload `reference` names, fetched in chunks (`GetPayload`) and
        checked against the reference's size and SHA-256 (`DecodeError` when it
        does not match; `NotFoundError` with reason `PAYLOAD_NOT_FOUND` once it
        expired with the broker's `retention`). `delivery_id` reads it as the
        agent holding that delivery of the run; without it the caller needs the
        `read` grant or to own the run. Deliveries come with their references
        resolved already: this is for references read elsewhere (a run's
        `result_ref`, say).

        Example::

            run = await client.get_run(run_id)
            if run.run.HasField("result_ref"):
                result = await client.get_payload(run_id, run.run.result_ref)
        """
        req = pb.GetPayloadRequest(run_id=run_id, name=reference.name, delivery_id=delivery_id)
        chunks: list[bytes] = []
        try:
            call = self._stub.get_payload(
                req, metadata=self._metadata, timeout=self._request_timeout
            )
            async for chunk in call:
                chunks.append(chunk.data)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        value = b"".join(chunks)
        check(reference, value, await sha256_hex(value))
        return any_pb2.Any(type_url=reference.type_url, value=value)

    async def _fetch_for_delivery(
        self, run_id: str, reference: pb.PayloadRef, delivery_id: str
    ) -> any_pb2.Any:
        return await self.get_payload(run_id, reference, delivery_id=delivery_id)

    async def dead_letters(self, agent: str = "", limit: int = 0) -> list[pb.DeadLetter]:
        """Dead letters of `agent` (empty: every agent), oldest first."""
        req = pb.ListDeadLettersRequest(agent=agent, limit=limit)
        resp = await self._call(self._stub.list_dead_letters, req)
        return list(resp.dead_letters)

    # ------------------------------------------------------------ handoffs

    async def handoff(
        self,
        run_id: str,
        target: str | None,
        payload: Message,
        *,
        idempotency_key: str | None = None,
        final: bool = False,
        confidence: float | None = None,
        tool_results: Iterable[ToolResult] = (),
        warnings: Iterable[str] = (),
        state_delta: StateDelta | None = None,
        asks_for: Iterable[str] = (),
        source_agent: str | None = None,
        parents: Iterable[str] = (),
        trace_context: Mapping[str, str] | None = None,
        consumes: str | None = None,
        fan_out: bool = False,
    ) -> Receipt:
        """Hands `payload` to agent `target` within `run_id` (or, with `final`,
        completes the run with it); accepted means durably stored. Retrying with
        the same `idempotency_key` answers the first handoff (`duplicate`).

        From a delivery, prefer `Delivery.handoff` (complete-and-handoff); this
        is the call an adapter makes when it manages deliveries itself
        (`consumes` names the delivery the handoff completes).

        Example::

            receipt = await client.handoff(run.id, "worker", task, idempotency_key="task-1")
        """
        req = build_request(
            run_id,
            target,
            payload,
            source_agent=source_agent,
            idempotency_key=idempotency_key,
            final=final,
            confidence=confidence,
            tool_results=tool_results,
            warnings=warnings,
            state_delta=state_delta,
            asks_for=asks_for,
            parents=parents,
            trace_context=trace_context,
            consumes=consumes,
            fan_out=fan_out,
        )
        return await self._send_handoff(req)

    async def _send_handoff(self, req: pb.HandoffRequest) -> Receipt:
        if req.final:
            name = "handoff (final)"
        elif req.to_barrier:
            name = f"handoff barrier {req.barrier_id}".rstrip()
        else:
            name = f"handoff {req.target_agent}"
        fields = dict(req.trace_context)
        span = _otel.call_span(name, req.run_id, fields)
        if span is not None:
            req.trace_context.clear()
            req.trace_context.update(fields)
        try:
            resp = await self._call(self._stub.handoff, req)
        except BaseException as e:
            _otel.end(span, e)
            raise
        _otel.end(span)
        return Receipt.from_proto(resp)

    async def fan_out(
        self,
        run_id: str,
        worker_agent: str,
        items: Sequence[Message],
        *,
        aggregator: str,
        mode: JoinMode = ALL,
        keys: Sequence[str] | None = None,
        barrier_id: str | None = None,
        timeout: Seconds | None = None,
        release_partial: bool = False,
        fail_fast: bool = False,
        source_agent: str | None = None,
    ) -> FanOutReceipt:
        """One branch handoff of each item to `worker_agent`, joined at a barrier
        that releases to `aggregator` (`ALL`, or `quorum(k)`), in one call. From
        a delivery, use `Delivery.fan_out`. Repeating the same fan-out answers the
        same barrier and branches (`duplicate`).

        Example::

            fanned = await client.fan_out(run.id, "worker", tasks, aggregator="aggregator")
        """
        req = fan_out_request(
            run_id=run_id,
            worker=worker_agent,
            aggregator=aggregator,
            items=items,
            source_agent=source_agent or "",
            consumes=None,
            consumed_handoff_id=None,
            trace_context={},
            mode=mode,
            keys=keys,
            barrier_id=barrier_id,
            timeout=timeout,
            release_partial=release_partial,
            fail_fast=fail_fast,
        )
        return await self._send_fan_out(req)

    async def _send_fan_out(self, req: pb.FanOutRequest) -> FanOutReceipt:
        sent = [b.branch_key for b in req.branches]
        # Every branch, and the barrier's release, continue the call's span.
        fields = dict(req.branches[0].trace_context) if req.branches else {}
        span = _otel.call_span(
            f"fan-out {req.barrier.barrier_id}".rstrip(), req.barrier.run_id, fields
        )
        if span is not None:
            # The span's W3C fields; each branch's other fields are kept.
            w3c = {k: v for k, v in fields.items() if k.lower() in ("traceparent", "tracestate")}
            for tc in [*(b.trace_context for b in req.branches), req.barrier.trace_context]:
                for key in [k for k in tc if k.lower() in ("traceparent", "tracestate")]:
                    del tc[key]
                tc.update(w3c)
        try:
            resp = await self._call(self._stub.fan_out, req)
        except BaseException as e:
            _otel.end(span, e)
            raise
        _otel.end(span)
        keys = receipt_keys(resp, sent)
        branches = [Receipt.from_proto(b) for b in resp.branches]
        if len(branches) != len(keys):
            raise error(
                ErrorKind.OTHER,
                f"the broker answered {len(branches)} branch handoffs for {len(keys)} branches",
            )
        return FanOutReceipt(
            barrier_id=req.barrier.barrier_id, keys=keys, branches=branches, barrier=resp.barrier
        )

    async def get_barrier(self, run_id: str, barrier_id: str) -> pb.Barrier:
        """A barrier: its spec, state, the branches that reached it, its release."""
        req = pb.GetBarrierRequest(run_id=run_id, barrier_id=barrier_id)
        resp = await self._call(self._stub.get_barrier, req)
        return resp.barrier

    # ------------------------------------------------------------ streams

    async def subscribe(
        self, agent: str, instance: str, max_in_flight: int = 1, *, verify_intent: bool = True
    ) -> Subscription:
        """Subscribes as `instance` of `agent`, holding at most `max_in_flight`
        unsettled deliveries; an async iterator of `Delivery`. A delivery whose
        intent digest does not match its pinned context is rejected (reason
        `INTENT_MISMATCH...`, which fails its run) and never yielded, unless
        `verify_intent` is false (it is then yielded, with a warning).

        Example::

            async with await client.subscribe("worker", "worker-1") as deliveries:
                async for delivery in deliveries:
                    task = delivery.payload(Subtask)
                    await delivery.handoff("aggregator", work_on(task))
        """
        return await Subscription.open(
            self, agent, instance, max_in_flight, verify_intent=verify_intent
        )

    def watch(
        self,
        *,
        run_id: str | None = None,
        agent: str | None = None,
        owner: str | None = None,
        kinds: Iterable[pb.EventKind.ValueType | str] = (),
        from_sequence: int = 0,
    ) -> Watch:
        """Events matching every filter given, live (and from `from_sequence` when
        set: 0 means new events only). `kinds` are `pb.EVENT_KIND_*` values or
        names (`"handoff_accepted"`). The iterator is resumable: its
        `next_sequence` is where to start again, and it reconnects by itself
        when the broker drains.

        Example::

            async for event in client.watch(run_id=run.id, kinds=["run_completed"]):
                print(event.sequence, event.kind)
                break
        """
        req = pb.WatchRequest(
            run_id=run_id or "",
            agent=agent or "",
            owner=owner or "",
            kinds=[_event_kind(k) for k in kinds],
            from_sequence=from_sequence,
        )
        return Watch(self, req)


def _event_kind(kind: pb.EventKind.ValueType | str) -> pb.EventKind.ValueType:
    if isinstance(kind, int):
        return kind
    name = kind.upper()
    if not name.startswith("EVENT_KIND_"):
        name = "EVENT_KIND_" + name
    try:
        return pb.EventKind.Value(name)
    except ValueError:
        raise error(ErrorKind.INVALID_ARGUMENT, f"{kind!r} is not an event kind") from None


class Watch(Closing):
    """An async iterator of `pb.Event`s (from `Client.watch`), resumable from
    `next_sequence`. Close it with `close()` or by leaving an `async with`."""

    _RETRIES = 3

    def __init__(self, client: Client, req: pb.WatchRequest) -> None:
        self._client = client
        self._req = req
        self._call: grpc.aio.UnaryStreamCall[pb.WatchRequest, pb.Event] | None = None
        self._closed = False
        self.next_sequence = req.from_sequence
        """The sequence to resume from so that nothing is missed (0 before
        any event, when the watch started with new events only): one past
        the last event received, or lower in a watch of one run, whose
        events come in causal order (the broker's `resume_sequence`)."""
        self._given: set[int] = set()

    def __aiter__(self) -> AsyncIterator[pb.Event]:
        return self

    async def __anext__(self) -> pb.Event:
        retries = 0
        while not self._closed:
            if self._call is None:
                req = pb.WatchRequest()
                req.CopyFrom(self._req)
                req.from_sequence = self.next_sequence
                self._call = self._client._stub.watch(req, metadata=self._client._metadata)
            try:
                event = await self._call.read()
            except grpc.RpcError as e:
                self._call = None
                err: HandoffError = from_rpc_error(e)
                if self._closed:
                    break
                if err.kind is ErrorKind.UNAVAILABLE and retries < self._RETRIES:
                    retries += 1
                    await asyncio.sleep(0.2 * retries)
                    continue
                raise err from None
            if event is grpc.aio.EOF:
                self._call = None
                break
            assert isinstance(event, pb.Event)
            if event.sequence in self._given:
                # Given before a resume that started below it.
                continue
            self.next_sequence = event.resume_sequence or event.sequence + 1
            self._given = {s for s in self._given if s >= self.next_sequence}
            if event.sequence >= self.next_sequence:
                self._given.add(event.sequence)
            return event
        raise StopAsyncIteration

    async def close(self) -> None:
        """Ends the watch."""
        self._closed = True
        if self._call is not None:
            self._call.cancel()
            self._call = None
