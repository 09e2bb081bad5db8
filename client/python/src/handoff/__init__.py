"""Python SDK for the handoff broker (`handoffd`): durable, typed, observable
handoffs between agents.

Example::

    from handoff import Client
    from handoff.demo.v1.demo_pb2 import Subtask

    async with await Client.connect("127.0.0.1:7233") as client:
        await client.register_agent("worker")
        run = await client.start_run("me", ask="Summarise the report")
        await client.handoff(run.id, "worker", Subtask(instruction="page 1"))
        async with await client.subscribe("worker", "worker-1") as deliveries:
            async for delivery in deliveries:
                task = delivery.payload(Subtask)
                await delivery.final(task)      # complete-and-handoff: the run's result
                break

Workers declare handlers with `@agent` and run them with `Worker`; every
failure is a `HandoffError` with a `kind` and the broker's `reason`. The
`handoff.v1` messages are in `handoff.v1.handoff_pb2`.
"""

from ._barrier import ALL, Branch, FanOutReceipt, Join, JoinMode, quorum
from ._client import Client, MergePolicy, TlsConfig, Watch
from ._contract import Compatibility, RegisteredContract, descriptor_set
from ._errors import (
    AlreadyExistsError,
    ClosedError,
    ConflictError,
    ConnectError,
    DecodeError,
    Disposition,
    ErrorKind,
    FailedPreconditionError,
    FieldViolation,
    HandoffError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    TimedOutError,
    UnavailableError,
)
from ._handoff import Final, Handoff, Receipt, ToolResult
from ._state import RunState, StateDelta, intent_digest
from ._subscription import Delivery, Pinned, Subscription
from ._values import JsonValue
from ._worker import AgentHandler, Context, FanOut, Reject, Worker, agent

__all__ = [
    "ALL",
    "AgentHandler",
    "AlreadyExistsError",
    "Branch",
    "Client",
    "ClosedError",
    "Compatibility",
    "ConflictError",
    "ConnectError",
    "Context",
    "DecodeError",
    "Delivery",
    "Disposition",
    "ErrorKind",
    "FailedPreconditionError",
    "FanOut",
    "FanOutReceipt",
    "FieldViolation",
    "Final",
    "Handoff",
    "HandoffError",
    "InvalidArgumentError",
    "Join",
    "JoinMode",
    "JsonValue",
    "MergePolicy",
    "NotFoundError",
    "PermissionDeniedError",
    "Pinned",
    "Receipt",
    "RegisteredContract",
    "Reject",
    "RunState",
    "StateDelta",
    "Subscription",
    "TimedOutError",
    "TlsConfig",
    "ToolResult",
    "UnavailableError",
    "Watch",
    "Worker",
    "agent",
    "descriptor_set",
    "intent_digest",
    "quorum",
]
