"""Receiving deliveries: `Subscription` and `Delivery`.

A subscription is one bidirectional `Subscribe` stream. Deliveries come down;
acks, nacks, rejects and extends go up, each with a request id the broker
answers in a `Settled`, so `await delivery.ack()` returns once JetStream
confirmed it. The client remembers the handoffs this process already finished:
one delivered again (its ack was lost in a crash of the stream) is acked again
silently instead of being handed to the application twice.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import grpc.aio
from google.protobuf import any_pb2, wrappers_pb2
from google.protobuf.message import Message

from . import _otel
from ._barrier import ALL, FanOutReceipt, Join, JoinMode, fan_out_request
from ._closing import Closing
from ._contract import full_name
from ._errors import ErrorKind, HandoffError, error, from_rpc_error, from_settled
from ._handoff import (
    TRACEPARENT,
    Receipt,
    ToolResult,
    build_request,
    continue_trace,
    trace_field,
)
from ._payload import has_references, resolve
from ._state import StateDelta, intent_intact
from ._values import JsonValue, Seconds, from_timestamp, from_values, to_duration, unpack
from .v1 import handoff_pb2 as pb

if TYPE_CHECKING:
    from ._client import Client

INTENT_MISMATCH = "INTENT_MISMATCH"
"""The reason a delivery whose intent digest does not match is rejected with."""

log = logging.getLogger("handoff")

M = TypeVar("M", bound=Message)

SETTLE_TIMEOUT = 15.0
"""Seconds allowed for the broker to confirm a settlement."""

_END = object()

# Cancels kept for deliveries not made yet (their payload being fetched).
_EARLY_CANCELS = 1024


class Subscription(Closing):
    """An async iterator of `Delivery` for one agent instance (from
    `Client.subscribe`). Closing it ends the stream; the broker then returns
    its unsettled deliveries to the agent's other instances at once.

    The iterator raises a `HandoffError` when the stream fails (for example
    `UnavailableError` with reason `DRAINING` when the broker shuts down), then
    stops.
    """

    def __init__(
        self,
        client: Client,
        agent: str,
        instance: str,
        max_in_flight: int,
        *,
        verify_intent: bool = True,
    ) -> None:
        """Use `Client.subscribe`."""
        self._client = client
        self._verify_intent = verify_intent
        self.agent_name = agent
        """The agent subscribed as."""
        self.instance = instance
        """This instance's name."""
        self.agent = pb.AgentSpec()
        """The agent as the broker knows it (lease, attempts, fallback)."""
        self._max_in_flight = max_in_flight
        self._requests: asyncio.Queue[pb.SubscribeRequest | None] = asyncio.Queue()
        self._deliveries: asyncio.Queue[object] = asyncio.Queue()
        self._pending: dict[int, asyncio.Future[pb.Settled]] = {}
        self._next_id = 1
        self._ended = False
        self._closing = False
        self._call: grpc.aio.StreamStreamCall[pb.SubscribeRequest, pb.SubscribeResponse] | None = (
            None
        )
        self._reader: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        # Deliveries held, by id, to tell them when their run is cancelled;
        # and cancels of deliveries not yet made (a payload still fetched).
        self._held: weakref.WeakValueDictionary[str, Delivery] = weakref.WeakValueDictionary()
        self._early_cancels: dict[str, str] = {}

    @classmethod
    async def open(
        cls,
        client: Client,
        agent: str,
        instance: str,
        max_in_flight: int,
        *,
        verify_intent: bool = True,
    ) -> Subscription:
        """Opens the stream and waits for the broker to confirm it."""
        sub = cls(client, agent, instance, max_in_flight, verify_intent=verify_intent)
        sub._requests.put_nowait(
            pb.SubscribeRequest(
                request_id=0,
                open=pb.SubscribeOpen(agent=agent, instance=instance, max_in_flight=max_in_flight),
            )
        )
        sub._call = client._stub.subscribe(sub._outbound(), metadata=client._metadata)
        try:
            first = await sub._call.read()
        except grpc.RpcError as e:
            sub._call.cancel()
            raise from_rpc_error(e) from None
        if not isinstance(first, pb.SubscribeResponse) or first.WhichOneof("message") != (
            "subscribed"
        ):
            sub._call.cancel()
            raise error(ErrorKind.OTHER, "the broker did not confirm the subscription")
        sub.agent = first.subscribed.agent
        sub._reader = asyncio.get_running_loop().create_task(sub._read())
        return sub

    async def _outbound(self) -> AsyncIterator[pb.SubscribeRequest]:
        while True:
            req = await self._requests.get()
            if req is None:
                return
            yield req

    async def _read(self) -> None:
        assert self._call is not None
        try:
            while True:
                resp = await self._call.read()
                if not isinstance(resp, pb.SubscribeResponse):
                    break  # EOF
                which = resp.WhichOneof("message")
                if which == "delivery" and has_references(resp.delivery):
                    # A payload by reference: fetched (and checked) apart, so
                    # this reader goes on carrying the broker's answers.
                    self._spawn(self._resolve(resp.delivery))
                elif which == "delivery":
                    delivery = Delivery(resp.delivery, self)
                    if self._client._is_finished(self.agent_name, delivery.handoff_id):
                        # Finished here already: its ack was lost. Ack it
                        # again, quietly, without holding up this reader.
                        self._spawn(delivery._ack_quietly())
                        continue
                    self._deliveries.put_nowait(delivery)
                elif which == "cancelled":
                    self._cancel(resp.cancelled)
                elif which == "settled":
                    fut = self._pending.pop(resp.settled.request_id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(resp.settled)
        except grpc.RpcError as e:
            if not self._closing:
                self._deliveries.put_nowait(from_rpc_error(e))
        except asyncio.CancelledError:
            pass
        finally:
            self._ended = True
            for fut in self._pending.values():
                if not fut.done():
                    closed = "the subscription closed before the broker answered"
                    fut.set_exception(error(ErrorKind.CLOSED, closed))
            self._pending.clear()
            self._deliveries.put_nowait(_END)

    def _cancel(self, cancelled: pb.Cancelled) -> None:
        log.info("the run %s of a delivery was cancelled: %s", cancelled.run_id, cancelled.reason)
        held = self._held.get(cancelled.delivery_id)
        if held is not None:
            held._cancel(cancelled.reason)
            return
        if len(self._early_cancels) >= _EARLY_CANCELS:
            self._early_cancels.pop(next(iter(self._early_cancels)))
        self._early_cancels[cancelled.delivery_id] = cancelled.reason

    def _hold(self, delivery: Delivery) -> None:
        self._held[delivery.id] = delivery
        reason = self._early_cancels.pop(delivery.id, None)
        if reason is not None:
            delivery._cancel(reason)

    async def _resolve(self, raw: pb.Delivery) -> None:
        if self._client._is_finished(self.agent_name, raw.handoff.id):
            await Delivery(raw, self)._ack_quietly()
            return
        if not intent_intact(raw):
            if self._verify_intent:
                # Its pinned context is not the one its run pinned: never
                # handed to the application.
                log.warning("handoff %s: intent digest mismatch, rejected", raw.handoff.id)
                await Delivery(raw, self).reject(
                    f"{INTENT_MISMATCH}: the delivery's pinned context does not match its"
                    " intent digest"
                )
                return
            log.warning("handoff %s: intent digest mismatch (trusted)", raw.handoff.id)
        failed = await resolve(self._client._fetch_for_delivery, raw)
        delivery = Delivery(raw, self)
        if failed is not None:
            log.warning(
                "a payload by reference of handoff %s could not be fetched: %s",
                raw.handoff.id,
                failed,
            )
            delivery._unresolved = failed
        if not self._ended:
            self._deliveries.put_nowait(delivery)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send(self, req: pb.SubscribeRequest) -> pb.Settled:
        if self._ended or self._closing:
            raise error(ErrorKind.CLOSED, "the subscription is closed")
        req.request_id = self._next_id
        self._next_id += 1
        fut: asyncio.Future[pb.Settled] = asyncio.get_running_loop().create_future()
        self._pending[req.request_id] = fut
        self._requests.put_nowait(req)
        try:
            settled = await asyncio.wait_for(fut, SETTLE_TIMEOUT)
        except asyncio.TimeoutError:
            self._pending.pop(req.request_id, None)
            raise error(ErrorKind.TIMEOUT, "the broker did not confirm in time") from None
        if settled.code != 0:
            raise from_settled(settled.code, settled.message, settled.reason)
        return settled

    def __aiter__(self) -> AsyncIterator[Delivery]:
        return self

    async def __anext__(self) -> Delivery:
        item = await self._deliveries.get()
        if item is _END:
            self._deliveries.put_nowait(_END)
            raise StopAsyncIteration
        if isinstance(item, HandoffError):
            raise item
        assert isinstance(item, Delivery)
        return item

    async def next(self, timeout: Seconds | None = None) -> Delivery | None:
        """The next delivery, or `None` when the subscription ended (or nothing
        came within `timeout` seconds)."""
        from ._values import seconds

        try:
            if timeout is None:
                return await self.__anext__()
            return await asyncio.wait_for(self.__anext__(), seconds(timeout))
        except (StopAsyncIteration, asyncio.TimeoutError):
            return None

    async def ack_id(self, delivery_id: str) -> None:
        """Acks a delivery by id, for one received in another session (to finish
        an ack whose answer was lost: acking an acked delivery is confirmed)."""
        await self._send(pb.SubscribeRequest(ack=pb.Ack(delivery_id=delivery_id)))

    def pending(self) -> list[Delivery]:
        """Deliveries received but not yet taken from the iterator."""
        out: list[Delivery] = []
        while not self._deliveries.empty():
            item = self._deliveries.get_nowait()
            if isinstance(item, Delivery):
                out.append(item)
            else:
                self._deliveries.put_nowait(item)
                break
        return out

    async def close(self) -> None:
        """Ends the stream; unsettled deliveries go back to the other instances."""
        if self._closing:
            return
        self._closing = True
        self._requests.put_nowait(None)
        if self._background:
            await asyncio.wait(set(self._background), timeout=SETTLE_TIMEOUT)
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._reader), 5)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._reader.cancel()

    def __repr__(self) -> str:
        return f"Subscription(agent={self.agent_name!r}, instance={self.instance!r})"


@dataclass(frozen=True)
class Pinned:
    """A run's pinned context, attached by the broker to every delivery."""

    ask: str
    """The original ask, verbatim."""
    fields: dict[str, str] = field(default_factory=dict)
    """Other pinned fields."""


@dataclass
class _Made:
    target: str  # "" for final, _TO_BARRIER for a branch result
    idempotency_key: str
    handoff_id: str


_TO_BARRIER = "\0barrier"


class Delivery:
    """One handoff leased to this instance. Settle it with exactly one of `ack`,
    `nack`, `reject`, a complete-and-handoff (`handoff`, `final`), a `fan_out`,
    or on a barrier branch a branch result (`to_barrier`, `skip_branch`,
    `fail_branch`); `extend` while working longer than the lease.

    Example::

        task = delivery.payload(Subtask)
        print(delivery.pinned.ask, delivery.state.get("city"))
        await delivery.handoff("aggregator", WorkerResult(summary="done"))
    """

    def __init__(self, raw: pb.Delivery, subscription: Subscription) -> None:
        self.raw = raw
        """The delivery message as it came."""
        self._sub = subscription
        self._made: list[_Made] = []
        # Its processing span (with opentelemetry-api), ended once settled.
        self._span = _otel.process_span(subscription.agent_name, raw.handoff, raw.attempt)
        self._settled_ = False
        self._state: dict[str, JsonValue] | None = None
        self._unresolved: HandoffError | None = None
        self._cancel_reason: str | None = None
        self._cancelled = asyncio.Event()
        self._on_cancel: list[Callable[[], object]] = []
        subscription._hold(self)
        if not intent_intact(raw):
            log.warning(
                "the pinned context of handoff %s does not match its intent digest",
                raw.handoff.id,
            )

    @property
    def _settled(self) -> bool:
        return self._settled_

    @_settled.setter
    def _settled(self, settled: bool) -> None:
        self._settled_ = settled
        if settled and self._span is not None:
            _otel.end(self._span)
            self._span = None

    def _continue_trace(self, into: dict[str, str]) -> None:
        """Fills `into` with this delivery's trace context (its processing
        span's, with opentelemetry-api), unless it names a `traceparent`."""
        if trace_field(into, TRACEPARENT) is None and not _otel.inject(self._span, into):
            continue_trace(into, self.raw.handoff.trace_context)

    def __repr__(self) -> str:
        return (
            f"Delivery(handoff_id={self.handoff_id!r}, run_id={self.run_id!r}, "
            f"attempt={self.attempt})"
        )

    # ------------------------------------------------------------ what it carries

    @property
    def id(self) -> str:
        """The opaque delivery id (what `consumes` names)."""
        return self.raw.delivery_id

    @property
    def envelope(self) -> pb.HandoffEnvelope:
        """The handoff's envelope."""
        return self.raw.handoff

    @property
    def handoff_id(self) -> str:
        """The handoff's id (the same on every redelivery)."""
        return self.raw.handoff.id

    @property
    def run_id(self) -> str:
        """The run it belongs to."""
        return self.raw.handoff.run_id

    @property
    def agent(self) -> str:
        """The agent it was delivered to."""
        return self._sub.agent_name

    @property
    def attempt(self) -> int:
        """1 on the first delivery, 2 on the first redelivery..."""
        return self.raw.attempt

    @property
    def max_attempts(self) -> int:
        """Deliveries before fallback or dead letter."""
        return self.raw.max_attempts

    @property
    def pinned(self) -> Pinned:
        """The run's pinned context (always there)."""
        p = self.raw.pinned
        return Pinned(ask=p.ask, fields=dict(p.fields))

    @property
    def source_agent(self) -> str:
        """The agent that handed this off; empty when it came from the run's owner."""
        return self.raw.handoff.source_agent

    @property
    def confidence(self) -> float:
        """The sender's confidence in [0, 1]."""
        return self.raw.handoff.confidence

    @property
    def warnings(self) -> list[str]:
        """The sender's warnings."""
        return list(self.raw.handoff.warnings)

    @property
    def depth(self) -> int:
        """Sequential hops of the run up to this handoff (1 for the first)."""
        return self.raw.handoff.depth

    @property
    def contract(self) -> tuple[str, int] | None:
        """The contract the payload was checked against and its version, if any."""
        e = self.raw.handoff
        return (e.contract_type, e.contract_version) if e.contract_type else None

    @property
    def lease_deadline(self) -> dt.datetime | None:
        """When the lease ends unless extended."""
        if not self.raw.HasField("lease_deadline"):
            return None
        return from_timestamp(self.raw.lease_deadline)

    @property
    def trace_context(self) -> dict[str, str]:
        """The W3C trace context the handoff was made in (and any other
        propagation fields); handoffs made from this delivery continue it."""
        return dict(self.raw.handoff.trace_context)

    @property
    def traceparent(self) -> str | None:
        """The W3C `traceparent`, if any: the parent of a span processing this."""
        return trace_field(self.raw.handoff.trace_context, "traceparent")

    @property
    def state(self) -> dict[str, JsonValue]:
        """The run state this handoff hands over (or the keys the agent reads and
        the pinned ones); empty when the run has no state."""
        if self._state is None:
            self._state = from_values(self.raw.state.values) if self.raw.HasField("state") else {}
        return self._state

    @property
    def state_revision(self) -> int:
        """The run-state revision this delivery carries (0: no state)."""
        return self.raw.handoff.state_revision

    @property
    def barrier_branch(self) -> tuple[str, str] | None:
        """`(barrier_id, branch_key)` of the branch this delivery is on, if any."""
        e = self.raw.handoff
        return (e.barrier_id, e.branch_key) if e.barrier_id and e.branch_key else None

    @property
    def cancelled(self) -> bool:
        """True once the delivery's run was cancelled (`Client.cancel_run`):
        its work is no longer wanted, and handoffs made from it are refused
        `RUN_CLOSED`. A `Worker` cancels the handler (`asyncio.CancelledError`
        inside it) and acks the delivery."""
        return self._cancel_reason is not None

    @property
    def cancel_reason(self) -> str | None:
        """Why the delivery's run was cancelled; `None` while it runs."""
        return self._cancel_reason

    async def wait_cancelled(self) -> str:
        """Returns, with the reason, once the delivery's run is cancelled."""
        await self._cancelled.wait()
        return self._cancel_reason or ""

    def _cancel(self, reason: str) -> None:
        if self._cancel_reason is not None:
            return
        self._cancel_reason = reason
        self._cancelled.set()
        for callback in self._on_cancel:
            callback()

    @property
    def settled(self) -> bool:
        """True once this process settled it (ack, nack, reject, a handoff that
        completes it, a fan-out)."""
        return self._settled

    def state_delta(self) -> StateDelta:
        """An empty delta based on the revision this delivery carries."""
        return StateDelta.based_on(self.state_revision)

    def intent_intact(self) -> bool:
        """Whether the pinned context and pinned state keys are what the broker
        attached (the intent digest matches); a warning is logged when not."""
        return intent_intact(self.raw)

    def payload(self, cls: type[M]) -> M:
        """The payload decoded as `cls` (its type is checked); `DecodeError` when
        it is another type. A payload the broker stores by reference was fetched
        and checked against its size and digest before the delivery was handed
        out, and decodes here as an inline one; when it could not be fetched,
        the fetch's error is raised here (`NotFoundError`, reason
        `PAYLOAD_NOT_FOUND`, once it expired)."""
        if self._unresolved is not None:
            raise self._unresolved
        if not self.raw.handoff.HasField("payload"):
            raise error(ErrorKind.DECODE, "the delivery has no payload")
        return unpack(self.raw.handoff.payload, cls)

    @property
    def payload_ref(self) -> pb.PayloadRef | None:
        """The payload's reference when the broker stores it by reference (over
        its `max_inline_payload`); `None` for an inline payload. `forward_to`
        hands it on without uploading it again."""
        h = self.raw.handoff
        return h.payload_ref if h.HasField("payload_ref") else None

    async def forward_to(self, target: str, *, idempotency_key: str | None = None) -> Receipt:
        """Complete-and-handoff of this delivery's payload, unchanged, to
        `target`: by reference when it came by reference (nothing is uploaded
        again; the broker checks the reference and the target's contract),
        else inline.

        Example::

            await delivery.forward_to("summariser")
        """
        req = pb.HandoffRequest(
            run_id=self.run_id, target_agent=target, idempotency_key=idempotency_key or ""
        )
        if self.payload_ref is not None:
            req.payload_ref.CopyFrom(self.payload_ref)
        elif self.raw.handoff.HasField("payload"):
            req.payload.CopyFrom(self.raw.handoff.payload)
        else:
            raise error(ErrorKind.DECODE, "the delivery has no payload")
        return await self.send(req)

    def is_release(self) -> bool:
        """Whether the payload is a barrier's `BarrierRelease`."""
        name = pb.BarrierRelease.DESCRIPTOR.full_name
        return self.raw.handoff.payload.type_url.endswith("/" + name)

    def join(self, result_type: type[M]) -> Join[M]:
        """The barrier release this delivery carries, each arrived branch's result
        decoded as `result_type`, in branch-key order. Settle the delivery as any
        other. `DecodeError` when it is not a release or a result is not one.

        Example::

            join = delivery.join(WorkerResult)
            await delivery.final(Report(results=[r for _, r in join.results()]))
        """
        try:
            release = self.payload(pb.BarrierRelease)
        except HandoffError as e:
            raise error(
                ErrorKind.DECODE, f"handoff {self.handoff_id} is not a barrier release: {e.message}"
            ) from e
        return Join.from_release(release, result_type)

    def judge_request(self) -> pb.JudgeRequest | None:
        """The request this delivery carries when the agent is a run's judge."""
        if not self.raw.handoff.judge:
            return None
        return self.payload(pb.JudgeRequest)

    async def judge_result(self) -> any_pb2.Any | None:
        """The result a judge request asks about: inline, or fetched (and
        checked) when the run's result came by reference; `None` when this
        delivery is no judge request."""
        request = self.judge_request()
        if request is None:
            return None
        if request.HasField("result"):
            return request.result
        if request.HasField("result_ref"):
            return await self._sub._client.get_payload(
                self.run_id, request.result_ref, delivery_id=self.id
            )
        return None

    async def get_state(self) -> dict[str, JsonValue]:
        """The run's latest state, read as the agent holding this delivery (after
        a `STATE_CONFLICT`, say)."""
        state = await self._sub._client.get_state(self.run_id, delivery_id=self.id)
        return state.values

    # ------------------------------------------------------------ settling

    async def ack(self) -> None:
        """Done: the handoff will not be delivered again.

        A `ClosedError`, `TimedOutError` or `UnavailableError` leaves the outcome
        unknown; repeat with `Subscription.ack_id` on a new subscription.
        """
        self._sub._client._mark_finished(self.agent, self.handoff_id)
        await self._sub._send(pb.SubscribeRequest(ack=pb.Ack(delivery_id=self.id)))
        self._settled = True

    async def _ack_quietly(self) -> None:
        try:
            await self._sub._send(pb.SubscribeRequest(ack=pb.Ack(delivery_id=self.id)))
        except HandoffError as e:
            log.debug("acking handoff %s again failed: %s", self.handoff_id, e)

    async def await_input(
        self,
        prompt: str,
        *,
        timeout: Seconds,
        answer: type[Message] | str | None = None,
        fallback_agent: str | None = None,
    ) -> pb.InputRequest:
        """Asks the run's owner a question and parks this delivery: it is acked
        (no lease is held while waiting) and the run is waiting for input. The
        answer (of type ``answer`` when given, checked by the broker) comes
        back to this agent as a new delivery whose envelope names the request
        (``envelope.input_request_id``). On ``timeout`` the handoff's payload
        goes to ``fallback_agent``, or the run fails.

        Example::

            request = await delivery.await_input("Which city?", timeout=3600, answer=Ask)
        """
        req = pb.AwaitInputRequest(
            delivery_id=self.id,
            prompt=prompt,
            fallback_agent=fallback_agent or "",
        )
        req.timeout.CopyFrom(to_duration(timeout))
        if answer is not None:
            req.answer.CopyFrom(pb.ContractRef(message_type=full_name(answer)))
        client = self._sub._client
        resp = await client._call(client._stub.await_input, req)
        self._settled = True
        client._mark_finished(self.agent, self.handoff_id)
        return resp.request

    async def nack(self, delay: Seconds | None = None) -> None:
        """Not now: redeliver after `delay` (or at once), to any instance."""
        req = pb.Nack(delivery_id=self.id)
        if delay is not None:
            req.delay.CopyFrom(to_duration(delay))
        await self._sub._send(pb.SubscribeRequest(nack=req))
        self._settled = True

    async def reject(self, reason: str) -> None:
        """Terminal failure: the run fails and its owner is told."""
        await self._sub._send(
            pb.SubscribeRequest(reject=pb.Reject(delivery_id=self.id, reason=reason))
        )
        self._sub._client._mark_finished(self.agent, self.handoff_id)
        self._settled = True

    async def extend(self) -> dt.datetime | None:
        """Still working: the lease restarts; returns the new deadline."""
        settled = await self._sub._send(pb.SubscribeRequest(extend=pb.Extend(delivery_id=self.id)))
        if settled.HasField("lease_deadline"):
            return from_timestamp(settled.lease_deadline)
        return None

    # ------------------------------------------------------------ complete-and-handoff

    async def handoff(
        self,
        target: str,
        payload: Message,
        *,
        idempotency_key: str | None = None,
        confidence: float | None = None,
        tool_results: Iterable[ToolResult] = (),
        warnings: Iterable[str] = (),
        state_delta: StateDelta | None = None,
        asks_for: Iterable[str] = (),
        fan_out: bool = False,
        trace_context: Mapping[str, str] | None = None,
    ) -> Receipt:
        """Complete-and-handoff: stores a handoff of `payload` to `target` (in
        this delivery's run, from this agent, consuming this delivery) and the
        broker then acks this delivery. Repeating it after a crash yields the
        same handoff, recognised as a duplicate: downstream sees it once.

        Several handoffs from one delivery: give each a distinct
        `idempotency_key`, mark each `fan_out=True`, and `ack` after the last.
        The handoff continues this delivery's trace unless `trace_context`
        names a `traceparent`.

        Example::

            receipt = await delivery.handoff("writer", draft,
                                             state_delta=delivery.state_delta().set("city", "Rome"))
        """
        req = build_request(
            self.run_id,
            target,
            payload,
            idempotency_key=idempotency_key,
            confidence=confidence,
            tool_results=tool_results,
            warnings=warnings,
            state_delta=state_delta,
            asks_for=asks_for,
            trace_context=trace_context,
            fan_out=fan_out,
        )
        return await self.send(req)

    async def final(
        self,
        payload: Message,
        *,
        confidence: float | None = None,
        tool_results: Iterable[ToolResult] = (),
        warnings: Iterable[str] = (),
        state_delta: StateDelta | None = None,
    ) -> Receipt:
        """Completes the run with `payload` as its result, consuming this delivery."""
        req = build_request(
            self.run_id,
            None,
            payload,
            final=True,
            confidence=confidence,
            tool_results=tool_results,
            warnings=warnings,
            state_delta=state_delta,
        )
        return await self.send(req)

    async def judge(self, score: float, reason: str) -> Receipt:
        """Answers a judge request: `score` in [0, 1] and why."""
        return await self.final(pb.JudgeVerdict(score=score, reason=reason))

    async def send(self, req: pb.HandoffRequest) -> Receipt:
        """Sends a raw `HandoffRequest` as a complete-and-handoff of this delivery:
        fills in the run, the source agent, `consumes` and the trace context.
        A second handoff to the same target with the same idempotency key from
        this delivery is refused here (`InvalidArgumentError`)."""
        if not req.run_id:
            req.run_id = self.run_id
        if not req.source_agent:
            req.source_agent = self.agent
        req.consumes = self.id
        tc = dict(req.trace_context)
        self._continue_trace(tc)
        req.trace_context.clear()
        req.trace_context.update(tc)
        target = "" if req.final else (_TO_BARRIER if req.to_barrier else req.target_agent)
        for made in self._made:
            if made.target == target and made.idempotency_key == req.idempotency_key:
                to = (
                    "the run's final result"
                    if not target
                    else "its barrier"
                    if target == _TO_BARRIER
                    else f"agent {target!r}"
                )
                raise error(
                    ErrorKind.INVALID_ARGUMENT,
                    f"this delivery already handed off to {to} with idempotency key "
                    f"{made.idempotency_key!r} (handoff {made.handoff_id}); give each handoff "
                    "from one delivery a distinct idempotency key",
                )
        receipt = await self._sub._client._send_handoff(req)
        if not req.fan_out:
            # Settled by the broker; a fan-out handoff is settled by `ack`.
            self._sub._client._mark_finished(self.agent, self.handoff_id)
            self._settled = True
        if not any(m.handoff_id == receipt.handoff_id for m in self._made):
            self._made.append(_Made(target, req.idempotency_key, receipt.handoff_id))
        return receipt

    # ------------------------------------------------------------ barriers

    async def to_barrier(
        self,
        result: Message,
        *,
        confidence: float | None = None,
        warnings: Iterable[str] = (),
        tool_results: Iterable[ToolResult] = (),
        state_delta: StateDelta | None = None,
    ) -> Receipt:
        """Complete-and-handoff of this branch's `result` to its barrier (status
        ARRIVED). `InvalidArgumentError` when the delivery is on no branch."""
        return await self._branch_result(
            result,
            pb.BRANCH_STATUS_ARRIVED,
            confidence=confidence,
            warnings=warnings,
            tool_results=tool_results,
            state_delta=state_delta,
        )

    async def skip_branch(self, reason: str) -> Receipt:
        """Reports this branch SKIPPED, with `reason` as its warning and payload."""
        return await self._branch_result(
            wrappers_pb2.StringValue(value=reason), pb.BRANCH_STATUS_SKIPPED, warnings=[reason]
        )

    async def fail_branch(self, reason: str) -> Receipt:
        """Reports this branch FAILED, with `reason` as its warning and payload:
        the run goes on and the release lists the branch as failed."""
        return await self._branch_result(
            wrappers_pb2.StringValue(value=reason), pb.BRANCH_STATUS_FAILED, warnings=[reason]
        )

    async def _branch_result(
        self,
        payload: Message,
        status: pb.BranchStatus.ValueType,
        *,
        confidence: float | None = None,
        warnings: Iterable[str] = (),
        tool_results: Iterable[ToolResult] = (),
        state_delta: StateDelta | None = None,
    ) -> Receipt:
        branch = self.barrier_branch
        if branch is None:
            raise error(
                ErrorKind.INVALID_ARGUMENT,
                f"handoff {self.handoff_id} is on no barrier branch",
            )
        req = build_request(
            self.run_id,
            None,
            payload,
            confidence=confidence,
            warnings=warnings,
            tool_results=tool_results,
            state_delta=state_delta,
        )
        req.to_barrier = True
        req.barrier_id, req.branch_key = branch
        req.branch_status = status
        return await self.send(req)

    async def fan_out(
        self,
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
    ) -> FanOutReceipt:
        """A fan-out that consumes this delivery: one branch handoff of each item
        to `worker_agent`, joined at a barrier that releases to `aggregator`. The
        broker acks this delivery once every branch is stored; a planner that
        stops half-way is redelivered its input and its repeated fan-out meets
        the same barrier (the branches are answered as duplicates).

        Example::

            await delivery.fan_out("worker", subtasks, aggregator="aggregator", mode=quorum(3))
        """
        tc: dict[str, str] = {}
        self._continue_trace(tc)
        req = fan_out_request(
            run_id=self.run_id,
            worker=worker_agent,
            aggregator=aggregator,
            items=items,
            source_agent=self.agent,
            consumes=self.id,
            consumed_handoff_id=self.handoff_id,
            trace_context=tc,
            mode=mode,
            keys=keys,
            barrier_id=barrier_id,
            timeout=timeout,
            release_partial=release_partial,
            fail_fast=fail_fast,
        )
        receipt = await self._sub._client._send_fan_out(req)
        self._sub._client._mark_finished(self.agent, self.handoff_id)
        self._settled = True
        for key, branch in zip(receipt.keys, receipt.branches, strict=True):
            if not any(m.handoff_id == branch.handoff_id for m in self._made):
                self._made.append(
                    _Made(worker_agent, f"fan-out/{receipt.barrier_id}/{key}", branch.handoff_id)
                )
        return receipt
