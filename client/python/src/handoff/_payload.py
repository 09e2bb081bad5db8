"""Payloads by reference: a payload over the broker's `max_inline_payload` (up
to its `max_payload_size`) travels as a `PayloadRef` (name, size, SHA-256, type
URL) and is read with `GetPayload`. The SDK resolves every reference a delivery
carries before handing it to the application (the envelope's payload, and the
branch results of a barrier release), checking each against its size and
digest, so `Delivery.payload` and `Delivery.join` read it as if inline."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from ._errors import ErrorKind, HandoffError, error
from .v1 import handoff_pb2 as pb

Fetch = Callable[[str, pb.PayloadRef, str], Awaitable[any_pb2.Any]]
"""Fetches a payload: (run id, reference, delivery id) -> the payload."""

_RELEASE = pb.BarrierRelease.DESCRIPTOR.full_name


def check(reference: pb.PayloadRef, value: bytes, digest: str) -> None:
    """Raises a `DecodeError` when `value` (with SHA-256 `digest`) is not what
    `reference` says."""
    if len(value) != reference.size or digest != reference.sha256:
        raise error(
            ErrorKind.DECODE,
            f"payload {reference.name} does not match its reference ({reference.size} bytes, "
            f"SHA-256 {reference.sha256}): fetched {len(value)} bytes, SHA-256 {digest}",
        )


async def sha256_hex(value: bytes) -> str:
    """The lowercase hex SHA-256 of `value`, off the event loop when large."""
    if len(value) < 1 << 16:
        return hashlib.sha256(value).hexdigest()
    return await asyncio.to_thread(lambda: hashlib.sha256(value).hexdigest())


def _release(envelope: pb.HandoffEnvelope) -> pb.BarrierRelease | None:
    if not envelope.HasField("payload") or not envelope.payload.type_url.endswith("/" + _RELEASE):
        return None
    release = pb.BarrierRelease()
    try:
        release.ParseFromString(envelope.payload.value)
    except DecodeError:
        return None  # join says why it does not decode
    return release


def has_references(delivery: pb.Delivery) -> bool:
    """Whether a delivery carries payloads by reference to resolve."""
    h = delivery.handoff
    if not h.HasField("payload") and h.HasField("payload_ref"):
        return True
    release = _release(h)
    return release is not None and any(b.HasField("payload_ref") for b in release.branches)


async def resolve(fetch: Fetch, delivery: pb.Delivery) -> HandoffError | None:
    """Fills in every payload `delivery` carries by reference, in place (the
    references stay, so the payload can be forwarded without uploading it
    again); the error when one could not be fetched."""
    h = delivery.handoff
    try:
        if not h.HasField("payload") and h.HasField("payload_ref"):
            h.payload.CopyFrom(await fetch(h.run_id, h.payload_ref, delivery.delivery_id))
        release = _release(h)
        if release is None:
            return None
        changed = False
        for branch in release.branches:
            if not branch.HasField("payload") and branch.HasField("payload_ref"):
                branch.payload.CopyFrom(
                    await fetch(h.run_id, branch.payload_ref, delivery.delivery_id)
                )
                changed = True
        if changed:
            h.payload.Pack(release)
    except HandoffError as e:
        return e
    return None
