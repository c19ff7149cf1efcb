"""The Responses API: POST /v1/responses (streaming in the Responses event vocabulary),
GET/DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items.

Input items become OpenAI chat messages, then harmony (one conversion path for both APIs); the
model's harmony messages become output items: analysis → `reasoning`, final text and preambles →
`message`, calls → `function_call`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from gptoss.harmony import Event, MessageEnd, ReasoningDelta, TextDelta, ToolCallDelta, ToolCallStart
from gptoss.inference import SequenceRequest, TokenEvent, TokenStream
from gptoss.server.errors import APIError
from gptoss.server.output import HarmonyOutput, check_json_format, new_id
from gptoss.server.prompting import JsonFormat, Prompt, build_prompt, parse_tool_choice
from gptoss.server.schemas import InputTokensRequest, ResponsesRequest, SamplingFields, TextConfig
from gptoss.server.service import Service, ServiceDep, sampling_params, sse
from gptoss.tokenizer import Tokenizer

router = APIRouter()


# ---------------------------------------------------------------------------------------------
# Input items → chat messages
# ---------------------------------------------------------------------------------------------


def _text(content: str | list[dict[str, Any]]) -> str:
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


def items_to_chat_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses input items (as JSON dicts) → OpenAI chat messages.

    A reasoning item belongs to the assistant message that follows it; consecutive function calls
    form one assistant message with several tool calls, as in chat.
    """
    messages: list[dict[str, Any]] = []
    reasoning: list[str] = []

    def assistant() -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": None}
        if reasoning:
            message["reasoning_content"] = "\n\n".join(reasoning)
            reasoning.clear()
        messages.append(message)
        return message

    for item in items:
        kind = item.get("type", "message")
        if kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            reasoning.append("".join(p["text"] for p in parts))
        elif kind == "function_call":
            last = messages[-1] if messages else None
            if last is None or last["role"] != "assistant" or not last.get("tool_calls") or reasoning:
                last = assistant()
            call = {"id": item["call_id"], "type": "function"}
            call["function"] = {"name": item["name"], "arguments": item["arguments"]}
            last.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            messages.append(
                {"role": "tool", "tool_call_id": item["call_id"], "content": _text(item["output"])}
            )
        elif item["role"] == "assistant":
            assistant()["content"] = _text(item["content"])
        else:
            messages.append({"role": item["role"], "content": _text(item["content"])})
    if reasoning:
        assistant()
    return messages


# ---------------------------------------------------------------------------------------------
# Model output → output items and stream events
# ---------------------------------------------------------------------------------------------


class _OutputItems:
    """Turns parser events into output items and the Responses stream events that build them."""

    def __init__(self, output: HarmonyOutput) -> None:
        self.output = output
        self.items: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None
        self.sequence = 0

    def event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse(data, event=kind)

    def on(self, e: Event) -> list[str]:
        if isinstance(e, ReasoningDelta):
            out = self._ensure("reasoning")
            self.open["content"][0]["text"] += e.text
            return out + [self._delta("response.reasoning_text.delta", delta=e.text, content_index=0)]
        if isinstance(e, TextDelta):
            out = self._ensure("message")
            self.open["content"][0]["text"] += e.text
            return out + [
                self._delta("response.output_text.delta", delta=e.text, content_index=0, logprobs=[])
            ]
        if isinstance(e, ToolCallStart):
            return self.close() + self._open_item(
                {
                    "type": "function_call",
                    "id": new_id("fc_"),
                    "call_id": self.output.tool_calls[-1].id,
                    "name": e.name,
                    "arguments": "",
                    "status": "in_progress",
                }
            )
        if isinstance(e, ToolCallDelta) and self.open is not None:
            self.open["arguments"] += e.arguments
            return [self._delta("response.function_call_arguments.delta", delta=e.arguments)]
        if isinstance(e, MessageEnd):
            return self.close()
        return []

    def _delta(self, kind: str, **fields: Any) -> str:
        assert self.open is not None
        return self.event(kind, item_id=self.open["id"], output_index=len(self.items) - 1, **fields)

    def _ensure(self, kind: str) -> list[str]:
        if self.open is not None and self.open["type"] == kind:
            return []
        out = self.close()
        if kind == "reasoning":
            item = {"type": "reasoning", "id": new_id("rs_"), "summary": [], "content": []}
            part = {"type": "reasoning_text", "text": ""}
        else:
            item = {
                "type": "message",
                "id": new_id("msg_"),
                "role": "assistant",
                "status": "in_progress",
                "content": [],
            }
            part = {"type": "output_text", "text": "", "annotations": []}
        out += self._open_item(item)
        item["content"].append(part)
        return out + [self._delta("response.content_part.added", content_index=0, part=dict(part))]

    def _open_item(self, item: dict[str, Any]) -> list[str]:
        self.items.append(item)
        self.open = item
        return [self.event("response.output_item.added", output_index=len(self.items) - 1, item=dict(item))]

    def close(self) -> list[str]:
        """Finish the open item, if any."""
        item = self.open
        if item is None:
            return []
        out = []
        if item["type"] == "function_call":
            out.append(self._delta("response.function_call_arguments.done", arguments=item["arguments"]))
        else:
            part = item["content"][0]
            if item["type"] == "reasoning":
                out.append(self._delta("response.reasoning_text.done", content_index=0, text=part["text"]))
            else:
                out.append(
                    self._delta("response.output_text.done", content_index=0, text=part["text"], logprobs=[])
                )
            out.append(self._delta("response.content_part.done", content_index=0, part=part))
        if "status" in item:
            item["status"] = "completed" if self.output.finish_reason != "length" else "incomplete"
        out.append(self.event("response.output_item.done", output_index=len(self.items) - 1, item=item))
        self.open = None
        return out


# ---------------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------------


def _json_format(text: TextConfig | None) -> JsonFormat | None:
    fmt = text.format if text else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return JsonFormat(fmt.name, None, fmt.description, "text.format")
    return JsonFormat(fmt.name, fmt.schema_ or {}, fmt.description, "text.format.schema")


def _owner(request: Request) -> str:
    """Who owns the responses this request stores and may read (set by the app's gate)."""
    return getattr(request.state, "owner", "")


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request, service: ServiceDep) -> Any:
    service.check_model(body.model)
    items, prompt, fmt = await _prompt(body, service, _owner(request))
    max_tokens = service.completion_budget(len(prompt.tokens), body.max_output_tokens, "max_output_tokens")
    sampling = SamplingFields(temperature=body.temperature, top_p=body.top_p, seed=body.seed)
    params = sampling_params(sampling, max_tokens, 0, None, Tokenizer.STOP_TOKENS)
    constraint = await run_in_threadpool(prompt.constraint, max_tokens)
    stream = service.submit([SequenceRequest(prompt.tokens, params, 0, constraint)])
    output = HarmonyOutput((), prompt.tools_allowed)
    reply = _Reply(service, body, items, len(prompt.tokens), output, fmt, _owner(request), stream)
    if body.stream:
        return service.event_stream(stream, reply.events(stream))
    await service.run(request, stream, reply.feed)
    return reply.finish()


@router.post("/v1/responses/input_tokens")
async def count_input_tokens(body: InputTokensRequest, request: Request, service: ServiceDep) -> Any:
    """The prompt tokens a `POST /v1/responses` with this body would take."""
    if body.model is not None:
        service.check_model(body.model)
    _, prompt, _ = await _prompt(body, service, _owner(request))
    return {"object": "response.input_tokens", "input_tokens": len(prompt.tokens)}


async def _prompt(
    body: ResponsesRequest | InputTokensRequest, service: Service, owner: str
) -> tuple[list[dict[str, Any]], Prompt, JsonFormat | None]:
    """The conversation's items (stored ones of `owner` first), its prompt and the requested JSON
    format."""
    previous: list[dict[str, Any]] = []
    if body.previous_response_id:
        previous = service.store.conversation(body.previous_response_id, owner)
        if previous is None:
            raise APIError(
                404,
                f"Previous response with id {body.previous_response_id!r} not found.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
    new_items = (
        [{"type": "message", "role": "user", "content": body.input}]
        if isinstance(body.input, str)
        else [item.model_dump(exclude_none=True) for item in body.input]
    )
    items = previous + new_items
    messages = items_to_chat_messages(items)
    if body.instructions:
        messages.insert(0, {"role": "developer", "content": body.instructions})
    tools = [t.model_dump(exclude_none=True, exclude={"type"}) for t in body.tools]
    fmt = _json_format(body.text)
    tool_choice = parse_tool_choice(body.tool_choice, [t["name"] for t in tools])
    prompt = await run_in_threadpool(  # rendering and tokenizing: off the loop
        lambda: build_prompt(
            service.runner,
            messages,
            tools=tools,
            tool_choice=tool_choice,
            reasoning_effort=body.reasoning.effort if body.reasoning else None,
            json_format=fmt,
            tool_param="tools[{i}].parameters",
        )
    )
    return items, prompt, fmt


class _Reply:
    def __init__(
        self,
        service: Service,
        body: ResponsesRequest,
        input_items: list[dict[str, Any]],
        prompt_tokens: int,
        output: HarmonyOutput,
        fmt: JsonFormat | None,
        owner: str,
        stream: TokenStream,
    ) -> None:
        self.service = service
        self.owner = owner
        self.body = body
        self.stream = stream
        self.input_items = input_items
        self.prompt_tokens = prompt_tokens
        self.output = output
        self.items = _OutputItems(output)
        self.fmt = fmt
        self.id = new_id("resp_")
        self.created = int(time.time())

    def response(self, status: str) -> dict[str, Any]:
        body = self.body
        done = status != "in_progress"
        tool_choice = body.tool_choice if isinstance(body.tool_choice, str) else body.tool_choice.model_dump()
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": body.model,
            "output": self.items.items if done else [],
            "instructions": body.instructions,
            "tools": [t.model_dump(exclude_none=True) for t in body.tools],
            "tool_choice": tool_choice,
            "parallel_tool_calls": body.parallel_tool_calls,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "max_output_tokens": body.max_output_tokens,
            "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": body.reasoning.effort if body.reasoning else None, "summary": None},
            "text": (body.text or TextConfig()).model_dump(by_alias=True, exclude_none=True),
            "metadata": body.metadata or {},
            "store": body.store,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "usage": self.usage() if done else None,
        }

    def usage(self) -> dict[str, Any]:
        out = self.output
        return {
            "input_tokens": self.prompt_tokens,
            "input_tokens_details": {"cached_tokens": self.stream.cached},
            "output_tokens": out.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": out.reasoning_tokens},
            "total_tokens": self.prompt_tokens + out.completion_tokens,
        }

    def feed(self, event: TokenEvent) -> list[str]:
        """The stream events that one generated token produces."""
        return [line for e in self.output.feed(event) for line in self.items.on(e)]

    def finish(self) -> dict[str, Any]:
        """Close the last item, then the response; store it unless told not to."""
        self.items.close()
        for kind, count in self.output.parser.warnings.items():
            self.service.metrics.harmony_repairs.labels(kind).inc(count)
        if self.fmt is not None and check_json_format(self.fmt, self.output.content) is not None:
            self.service.metrics.format_violations.inc()
        response = self.response("incomplete" if self.output.finish_reason == "length" else "completed")
        if self.body.store:
            self.service.store.put(response, self.input_items, self.owner)
        return response

    async def events(self, stream: TokenStream) -> AsyncIterator[str]:
        yield self.items.event("response.created", response=self.response("in_progress"))
        yield self.items.event("response.in_progress", response=self.response("in_progress"))
        async for event in stream:
            for line in self.feed(event):
                yield line
        tail = self.items.close()
        response = self.finish()
        for line in tail:
            yield line
        yield self.items.event(f"response.{response['status']}", response=response)


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request, service: ServiceDep) -> Any:
    response = service.store.get(response_id, _owner(request))
    if response is None:
        raise APIError(404, f"No response with id {response_id!r} is stored.", param="response_id")
    return response


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request, service: ServiceDep) -> Any:
    if not service.store.delete(response_id, _owner(request)):
        raise APIError(404, f"No response with id {response_id!r} is stored.", param="response_id")
    return {"id": response_id, "object": "response", "deleted": True}


def _with_parts(item: dict[str, Any]) -> dict[str, Any]:
    """A stored message item with string content as the API lists it: a list of content parts."""
    if item.get("type", "message") != "message" or not isinstance(item.get("content"), str):
        return item
    kind = "output_text" if item.get("role") == "assistant" else "input_text"
    return {**item, "type": "message", "content": [{"type": kind, "text": item["content"]}]}


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(response_id: str, request: Request, service: ServiceDep) -> Any:
    items = service.store.input_items(response_id, _owner(request))
    if items is None:
        raise APIError(404, f"No response with id {response_id!r} is stored.", param="response_id")
    data = [{"id": item.get("id") or new_id("item_"), **_with_parts(item)} for item in items]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": False,
    }
