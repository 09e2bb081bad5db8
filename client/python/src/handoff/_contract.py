"""Contracts: a protobuf message type registered with its rules, and the
`FileDescriptorSet` that defines it, taken from the generated class."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from google.protobuf import descriptor_pb2
from google.protobuf.message import Message

from ._errors import ErrorKind, error
from ._values import Seconds, to_duration
from .v1 import handoff_pb2 as pb

Compatibility = Literal["NONE", "BACKWARD", "FORWARD", "FULL"]
"""How a new version of a contract must relate to the one before it."""

_COMPATIBILITY: dict[str, pb.Compatibility.ValueType] = {
    "NONE": pb.COMPATIBILITY_NONE,
    "BACKWARD": pb.COMPATIBILITY_BACKWARD,
    "FORWARD": pb.COMPATIBILITY_FORWARD,
    "FULL": pb.COMPATIBILITY_FULL,
}


def descriptor_set(message_class: type[Message]) -> descriptor_pb2.FileDescriptorSet:
    """The `FileDescriptorSet` of the file defining `message_class` and every
    file it imports, dependencies first.

    Example::

        fds = descriptor_set(Subtask)
        assert fds.file[-1].name == "handoff/demo/v1/demo.proto"
    """
    out = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()

    # A FileDescriptor (the pure-Python or the upb one, typed apart).
    def add(f: Any) -> None:
        if f.name in seen:
            return
        seen.add(f.name)
        for dep in f.dependencies:
            add(dep)
        proto = out.file.add()
        f.CopyToProto(proto)

    add(message_class.DESCRIPTOR.file)
    return out


def full_name(message_type: type[Message] | str) -> str:
    """The full protobuf name of a message class (or the name itself)."""
    if isinstance(message_type, str):
        return message_type
    return message_type.DESCRIPTOR.full_name


def contract_request(
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
) -> pb.RegisterContractRequest:
    """The `RegisterContractRequest` of `message_class` with these rules."""
    req = pb.RegisterContractRequest(
        message_type=full_name(message_class),
        version=version,
        file_descriptor_set=descriptor_set(message_class).SerializeToString(),
    )
    if compatibility is not None:
        mode = _COMPATIBILITY.get(compatibility.upper())
        if mode is None:
            raise error(
                ErrorKind.INVALID_ARGUMENT,
                f"compatibility {compatibility!r} is not one of {sorted(_COMPATIBILITY)}",
            )
        req.compatibility = mode
    rules = pb.ContractRules(
        required_fields=list(require),
        max_tokens=max_tokens,
        max_bytes=max_bytes,
        carry=list(carry),
    )
    if min_confidence is not None:
        rules.min_confidence = min_confidence
    if max_tool_result_age is not None:
        rules.max_tool_result_age.CopyFrom(to_duration(max_tool_result_age))
    if rules.ByteSize() > 0:
        req.rules.CopyFrom(rules)
    return req


@dataclass(frozen=True)
class RegisteredContract:
    """What the broker answered to `Client.register_contract`."""

    contract: pb.Contract
    """The version as stored (its number, fingerprint, registration time)."""
    created: bool
    """False when this exact content was already registered (a no-op)."""

    @property
    def version(self) -> int:
        """The contract version."""
        return self.contract.version
