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


async def test_a_judge_gets_a_result_that_came_by_reference(client: Client) -> None:
    worker, judge = uniq("big-result"), uniq("judge")
    await client.register_agent(worker)
    await client.register_agent(judge)
    run = await client.start_run("tests", ask="write it all", judge=(judge, 0.5))
    await client.handoff(run.id, worker, wrappers_pb2.StringValue(value="go"))
    result = wrappers_pb2.BytesValue(value=os.urandom(1 << 20))
    async with await client.subscribe(worker, "i1") as sub:
        await (await take(sub)).final(result)
    ended = (await client.get_run(run.id)).run
    assert ended.HasField("result_ref"), "a 1 MiB result travels by reference"
    async with await client.subscribe(judge, "j1") as sub:
        d = await take(sub)
        request = d.judge_request()
        assert request is not None and not request.HasField("result")
        assert request.result_ref == ended.result_ref
        got = await d.judge_result()
        assert got is not None and got.value == result.SerializeToString()
        await d.judge(0.9, "complete")
