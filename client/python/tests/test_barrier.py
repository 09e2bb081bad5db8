"""Fan-out and join through a real broker."""

from __future__ import annotations

import asyncio

from handoff import Client, Delivery, Subscription, quorum
from handoff.demo.v1.demo_pb2 import Ask, Report, Subtask, WorkerResult
from handoff.v1 import handoff_pb2 as pb

from .conftest import WAIT, bounded, uniq


async def take(sub: Subscription, timeout: float = WAIT) -> Delivery:
    d = await sub.next(timeout)
    assert d is not None, "no delivery in time"
    return d


async def test_fan_out_of_20_branches_joins_once_in_key_order(client: Client) -> None:
    planner, worker, aggregator = uniq("planner"), uniq("worker"), uniq("aggregator")
    await client.register_agent(planner, accepts=Ask, emits=[Subtask])
    await client.register_agent(worker, accepts=Subtask, emits=[WorkerResult])
    await client.register_agent(aggregator, emits=[Report])
    run = await client.start_run("tests", ask="twenty things")
    await client.handoff(run.id, planner, Ask(question="twenty things", max_subtasks=20))

    async with await client.subscribe(planner, "p1") as sub:
        ask = await take(sub)
        tasks = [Subtask(index=i, of=20, instruction=f"part {i}") for i in range(20)]
        fanned = await ask.fan_out(worker, tasks, aggregator=aggregator)
        assert fanned.keys == [str(i) for i in range(20)]
        assert not any(b.duplicate for b in fanned.branches)
        # A redo from the same delivery meets the same barrier: no second join.
        redo = await ask.fan_out(worker, tasks[:3], aggregator=aggregator)
        assert redo.barrier_id == fanned.barrier_id
        assert [b.handoff_id for b in redo.branches] == [b.handoff_id for b in fanned.branches]
        assert all(b.duplicate for b in redo.branches)

    workers = [await client.subscribe(worker, f"w{i}", 4) for i in range(3)]

    async def work(sub: Subscription) -> None:
        async for d in sub:
            task = d.payload(Subtask)
            assert d.barrier_branch == (fanned.barrier_id, str(task.index))
            await d.to_barrier(WorkerResult(index=task.index, of=20, summary=f"did {task.index}"))

    running = [asyncio.create_task(work(s)) for s in workers]
    try:
        async with await client.subscribe(aggregator, "a1") as agg:
            release = await take(agg, 60)
            join = release.join(WorkerResult)
            assert join.barrier_id == fanned.barrier_id
            assert [b.key for b in join.branches] == [str(i) for i in range(20)]
            assert [r.index for _, r in join.results()] == list(range(20))
            assert join.confidence == 1.0 and not join.missing and not join.failure
            await release.final(Report(answer="20", results=[r for _, r in join.results()]))
            assert await agg.next(1.0) is None  # exactly one release
    finally:
        for s in workers:
            await s.close()
        await bounded(asyncio.gather(*running))
    got = await client.get_run(run.id)
    assert got.run.status == pb.RUN_STATUS_COMPLETED
    barrier = await client.get_barrier(run.id, fanned.barrier_id)
    assert barrier.state == pb.BARRIER_STATE_RELEASED and len(barrier.branches) == 20


async def test_skipped_and_failed_branches_and_quorum(client: Client) -> None:
    worker, aggregator = uniq("worker"), uniq("aggregator")
    await client.register_agent(worker, accepts=Subtask, emits=[WorkerResult])
    await client.register_agent(aggregator)
    run = await client.start_run("tests")
    tasks = [Subtask(index=i, instruction=f"part {i}") for i in range(4)]
    fanned = await client.fan_out(
        run.id, worker, tasks, aggregator=aggregator, keys=["a", "b", "c", "d"], mode=quorum(2)
    )
    again = await client.fan_out(
        run.id, worker, tasks, aggregator=aggregator, keys=["a", "b", "c", "d"], mode=quorum(2)
    )
    assert again.barrier_id == fanned.barrier_id and all(b.duplicate for b in again.branches)
    async with await client.subscribe(worker, "w1", 4) as sub:
        seen = {}
        for _ in range(4):
            d = await take(sub)
            seen[d.barrier_branch[1] if d.barrier_branch else ""] = d
        await seen["a"].skip_branch("nothing to do")
        await seen["b"].fail_branch("tool down")
        await seen["c"].to_barrier(WorkerResult(index=2, summary="c"))
        await seen["d"].to_barrier(WorkerResult(index=3, summary="d"))
    async with await client.subscribe(aggregator, "a1") as agg:
        release = await take(agg)
        join = release.join(WorkerResult)
        assert join.skipped == ["a"] and join.failed == ["b"]
        assert [k for k, _ in join.results()] == ["c", "d"]
        b = join.branch("b")
        assert b is not None and b.warnings == ["tool down"] and b.result is None
        await release.ack()
