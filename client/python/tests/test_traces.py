"""One trace per run across both SDKs and the broker: the demo pipeline with
its planner and aggregator in Rust (the example, its SDK built with the
`otel` feature) and its workers in Python (examples/demo.py, with
opentelemetry-api), against a broker exporting its own spans, all to an
OTLP receiver this test runs on loopback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from .conftest import REPO, _stop, pipeline_bin, start_broker, start_nats

# The run's spans, by who makes them.
BROKER = "handoffd"
RUST = "handoff-demo-pipeline"
PYTHON = "handoff-demo-workers"


@dataclass
class Span:
    service: str
    trace: str
    id: str
    parent: str
    name: str
    kind: int
    error: bool
    attributes: dict[str, str]
    links: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)


def _attrs(kvs: object) -> dict[str, str]:
    out: dict[str, str] = {}
    for kv in kvs:  # type: ignore[attr-defined]
        v = kv.value
        out[kv.key] = str(getattr(v, v.WhichOneof("value"))) if v.WhichOneof("value") else ""
    return out


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span exported to it."""

    def __init__(self) -> None:
        self.spans: list[Span] = []

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: object
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for rs in request.resource_spans:
            service = _attrs(rs.resource.attributes).get("service.name", "")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append(
                        Span(
                            service=service,
                            trace=s.trace_id.hex(),
                            id=s.span_id.hex(),
                            parent=s.parent_span_id.hex(),
                            name=s.name,
                            kind=s.kind,
                            error=s.status.code == 2,
                            attributes=_attrs(s.attributes),
                            links=[
                                (link.trace_id.hex(), link.span_id.hex(), _attrs(link.attributes))
                                for link in s.links
                            ],
                        )
                    )
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    r = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(r, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield r, f"http://127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def test_a_fan_in_run_of_the_demo_is_one_trace_across_the_broker_and_both_sdks(
    receiver: tuple[Receiver, str],
) -> None:
    spans, endpoint = receiver
    with tempfile.TemporaryDirectory(prefix="handoff-traces-") as store:
        server = start_nats(Path(store))
        try:
            broker = start_broker(server.url, {"HANDOFF_OTLP_ENDPOINT": endpoint})
            try:
                env = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=endpoint)
                rust = subprocess.Popen(
                    [
                        str(pipeline_bin()),
                        "--addr",
                        f"http://{broker.addr}",
                        "--external-workers",
                        "--work-ms",
                        "0",
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=env,
                )
                python = subprocess.run(
                    [
                        sys.executable,
                        str(REPO / "client" / "python" / "examples" / "demo.py"),
                        "--addr",
                        broker.addr,
                    ],
                    capture_output=True,
                    text=True,
                    env=env,
                    timeout=120,
                    check=False,
                )
                out, err = rust.communicate(timeout=120)
                assert python.returncode == 0, python.stdout[-2000:] + python.stderr[-2000:]
                assert rust.returncode == 0, out[-2000:] + err[-2000:]
            finally:
                # The broker flushes its spans as it stops.
                _stop(broker.proc)
        finally:
            _stop(server.proc)
    run = re.findall(r"^run (\S+) started by demo-user$", out, re.M)[-1]

    of_run = [s for s in spans.spans if s.attributes.get("gen_ai.conversation.id") == run]
    # The two handoffs the demo shows refused are attempts of their own (each
    # its own trace, every span in it an error); the rest is one trace.
    flow = [s for s in of_run if s.trace not in {r.trace for r in of_run if r.error}]
    traces = {s.trace for s in flow}
    assert len(traces) == 1, sorted((s.service, s.name, s.trace) for s in flow)
    trace = traces.pop()
    ids = {s.id for s in flow}
    names = [(s.service, s.name) for s in flow]

    def count(service: str, name: str) -> int:
        return names.count((service, name))

    barrier = next(s for s in flow if s.name.startswith("release barrier ")).name.split()[-1]
    # The owner's call, in the Rust SDK, is the root; everything else has its
    # parent in the trace.
    roots = [s for s in flow if s.parent not in ids]
    assert [(s.service, s.name) for s in roots] == [(RUST, "handoff planner")], roots
    # Each SDK's spans are in it: the Rust planner and aggregator, the Python
    # workers.
    assert count(RUST, "process planner") >= 1
    assert count(RUST, f"fan-out {barrier}") == 1
    assert count(RUST, "process aggregator") >= 1
    assert count(RUST, "handoff (final)") == 1
    assert count(PYTHON, "process worker") >= 4
    assert count(PYTHON, f"handoff barrier {barrier}") == 4
    # And the broker's: a send per handoff, a receive per delivery.
    assert count(BROKER, "send planner") == 1
    assert count(BROKER, "send worker") == 4
    assert count(BROKER, f"send barrier {barrier}") == 4
    assert count(BROKER, "send (final)") == 1
    assert count(BROKER, "receive worker") >= 4
    assert count(BROKER, "receive aggregator") >= 1
    # The release continues the fan-out's trace (a child of the call that
    # opened the barrier) and links to each branch's handoff.
    by_id = {s.id: s for s in flow}
    release = next(s for s in flow if s.name == f"release barrier {barrier}")
    assert release.service == BROKER
    assert (by_id[release.parent].service, by_id[release.parent].name) == (
        RUST,
        f"fan-out {barrier}",
    )
    branch_sends = {s.id for s in flow if s.name == f"send barrier {barrier}"}
    linked = {span for (t, span, _) in release.links if t == trace}
    assert linked == branch_sends, (release.links, branch_sends)
    assert sorted(a.get("handoff.branch.key", "") for (_, _, a) in release.links) == [
        "0",
        "1",
        "2",
        "3",
    ]
    # The aggregator's delivery is the release's child.
    receive = next(s for s in flow if s.name == "receive aggregator")
    assert by_id[receive.parent] is release
