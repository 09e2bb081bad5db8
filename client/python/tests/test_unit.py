"""Unit tests: no server."""

from __future__ import annotations

import collections
import datetime as dt

import grpc
import pytest
from google.protobuf import any_pb2, struct_pb2
from google.rpc import error_details_pb2, status_pb2

from handoff import (
    ALL,
    ConflictError,
    DecodeError,
    ErrorKind,
    HandoffError,
    InvalidArgumentError,
    StateDelta,
    descriptor_set,
    intent_digest,
    quorum,
)
from handoff._barrier import Join, default_barrier_id, fan_out_request
from handoff._client import _event_kind, _target, new_run_id
from handoff._errors import from_settled, from_status
from handoff._values import from_value, pack, to_value, unpack
from handoff.demo.v1.demo_pb2 import Ask, Subtask, WorkerResult
from handoff.v1 import handoff_pb2 as pb


def test_json_values_round_trip() -> None:
    value = {"a": [1, 2.5, "x", None, True], "b": {"c": -3}, "d": ""}
    assert from_value(to_value(value)) == value
    assert to_value(True).WhichOneof("kind") == "bool_value"
    assert to_value(2).number_value == 2.0
    with pytest.raises(InvalidArgumentError):
        to_value(object())  # type: ignore[arg-type]


def test_state_delta_builds_every_operation() -> None:
    d = (
        StateDelta.based_on(3)
        .set("city", "Oslo")
        .set("nights", 2)
        .append("notes", ["a", "b"])
        .merge("profile", {"name": "Ann"})
        .unset("draft")
        .to_proto()
    )
    assert d.base_revision == 3
    assert d.set["city"].string_value == "Oslo"
    assert d.set["nights"].number_value == 2.0
    assert len(d.append["notes"].values) == 2
    assert d.merge["profile"].fields["name"].string_value == "Ann"
    assert list(d.unset) == ["draft"]
    assert StateDelta().is_empty()
    assert not StateDelta().to_proto().HasField("base_revision")


def test_intent_digest_changes_with_the_ask_fields_and_pinned_values() -> None:
    def pinned(ask: str, b: str = "2") -> pb.PinnedContext:
        return pb.PinnedContext(ask=ask, fields={"a": "1", "b": b})

    def state(v: str) -> pb.RunState:
        return pb.RunState(pinned_keys=["order_id"], values={"order_id": to_value(v)})

    base = intent_digest(pinned("find flights"), None)
    assert base == intent_digest(pinned("find flights"), None)
    assert len(base) == 64
    assert base != intent_digest(pinned("find hotels"), None)
    assert base != intent_digest(pinned("find flights", b="3"), None)
    with_state = intent_digest(pinned("find flights"), state("A-1"))
    assert with_state != base
    assert with_state != intent_digest(pinned("find flights"), state("A-2"))
    # No ambiguity between the ask and the fields.
    a = pb.PinnedContext(ask="x\n1:y")
    b = pb.PinnedContext(ask="x", fields={"y": ""})
    assert intent_digest(a, None) != intent_digest(b, None)
    # No pinned context is the empty one.
    assert intent_digest(None, None) == intent_digest(pb.PinnedContext(), None)


def test_descriptor_set_holds_the_file_and_its_imports() -> None:
    fds = descriptor_set(pb.HandoffEnvelope)
    names = [f.name for f in fds.file]
    assert names[-1] == "handoff/v1/handoff.proto"
    assert "google/protobuf/any.proto" in names
    assert names.index("google/protobuf/any.proto") < names.index("handoff/v1/handoff.proto")
    demo = descriptor_set(Subtask)
    assert [f.name for f in demo.file] == ["handoff/demo/v1/demo.proto"]


def test_payloads_are_type_checked() -> None:
    any_msg = pack(Subtask(index=1, instruction="read"))
    assert any_msg.type_url == "type.googleapis.com/handoff.demo.v1.Subtask"
    assert unpack(any_msg, Subtask).instruction == "read"
    with pytest.raises(DecodeError) as e:
        unpack(any_msg, Ask)
    assert e.value.kind is ErrorKind.DECODE


def _status_details(reason: str, metadata: dict[str, str], field: str | None = None) -> bytes:
    status = status_pb2.Status(code=9, message="m")
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="handoff.v1", metadata=metadata))
    status.details.append(info)
    if field:
        bad = any_pb2.Any()
        bad.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=field, description="bad")
                ]
            )
        )
        status.details.append(bad)
    return status.SerializeToString()


def test_errors_carry_kind_reason_metadata_and_field_violations() -> None:
    err = from_status(
        grpc.StatusCode.FAILED_PRECONDITION,
        "run r1 is at depth 5",
        _status_details("DEPTH_CAP", {"depth": "5", "max_depth": "5"}),
    )
    assert err.kind is ErrorKind.FAILED_PRECONDITION
    assert err.code is grpc.StatusCode.FAILED_PRECONDITION
    assert err.reason == "DEPTH_CAP"
    assert err.metadata == {"depth": "5", "max_depth": "5"}
    assert str(err).startswith("FAILED_PRECONDITION [DEPTH_CAP]: ")
    bad = from_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        "bad key",
        _status_details("INVALID_NAME", {"field": "x"}, field="branches[2].branch_key"),
    )
    assert isinstance(bad, InvalidArgumentError)
    assert [v.field for v in bad.field_violations] == ["branches[2].branch_key"]
    conflict = from_status(grpc.StatusCode.ABORTED, "stale", _status_details("STATE_CONFLICT", {}))
    assert isinstance(conflict, ConflictError) and conflict.kind is ErrorKind.CONFLICT
    garbage = from_status(grpc.StatusCode.INTERNAL, "x", b"\xff\xff")
    assert garbage.kind is ErrorKind.OTHER and garbage.reason is None
    settled = from_settled(3, "not ours", "BAD_DELIVERY_ID")
    assert settled.kind is ErrorKind.INVALID_ARGUMENT and settled.reason == "BAD_DELIVERY_ID"
    assert isinstance(settled, HandoffError)


def test_default_barrier_id_is_deterministic() -> None:
    items = [pack(Subtask(index=i)) for i in range(3)]

    def bid(**kw: object) -> str:
        args: dict[str, object] = dict(
            run_id="r",
            consumed_handoff_id=None,
            worker="w",
            aggregator="a",
            mode=ALL,
            named_keys=False,
            keys=["0", "1", "2"],
            items=items,
        )
        args.update(kw)
        return default_barrier_id(**args)  # type: ignore[arg-type]

    assert bid() == bid()
    assert bid().startswith("join-") and len(bid()) == len("join-") + 16
    assert bid() != bid(mode=quorum(2))
    assert bid() != bid(items=items[:2], keys=["0", "1"])
    # From a delivery: identified by the delivery, not the items.
    assert bid(consumed_handoff_id="h") == bid(consumed_handoff_id="h", items=items[:1])


def test_fan_out_request_counts_branches_by_default() -> None:
    req = fan_out_request(
        run_id="r",
        worker="w",
        aggregator="a",
        items=[Subtask(index=i) for i in range(3)],
        source_agent="",
        consumes=None,
        consumed_handoff_id=None,
        trace_context={},
        mode=ALL,
        keys=None,
        barrier_id=None,
        timeout=dt.timedelta(seconds=5),
        release_partial=False,
        fail_fast=False,
    )
    assert req.barrier.branch_count == 3 and not req.barrier.branch_keys
    assert req.barrier.mode == pb.BARRIER_MODE_ALL
    assert req.barrier.on_timeout == pb.ON_TIMEOUT_FAIL
    assert req.barrier.timeout.seconds == 5
    assert [b.branch_key for b in req.branches] == ["0", "1", "2"]
    assert all(not b.fan_out and not b.consumes for b in req.branches)
    assert req.branches[1].idempotency_key == f"fan-out/{req.barrier.barrier_id}/1"


def test_join_decodes_branches_in_order() -> None:
    release = pb.BarrierRelease(
        run_id="r",
        barrier_id="b",
        branches=[
            pb.BranchResult(
                key="0", status=pb.BRANCH_STATUS_ARRIVED, payload=pack(WorkerResult(index=0))
            ),
            pb.BranchResult(key="1", status=pb.BRANCH_STATUS_MISSING),
            pb.BranchResult(
                key="2",
                status=pb.BRANCH_STATUS_FAILED,
                payload=pack(struct_pb2.Value(string_value="boom")),
            ),
        ],
        missing=["1"],
        failed=["2"],
        confidence=1 / 3,
    )
    join = Join.from_release(release, WorkerResult)
    assert [k for k, _ in join.results()] == ["0"]
    branch = join.branch("2")
    assert branch is not None and branch.result is None
    assert join.missing == ["1"]
    wrong = pb.BarrierRelease(
        branches=[pb.BranchResult(key="0", status=pb.BRANCH_STATUS_ARRIVED, payload=pack(Ask()))]
    )
    with pytest.raises(DecodeError):
        Join.from_release(wrong, WorkerResult)


def test_addresses_event_kinds_and_run_ids() -> None:
    assert _target("127.0.0.1:7233", False) == ("127.0.0.1:7233", False)
    assert _target("https://broker:7233", False) == ("broker:7233", True)
    assert _target("broker:7233", True) == ("broker:7233", True)
    with pytest.raises(InvalidArgumentError):
        _target("http://broker:7233", True)
    assert _event_kind("handoff_accepted") == pb.EVENT_KIND_HANDOFF_ACCEPTED
    assert _event_kind("EVENT_KIND_ACKED") == pb.EVENT_KIND_ACKED
    with pytest.raises(InvalidArgumentError):
        _event_kind("nope")
    a, b = new_run_id(), new_run_id()
    assert a != b and a[14] == "7"


def test_dispositions_come_from_the_brokers_table_else_from_the_kind() -> None:
    from handoff import Disposition, HandoffError
    from handoff._errors import ErrorKind, error

    def refused(reason: str, **metadata: str) -> HandoffError:
        return HandoffError(
            "x", kind=ErrorKind.FAILED_PRECONDITION, reason=reason, metadata=metadata
        )

    assert refused("STATE_TOO_LARGE").disposition is Disposition.TERMINAL
    assert refused("STATE_CONFLICT").disposition is Disposition.CONFLICT
    assert refused("NATS_UNAVAILABLE").disposition is Disposition.RETRYABLE
    assert refused("LEASE_SUPERSEDED").disposition is Disposition.SUPERSEDED
    # A reason a newer broker may send, and errors of the SDK's own, by kind.
    assert refused("SOMETHING_NEW").disposition is Disposition.TERMINAL
    assert error(ErrorKind.UNAVAILABLE, "down").disposition is Disposition.RETRYABLE
    assert error(ErrorKind.OTHER, "stream reset").disposition is Disposition.RETRYABLE
    assert error(ErrorKind.CONFLICT, "stale").disposition is Disposition.CONFLICT
    assert error(ErrorKind.DECODE, "bad").disposition is Disposition.TERMINAL
    big = refused("STATE_TOO_LARGE", size="81046", key="messages", limit="65536")
    assert big.summary() == "STATE_TOO_LARGE key=messages limit=65536 size=81046"
    assert error(ErrorKind.OTHER, "plain").summary() == "plain"


def test_retry_delays_double_jitter_and_stay_under_thirty_seconds() -> None:
    from handoff._worker import retry_delay

    for _ in range(200):
        assert 0.125 <= retry_delay(1) < 0.375
        assert 1.0 <= retry_delay(4) < 3.0
        assert retry_delay(60) <= 30.0
        assert 0.1 <= retry_delay(1, 0.2) < 0.3
    assert len({retry_delay(3) for _ in range(20)}) > 1


def test_a_langchain_message_keeps_one_id_and_json_values() -> None:
    pytest.importorskip("langchain_core")
    import datetime as dt

    from langchain_core.messages import AIMessage

    from handoff._values import from_value, langchain_message, to_value

    m = AIMessage(content="hi", additional_kwargs={"at": dt.datetime(2026, 1, 2, 3, 4, 5)})
    first, second = langchain_message(m), langchain_message(m)
    assert first is not None and first == second, "serialized twice, one id"
    assert m.id and first["data"]["id"] == m.id  # type: ignore[index,call-overload]
    stored = from_value(to_value(first))
    assert stored == first


async def test_a_delivery_whose_intent_digest_does_not_match_is_rejected_unless_trusted() -> None:
    from handoff._client import Client as _Client
    from handoff._state import intent_digest
    from handoff._subscription import INTENT_MISMATCH, Subscription
    from handoff.v1 import handoff_pb2 as hpb

    pinned = hpb.PinnedContext(ask="keep to the ask")
    good = intent_digest(pinned, None)
    broken = hpb.Delivery(delivery_id="d1", pinned=pinned, pinned_digest="0" + good[1:])
    broken.handoff.id = "h1"
    broken.handoff.run_id = "r1"
    client = _Client.__new__(_Client)
    client._finished = collections.OrderedDict()
    sent: list[hpb.SubscribeRequest] = []

    async def send(req: hpb.SubscribeRequest) -> hpb.Settled:
        sent.append(req)
        return hpb.Settled()

    for verify in (True, False):
        sub = Subscription(client, "reader", "r1", 1, verify_intent=verify)
        sub._send = send  # type: ignore[method-assign]
        sent.clear()
        await sub._resolve(broken)
        yielded = not sub._deliveries.empty()
        if verify:
            assert not yielded
            assert [r.WhichOneof("command") for r in sent] == ["reject"]
            assert sent[0].reject.reason.startswith(INTENT_MISMATCH)
        else:
            assert yielded and sent == []
        client._finished.clear()
    intact = hpb.Delivery(delivery_id="d2", pinned=pinned, pinned_digest=good)
    intact.handoff.id = "h2"
    sub = Subscription(client, "reader", "r1", 1)
    sub._send = send  # type: ignore[method-assign]
    sent.clear()
    await sub._resolve(intact)
    assert not sub._deliveries.empty() and sent == []
