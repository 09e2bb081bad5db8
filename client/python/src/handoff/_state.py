"""The run state from an agent's side: the `StateDelta` a handoff carries, a
`RunState` read back, and the intent digest every delivery carries."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ._values import JsonValue, from_timestamp, from_values, to_list, to_struct, to_value
from .v1 import handoff_pb2 as pb


class StateDelta:
    """Explicit changes to a run's state, applied by the broker atomically with
    the handoff that carries them. The builder methods return the delta, so
    they chain.

    Made from a delivery (`delivery.state_delta()`) it is based on the revision
    that delivery carried: a key it replaces or removes that another handoff
    changed since is refused with `ConflictError` (reason `STATE_CONFLICT`);
    disjoint keys, appends and merges combine. Without a base revision it
    writes over whatever is held.

    Example::

        delta = delivery.state_delta().set("city", "Rome").append("notes", ["booked"])
        await delivery.handoff("writer", draft, state_delta=delta)
    """

    def __init__(self, base_revision: int | None = None) -> None:
        self._delta = pb.StateDelta()
        if base_revision is not None:
            self._delta.base_revision = base_revision

    @classmethod
    def based_on(cls, revision: int) -> StateDelta:
        """An empty delta based on `revision` (conflicts are detected from it)."""
        return cls(base_revision=revision)

    @property
    def base_revision(self) -> int | None:
        """The revision the delta was made from, if any."""
        return self._delta.base_revision if self._delta.HasField("base_revision") else None

    def set(self, key: str, value: JsonValue) -> StateDelta:
        """Writes `value` to `key` through the key's merge policy."""
        self._delta.set[key].CopyFrom(to_value(value))
        return self

    def append(self, key: str, items: Iterable[JsonValue]) -> StateDelta:
        """Appends `items` to the list held by `key` (a new list if absent)."""
        self._delta.append[key].CopyFrom(to_list(list(items)))
        return self

    def merge(self, key: str, fields: Mapping[str, JsonValue]) -> StateDelta:
        """Merges `fields` into the struct held by `key` (a new struct if absent),
        one level deep."""
        self._delta.merge[key].CopyFrom(to_struct(fields))
        return self

    def unset(self, key: str) -> StateDelta:
        """Removes `key`."""
        self._delta.unset.append(key)
        return self

    def is_empty(self) -> bool:
        """Whether it changes nothing."""
        d = self._delta
        return not (d.set or d.append or d.merge or d.unset)

    def to_proto(self) -> pb.StateDelta:
        """The delta as sent (a copy)."""
        out = pb.StateDelta()
        out.CopyFrom(self._delta)
        return out

    def __repr__(self) -> str:
        d = self._delta
        return (
            f"StateDelta(base_revision={self.base_revision}, set={sorted(d.set)}, "
            f"append={sorted(d.append)}, merge={sorted(d.merge)}, unset={list(d.unset)})"
        )


@dataclass(frozen=True)
class RunState:
    """A run's state at one revision, as `Client.get_state` reads it."""

    run_id: str
    """The run."""
    revision: int
    """This revision (1 for the seed)."""
    values: dict[str, JsonValue]
    """The state document."""
    pinned_keys: list[str]
    """Keys no delta may change or remove."""
    latest_revision: int
    """The run's latest revision."""
    handoff_id: str
    """The handoff whose delta made this revision (empty for the seed)."""
    source_agent: str
    """The agent that made it."""
    at: dt.datetime | None
    """When."""
    added: list[str] = field(default_factory=list)
    """Keys this revision added."""
    changed: list[str] = field(default_factory=list)
    """Keys this revision changed."""
    removed: list[str] = field(default_factory=list)
    """Keys this revision removed."""
    raw: pb.GetStateResponse = field(default_factory=pb.GetStateResponse, repr=False)
    """The broker's answer as it came."""

    @classmethod
    def from_proto(cls, resp: pb.GetStateResponse) -> RunState:
        """From a `GetStateResponse`."""
        s = resp.state
        return cls(
            run_id=s.run_id,
            revision=s.revision,
            values=from_values(s.values),
            pinned_keys=list(s.pinned_keys),
            latest_revision=resp.latest_revision,
            handoff_id=resp.handoff_id,
            source_agent=resp.source_agent,
            at=from_timestamp(resp.at) if resp.HasField("at") else None,
            added=list(resp.change.added),
            changed=list(resp.change.changed),
            removed=list(resp.change.removed),
            raw=resp,
        )


def intent_digest(pinned: pb.PinnedContext | None, state: pb.RunState | None) -> str:
    """The `handoff.v1` intent digest: a hex SHA-256 of the pinned context and the
    pinned state keys, byte for byte what the broker computes
    (`proto/src/digest.rs`).

    The encoding: `handoff.v1 intent`, the ask, the number of pinned fields and
    each field's name and value in byte order of the names, the number of pinned
    state keys and each key with its value's canonical protobuf encoding; each
    item written as its length in decimal, `:`, its bytes and a newline.

    Example::

        assert intent_digest(d.raw.pinned, d.raw.state) == d.raw.pinned_digest
    """
    h = hashlib.sha256()

    def item(data: bytes) -> None:
        h.update(str(len(data)).encode())
        h.update(b":")
        h.update(data)
        h.update(b"\n")

    item(b"handoff.v1 intent")
    item((pinned.ask if pinned is not None else "").encode())
    fields = sorted(
        ((k.encode(), v.encode()) for k, v in pinned.fields.items()) if pinned is not None else ()
    )
    item(str(len(fields)).encode())
    for k, v in fields:
        item(k)
        item(v)
    keys = sorted({k.encode() for k in state.pinned_keys}) if state is not None else []
    item(str(len(keys)).encode())
    for key in keys:
        item(key)
        name = key.decode()
        if state is not None and name in state.values:
            item(state.values[name].SerializeToString(deterministic=True))
        else:
            item(b"")
    return h.hexdigest()


def intent_intact(delivery: pb.Delivery) -> bool:
    """Whether a delivery's intent digest matches its pinned context and pinned
    state keys (a delivery without a digest has nothing to check)."""
    if not delivery.pinned_digest:
        return True
    pinned = delivery.pinned if delivery.HasField("pinned") else None
    state = delivery.state if delivery.HasField("state") else None
    return delivery.pinned_digest == intent_digest(pinned, state)
