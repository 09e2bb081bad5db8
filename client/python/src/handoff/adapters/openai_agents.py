"""The OpenAI Agents SDK and the broker: a `Handoff` the model calls like any
other, whose invocation is a durable, typed broker handoff to a broker agent
instead of an in-process switch. Needs `pip install 'handoff[openai-agents]'`.

The handoff's input is typed by a contract, a protobuf message class:

- `broker_handoff(client, "writer", contract=Subtask, ...)`: the tool's input
  schema is made from the message's fields (a pydantic model built from its
  descriptor, see `contract_model`); the model's arguments become the message,
  field for field;
- `..., contract=Subtask, input_type=MySubtask`: a pydantic model of your own
  (descriptions, constraints) whose fields are named like the message's; its
  values (`model_dump(mode="json")`) are parsed into the message, so a field
  the message lacks is an error at construction.

Fields built from a descriptor: scalars, enums (by name), repeated fields and
nested messages; map fields and `google.protobuf.*` message fields are refused
(give `input_type` and shape those yourself). Every field is required, as the
SDK's strict schemas ask; a field with presence (proto3 `optional`, a message)
may be null, and is then left unset.

Invoked, the handoff validates the arguments (a `ModelBehaviorError` when they
do not fit, as the SDK's own handoffs), sends `client.handoff(run_id, target,
message, ...)` (accepted means durably stored), calls `on_handoff(ctx,
message, receipt)` if given, and returns control as the SDK expects: to
`then` if given, else to a stand-in agent named like the broker agent that
answers at once, without a model, with the receipt as JSON (`handoff_id`,
`run_id`, `target`, `duplicate`), which becomes the run's final output.

`Runner.run_streamed` works the same: the stand-in streams one completed
response with the receipt.

`run(client, agent, input, owner=...)` runs the agents inside a broker run
it starts (its ask taken from the input), so that no run id is threaded by
hand: it answers a `BrokerRun` with the run id, the SDK's result, the receipt
of the broker handoff the agents ended with, and `answer(Report)`, which waits
for the broker run's final result (`streamed=True` for `Runner.run_streamed`).
`agent_worker(agent, "writer", accepts=Subtask)` runs an `Agent` as a broker
worker: each delivery's payload (with the run's pinned ask) is its input, and
a `broker_handoff` it calls is the delivery's complete-and-handoff.

Example::

    to_writer = broker_handoff(client, "writer", contract=Subtask)
    triage = Agent(name="triage", instructions="...", handoffs=[to_writer])
    done = await run(client, triage, "Summarise page 1", owner="me")
    report = await done.answer(Report)          # once the writer finished
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional, TypeVar, cast

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from .._client import Client
from .._errors import ErrorKind, error
from .._handoff import Final, Receipt
from .._state import StateDelta
from .._subscription import Delivery
from .._values import Seconds, seconds
from .._worker import AgentHandler, Context, Outcome, agent
from ..v1 import handoff_pb2 as pb

try:
    from agents import Agent, Handoff, ModelBehaviorError, RunContextWrapper, Runner
    from agents.agent_output import AgentOutputSchemaBase
    from agents.items import ModelResponse, TResponseInputItem, TResponseStreamEvent
    from agents.model_settings import ModelSettings
    from agents.models.interface import Model, ModelTracing
    from agents.result import RunResult, RunResultStreaming
    from agents.stream_events import StreamEvent
    from agents.strict_schema import ensure_strict_json_schema
    from agents.tool import Tool
    from agents.usage import Usage
    from openai.types.responses import (
        Response,
        ResponseCompletedEvent,
        ResponseOutputMessage,
        ResponseOutputText,
        ResponseUsage,
    )
    from openai.types.responses.response_prompt_param import ResponsePromptParam
    from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails
    from pydantic import BaseModel, Field, TypeAdapter, ValidationError, create_model
except ImportError as e:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "handoff.adapters.openai_agents needs the OpenAI Agents SDK: "
        "pip install 'handoff[openai-agents]'"
    ) from e

__all__ = [
    "BrokerRun",
    "BrokerRunContext",
    "agent_worker",
    "broker_handoff",
    "contract_model",
    "run",
    "to_contract",
]

RunId = str | Callable[[RunContextWrapper[Any]], str]
"""The run a handoff goes into: a run id, or a function of the run context
(default: the `run_id` of the run context, as `run` and `agent_worker` give
it)."""


@dataclass
class BrokerRunContext:
    """The run context `run` and `agent_worker` give the Agents SDK: the broker
    run, and, in a worker, the delivery being handled (a `broker_handoff` then
    is its complete-and-handoff). `extra` carries the caller's own context."""

    run_id: str
    """The broker run."""
    delivery: Delivery | None = None
    """The delivery an `agent_worker` handles; `None` outside a worker."""
    extra: Any = None
    """The context given to `run` (`context=`), for the agents' tools."""


P = TypeVar("P", bound=Message)

OnHandoff = Callable[[RunContextWrapper[Any], Message, Receipt], Awaitable[None] | None]
"""Called once the broker accepted the handoff."""

_SCALARS: dict[int, Any] = {
    FieldDescriptor.TYPE_STRING: str,
    FieldDescriptor.TYPE_BYTES: str,  # base64, as in the protobuf JSON mapping
    FieldDescriptor.TYPE_BOOL: bool,
    FieldDescriptor.TYPE_DOUBLE: float,
    FieldDescriptor.TYPE_FLOAT: float,
    FieldDescriptor.TYPE_INT32: int,
    FieldDescriptor.TYPE_INT64: int,
    FieldDescriptor.TYPE_UINT32: int,
    FieldDescriptor.TYPE_UINT64: int,
    FieldDescriptor.TYPE_SINT32: int,
    FieldDescriptor.TYPE_SINT64: int,
    FieldDescriptor.TYPE_FIXED32: int,
    FieldDescriptor.TYPE_FIXED64: int,
    FieldDescriptor.TYPE_SFIXED32: int,
    FieldDescriptor.TYPE_SFIXED64: int,
}


def contract_model(contract: type[Message]) -> type[BaseModel]:
    """A pydantic model with the fields of protobuf message `contract` (see the
    module's doc for which fields convert): what the handoff's input schema is
    made from when no `input_type` is given.

    Example::

        Model = contract_model(Subtask)
        Model.model_json_schema()["required"]  # ['index', 'of', 'instruction', 'sources']
    """
    return _model(contract.DESCRIPTOR, {}, ())


def _model(
    # A message descriptor (`Any`: the stubs type `DESCRIPTOR` as a union of the
    # pure-Python and upb descriptor classes).
    desc: Any,
    made: dict[str, type[BaseModel]],
    path: tuple[str, ...],
) -> type[BaseModel]:
    if desc.full_name in made:
        return made[desc.full_name]
    if desc.full_name in path:
        raise error(
            ErrorKind.INVALID_ARGUMENT,
            f"{desc.full_name} is recursive: give the handoff an input_type",
        )
    fields: dict[str, Any] = {}
    for f in desc.fields:
        where = f"{desc.full_name}.{f.name}"
        if f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type is not None:
            sub = f.message_type
            if sub.GetOptions().map_entry:
                raise error(
                    ErrorKind.INVALID_ARGUMENT,
                    f"{where} is a map field: give the handoff an input_type",
                )
            if sub.full_name.startswith("google.protobuf."):
                raise error(
                    ErrorKind.INVALID_ARGUMENT,
                    f"{where} is a {sub.full_name}: give the handoff an input_type",
                )
            typ: Any = _model(sub, made, (*path, desc.full_name))
        elif f.type == FieldDescriptor.TYPE_ENUM and f.enum_type is not None:
            typ = Literal[tuple(v.name for v in f.enum_type.values)]
        elif f.type in _SCALARS:
            typ = _SCALARS[f.type]
        else:
            raise error(ErrorKind.INVALID_ARGUMENT, f"{where} has a type JSON cannot carry")
        if f.is_repeated:
            typ = list[typ]
        elif f.has_presence:
            typ = Optional[typ]  # noqa: UP045 - a runtime type, built from a variable
        fields[f.name] = (typ, Field(...))
    model = cast(type[BaseModel], create_model(desc.name, **fields))
    made[desc.full_name] = model
    return model


def to_contract(value: BaseModel, contract: type[Message]) -> Message:
    """The `contract` message holding `value`'s fields (nulls left unset); an
    `InvalidArgumentError` when they do not fit it."""
    data = value.model_dump(mode="json", exclude_none=True)
    msg = contract()
    try:
        json_format.ParseDict(data, msg)
    except json_format.ParseError as e:
        raise error(
            ErrorKind.INVALID_ARGUMENT,
            f"the handoff input does not fit {contract.DESCRIPTOR.full_name}: {e}",
        ) from e
    return msg


class _ReceiptModel(Model):
    """A model that answers with a fixed text and calls nothing: the stand-in
    for a broker agent once the handoff is stored."""

    def __init__(self, text: str) -> None:
        self._text = text

    def _message(self) -> ResponseOutputMessage:
        """The receipt as an assistant message."""
        return ResponseOutputMessage(
            id="handoff-receipt",
            type="message",
            role="assistant",
            status="completed",
            content=[
                ResponseOutputText(text=self._text, type="output_text", annotations=[], logprobs=[])
            ],
        )

    async def get_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff[Any, Any]],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: ResponsePromptParam | None,
    ) -> ModelResponse:
        """The receipt, as one assistant message."""
        return ModelResponse(output=[self._message()], usage=Usage(), response_id=None)

    async def stream_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff[Any, Any]],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: ResponsePromptParam | None,
    ) -> AsyncIterator[TResponseStreamEvent]:
        """The receipt, as one completed response (so `Runner.run_streamed` ends
        cleanly with it as its final output)."""
        message = self._message()
        response = Response(
            id="handoff-receipt",
            created_at=time.time(),
            model="handoff-broker",
            object="response",
            output=[message],
            tool_choice="none",
            tools=[],
            top_p=None,
            parallel_tool_calls=False,
            status="completed",
            usage=ResponseUsage(
                input_tokens=0,
                output_tokens=0,
                total_tokens=0,
                input_tokens_details=InputTokensDetails(cached_tokens=0, cache_write_tokens=0),
                output_tokens_details=OutputTokensDetails(reasoning_tokens=0),
            ),
        )
        yield ResponseCompletedEvent(
            type="response.completed", response=response, sequence_number=0
        )


def _run_of(ctx: RunContextWrapper[Any], run_id: RunId | None) -> str:
    if callable(run_id):
        return run_id(ctx)
    if run_id is not None:
        return run_id
    found = getattr(ctx.context, "run_id", None)
    if isinstance(found, str) and found:
        return found
    raise ModelBehaviorError(
        "broker_handoff has no run id: give run_id=, or run through handoff's run()"
    )


def broker_handoff(
    client: Client,
    target: str,
    *,
    contract: type[Message],
    run_id: RunId | None = None,
    input_type: type[BaseModel] | None = None,
    source_agent: str | None = None,
    state_delta: Callable[[RunContextWrapper[Any], Message], StateDelta | None] | None = None,
    on_handoff: OnHandoff | None = None,
    then: Agent[Any] | None = None,
    tool_name_override: str | None = None,
    tool_description_override: str | None = None,
) -> Handoff[Any, Agent[Any]]:
    """An Agents SDK `Handoff` to broker agent `target`: the model's arguments,
    typed by `contract` (and `input_type`, if given), are handed off durably in
    `run_id` from `source_agent`, with `state_delta(ctx, message)` if given; see
    the module's doc for what the SDK gets back.

    Example::

        to_writer = broker_handoff(client, "writer", contract=Subtask,
                                   run_id=lambda ctx: ctx.context.run_id,
                                   source_agent="triage")
        triage = Agent(name="triage", handoffs=[to_writer], model=...)
    """
    model = input_type if input_type is not None else contract_model(contract)
    if input_type is not None:
        known = {f.name for f in contract.DESCRIPTOR.fields}
        extra = sorted(set(input_type.model_fields) - known)
        if extra:
            raise error(
                ErrorKind.INVALID_ARGUMENT,
                f"{input_type.__name__} has fields {extra} that "
                f"{contract.DESCRIPTOR.full_name} lacks",
            )
    adapter: TypeAdapter[BaseModel] = TypeAdapter(model)
    schema = ensure_strict_json_schema(adapter.json_schema())

    async def invoke(ctx: RunContextWrapper[Any], input_json: str) -> Agent[Any]:
        try:
            value = adapter.validate_json(input_json or "{}")
        except ValidationError as e:
            raise ModelBehaviorError(
                f"invalid input for the handoff to {target}: {e.error_count()} error(s)"
            ) from e
        try:
            message = to_contract(value, contract)
        except Exception as e:
            raise ModelBehaviorError(str(e)) from e
        rid = _run_of(ctx, run_id)
        delta = state_delta(ctx, message) if state_delta is not None else None
        delivery = ctx.context.delivery if isinstance(ctx.context, BrokerRunContext) else None
        if delivery is not None:
            # In a worker: the complete-and-handoff of the delivery, once.
            if delivery.settled:
                raise ModelBehaviorError(
                    f"the delivery was handed off already; no second handoff to {target}"
                )
            receipt = await delivery.handoff(target, message, state_delta=delta)
        else:
            receipt = await client.handoff(
                rid, target, message, source_agent=source_agent, state_delta=delta
            )
        if on_handoff is not None:
            done = on_handoff(ctx, message, receipt)
            if inspect.isawaitable(done):
                await done
        if then is not None:
            return then
        text = json.dumps(
            {
                "handoff_id": receipt.handoff_id,
                "run_id": rid,
                "target": target,
                "duplicate": receipt.duplicate,
            }
        )
        return Agent(name=target, model=_ReceiptModel(text))

    return Handoff(
        tool_name=tool_name_override or f"transfer_to_{target}".replace("-", "_"),
        tool_description=tool_description_override
        or f"Hand off to the {target} agent (durably, through the broker). "
        f"The input is a {contract.DESCRIPTOR.full_name}.",
        input_json_schema=schema,
        on_invoke_handoff=invoke,
        agent_name=target,
        strict_json_schema=True,
    )


# ---------------------------------------------------------------- runs


M = TypeVar("M", bound=Message)


@dataclass
class BrokerRun:
    """What `run` answers: the broker run, the Agents SDK's own result, the
    receipt of the broker handoff the run ended with (if it did), and, awaited,
    the broker run's final answer."""

    client: Client
    run_id: str
    """The broker run the agents worked in."""
    result: RunResult | RunResultStreaming
    """The Agents SDK's result (streamed: once its events were consumed)."""
    receipt: dict[str, Any] | None
    """The broker handoff the agents ended with (`handoff_id`, `run_id`,
    `target`, `duplicate`); `None` when they answered themselves."""

    async def answer(self, result_type: type[M], *, timeout: Seconds = 60.0) -> M:
        """Waits until the broker run ends and answers its final result as
        `result_type`; a run that failed, timed out or was cancelled raises
        `FailedPreconditionError` naming why."""
        deadline = time.monotonic() + seconds(timeout)
        while True:
            got = (await self.client.get_run(self.run_id)).run
            if got.status == pb.RUN_STATUS_COMPLETED:
                out = result_type()
                result = got.result
                if got.HasField("result_ref"):
                    # Stored by reference (over the broker's inline limit).
                    result = await self.client.get_payload(self.run_id, got.result_ref)
                if not result.Unpack(out):
                    raise error(
                        ErrorKind.DECODE,
                        f"run {self.run_id} ended with a {result.type_url}, "
                        f"not a {result_type.DESCRIPTOR.full_name}",
                    )
                return out
            if got.status not in (pb.RUN_STATUS_RUNNING, pb.RUN_STATUS_WAITING_INPUT):
                raise error(
                    ErrorKind.FAILED_PRECONDITION,
                    f"run {self.run_id} ended {pb.RunStatus.Name(got.status)}: {got.failure}",
                )
            if time.monotonic() >= deadline:
                raise error(ErrorKind.TIMEOUT, f"run {self.run_id} did not end in time")
            await asyncio.sleep(0.1)


async def run(
    client: Client,
    agent: Agent[Any],
    input: str | list[TResponseInputItem],
    *,
    owner: str,
    run_id: str | None = None,
    ask: str | None = None,
    context: Any = None,
    streamed: bool = False,
    on_event: Callable[[StreamEvent], Awaitable[None] | None] | None = None,
    max_depth: int = 0,
) -> BrokerRun:
    """Runs `agent` with the Agents SDK's `Runner` inside a broker run: the run
    is started (its ask is `ask`, else the input when it is text; `run_id`
    names an existing run instead), the agents' `broker_handoff`s go into it
    without being told its id, and the answer carries the run id, the SDK's
    result, the receipt of the broker handoff the agents ended with, and
    `answer(...)` to wait for the broker run's final result. `streamed` runs
    `Runner.run_streamed`, handing each stream event to `on_event`.

    Example::

        done = await run(client, triage, "Summarise page 1", owner="me")
        report = await done.answer(Report)
    """
    if run_id is None:
        text_ask = ask if ask is not None else (input if isinstance(input, str) else None)
        started = await client.start_run(owner, ask=text_ask, max_depth=max_depth)
        run_id = started.id
    ctx = BrokerRunContext(run_id=run_id, extra=context)
    result: RunResult | RunResultStreaming
    if streamed:
        streaming = Runner.run_streamed(agent, input, context=ctx)
        async for event in streaming.stream_events():
            if on_event is not None:
                done = on_event(event)
                if inspect.isawaitable(done):
                    await done
        result = streaming
    else:
        result = await Runner.run(agent, input, context=ctx)
    return BrokerRun(client=client, run_id=run_id, result=result, receipt=_receipt(result))


def _receipt(result: RunResult | RunResultStreaming) -> dict[str, Any] | None:
    """The receipt a broker handoff's stand-in answered with, if the run ended
    with one."""
    output = result.final_output
    if not isinstance(output, str) or not isinstance(result.last_agent.model, _ReceiptModel):
        return None
    try:
        found = json.loads(output)
    except json.JSONDecodeError:
        return None
    return found if isinstance(found, dict) else None


# ---------------------------------------------------------------- workers


def agent_worker(
    agent_: Agent[Any],
    name: str,
    *,
    accepts: type[P],
    emits: Sequence[type[Message]] = (),
    result: Callable[[str], Message] | None = None,
    to_input: Callable[[P, Context], str] | None = None,
    lease: Seconds | None = None,
    max_attempts: int = 0,
    fallback: str | None = None,
) -> AgentHandler[P]:
    """An Agents SDK `Agent` as the handler of broker agent `name`, for
    `Worker`. Per delivery, `Runner.run` runs the agent on `to_input(payload,
    ctx)` (default: the run's pinned ask, then the payload as JSON), with a
    `BrokerRunContext` naming the run and the delivery: a `broker_handoff` the
    agent calls is the complete-and-handoff of the delivery. When the agent
    answers itself instead, its final output becomes `result(output)` (the
    run's final result; without `result`, the output is refused as not a
    handoff). Refusals and failures settle the delivery as the `Worker` does.

    Example::

        writer = Agent(name="writer", instructions="...", handoffs=[to_editor])
        await Worker(client, [agent_worker(writer, "writer", accepts=Subtask,
                                           emits=[Subtask])]).run()
    """

    async def handle(payload: P, ctx: Context) -> Outcome:
        d = ctx.delivery
        if to_input is not None:
            text = to_input(payload, ctx)
        else:
            body = json_format.MessageToJson(payload, preserving_proto_field_name=True)
            text = f"{ctx.pinned.ask}\n\n{body}" if ctx.pinned.ask else body
        done = await Runner.run(agent_, text, context=BrokerRunContext(run_id=d.run_id, delivery=d))
        if d.settled:
            return None  # a broker_handoff handed the delivery off
        if result is None:
            raise error(
                ErrorKind.FAILED_PRECONDITION,
                f"agent {name} answered without a handoff and has no result=",
            )
        return Final(result(str(done.final_output)))

    return agent(
        name,
        accepts=accepts,
        emits=list(emits),
        lease=lease,
        max_attempts=max_attempts,
        fallback=fallback,
    )(handle)
