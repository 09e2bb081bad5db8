"""Fan-out and join: parallel branches that meet at a barrier.

A planner hands a list of items to a worker agent, one branch per item, and
names the agent that receives the joined results (`Client.fan_out`,
`Delivery.fan_out`): the broker opens the barrier and stores every branch in
one `FanOut` call. Each worker answers its branch with `Delivery.to_barrier`
(or `skip_branch` / `fail_branch`). When the barrier is satisfied the
aggregator receives exactly one delivery whose payload is a `BarrierRelease`;
`Delivery.join(WorkerResult)` decodes it into a `Join` of typed results in
branch-key order.

Without an explicit `barrier_id` a fan-out gets a deterministic one (the same
as the Rust SDK's): derived from the delivery it consumes, so a planner that is
redelivered its input meets the barrier of its first fan-out; or, with no
delivery consumed, from what it hands out, so a retry opens the same barrier.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from google.protobuf import any_pb2
from google.protobuf.message import Message

from ._errors import ErrorKind, error
from ._handoff import Receipt
from ._values import Seconds, from_timestamp, pack, to_duration, type_name, unpack
from .v1 import handoff_pb2 as pb

T = TypeVar("T", bound=Message)


@dataclass(frozen=True)
class JoinMode:
    """How a fan-out's barrier releases: `ALL`, or `quorum(k)`."""

    quorum: int = 0
    """0: when every branch arrived, failed or was skipped; k: at the k-th arrival."""

    def apply(self, spec: pb.BarrierSpec) -> None:
        """Sets the mode and quorum of `spec`."""
        if self.quorum:
            spec.mode = pb.BARRIER_MODE_QUORUM
            spec.quorum = self.quorum
        else:
            spec.mode = pb.BARRIER_MODE_ALL
            spec.quorum = 0


ALL = JoinMode()
"""Release when every branch has arrived, failed or been skipped."""


def quorum(k: int) -> JoinMode:
    """Release at the `k`-th arrived branch; later ones are recorded as late."""
    if k < 1:
        raise error(ErrorKind.INVALID_ARGUMENT, f"a quorum must be at least 1, not {k}")
    return JoinMode(quorum=k)


class _Fnv1a:
    """64-bit FNV-1a over length-prefixed fields (stable across processes)."""

    OFFSET = 0xCBF29CE484222325
    PRIME = 0x00000100000001B3
    MASK = (1 << 64) - 1

    def __init__(self) -> None:
        self.h = self.OFFSET

    def update(self, data: bytes) -> None:
        h = self.h
        for b in data:
            h ^= b
            h = (h * self.PRIME) & self.MASK
        self.h = h

    def field(self, data: bytes) -> None:
        self.update(len(data).to_bytes(8, "little"))
        self.update(data)


def default_barrier_id(
    *,
    run_id: str,
    consumed_handoff_id: str | None,
    worker: str,
    aggregator: str,
    mode: JoinMode,
    named_keys: bool,
    keys: Sequence[str],
    items: Sequence[any_pb2.Any],
) -> str:
    """`join-` and 16 hex digits of a hash of what makes the fan-out what it is
    (the Rust SDK's `FanOut::default_barrier_id`)."""
    h = _Fnv1a()
    h.field(b"handoff fan-out")
    h.field(run_id.encode())
    h.field((consumed_handoff_id or "").encode())
    h.field(worker.encode())
    h.field(aggregator.encode())
    if consumed_handoff_id is not None:
        return f"join-{h.h:016x}"
    if mode.quorum:
        h.field(b"quorum")
        h.field(mode.quorum.to_bytes(4, "little"))
    else:
        h.field(b"all")
    h.field(b"keys" if named_keys else b"count")
    h.field(len(keys).to_bytes(8, "little"))
    for key in keys:
        h.field(key.encode())
    for item in items:
        h.field(item.type_url.encode())
        h.field(item.value)
    return f"join-{h.h:016x}"


def branch_idempotency_key(barrier_id: str, key: str) -> str:
    """The idempotency key of a branch handoff: distinct per branch, stable."""
    return f"fan-out/{barrier_id}/{key}"


def fan_out_request(
    *,
    run_id: str,
    worker: str,
    aggregator: str,
    items: Sequence[Message],
    source_agent: str,
    consumes: str | None,
    consumed_handoff_id: str | None,
    trace_context: dict[str, str],
    mode: JoinMode,
    keys: Sequence[str] | None,
    barrier_id: str | None,
    timeout: Seconds | None,
    release_partial: bool,
    fail_fast: bool,
) -> pb.FanOutRequest:
    """The `FanOutRequest` of a fan-out: the barrier and one branch per item."""
    packed = [pack(m) for m in items]
    if not packed:
        raise error(ErrorKind.INVALID_ARGUMENT, "a fan-out needs at least one item")
    if keys is not None and len(keys) != len(packed):
        raise error(
            ErrorKind.INVALID_ARGUMENT,
            f"{len(keys)} keys for {len(packed)} items: give one key per item",
        )
    branch_keys = list(keys) if keys is not None else [str(i) for i in range(len(packed))]
    bid = barrier_id or default_barrier_id(
        run_id=run_id,
        consumed_handoff_id=consumed_handoff_id,
        worker=worker,
        aggregator=aggregator,
        mode=mode,
        named_keys=keys is not None,
        keys=branch_keys,
        items=packed,
    )
    spec = pb.BarrierSpec(
        run_id=run_id,
        barrier_id=bid,
        fail_fast=fail_fast,
        on_timeout=pb.ON_TIMEOUT_RELEASE_PARTIAL if release_partial else pb.ON_TIMEOUT_FAIL,
        target_agent=aggregator,
    )
    if timeout is not None:
        spec.timeout.CopyFrom(to_duration(timeout))
    if keys is not None:
        spec.branch_keys.extend(branch_keys)
    else:
        spec.branch_count = len(packed)
    mode.apply(spec)
    branches = [
        pb.HandoffRequest(
            run_id=run_id,
            source_agent=source_agent,
            target_agent=worker,
            payload=payload,
            barrier_id=bid,
            branch_key=key,
            idempotency_key=branch_idempotency_key(bid, key),
            fan_out=bool(consumes),
            consumes=consumes or "",
            trace_context=trace_context,
        )
        for payload, key in zip(packed, branch_keys, strict=True)
    ]
    return pb.FanOutRequest(barrier=spec, branches=branches)


@dataclass(frozen=True)
class FanOutReceipt:
    """What the broker answered to an accepted fan-out."""

    barrier_id: str
    """The barrier's id."""
    keys: list[str]
    """The branch keys, in item order."""
    branches: list[Receipt]
    """One receipt per branch (`keys[i]` is the key of `branches[i]`);
    `duplicate` when the fan-out was repeated."""
    barrier: pb.Barrier = field(repr=False)
    """The barrier as it stood after the branches were handed off."""


def receipt_keys(resp: pb.FanOutResponse, sent: list[str]) -> list[str]:
    """The keys of the barrier the broker answered with (a redo is answered
    with the first fan-out's barrier)."""
    spec = resp.barrier.spec
    if spec.branch_keys:
        return list(spec.branch_keys)
    if spec.branch_count:
        return [str(i) for i in range(spec.branch_count)]
    return sent


@dataclass(frozen=True)
class Branch(Generic[T]):
    """One branch of a `Join`."""

    key: str
    """The branch key."""
    status: pb.BranchStatus.ValueType
    """`pb.BRANCH_STATUS_ARRIVED`, `_FAILED`, `_SKIPPED` or `_MISSING`."""
    result: T | None
    """The worker's result: set for an arrived branch, and for a failed or
    skipped one whose payload is a `T`; `None` otherwise."""
    handoff_id: str
    """The branch handoff's id (empty for a missing branch)."""
    source_agent: str
    """The agent that reported the branch."""
    confidence: float
    """The branch's confidence."""
    warnings: list[str]
    """The branch's warnings (the reason of a failed or skipped branch)."""
    depth: int
    """The branch handoff's depth."""
    arrived_at: dt.datetime | None
    """When it reached the barrier."""

    @property
    def arrived(self) -> bool:
        """True for a branch that arrived with a result."""
        return self.status == pb.BRANCH_STATUS_ARRIVED


@dataclass(frozen=True)
class Join(Generic[T]):
    """A barrier's release decoded: every branch in branch-key order with the
    workers' results as `T`.

    Example::

        join = release.join(WorkerResult)
        for key, result in join.results():
            print(key, result.summary)
        print(len(join.missing), "missing; confidence", join.confidence)
    """

    run_id: str
    """The run."""
    barrier_id: str
    """The barrier that released."""
    branches: list[Branch[T]]
    """Every branch in branch-key order, missing ones included."""
    missing: list[str]
    """Keys not arrived at the release."""
    failed: list[str]
    """Keys of failed branches."""
    skipped: list[str]
    """Keys of skipped branches."""
    confidence: float
    """Arrived / expected."""
    warnings: list[str]
    """What the receiver should know."""
    failure: bool
    """True when the release is a failure (fail-fast, unreachable quorum, timeout with FAIL)."""
    timed_out: bool
    """True when the barrier's timeout released it."""

    @classmethod
    def from_release(cls, release: pb.BarrierRelease, result_type: type[T]) -> Join[T]:
        """Decodes a release: each arrived branch's result as `result_type`."""
        return cls(
            run_id=release.run_id,
            barrier_id=release.barrier_id,
            branches=[_branch(b, result_type) for b in release.branches],
            missing=list(release.missing),
            failed=list(release.failed),
            skipped=list(release.skipped),
            confidence=release.confidence,
            warnings=list(release.warnings),
            failure=release.failure,
            timed_out=release.timed_out,
        )

    def results(self) -> Iterator[tuple[str, T]]:
        """The arrived branches' results with their keys, in branch-key order."""
        for b in self.branches:
            if b.arrived and b.result is not None:
                yield b.key, b.result

    def branch(self, key: str) -> Branch[T] | None:
        """The branch with key `key`."""
        return next((b for b in self.branches if b.key == key), None)


def _branch(b: pb.BranchResult, result_type: type[T]) -> Branch[T]:
    # UNSPECIFIED is ARRIVED (a branch handoff's default); an unknown status
    # counts as FAILED, never as a result.
    status = b.status
    if status == pb.BRANCH_STATUS_UNSPECIFIED:
        status = pb.BRANCH_STATUS_ARRIVED
    elif status not in pb.BranchStatus.values():
        status = pb.BRANCH_STATUS_FAILED
    result: T | None = None
    if b.HasField("payload"):
        expected = result_type.DESCRIPTOR.full_name
        actual = type_name(b.payload.type_url)
        if actual == expected:
            try:
                result = unpack(b.payload, result_type)
            except Exception as e:
                raise error(
                    ErrorKind.DECODE, f"branch {b.key!r}: its result does not decode: {e}"
                ) from e
        elif status == pb.BRANCH_STATUS_ARRIVED:
            raise error(
                ErrorKind.DECODE, f"branch {b.key!r}: its result is a {actual}, not a {expected}"
            )
    return Branch(
        key=b.key,
        status=status,
        result=result,
        handoff_id=b.handoff_id,
        source_agent=b.source_agent,
        confidence=b.confidence,
        warnings=list(b.warnings),
        depth=b.depth,
        arrived_at=from_timestamp(b.arrived_at) if b.HasField("arrived_at") else None,
    )
