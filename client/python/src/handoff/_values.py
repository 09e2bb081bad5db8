"""Plain Python values to and from protobuf: JSON-like values as
`google.protobuf.Value`, messages as `google.protobuf.Any`, durations and
timestamps."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from typing import TypeAlias, TypeVar, cast

from google.protobuf import any_pb2, duration_pb2, struct_pb2, timestamp_pb2
from google.protobuf.message import DecodeError as _ProtoDecodeError
from google.protobuf.message import Message

from ._errors import ErrorKind, error

JsonValue: TypeAlias = (
    bool
    | int
    | float
    | str
    | list["JsonValue"]
    | tuple["JsonValue", ...]
    | dict[str, "JsonValue"]
    | None
)
"""A JSON-like value: what run state holds (`None`, `bool`, numbers, `str`,
lists and dicts of them)."""

Seconds: TypeAlias = dt.timedelta | float | int
"""A duration: a `timedelta`, or seconds."""

M = TypeVar("M", bound=Message)

TYPE_URL_PREFIX = "type.googleapis.com/"

# Numbers come back as `int` when they are integral and exact in a double.
_EXACT = 2**53


def to_value(value: JsonValue) -> struct_pb2.Value:
    """A `google.protobuf.Value` from a JSON-like Python value (or a LangChain
    message: see `langchain_message`)."""
    out = struct_pb2.Value()
    if value is None:
        out.null_value = struct_pb2.NULL_VALUE
    elif isinstance(value, bool):
        out.bool_value = value
    elif isinstance(value, (int, float)):
        out.number_value = float(value)
    elif isinstance(value, str):
        out.string_value = value
    elif isinstance(value, (list, tuple)):
        out.list_value.CopyFrom(to_list(value))
    elif isinstance(value, Mapping):
        out.struct_value.CopyFrom(to_struct(value))
    elif (message := langchain_message(value)) is not None:
        out.struct_value.CopyFrom(to_struct(message))
    else:
        raise error(
            ErrorKind.INVALID_ARGUMENT,
            f"{type(value).__name__} is not a JSON-like value "
            "(None, bool, number, str, list, dict)",
        )
    return out


def langchain_message(value: object) -> dict[str, JsonValue] | None:
    """A LangChain message (`HumanMessage`, `AIMessage`, ...) in LangChain's own
    serialized form, `{"type": ..., "data": {...}}` (as `message_to_dict`
    writes it, its data in JSON mode; what `messages_from_dict` restores as the
    same message), with an id assigned to the message when it has none, so that
    no later hop mints another; `None` for any other value."""
    if not type(value).__module__.startswith("langchain_core."):
        return None
    try:
        from langchain_core.messages import BaseMessage
    except ImportError:  # pragma: no cover - a langchain_core object without it
        return None
    if not isinstance(value, BaseMessage):
        return None
    if value.id is None:
        # On the message itself: serialized again, it keeps this id.
        value.id = str(uuid.uuid4())
    data = value.model_dump(mode="json")
    return {"type": value.type, "data": cast(JsonValue, data)}


def to_list(items: list[JsonValue] | tuple[JsonValue, ...]) -> struct_pb2.ListValue:
    """A `google.protobuf.ListValue` of JSON-like Python values."""
    out = struct_pb2.ListValue()
    for item in items:
        out.values.append(to_value(item))
    return out


def to_struct(fields: Mapping[str, JsonValue]) -> struct_pb2.Struct:
    """A `google.protobuf.Struct` of JSON-like Python values."""
    out = struct_pb2.Struct()
    for key, item in fields.items():
        if not isinstance(key, str):
            raise error(ErrorKind.INVALID_ARGUMENT, f"struct key {key!r} is not a str")
        out.fields[key].CopyFrom(to_value(item))
    return out


def from_value(value: struct_pb2.Value) -> JsonValue:
    """The Python value of a `google.protobuf.Value` (integral numbers as `int`)."""
    kind = value.WhichOneof("kind")
    if kind == "bool_value":
        return value.bool_value
    if kind == "number_value":
        n = value.number_value
        if n.is_integer() and -_EXACT <= n <= _EXACT:
            return int(n)
        return n
    if kind == "string_value":
        return value.string_value
    if kind == "list_value":
        return [from_value(v) for v in value.list_value.values]
    if kind == "struct_value":
        return {k: from_value(v) for k, v in value.struct_value.fields.items()}
    return None


def from_values(values: Mapping[str, struct_pb2.Value]) -> dict[str, JsonValue]:
    """A dict of Python values from a map of `google.protobuf.Value`s."""
    return {k: from_value(v) for k, v in values.items()}


def seconds(value: Seconds) -> float:
    """Seconds of a duration given as a `timedelta` or a number."""
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    return float(value)


def to_duration(value: Seconds) -> duration_pb2.Duration:
    """A `google.protobuf.Duration`."""
    out = duration_pb2.Duration()
    out.FromTimedelta(dt.timedelta(seconds=seconds(value)))
    return out


def to_timestamp(when: dt.datetime) -> timestamp_pb2.Timestamp:
    """A `google.protobuf.Timestamp` (a naive datetime is taken as UTC)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(when)
    return out


def from_timestamp(ts: timestamp_pb2.Timestamp) -> dt.datetime:
    """An aware UTC datetime."""
    return ts.ToDatetime(tzinfo=dt.timezone.utc)


def pack(message: Message) -> any_pb2.Any:
    """Packs a message as a `google.protobuf.Any` (`type.googleapis.com/<full name>`)."""
    if not isinstance(message, Message):
        raise error(
            ErrorKind.INVALID_ARGUMENT,
            f"a payload must be a protobuf message, not {type(message).__name__}",
        )
    out = any_pb2.Any()
    out.Pack(message)
    return out


def type_name(type_url: str) -> str:
    """The message type an `Any` type URL names (what follows its last `/`)."""
    return type_url.rsplit("/", 1)[-1]


def unpack(any_msg: any_pb2.Any, cls: type[M]) -> M:
    """Unpacks `any_msg` as `cls`, checking its type; `DecodeError` when it is another."""
    expected = cls.DESCRIPTOR.full_name
    actual = type_name(any_msg.type_url)
    if actual != expected:
        raise error(
            ErrorKind.DECODE,
            f"payload of type {any_msg.type_url!r} does not decode as {expected}",
        )
    out = cls()
    try:
        out.ParseFromString(any_msg.value)
    except _ProtoDecodeError as e:
        raise error(ErrorKind.DECODE, f"payload does not decode as {expected}: {e}") from e
    return out
