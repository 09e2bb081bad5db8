"""The `handoff.v1.HandoffBroker` methods as typed `grpc.aio` callables.

Built directly on the channel rather than through the generated
`handoff_pb2_grpc` module, whose import demands a grpcio at least as new as
the grpcio-tools that generated it.
"""

from __future__ import annotations

from typing import TypeVar

import grpc.aio
from google.protobuf.message import Message

from .v1 import handoff_pb2 as pb

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)

SERVICE = "/handoff.v1.HandoffBroker/"


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


class Stub:
    """One callable per RPC the SDK uses."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        def unary(
            name: str, req: type[Req], resp: type[Resp]
        ) -> grpc.aio.UnaryUnaryMultiCallable[Req, Resp]:
            return channel.unary_unary(SERVICE + name, _serialize, resp.FromString)

        self.register_contract = unary(
            "RegisterContract", pb.RegisterContractRequest, pb.RegisterContractResponse
        )
        self.get_contract = unary("GetContract", pb.GetContractRequest, pb.GetContractResponse)
        self.register_agent = unary(
            "RegisterAgent", pb.RegisterAgentRequest, pb.RegisterAgentResponse
        )
        self.list_agents = unary("ListAgents", pb.ListAgentsRequest, pb.ListAgentsResponse)
        self.list_instances = unary(
            "ListInstances", pb.ListInstancesRequest, pb.ListInstancesResponse
        )
        self.start_run = unary("StartRun", pb.StartRunRequest, pb.StartRunResponse)
        self.handoff = unary("Handoff", pb.HandoffRequest, pb.HandoffResponse)
        self.fan_out = unary("FanOut", pb.FanOutRequest, pb.FanOutResponse)
        self.get_barrier = unary("GetBarrier", pb.GetBarrierRequest, pb.GetBarrierResponse)
        self.get_run = unary("GetRun", pb.GetRunRequest, pb.GetRunResponse)
        self.list_runs = unary("ListRuns", pb.ListRunsRequest, pb.ListRunsResponse)
        self.cancel_run = unary("CancelRun", pb.CancelRunRequest, pb.CancelRunResponse)
        self.get_handoff = unary("GetHandoff", pb.GetHandoffRequest, pb.GetHandoffResponse)
        self.redrive_dead_letter = unary(
            "RedriveDeadLetter", pb.RedriveDeadLetterRequest, pb.RedriveDeadLetterResponse
        )
        self.fork_run = unary("ForkRun", pb.ForkRunRequest, pb.ForkRunResponse)
        self.await_input = unary("AwaitInput", pb.AwaitInputRequest, pb.AwaitInputResponse)
        self.provide_input = unary("ProvideInput", pb.ProvideInputRequest, pb.ProvideInputResponse)
        self.get_state = unary("GetState", pb.GetStateRequest, pb.GetStateResponse)
        self.list_dead_letters = unary(
            "ListDeadLetters", pb.ListDeadLettersRequest, pb.ListDeadLettersResponse
        )
        self.get_payload: grpc.aio.UnaryStreamMultiCallable[
            pb.GetPayloadRequest, pb.PayloadChunk
        ] = channel.unary_stream(SERVICE + "GetPayload", _serialize, pb.PayloadChunk.FromString)
        self.watch: grpc.aio.UnaryStreamMultiCallable[pb.WatchRequest, pb.Event] = (
            channel.unary_stream(SERVICE + "Watch", _serialize, pb.Event.FromString)
        )
        self.subscribe: grpc.aio.StreamStreamMultiCallable[
            pb.SubscribeRequest, pb.SubscribeResponse
        ] = channel.stream_stream(
            SERVICE + "Subscribe", _serialize, pb.SubscribeResponse.FromString
        )
