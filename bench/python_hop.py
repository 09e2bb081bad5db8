"""Per-hop latency of complete-and-handoff from the Python SDK, next to the Rust
SDK's, against one broker in the same run.

    cargo build --release -p handoffd
    cargo build --release -p handoff-client --example hop_chain
    target/python-venv/bin/python bench/python_hop.py            # about a minute

It starts one `handoffd` (`HANDOFF_BIN`, default `target/release/handoffd`) on
its embedded default: a `nats-server` child (on `PATH`), its store in a
temporary directory, gRPC on a free loopback port read back from its log.
Against it, for `--rounds` rounds, it runs the same chain twice, in turns (the
first SDK alternates from round to round):

- Python: agents `chain-py-0` .. `chain-py-<N-1>` (no contract); for each of
  `--runs` runs, one after another, a run is started, a `Subtask` with a
  `--payload`-byte instruction is handed to the first agent, and each agent in
  turn takes its delivery and hands the same payload to the next with
  `delivery.handoff(next, ...)` (complete-and-handoff); the last one ends the
  run with `delivery.final(...)`. A hop is the time from one agent's delivery
  to the next one's. The first `--warmup` runs are not measured.
- Rust: the same chain by `client/examples/hop_chain.rs` (`HOP_CHAIN_BIN`,
  default `target/release/examples/hop_chain`), a process of its own.

It prints the p50, p90 and p99 of each, and the ratio Python / Rust.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from handoff import Client, Subscription
from handoff.demo.v1.demo_pb2 import Subtask

REPO = Path(__file__).resolve().parents[1]
SERVING = re.compile(r'"message":"handoffd serving".*?"addr":"([^"]+)"')
START_WAIT = 30.0


@dataclass
class Figures:
    """Percentiles of one chain, in milliseconds."""

    sdk: str
    hops: int
    p50: float
    p90: float
    p99: float


def percentile(sorted_us: list[int], q: float) -> float:
    """The `q` quantile (nearest rank) of sorted microseconds, in milliseconds."""
    i = min(max(math.ceil(len(sorted_us) * q), 1), len(sorted_us)) - 1
    return sorted_us[i] / 1000.0


def start_broker(binary: Path, data: Path) -> tuple[subprocess.Popen[bytes], str]:
    """handoffd on its embedded default, and the address its log says it serves on."""
    log = data / "handoffd.log"
    env = dict(os.environ)
    env.update(
        {
            "HANDOFF_DATA_DIR": str(data / "data"),
            "HANDOFF_LISTEN": "127.0.0.1:0",
            "HANDOFF_LOG_FORMAT": "json",
            "RUST_LOG": "info",
        }
    )
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [str(binary)], env=env, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink
        )
    end = time.monotonic() + START_WAIT
    while time.monotonic() < end:
        m = SERVING.search(log.read_text(errors="replace"))
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    stop(proc)
    raise RuntimeError(f"handoffd did not start; its log:\n{log.read_text(errors='replace')}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM by PID (the broker drains and stops its nats-server), then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


async def python_chain(addr: str, agents: int, runs: int, warmup: int, payload: int) -> Figures:
    """The chain driven by the Python SDK."""
    async with await Client.connect(addr) as client:
        names = [f"chain-py-{i}" for i in range(agents)]
        subs: list[Subscription] = []
        for name in names:
            await client.register_agent(name)
            subs.append(await client.subscribe(name, "bench", 1))
        task = Subtask(index=0, of=1, instruction="x" * payload)
        hops: list[int] = []
        for run_n in range(warmup + runs):
            run = await client.start_run("bench", max_depth=agents + 1)
            await client.handoff(run.id, names[0], task)
            last: int | None = None
            for i, sub in enumerate(subs):
                d = await sub.__anext__()
                now = time.perf_counter_ns()
                if d.run_id != run.id:
                    raise RuntimeError(f"{names[i]} got a handoff of another run")
                if last is not None and run_n >= warmup:
                    hops.append((now - last) // 1000)
                last = now
                if i + 1 < len(names):
                    await d.handoff(names[i + 1], task)
                else:
                    await d.final(task)
        for sub in subs:
            await sub.close()
    hops.sort()
    return Figures(
        "python", len(hops), percentile(hops, 0.5), percentile(hops, 0.9), percentile(hops, 0.99)
    )


def rust_chain(
    binary: Path, addr: str, agents: int, runs: int, warmup: int, payload: int
) -> Figures:
    """The chain driven by the Rust SDK (hop_chain), a process of its own."""
    out = subprocess.run(
        [
            str(binary),
            "--addr",
            f"http://{addr}",
            "--agents",
            str(agents),
            "--runs",
            str(runs),
            "--warmup",
            str(warmup),
            "--payload",
            str(payload),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return Figures("rust", got["hops"], got["p50_ms"], got["p90_ms"], got["p99_ms"])


def main() -> int:
    """Parses the arguments, starts the broker, runs both chains in turns."""
    parser = argparse.ArgumentParser(description="Python vs Rust SDK per-hop latency")
    parser.add_argument("--agents", type=int, default=5, help="agents in the chain")
    parser.add_argument("--runs", type=int, default=500, help="measured runs per chain")
    parser.add_argument("--warmup", type=int, default=20, help="runs not measured first")
    parser.add_argument("--payload", type=int, default=1024, help="bytes per handoff")
    parser.add_argument("--rounds", type=int, default=2, help="Python and Rust turns")
    args = parser.parse_args()
    broker_bin = Path(os.environ.get("HANDOFF_BIN", REPO / "target/release/handoffd"))
    chain_bin = Path(
        os.environ.get("HOP_CHAIN_BIN", REPO / "target/release/examples/hop_chain")
    )
    for b in (broker_bin, chain_bin):
        if not b.is_file():
            print(f"python_hop: no {b} (build it, or name it; see --help)", file=sys.stderr)
            return 1
    sizes = (args.agents, args.runs, args.warmup, args.payload)
    with tempfile.TemporaryDirectory() as tmp:
        proc, addr = start_broker(broker_bin, Path(tmp))
        try:
            print(
                f"handoffd {broker_bin} on {addr}; chain of {args.agents} agents, "
                f"{args.payload}-byte payloads, {args.runs} runs per chain "
                f"({args.runs * (args.agents - 1)} hops)",
                flush=True,
            )
            print(f"{'':<14}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}   hops", flush=True)
            for r in range(args.rounds):
                figures: dict[str, Figures] = {}
                for sdk in ("python", "rust") if r % 2 == 0 else ("rust", "python"):
                    if sdk == "python":
                        f = asyncio.run(python_chain(addr, *sizes))
                    else:
                        f = rust_chain(chain_bin, addr, *sizes)
                    figures[sdk] = f
                py, rs = figures["python"], figures["rust"]
                for f in (py, rs):
                    name = f"{f.sdk} ({r + 1})"
                    print(f"{name:<14}{f.p50:>9.3f}{f.p90:>9.3f}{f.p99:>9.3f}   {f.hops}")
                print(
                    f"{'ratio py/rs':<14}{py.p50 / rs.p50:>8.2f}x{py.p90 / rs.p90:>8.2f}x"
                    f"{py.p99 / rs.p99:>8.2f}x",
                    flush=True,
                )
        finally:
            stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
