"""Workers: handlers declared with `@agent`, run by a `Worker`.

A handler is `async def handle(payload, ctx) -> ...`. What it returns settles
its delivery:

- a protobuf message: handed to the agent's `then` target if it names one,
  else to the delivery's barrier when it is on a branch, else the run's final
  result;
- `Handoff(target, message, ...)`, `Final(message, ...)` or `FanOut(...)`:
  that complete-and-handoff;
- `None`: an ack (unless the handler settled the delivery itself through
  `ctx.delivery`).

An exception nacks the delivery (redelivered, to any instance, until its
attempts run out), backing off with jitter from `retry_delay`, except a
`HandoffError` whose disposition is terminal (a refusal that can never
succeed, such as `STATE_TOO_LARGE` or `DEPTH_CAP`, raised by the handler's own
calls or by settling what it returned): that rejects the delivery with the
reason and its metadata, so the run fails at once naming them and nothing is
retried; a conflict is retried at once. `Reject(reason)` rejects it (the run
fails, its owner is told). While a handler runs, its lease is extended before it ends.
`Worker.run` stops on SIGTERM or SIGINT: no new delivery is taken, running
handlers finish, and those still running at the drain timeout are nacked.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import random
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeAlias, TypeVar

import grpc
from google.protobuf.message import Message

from ._barrier import ALL, JoinMode
from ._client import Client
from ._errors import Disposition, ErrorKind, HandoffError, error
from ._handoff import Final, Handoff
from ._state import StateDelta
from ._subscription import Delivery, Pinned, Subscription
from ._values import JsonValue, Seconds, seconds

log = logging.getLogger("handoff.worker")

P = TypeVar("P", bound=Message)


class Reject(Exception):
    """Raised by a handler: the delivery is rejected with `reason` (terminal; the
    run fails and its owner is told) instead of nacked."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        """Why (recorded on the run)."""


@dataclass
class FanOut:
    """A handler's return value that fans its delivery out: one branch per item
    to `worker`, joined at a barrier releasing to `aggregator`."""

    worker: str
    """The agent each branch goes to."""
    items: Sequence[Message]
    """One branch per item."""
    aggregator: str
    """The agent that receives the release."""
    mode: JoinMode = ALL
    """`ALL` or `quorum(k)`."""
    keys: Sequence[str] | None = None
    """Branch keys (default: "0", "1", ...)."""
    timeout: Seconds | None = None
    """Release (as a failure unless `release_partial`) when it passes."""
    release_partial: bool = False
    """At the timeout, release what arrived."""


Outcome: TypeAlias = Message | Handoff | Final | FanOut | None
"""What a handler may return."""


class Context:
    """What a handler knows beside its payload: the delivery and the client."""

    def __init__(self, delivery: Delivery, client: Client) -> None:
        self.delivery = delivery
        """The delivery being handled (settle it yourself if you need to)."""
        self.client = client
        """The worker's client."""

    @property
    def run_id(self) -> str:
        """The run."""
        return self.delivery.run_id

    @property
    def handoff_id(self) -> str:
        """The handoff being handled."""
        return self.delivery.handoff_id

    @property
    def attempt(self) -> int:
        """1 on the first delivery, 2 on the first redelivery..."""
        return self.delivery.attempt

    @property
    def pinned(self) -> Pinned:
        """The run's pinned context."""
        return self.delivery.pinned

    @property
    def state(self) -> dict[str, JsonValue]:
        """The run state the delivery carries."""
        return self.delivery.state

    def state_delta(self) -> StateDelta:
        """An empty delta based on the delivery's revision."""
        return self.delivery.state_delta()


Handler = Callable[[Any, Context], Awaitable[Outcome]]


@dataclass
class AgentHandler(Generic[P]):
    """A handler bound to its agent (what `@agent` makes); still callable."""

    fn: Callable[[P, Context], Awaitable[Outcome]]
    """The decorated function."""
    name: str
    """The agent."""
    accepts: type[P] | None
    """The payload type (the agent's contract), or `None` for the raw delivery's."""
    emits: list[type[Message]] = field(default_factory=list)
    """Contracts it sends."""
    then: str | None = None
    """Where a returned plain message goes (see the module's doc)."""
    lease: Seconds | None = None
    """The agent's lease when the worker registers it."""
    max_attempts: int = 0
    """The agent's attempts when the worker registers it."""
    fallback: str | None = None
    """The agent's fallback when the worker registers it."""
    reads: list[str] = field(default_factory=list)
    """Run-state keys it reads."""

    async def __call__(self, payload: P, ctx: Context) -> Outcome:
        return await self.fn(payload, ctx)


def agent(
    name: str,
    *,
    accepts: type[P] | None = None,
    emits: Sequence[type[Message]] = (),
    then: str | None = None,
    lease: Seconds | None = None,
    max_attempts: int = 0,
    fallback: str | None = None,
    reads: Sequence[str] = (),
) -> Callable[[Callable[[P, Context], Awaitable[Outcome]]], AgentHandler[P]]:
    """Declares a handler for agent `name`, taking payloads of type `accepts`.

    Example::

        @agent("worker", accepts=Subtask, emits=[WorkerResult])
        async def work(task: Subtask, ctx: Context) -> WorkerResult:
            return WorkerResult(index=task.index, summary=f"did {task.instruction}")

        await Worker(client, [work]).run(instances=4)
    """

    def wrap(fn: Callable[[P, Context], Awaitable[Outcome]]) -> AgentHandler[P]:
        return AgentHandler(
            fn=fn,
            name=name,
            accepts=accepts,
            emits=list(emits),
            then=then,
            lease=lease,
            max_attempts=max_attempts,
            fallback=fallback,
            reads=list(reads),
        )

    return wrap


class Worker:
    """Runs `@agent` handlers: `instances` competing subscriptions per agent,
    each handling one delivery at a time.

    Example::

        worker = Worker(client, [plan, work, aggregate])
        await worker.run(instances=4)   # until SIGTERM / SIGINT or worker.stop()
    """

    def __init__(
        self,
        client: Client,
        handlers: Sequence[AgentHandler[Any]],
        *,
        register: bool = True,
        drain_timeout: Seconds = 10.0,
        instance_prefix: str | None = None,
        retry_delay: Seconds | None = None,
    ) -> None:
        """`register`: declare each agent (accepts, emits, lease...) before
        subscribing; `drain_timeout`: how long running handlers may take to finish
        once stopped; `retry_delay`: the first nack delay after a handler failed
        retryably (doubled per attempt up to 30 s, jittered; default 0.25 s)."""
        self.client = client
        self.handlers = list(handlers)
        self.register = register
        self.drain_timeout = seconds(drain_timeout)
        self.retry_delay = retry_delay
        self.prefix = instance_prefix or f"{socket.gethostname()}-{os.getpid()}"
        self._stop = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()
        self._subs: list[Subscription] = []
        self.ready = asyncio.Event()
        """Set once every agent is registered and subscribed."""

    def stop(self) -> None:
        """Stops taking deliveries; `run` returns once running handlers finished
        (or were nacked at the drain timeout)."""
        self._stop.set()

    async def run(self, instances: int = 1, *, handle_signals: bool = True) -> None:
        """Subscribes `instances` times per agent and handles deliveries until
        `stop()`, SIGTERM or SIGINT, then drains."""
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(sig, self.stop)
                    installed.append(sig)
        try:
            if self.register:
                for h in self.handlers:
                    await self.client.register_agent(
                        h.name,
                        accepts=h.accepts,
                        emits=h.emits,
                        lease=h.lease,
                        max_attempts=h.max_attempts,
                        fallback=h.fallback,
                        reads=h.reads,
                    )
            loops = []
            for h in self.handlers:
                for i in range(instances):
                    sub = await self.client.subscribe(h.name, f"{self.prefix}-{h.name}-{i}", 1)
                    self._subs.append(sub)
                    loops.append(loop.create_task(self._instance(h, sub)))
            self.ready.set()
            await self._stop.wait()
            await self._drain(loops)
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            for sub in self._subs:
                # Deliveries that came in during the drain go back now.
                for d in sub.pending():
                    with contextlib.suppress(HandoffError):
                        await d.nack()
                await sub.close()
            self._subs.clear()

    async def _instance(self, handler: AgentHandler[Any], sub: Subscription) -> None:
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            while not self._stop.is_set():
                nxt = asyncio.ensure_future(sub.__anext__())
                done, _ = await asyncio.wait({nxt, stop}, return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    nxt.cancel()
                    with contextlib.suppress(BaseException):
                        await nxt
                    break
                try:
                    delivery = nxt.result()
                except StopAsyncIteration:
                    break
                except HandoffError as e:
                    log.warning("subscription of %s ended: %s", handler.name, e)
                    break
                if self._stop.is_set():
                    with contextlib.suppress(HandoffError):
                        await delivery.nack()
                    break
                task = asyncio.get_running_loop().create_task(self._handle(handler, delivery))
                self._running.add(task)
                try:
                    await asyncio.shield(task)
                except asyncio.CancelledError:
                    if not task.done():
                        raise
                finally:
                    self._running.discard(task)
        finally:
            stop.cancel()
            # Deliveries that came in but will not be handled go back now.
            for d in sub.pending():
                with contextlib.suppress(HandoffError):
                    await d.nack()

    async def _drain(self, loops: list[asyncio.Task[None]]) -> None:
        running = set(self._running)
        if running:
            _, late = await asyncio.wait(running, timeout=self.drain_timeout)
            for task in late:
                task.cancel()
            if late:
                log.warning("drain timeout: %d handler(s) cancelled and nacked", len(late))
                await asyncio.wait(late, timeout=SETTLE_GRACE)
        if loops:
            await asyncio.wait(loops, timeout=SETTLE_GRACE)
            for t in loops:
                t.cancel()

    async def _handle(self, handler: AgentHandler[Any], delivery: Delivery) -> None:
        keeper = asyncio.get_running_loop().create_task(_keep_leased(delivery))
        try:
            try:
                payload: Any = (
                    delivery.payload(handler.accepts)
                    if handler.accepts is not None
                    else delivery.raw.handoff.payload
                )
            except HandoffError as e:
                # It can never succeed, on any instance: reject it.
                keeper.cancel()
                await delivery.reject(f"{e.message} (agent {handler.name})")
                return
            work = asyncio.ensure_future(handler(payload, Context(delivery, self.client)))
            # A cancelled run cancels its handler (CancelledError inside it);
            # nothing else cancels `work` alone.
            delivery._on_cancel.append(work.cancel)
            if delivery.cancelled:
                work.cancel()
            try:
                await asyncio.wait({work})
            except asyncio.CancelledError:
                # The worker is stopping: the handler is cancelled and its
                # delivery goes back to the agent's other instances.
                keeper.cancel()
                work.cancel()
                with contextlib.suppress(BaseException):
                    # Within the drain's own grace, so the nack below goes
                    # out before the drain gives up on this task.
                    await asyncio.wait({work}, timeout=SETTLE_GRACE / 2)
                if not delivery.settled:
                    with contextlib.suppress(HandoffError):
                        await asyncio.shield(delivery.nack())
                raise
            keeper.cancel()
            if work.cancelled() and delivery.cancelled:
                log.info(
                    "handler of %s stopped: run %s was cancelled (%s)",
                    handler.name,
                    delivery.run_id,
                    delivery.cancel_reason,
                )
                if not delivery.settled:
                    await delivery._ack_quietly()
                return
            try:
                # A handler that ended in CancelledError of its own fails
                # like any other exception.
                if work.cancelled():
                    raise RuntimeError("the handler was cancelled")
                outcome = work.result()
            except Reject as r:
                keeper.cancel()
                if not delivery.settled:
                    await delivery.reject(r.reason)
                return
            except Exception as e:
                keeper.cancel()
                log.warning(
                    "handler of %s failed on handoff %s (attempt %d): %r",
                    handler.name,
                    delivery.handoff_id,
                    delivery.attempt,
                    e,
                )
                if not delivery.settled:
                    await self._fail(delivery, e)
                return
            keeper.cancel()
            try:
                await _settle(handler, delivery, outcome)
            except Exception as e:
                log.warning(
                    "settling handoff %s of %s failed: %r", delivery.handoff_id, handler.name, e
                )
                if not delivery.settled:
                    await self._fail(delivery, e)
        except Exception as e:
            # The settlement itself failed (the broker away, the lease gone):
            # the delivery comes back when its lease passes.
            log.warning(
                "settling handoff %s of %s failed: %r", delivery.handoff_id, handler.name, e
            )
        finally:
            keeper.cancel()

    async def _fail(self, delivery: Delivery, e: Exception) -> None:
        """Settles a delivery whose work failed with `e`: a terminal refusal
        rejects it with the reason and its metadata; a conflict nacks it for at
        once; anything else nacks it after a backoff with jitter."""
        disposition = e.disposition if isinstance(e, HandoffError) else Disposition.RETRYABLE
        if isinstance(e, HandoffError) and _own_credentials(e):
            log.error("refused for this worker's credentials, not the run's fault: %s", e)
            disposition = Disposition.RETRYABLE
        if disposition is Disposition.TERMINAL:
            assert isinstance(e, HandoffError)
            await delivery.reject(e.summary())
        elif disposition is Disposition.CONFLICT:
            await delivery.nack()
        elif disposition is Disposition.RETRYABLE:
            await delivery.nack(retry_delay(delivery.attempt, self.retry_delay))
        # SUPERSEDED: the delivery is no longer this worker's; nothing to settle.


SETTLE_GRACE = 5.0


def _own_credentials(e: HandoffError) -> bool:
    """Whether `e` refuses the worker's own credentials (not the run's fault)."""
    return e.code == grpc.StatusCode.UNAUTHENTICATED or e.reason == "NOT_GRANTED"


def retry_delay(attempt: int, base: Seconds | None = None) -> float:
    """Seconds before attempt `attempt + 1` after a retryable failure: `base`
    (default 0.25 s) doubled per attempt, spread by a random factor in
    [0.5, 1.5) so that instances failing together do not retry together, and
    at most 30 s."""
    first = seconds(base) if base is not None else 0.25
    delay: float = first * 2.0 ** min(max(attempt - 1, 0), 20)
    return min(delay * (0.5 + random.random()), 30.0)


async def _settle(handler: AgentHandler[Any], delivery: Delivery, outcome: Outcome) -> None:
    """Turns a handler's return value into the settlement of its delivery."""
    if outcome is None:
        if not delivery.settled:
            await delivery.ack()
    elif isinstance(outcome, Handoff):
        await delivery.handoff(
            outcome.target,
            outcome.payload,
            idempotency_key=outcome.idempotency_key,
            confidence=outcome.confidence,
            tool_results=outcome.tool_results,
            warnings=outcome.warnings,
            state_delta=outcome.state_delta,
            asks_for=outcome.asks_for,
        )
    elif isinstance(outcome, Final):
        await delivery.final(
            outcome.payload,
            confidence=outcome.confidence,
            tool_results=outcome.tool_results,
            warnings=outcome.warnings,
            state_delta=outcome.state_delta,
        )
    elif isinstance(outcome, FanOut):
        await delivery.fan_out(
            outcome.worker,
            outcome.items,
            aggregator=outcome.aggregator,
            mode=outcome.mode,
            keys=outcome.keys,
            timeout=outcome.timeout,
            release_partial=outcome.release_partial,
        )
    elif isinstance(outcome, Message):
        if handler.then:
            await delivery.handoff(handler.then, outcome)
        elif delivery.barrier_branch is not None:
            await delivery.to_barrier(outcome)
        else:
            await delivery.final(outcome)
    else:
        raise error(
            ErrorKind.INVALID_ARGUMENT,
            f"handler of {handler.name} returned a {type(outcome).__name__}: return a message, "
            "Handoff, Final, FanOut or None",
        )


async def _keep_leased(delivery: Delivery) -> None:
    """Extends the delivery's lease at half of what is left, until cancelled."""
    deadline = delivery.lease_deadline
    while True:
        now = dt.datetime.now(dt.timezone.utc)
        left = (deadline - now).total_seconds() if deadline is not None else 30.0
        await asyncio.sleep(max(left / 2, 0.2))
        try:
            deadline = await delivery.extend()
        except HandoffError as e:
            log.warning("extending the lease of handoff %s failed: %s", delivery.handoff_id, e)
            if e.kind in (ErrorKind.CLOSED, ErrorKind.FAILED_PRECONDITION):
                return
