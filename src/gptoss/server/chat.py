"""POST /v1/chat/completions (harmony chat, tools, reasoning) and POST /v1/completions (raw text)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from gptoss.harmony import Event, ReasoningDelta, TextDelta, ToolCallDelta, ToolCallStart
from gptoss.inference import SequenceRequest, TokenEvent, TokenStream
from gptoss.inference.grammar import Body, GrammarConstraint, GrammarError, body_from_fields
from gptoss.server.errors import APIError
from gptoss.server.output import HarmonyOutput, TextOutput, check_json_format, new_id
from gptoss.server.prompting import JsonFormat, Prompt, build_prompt, parse_tool_choice, text_grammar
from gptoss.server.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessageOut,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    FunctionCallOut,
    ResponseFormat,
    SamplingFields,
    ToolCallOut,
    Usage,
)
from gptoss.server.service import Service, ServiceDep, check_logit_bias, sampling_params, sse
from gptoss.server.tokenize import prompt_logprobs
from gptoss.tokenizer import Tokenizer, get_tokenizer

router = APIRouter()


# ---------------------------------------------------------------------------------------------
# Chat completions
# ---------------------------------------------------------------------------------------------


def chunk_json(chunk: ChatCompletionChunk | Completion, include_usage: bool) -> str:
    """A stream chunk as SSE: absent fields left out, except the ones OpenAI always sends
    (`finish_reason`, and `usage` when the client asked for it)."""
    data = chunk.model_dump(exclude_none=True)
    for choice in data["choices"]:
        choice.setdefault("finish_reason", None)
    if include_usage:
        data.setdefault("usage", None)
    return sse(data)


def json_format(fmt: ResponseFormat | None) -> JsonFormat | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return JsonFormat("json_object", None)
    if fmt.json_schema is None:
        raise APIError(
            400, "response_format.json_schema is required with type 'json_schema'", param="response_format"
        )
    spec = fmt.json_schema
    return JsonFormat(spec.name, spec.schema_ or {}, spec.description, "response_format.json_schema.schema")


def output_constraint(body: SamplingFields, fmt: JsonFormat | None) -> tuple[JsonFormat | None, Body | None]:
    """The requested output format: `response_format`, or one of vLLM's and llama.cpp's fields
    (in chat, a JSON Schema among them is treated as `response_format` is: shown to the model)."""
    try:
        output = body_from_fields(body.guided())
    except GrammarError as exc:
        raise APIError(400, str(exc), param=exc.param) from None
    if output is None:
        return fmt, None
    if fmt is not None:
        raise APIError(400, f"give response_format or {output.param}, not both", param=output.param)
    if output.kind == "json_schema" and isinstance(body, ChatCompletionRequest):
        return JsonFormat("response", output.spec, None, output.param), None
    return None, output


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def chat_completions(body: ChatCompletionRequest, request: Request, service: ServiceDep) -> Any:
    service.check_model(body.model)
    check_logit_bias(body.logit_bias, service.runner.vocab_size)
    tools = [t.function.model_dump(exclude_none=True) for t in body.tools or []]
    fmt, output = output_constraint(body, json_format(body.response_format))
    tool_choice = parse_tool_choice(body.tool_choice, [t["name"] for t in tools])

    def prepare() -> tuple[Prompt, list[HarmonyOutput]]:  # rendering and tokenizing: off the loop
        prompt = build_prompt(
            service.runner,
            [m.model_dump(exclude_none=True) for m in body.messages],
            tools=tools,
            tool_choice=tool_choice,
            reasoning_effort=body.reasoning_effort,
            json_format=fmt,
            output=output,
        )
        return prompt, [HarmonyOutput(body.stop, prompt.tools_allowed, body.logprobs) for _ in range(body.n)]

    prompt, outputs = await run_in_threadpool(prepare)
    requested = body.max_completion_tokens or body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    max_tokens = service.completion_budget(len(prompt.tokens), requested, param)
    constraints = await run_in_threadpool(lambda: [prompt.constraint(max_tokens) for _ in range(body.n)])
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    stop_ids = Tokenizer.STOP_TOKENS
    stream = service.submit(
        [
            SequenceRequest(
                prompt.tokens,
                sampling_params(body, max_tokens, i, logprobs, stop_ids),
                i,
                constraints[i],
            )
            for i in range(body.n)
        ]
    )
    reply = _ChatReply(service, body, len(prompt.tokens), outputs, fmt, stream)
    if body.stream:
        return service.event_stream(stream, reply.chunks(stream))
    await service.run(request, stream, lambda event: reply.feed(stream, event))
    return reply.completion()


class _ChatReply:
    """Builds the answer of one chat request, as chunks or as one completion."""

    def __init__(
        self,
        service: Service,
        body: ChatCompletionRequest,
        prompt_tokens: int,
        outputs: list[HarmonyOutput],
        fmt: JsonFormat | None,
        stream: TokenStream,
    ) -> None:
        self.service = service
        self.body = body
        self.prompt_tokens = prompt_tokens
        self.outputs = outputs
        self.stream = stream
        self.fmt = fmt
        self.id = new_id("chatcmpl-")
        self.created = int(time.time())

    def feed(self, stream: TokenStream, event: TokenEvent) -> list[Event]:
        out = self.outputs[event.index]
        events = out.feed(event)
        if out.stopped:  # a stop string: no more tokens needed for this choice
            stream.cancel(event.index)
        if out.finished:
            self._on_finish(out)
        return events

    def _on_finish(self, out: HarmonyOutput) -> None:
        for kind, count in out.parser.warnings.items():
            self.service.metrics.harmony_repairs.labels(kind).inc(count)
        if self.fmt is not None and check_json_format(self.fmt, out.content) is not None:
            self.service.metrics.format_violations.inc()

    def usage(self) -> Usage:
        completion = sum(o.completion_tokens for o in self.outputs)
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
            completion_tokens_details={"reasoning_tokens": sum(o.reasoning_tokens for o in self.outputs)},
            prompt_tokens_details={"cached_tokens": self.stream.cached},
        )

    def completion(self) -> ChatCompletion:
        choices = []
        for i, out in enumerate(self.outputs):
            calls = [
                ToolCallOut(
                    index=k,
                    id=c.id,
                    type="function",
                    function=FunctionCallOut(name=c.name, arguments=c.arguments),
                )
                for k, c in enumerate(out.tool_calls)
            ]
            message = ChatMessageOut(
                content=out.content if out.content or not calls else None,
                reasoning=out.reasoning or None,
                reasoning_content=out.reasoning or None,
                tool_calls=calls or None,
            )
            choices.append(
                ChatChoice(
                    index=i,
                    message=message,
                    finish_reason=out.finish_reason,
                    logprobs=ChoiceLogprobs(content=out.logprobs) if self.body.logprobs else None,
                    response_format_error=check_json_format(self.fmt, out.content) if self.fmt else None,
                )
            )
        return ChatCompletion(
            id=self.id,
            created=self.created,
            model=self.body.model,
            system_fingerprint=self.service.fingerprint,
            choices=choices,
            usage=self.usage(),
        )

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        chunk = ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.body.model,
            system_fingerprint=self.service.fingerprint,
            choices=choices,
            usage=usage,
        )
        return chunk_json(chunk, self._include_usage)

    @property
    def _include_usage(self) -> bool:
        return bool(self.body.stream_options and self.body.stream_options.include_usage)

    async def chunks(self, stream: TokenStream) -> AsyncIterator[str]:
        for i in range(len(self.outputs)):
            yield self._chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
        async for event in stream:
            out = self.outputs[event.index]
            seen_logprobs = len(out.logprobs)
            for e in self.feed(stream, event):
                if (delta := self._delta(out, e)) is not None:
                    logprobs = None
                    if self.body.logprobs and isinstance(e, TextDelta):
                        logprobs = ChoiceLogprobs(content=out.logprobs[seen_logprobs:])
                        seen_logprobs = len(out.logprobs)
                    yield self._chunk([ChatChunkChoice(index=event.index, delta=delta, logprobs=logprobs)])
            if out.finished:
                yield self._chunk(
                    [ChatChunkChoice(index=event.index, delta=ChatDelta(), finish_reason=out.finish_reason)]
                )
        if self._include_usage:
            yield self._chunk([], self.usage())
        yield sse("[DONE]")

    @staticmethod
    def _delta(out: HarmonyOutput, e: Event) -> ChatDelta | None:
        if isinstance(e, ReasoningDelta):
            return ChatDelta(reasoning=e.text, reasoning_content=e.text)
        if isinstance(e, TextDelta):
            return ChatDelta(content=e.text)
        if isinstance(e, ToolCallStart):
            call = out.tool_calls[-1]
            function = FunctionCallOut(name=call.name, arguments="")
            return ChatDelta(
                tool_calls=[
                    ToolCallOut(index=len(out.tool_calls) - 1, id=call.id, type="function", function=function)
                ]
            )
        if isinstance(e, ToolCallDelta):
            function = FunctionCallOut(arguments=e.arguments)
            return ChatDelta(tool_calls=[ToolCallOut(index=len(out.tool_calls) - 1, function=function)])
        return None  # MessageEnd: nothing to show


# ---------------------------------------------------------------------------------------------
# Completions
# ---------------------------------------------------------------------------------------------


def _prompts(prompt: str | list[str] | list[int] | list[list[int]], vocab_size: int) -> list[list[int]]:
    """Token ids of each prompt; text may contain harmony special tokens (raw completions are how
    one drives the chat format by hand)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        prompt = [prompt]  # one prompt given as token ids
    tokenizer = get_tokenizer()
    out = [tokenizer.encode(p, allowed_special="all") if isinstance(p, str) else list(p) for p in prompt]
    for tokens in out:
        if any(not 0 <= t < vocab_size for t in tokens):
            raise APIError(400, f"prompt token ids must lie in 0..{vocab_size - 1}", param="prompt")
    if not out:
        raise APIError(400, "the prompt is empty", param="prompt")
    return out


@router.post("/v1/completions", response_model=Completion)
async def completions(body: CompletionRequest, request: Request, service: ServiceDep) -> Any:
    service.check_model(body.model)
    check_logit_bias(body.logit_bias, service.runner.vocab_size)
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if body.max_tokens == 0 and body.stream:
        raise APIError(400, "max_tokens 0 scores the prompt only and does not stream", param="stream")

    def prepare() -> tuple[list[list[int]], list[str]]:  # tokenizing: off the loop
        prompts = [service.runner.fit_prompt(p) for p in _prompts(body.prompt, service.runner.vocab_size)]
        return prompts, [get_tokenizer().decode(tokens) if body.echo else "" for tokens in prompts]

    prompts, texts = await run_in_threadpool(prepare)
    _, output = output_constraint(body, None)
    rows = service.runner.token_rows
    grammar = await run_in_threadpool(text_grammar, output, rows) if output is not None else None
    requests = []
    stop_ids = Tokenizer.STOP_TOKENS
    for p, tokens in enumerate(prompts):
        max_tokens = service.completion_budget(len(tokens), body.max_tokens, "max_tokens")
        for i in range(body.n if max_tokens else 0):
            params = sampling_params(body, max_tokens, i, body.logprobs, stop_ids)
            requests.append(
                SequenceRequest(tokens, params, p * body.n + i, grammar and GrammarConstraint(grammar, rows))
            )
    outputs = await run_in_threadpool(
        lambda: [
            TextOutput(body.stop, body.logprobs, len(texts[k // body.n])) for k in range(len(texts) * body.n)
        ]
    )
    if body.echo and body.logprobs is not None:  # the prompt's own log-probabilities come first
        for p, tokens in enumerate(prompts):
            scored = prompt_logprobs(tokens, await service.score(tokens, body.logprobs))
            for out in outputs[p * body.n : (p + 1) * body.n]:
                for key, values in scored.items():
                    out.logprobs[key].extend(values)
    reply_id, created = new_id("cmpl-"), int(time.time())
    prompt_tokens = sum(len(t) for t in prompts)

    stream: TokenStream | None = None

    def usage() -> Usage:
        completion = sum(o.completion_tokens for o in outputs)
        # Each prompt counted once: the tokens its first choice took from the prefix cache.
        cached = sum(stream.cached_tokens.get(p * body.n, 0) for p in range(len(prompts))) if stream else 0
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion,
            total_tokens=prompt_tokens + completion,
            prompt_tokens_details={"cached_tokens": cached},
        )

    def feed(event: TokenEvent) -> str:
        out = outputs[event.index]
        text = out.feed(event)
        if out.stopped:
            stream.cancel(event.index)
        return text

    def logprobs(out: TextOutput, start: int = 0) -> CompletionLogprobs | None:
        if body.logprobs is None:
            return None
        return CompletionLogprobs(**{k: v[start:] for k, v in out.logprobs.items()})

    def reply(choices: list[CompletionChoice], with_usage: bool) -> Completion:
        return Completion(
            id=reply_id,
            created=created,
            model=body.model,
            system_fingerprint=service.fingerprint,
            choices=choices,
            usage=usage() if with_usage else None,
        )

    if body.max_tokens == 0:  # nothing to generate: the echoed prompt (and its scores) is the answer
        choices = [
            CompletionChoice(index=k, text=texts[k // body.n], finish_reason="length", logprobs=logprobs(o))
            for k, o in enumerate(outputs)
        ]
        return reply(choices, with_usage=True)
    stream = service.submit(requests)
    if not body.stream:
        await service.run(request, stream, feed)
        choices = [
            CompletionChoice(
                index=k, text=texts[k // body.n] + o.text, finish_reason=o.finish_reason, logprobs=logprobs(o)
            )
            for k, o in enumerate(outputs)
        ]
        return reply(choices, with_usage=True)

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def chunks() -> AsyncIterator[str]:
        if body.echo:
            choices = [
                CompletionChoice(index=k, text=texts[k // body.n], finish_reason=None, logprobs=logprobs(o))
                for k, o in enumerate(outputs)
            ]
            yield chunk_json(reply(choices, False), include_usage)
        async for event in stream:
            out = outputs[event.index]
            seen = len(out.logprobs["tokens"])
            text = feed(event)
            finish = out.finish_reason if out.finished else None
            if text or finish:
                choice = CompletionChoice(
                    index=event.index, text=text, finish_reason=finish, logprobs=logprobs(out, seen)
                )
                yield chunk_json(reply([choice], False), include_usage)
        if include_usage:
            yield chunk_json(reply([], True), include_usage)
        yield sse("[DONE]")

    return service.event_stream(stream, chunks())
