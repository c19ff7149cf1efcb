"""Ollama's API: POST /api/chat and /api/generate (NDJSON streams, ``think``, tools, ``format``,
``options``), GET /api/tags, /api/ps and /api/version, POST /api/show; errors as ``{"error": ...}``.

Messages become OpenAI chat messages and go down the same harmony pipeline as every other API.
``think`` picks the reasoning effort (true: medium; false: low, with the reasoning left out of the
reply, since gpt-oss always reasons); ``message.thinking`` carries the reasoning back in and out.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field

import gptoss
from gptoss.harmony import Event, MessageEnd, ReasoningDelta, TextDelta
from gptoss.inference import EngineError
from gptoss.server.errors import APIError, register_error_shape
from gptoss.server.output import HarmonyOutput
from gptoss.server.prompting import JsonFormat, parse_tool_choice
from gptoss.server.schemas import FunctionDefinition, check_json_schema
from gptoss.server.schemas import Request as RequestModel
from gptoss.server.service import Service, ServiceDep
from gptoss.server.turn import Turn, record_repairs, sampling_fields, start_turn


class _JsonBody(APIRoute):
    """Every body is read as JSON, whatever its Content-Type: Ollama does so, and its documented
    examples post with ``curl -d``, which says form-urlencoded."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
                headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
                request.scope["headers"] = [*headers, (b"content-type", b"application/json")]
                request = Request(request.scope, request.receive)
            return await handler(request)

        return route


router = APIRouter(prefix="/api", route_class=_JsonBody)

# The Ollama API release whose routes and fields these follow (clients gate features on it).
OLLAMA_API_VERSION = "0.12.0"

register_error_shape("/api/", lambda exc: {"error": exc.message})


# ---------------------------------------------------------------------------------------------
# Request shapes
# ---------------------------------------------------------------------------------------------


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Options(_Loose):
    """The sampling options gpt-oss honours; the rest (num_ctx, num_gpu, mirostat, ...) are
    accepted and ignored, as Ollama ignores options a model does not use."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    num_predict: int | None = Field(default=None, ge=-2)
    stop: list[str] | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class FunctionCall(_Loose):
    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class ToolCall(_Loose):
    function: FunctionCall


class Message(_Loose):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None


class Tool(_Loose):
    type: Literal["function"] = "function"
    function: FunctionDefinition


Think = bool | Literal["low", "medium", "high"] | None
Format = Literal["", "json"] | dict[str, Any] | None


class _Generating(RequestModel):
    model: str
    format: Format = None
    options: Options | None = None
    stream: bool = True
    think: Think = None
    keep_alive: str | float | None = None  # the model stays loaded while the server runs


class ChatRequest(_Generating):
    messages: list[Message] = Field(default_factory=list)
    tools: list[Tool] | None = None


class GenerateRequest(_Generating):
    prompt: str | None = None
    system: str | None = None
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[str] | None = None


class ModelRequest(RequestModel):
    model: str | None = None
    name: str | None = None  # the field's older name


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------


def check_model(service: Service, name: str) -> None:
    """Ollama names carry a tag; ":latest" is the one this server's single model answers to."""
    service.check_model(name.removesuffix(":latest"))


def to_chat_messages(messages: list[Message]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    pending: list[str] = []  # names of calls not yet answered, for tool messages without tool_name
    for m in messages:
        if m.images:
            raise APIError(400, "gpt-oss reads text only: images are not supported", param="messages")
        if m.role == "assistant":
            message: dict[str, Any] = {"role": "assistant", "content": m.content}
            if m.thinking:
                message["reasoning_content"] = m.thinking
            calls = m.tool_calls or []
            if calls:
                message["tool_calls"] = [
                    {
                        "type": "function",
                        "function": {"name": c.function.name, "arguments": c.function.arguments},
                    }
                    for c in calls
                ]
            pending = [c.function.name for c in calls]
            out.append(message)
        elif m.role == "tool":
            name = m.tool_name or (pending.pop(0) if pending else None)
            if name is None:
                raise APIError(
                    400,
                    "a tool message needs tool_name (no earlier tool call is unanswered)",
                    param="messages",
                )
            if name in pending:
                pending.remove(name)
            out.append({"role": "tool", "name": name, "content": m.content})
        else:
            out.append({"role": m.role, "content": m.content})
    return out


def _effort(think: Think) -> str:
    return "low" if think is False else "medium" if think in (True, None) else think


def _json_format(fmt: Format) -> JsonFormat | None:
    if not fmt:
        return None
    if fmt == "json":
        return JsonFormat("json_object", None, None, "format")
    try:
        return JsonFormat("response", check_json_schema(fmt), None, "format")
    except ValueError as exc:
        raise APIError(400, f"format: {exc}", param="format") from None


def _max_tokens(options: Options) -> int | None:
    if options.num_predict == 0:
        raise APIError(400, "options.num_predict must be positive, or -1 for no limit", param="num_predict")
    return options.num_predict if options.num_predict and options.num_predict > 0 else None


async def _start(
    service: Service, body: _Generating, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
) -> Turn:
    options = body.options or Options()
    return await start_turn(
        service,
        messages,
        tools=tools,
        tool_choice=parse_tool_choice(None, [t["name"] for t in tools]),
        reasoning_effort=_effort(body.think),
        sampling=sampling_fields(
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=options.top_k,
            min_p=options.min_p,
            seed=options.seed,
            repetition_penalty=options.repeat_penalty,
            presence_penalty=options.presence_penalty,
            frequency_penalty=options.frequency_penalty,
        ),
        max_tokens=_max_tokens(options),
        max_tokens_param="num_predict",
        stop=options.stop or (),
        json_format=_json_format(body.format),
    )


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _arguments(text: str) -> dict[str, Any] | str:
    """A call's arguments as Ollama sends them: an object (raw text when the model wrote no JSON
    object, rather than dropping it)."""
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, dict) else text


# ---------------------------------------------------------------------------------------------
# Replies
# ---------------------------------------------------------------------------------------------


class _Reply:
    """One chat or generate answer: NDJSON lines while streaming, or one object."""

    def __init__(self, service: Service, body: _Generating, turn: Turn, chat: bool) -> None:
        self.service = service
        self.body = body
        self.turn = turn
        self.chat = chat
        self.show_thinking = body.think is not False
        self.started = time.monotonic()

    @property
    def output(self) -> HarmonyOutput:
        return self.turn.output

    def _part(self, content: str, thinking: str, calls: list[Any], done: bool) -> dict[str, Any]:
        data: dict[str, Any] = {"model": self.body.model, "created_at": _now()}
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = [
                    {"function": {"name": c.name, "arguments": _arguments(c.arguments)}} for c in calls
                ]
            data["message"] = message
        else:
            data["response"] = content
            if thinking:
                data["thinking"] = thinking
        data["done"] = done
        if done:
            data |= self._stats()
        return data

    def _stats(self) -> dict[str, Any]:
        stream, now = self.turn.stream, time.monotonic()
        first = stream.first_token_at or now
        return {
            "done_reason": "length" if self.output.finish_reason == "length" else "stop",
            "total_duration": int((now - self.started) * 1e9),
            "load_duration": 0,
            "prompt_eval_count": self.turn.prompt_tokens,
            "prompt_eval_duration": int((first - stream.submitted_at) * 1e9),
            "eval_count": self.output.completion_tokens,
            "eval_duration": int((now - first) * 1e9),
        }

    def whole(self) -> dict[str, Any]:
        out = self.output
        record_repairs(self.service, out)
        thinking = out.reasoning if self.show_thinking else ""
        return self._part(out.content, thinking, out.tool_calls, done=True)

    def _line(self, e: Event, calls_done: int) -> dict[str, Any] | None:
        if isinstance(e, ReasoningDelta) and self.show_thinking:
            return self._part("", e.text, [], done=False)
        if isinstance(e, TextDelta):
            return self._part(e.text, "", [], done=False)
        # A call is sent whole, once its message ends (Ollama streams no partial arguments).
        if isinstance(e, MessageEnd) and len(self.output.tool_calls) > calls_done:
            return self._part("", "", self.output.tool_calls[calls_done:], done=False)
        return None

    async def lines(self) -> AsyncIterator[str]:
        calls_done = 0
        try:
            async for token in self.turn.stream:
                for e in self.turn.feed(token):
                    if (part := self._line(e, calls_done)) is not None:
                        calls_done = len(self.output.tool_calls)
                        yield json.dumps(part) + "\n"
        except EngineError as exc:  # the headers are sent: Ollama reports it as a line
            yield json.dumps({"error": str(exc)}) + "\n"
            return
        record_repairs(self.service, self.output)
        yield json.dumps(self._part("", "", [], done=True)) + "\n"


async def _answer(service: Service, request: Request, reply: _Reply) -> Any:
    if reply.body.stream:
        response: StreamingResponse = service.event_stream(reply.turn.stream, reply.lines())
        response.headers["content-type"] = "application/x-ndjson"
        return response
    await service.run(request, reply.turn.stream, reply.turn.feed)
    return reply.whole()


def _loaded(body: _Generating, chat: bool) -> dict[str, Any]:
    """Ollama's answer to a request with nothing to generate: the model is loaded."""
    data: dict[str, Any] = {"model": body.model, "created_at": _now()}
    data |= {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
    return data | {"done": True, "done_reason": "load"}


# ---------------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------------


@router.post("/chat")
async def chat(body: ChatRequest, request: Request, service: ServiceDep) -> Any:
    check_model(service, body.model)
    if not body.messages:
        return _loaded(body, chat=True)
    tools = [t.function.model_dump(exclude_none=True) for t in body.tools or []]
    turn = await _start(service, body, to_chat_messages(body.messages), tools)
    return await _answer(service, request, _Reply(service, body, turn, chat=True))


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request, service: ServiceDep) -> Any:
    check_model(service, body.model)
    for field, why in (
        ("raw", "raw prompts are served by /v1/completions"),
        ("suffix", "gpt-oss does not fill in the middle"),
        ("template", "the prompt format is harmony's, not a template's"),
        ("context", "send the conversation to /api/chat instead of a context"),
        ("images", "gpt-oss reads text only"),
    ):
        if getattr(body, field):
            raise APIError(400, f"{field} is not supported: {why}", param=field)
    if not body.prompt:
        return _loaded(body, chat=False)
    messages = [{"role": "system", "content": body.system}] if body.system else []
    messages.append({"role": "user", "content": body.prompt})
    turn = await _start(service, body, messages, [])
    return await _answer(service, request, _Reply(service, body, turn, chat=False))


def _details(service: Service) -> dict[str, Any]:
    model = getattr(service.runner, "model", None)
    details: dict[str, Any] = {"format": "safetensors", "family": "gptoss", "families": ["gptoss"]}
    if model is not None:
        count = sum(p.numel() for p in model.parameters())
        details["parameter_size"] = f"{count / 1e9:.1f}B" if count >= 1e8 else f"{count / 1e6:.1f}M"
        details["quantization_level"] = str(next(model.parameters()).dtype).removeprefix("torch.").upper()
    return details


def _size(service: Service) -> int:
    model = getattr(service.runner, "model", None)
    if model is None:
        return 0
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _modified(service: Service) -> str:
    return datetime.fromtimestamp(service.created, UTC).isoformat().replace("+00:00", "Z")


@router.get("/tags")
async def tags(service: ServiceDep) -> dict[str, Any]:
    name = service.settings.model_name
    entry = {"name": name, "model": name, "modified_at": _modified(service), "size": _size(service)}
    return {"models": [entry | {"details": _details(service)}]}


@router.get("/ps")
async def ps(service: ServiceDep) -> dict[str, Any]:
    name = service.settings.model_name
    entry = {"name": name, "model": name, "size": _size(service), "size_vram": 0}
    return {"models": [entry | {"details": _details(service), "context_length": service.runner.context}]}


@router.post("/show")
async def show(body: ModelRequest, service: ServiceDep) -> dict[str, Any]:
    if not (body.model or body.name):
        raise APIError(400, "model is required", param="model")
    check_model(service, body.model or body.name or "")
    details = _details(service)
    return {
        "modelfile": "",
        "parameters": "",
        "template": "",  # the prompt format is harmony, rendered by the server
        "details": details,
        "model_info": {"general.architecture": "gptoss", "gptoss.context_length": service.runner.context},
        "capabilities": ["completion", "tools", "thinking"],
        "modified_at": _modified(service),
    }


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": OLLAMA_API_VERSION, "gptoss": gptoss.__version__}
