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

Example::

    to_writer = broker_handoff(client, "writer", contract=Subtask,
                               run_id=lambda ctx: ctx.context.run_id)
    triage = Agent(name="triage", instructions="...", handoffs=[to_writer])
    result = await Runner.run(triage, "Summarise page 1", context=Ctx(run_id=run.id))
    receipt = json.loads(result.final_output)
"""

from __future__ import annotations

import inspect
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal, Optional, cast

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from .._client import Client
from .._errors import ErrorKind, error
from .._handoff import Receipt
from .._state import StateDelta

try:
    from agents import Agent, Handoff, ModelBehaviorError, RunContextWrapper
    from agents.agent_output import AgentOutputSchemaBase
    from agents.items import ModelResponse, TResponseInputItem, TResponseStreamEvent
    from agents.model_settings import ModelSettings
    from agents.models.interface import Model, ModelTracing
    from agents.strict_schema import ensure_strict_json_schema
    from agents.tool import Tool
    from agents.usage import Usage
    from openai.types.responses import ResponseOutputMessage, ResponseOutputText
    from openai.types.responses.response_prompt_param import ResponsePromptParam
    from pydantic import BaseModel, Field, TypeAdapter, ValidationError, create_model
except ImportError as e:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "handoff.adapters.openai_agents needs the OpenAI Agents SDK: "
        "pip install 'handoff[openai-agents]'"
    ) from e

__all__ = ["broker_handoff", "contract_model", "to_contract"]

RunId = str | Callable[[RunContextWrapper[Any]], str]
"""The run a handoff goes into: a run id, or a function of the run context."""

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
        message = ResponseOutputMessage(
            id="handoff-receipt",
            type="message",
            role="assistant",
            status="completed",
            content=[
                ResponseOutputText(text=self._text, type="output_text", annotations=[], logprobs=[])
            ],
        )
        return ModelResponse(output=[message], usage=Usage(), response_id=None)

    def stream_response(
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
        """Not streamed: the stand-in answers through `get_response` only."""
        raise error(
            ErrorKind.OTHER,
            "the stand-in of a broker agent does not stream: run with Runner.run",
        )


def broker_handoff(
    client: Client,
    target: str,
    *,
    contract: type[Message],
    run_id: RunId,
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
        rid = run_id(ctx) if callable(run_id) else run_id
        delta = state_delta(ctx, message) if state_delta is not None else None
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
