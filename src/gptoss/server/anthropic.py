"""Anthropic's Messages API: POST /v1/messages (streaming in Anthropic's event vocabulary) and
POST /v1/messages/count_tokens, with Anthropic's error shape.

Content blocks become OpenAI chat messages (one conversion path into harmony for every API):
`thinking` → the assistant's reasoning, `tool_use` → tool calls, `tool_result` → tool messages.
The model's harmony output becomes blocks again: analysis → `thinking` (shown only when the
request enables thinking; gpt-oss always reasons, so without it the effort is low and the reasoning
hidden), final text → `text`, calls → `tool_use`. ``output_config.effort``, else the thinking
``budget_tokens``, picks the reasoning effort; ``output_config.format`` asks for JSON by schema.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool

from gptoss.harmony import Event, MessageEnd, ReasoningDelta, TextDelta, ToolCallDelta, ToolCallStart
from gptoss.inference import EngineError
from gptoss.server.errors import APIError, register_error_shape
from gptoss.server.output import HarmonyOutput, new_id
from gptoss.server.prompting import JsonFormat, ToolChoice, build_prompt, parse_tool_choice
from gptoss.server.schemas import FunctionName, check_json_schema
from gptoss.server.schemas import Request as RequestModel
from gptoss.server.service import Service, ServiceDep, sse
from gptoss.server.turn import Turn, record_repairs, sampling_fields, start_turn

log = logging.getLogger(__name__)
router = APIRouter()

PREFIX = "/v1/messages"
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def error_shape(exc: APIError) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(exc.status, "invalid_request_error" if exc.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": exc.message}}


register_error_shape(PREFIX, error_shape)


# ---------------------------------------------------------------------------------------------
# Request shapes
# ---------------------------------------------------------------------------------------------


class _Block(BaseModel):
    model_config = ConfigDict(extra="ignore")  # cache_control, citations, ...


class TextBlock(_Block):
    type: Literal["text"]
    text: str


class ThinkingBlock(_Block):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Block):
    type: Literal["redacted_thinking"]
    data: str


class ToolUseBlock(_Block):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(_Block):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool = False


Block = Annotated[
    TextBlock | ThinkingBlock | RedactedThinkingBlock | ToolUseBlock | ToolResultBlock,
    Field(discriminator="type"),
]


class MessageParam(_Block):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(_Block):
    name: FunctionName
    description: str | None = None
    input_schema: dict[str, Any]
    strict: bool | None = None

    _check = field_validator("input_schema")(check_json_schema)


class ToolChoiceParam(_Block):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class ThinkingConfig(_Block):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(default=None, ge=1024)
    display: Literal["summarized", "omitted"] | None = None


class JsonOutputFormat(_Block):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")

    _check = field_validator("schema_")(check_json_schema)


class OutputConfig(_Block):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: JsonOutputFormat | None = None


class CountTokensRequest(RequestModel):
    model: str
    messages: list[MessageParam] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoiceParam | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    metadata: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------
# Blocks → chat messages
# ---------------------------------------------------------------------------------------------


def _text(content: str | list[TextBlock] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(block.text for block in content)


def to_chat_messages(body: CountTokensRequest) -> list[dict[str, Any]]:
    """The system prompt and messages as OpenAI chat messages."""
    messages: list[dict[str, Any]] = []
    if body.system:
        messages.append({"role": "system", "content": _text(body.system)})
    for i, message in enumerate(body.messages):
        blocks = (
            [TextBlock(type="text", text=message.content)]
            if isinstance(message.content, str)
            else message.content
        )
        if message.role == "assistant":
            if i == len(body.messages) - 1:
                raise APIError(
                    400,
                    "the last message is the assistant's: gpt-oss cannot continue a prefilled answer; "
                    "end with a user message",
                    param="messages",
                )
            messages.append(_assistant(blocks))
            continue
        text: list[str] = []
        for block in blocks:
            if isinstance(block, ToolResultBlock):
                result = _text(block.content)
                messages.append(
                    {
                        "role": "tool",
                        "tool_call_id": block.tool_use_id,
                        "content": f"Error: {result}" if block.is_error else result,
                    }
                )
            elif isinstance(block, TextBlock):
                text.append(block.text)
            else:
                raise APIError(400, f"a user message cannot hold a {block.type} block", param="messages")
        if text:
            messages.append({"role": "user", "content": "\n\n".join(text)})
    return messages


def _assistant(blocks: list[Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": ""}
    for block in blocks:
        if isinstance(block, ThinkingBlock):
            message["reasoning_content"] = message.get("reasoning_content", "") + block.thinking
        elif isinstance(block, TextBlock):
            message["content"] += block.text
        elif isinstance(block, ToolUseBlock):
            call = {"name": block.name, "arguments": json.dumps(block.input)}
            message.setdefault("tool_calls", []).append(
                {"id": block.id, "type": "function", "function": call}
            )
        elif isinstance(block, ToolResultBlock):
            raise APIError(400, "tool_result blocks belong in user messages", param="messages")
        # redacted_thinking: another model's encrypted reasoning, which gpt-oss cannot read
    return message


def _tools(body: CountTokensRequest) -> tuple[list[dict[str, Any]], ToolChoice]:
    tools = [
        {"name": t.name, "description": t.description, "parameters": t.input_schema, "strict": t.strict}
        for t in body.tools or []
    ]
    tools = [{k: v for k, v in t.items() if v is not None} for t in tools]
    names = [t["name"] for t in tools]
    choice = body.tool_choice
    if choice is None:
        return tools, parse_tool_choice(None, names)
    if choice.type == "tool":
        if not choice.name:
            raise APIError(400, 'tool_choice of type "tool" needs a name', param="tool_choice.name")
        return tools, parse_tool_choice(choice, names)
    return tools, parse_tool_choice({"auto": "auto", "any": "required", "none": "none"}[choice.type], names)


def _effort(body: CountTokensRequest) -> str:
    """Reasoning effort: `output_config.effort` (gpt-oss's highest is "high"), else the thinking
    budget's; gpt-oss cannot stop reasoning, so without thinking it reasons little (low)."""
    effort = body.output_config.effort if body.output_config else None
    if effort is not None:
        return effort if effort in ("low", "medium") else "high"
    thinking = body.thinking
    if thinking is None or thinking.type == "disabled":
        return "low"
    budget = thinking.budget_tokens or 8192
    return "low" if budget < 4096 else "medium" if budget < 16384 else "high"


def _shows_thinking(body: CountTokensRequest) -> bool:
    thinking = body.thinking
    return thinking is not None and thinking.type != "disabled" and thinking.display != "omitted"


def _json_format(body: CountTokensRequest) -> JsonFormat | None:
    fmt = body.output_config.format if body.output_config else None
    return JsonFormat("response", fmt.schema_, None, "output_config.format.schema") if fmt else None


# ---------------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------------


@router.post(PREFIX + "/count_tokens")
async def count_tokens(body: CountTokensRequest, service: ServiceDep) -> dict[str, int]:
    service.check_model(body.model)
    tools, choice = _tools(body)
    prompt = await run_in_threadpool(  # rendering and tokenizing: off the event loop
        lambda: build_prompt(
            service.runner,
            to_chat_messages(body),
            tools=tools,
            tool_choice=choice,
            reasoning_effort=_effort(body),
            json_format=_json_format(body),
            tool_param="tools[{i}].input_schema",
        )
    )
    return {"input_tokens": len(prompt.tokens)}


@router.post(PREFIX)
async def create_message(body: MessagesRequest, request: Request, service: ServiceDep) -> Any:
    service.check_model(body.model)
    tools, choice = _tools(body)
    turn = await start_turn(
        service,
        to_chat_messages(body),
        tools=tools,
        tool_choice=choice,
        reasoning_effort=_effort(body),
        sampling=sampling_fields(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k),
        max_tokens=body.max_tokens,
        max_tokens_param="max_tokens",
        stop=body.stop_sequences or (),
        json_format=_json_format(body),
        tool_param="tools[{i}].input_schema",
    )
    reply = _Reply(service, body, turn, _shows_thinking(body))
    if body.stream:
        return service.event_stream(turn.stream, reply.events())
    await service.run(request, turn.stream, turn.feed)
    record_repairs(service, turn.output)
    return reply.message()


class _Reply:
    """The answer of one request, as a message or as Anthropic's stream events."""

    def __init__(self, service: Service, body: MessagesRequest, turn: Turn, show_thinking: bool) -> None:
        self.service = service
        self.body = body
        self.turn = turn
        self.show_thinking = show_thinking
        self.id = new_id("msg_")
        self.index = -1  # of the open content block
        self.open: str | None = None  # its type

    @property
    def output(self) -> HarmonyOutput:
        return self.turn.output

    def stop_reason(self) -> tuple[str, str | None]:
        out = self.output
        if out.stopped:
            return "stop_sequence", out.stopper.found
        return {"length": "max_tokens", "tool_calls": "tool_use"}.get(out.finish_reason, "end_turn"), None

    def usage(self, output_tokens: int) -> dict[str, int]:
        return {
            # Anthropic counts the prompt tokens read from the cache apart from the others.
            "input_tokens": self.turn.prompt_tokens - self.turn.stream.cached,
            "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": self.turn.stream.cached,
        }

    def envelope(self, content: list[dict[str, Any]], done: bool) -> dict[str, Any]:
        reason, sequence = self.stop_reason() if done else (None, None)
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.body.model,
            "content": content,
            "stop_reason": reason,
            "stop_sequence": sequence,
            "usage": self.usage(self.output.completion_tokens if done else 0),
        }

    def message(self) -> dict[str, Any]:
        out = self.output
        content: list[dict[str, Any]] = []
        if self.show_thinking and out.reasoning:
            content.append({"type": "thinking", "thinking": out.reasoning, "signature": ""})
        if out.content:
            content.append({"type": "text", "text": out.content})
        for call in out.tool_calls:
            content.append(
                {"type": "tool_use", "id": call.id, "name": call.name, "input": tool_input(call.arguments)}
            )
        return self.envelope(content, done=True)

    # ------------------------------------------------------------------ streaming
    @staticmethod
    def event(kind: str, **fields: Any) -> str:
        return sse({"type": kind, **fields}, event=kind)

    def _start(self, block: dict[str, Any]) -> list[str]:
        out = self._stop()
        self.index += 1
        self.open = block["type"]
        return out + [self.event("content_block_start", index=self.index, content_block=block)]

    def _stop(self) -> list[str]:
        if self.open is None:
            return []
        self.open = None
        return [self.event("content_block_stop", index=self.index)]

    def _delta(self, **delta: Any) -> str:
        return self.event("content_block_delta", index=self.index, delta=delta)

    def on(self, e: Event) -> list[str]:
        if isinstance(e, ReasoningDelta) and self.show_thinking:
            lines = (
                []
                if self.open == "thinking"
                else self._start({"type": "thinking", "thinking": "", "signature": ""})
            )
            return lines + [self._delta(type="thinking_delta", thinking=e.text)]
        if isinstance(e, TextDelta):
            lines = [] if self.open == "text" else self._start({"type": "text", "text": ""})
            return lines + [self._delta(type="text_delta", text=e.text)]
        if isinstance(e, ToolCallStart):
            call = self.output.tool_calls[-1]
            return self._start({"type": "tool_use", "id": call.id, "name": call.name, "input": {}})
        if isinstance(e, ToolCallDelta) and self.open == "tool_use":
            return [self._delta(type="input_json_delta", partial_json=e.arguments)]
        if isinstance(e, MessageEnd):
            return self._stop()
        return []

    async def events(self) -> AsyncIterator[str]:
        yield self.event("message_start", message=self.envelope([], done=False))
        yield self.event("ping")
        try:
            async for token in self.turn.stream:
                for e in self.turn.feed(token):
                    for line in self.on(e):
                        yield line
        except EngineError as exc:  # the headers are sent: report it as Anthropic's stream does
            yield self.event("error", error={"type": "api_error", "message": str(exc)})
            return
        for line in self._stop():
            yield line
        record_repairs(self.service, self.output)
        reason, sequence = self.stop_reason()
        delta = {"stop_reason": reason, "stop_sequence": sequence}
        yield self.event("message_delta", delta=delta, usage={"output_tokens": self.output.completion_tokens})
        yield self.event("message_stop")


def tool_input(arguments: str) -> dict[str, Any]:
    """A call's arguments as the `input` object. Arguments that are not a JSON object (a model's
    slip) are kept whole under "_raw_arguments" rather than dropped."""
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        value = None
    if isinstance(value, dict):
        return value
    log.warning("tool call arguments are not a JSON object: %.200s", arguments)
    return {"_raw_arguments": arguments}
