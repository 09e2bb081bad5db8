"""Large payloads by reference through the Python SDK: a 16 MiB payload is
stored by reference, fetched and checked by the SDK, delivered intact, and
forwarded to a next hop without being uploaded again."""

from __future__ import annotations

import hashlib
import os

from google.protobuf import wrappers_pb2

from handoff import Client, Delivery, NotFoundError, Subscription

from .conftest import WAIT, uniq


async def take(sub: Subscription) -> Delivery:
    d = await sub.next(WAIT)
    assert d is not None, "no delivery in time"
    return d


async def test_a_16_mib_payload_is_delivered_intact_and_forwarded(client: Client) -> None:
    first, second = uniq("reader"), uniq("next")
    for agent in (first, second):
        await client.register_agent(agent)
    run = await client.start_run("tests")
    sent = wrappers_pb2.BytesValue(value=os.urandom(16 << 20))
    encoded = sent.SerializeToString()
    await client.handoff(run.id, first, sent)

    async with await client.subscribe(first, "i1") as sub:
        d = await take(sub)
        ref = d.payload_ref
        assert ref is not None, "a 16 MiB payload travels by reference"
        assert ref.size == len(encoded)
        assert ref.sha256 == hashlib.sha256(encoded).hexdigest()
        assert ref.name == f"{run.id}/{ref.sha256}"
        assert d.payload(wrappers_pb2.BytesValue).value == sent.value
        receipt = await d.forward_to(second)
        assert receipt.depth == 2

    async with await client.subscribe(second, "i1") as sub:
        d = await take(sub)
        assert d.payload_ref == ref, "forwarded by reference, not uploaded again"
        assert d.payload(wrappers_pb2.BytesValue).value == sent.value
        await d.ack()

    # The run's owner may read it directly; a name that is not stored is
    # refused by reason.
    fetched = await client.get_payload(run.id, ref)
    assert fetched.value == encoded
    missing = type(ref)(
        name=f"{run.id}/{'0' * 64}", size=ref.size, sha256="0" * 64, type_url=ref.type_url
    )
    try:
        await client.get_payload(run.id, missing)
    except NotFoundError as e:
        assert e.reason == "PAYLOAD_NOT_FOUND"
    else:
        raise AssertionError("a payload that is not stored was answered")
