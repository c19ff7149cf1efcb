"""One assistant turn of a chat, for the APIs that are not OpenAI's (Anthropic Messages, Ollama):
they convert their requests to OpenAI-style chat messages and then take the same steps as
/v1/chat/completions with one choice (harmony prompt, token budget, sampling, scheduler), so there
is one request pipeline whatever the API.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from gptoss.harmony import Event
from gptoss.inference import SequenceRequest, TokenEvent, TokenStream
from gptoss.server.errors import APIError
from gptoss.server.output import HarmonyOutput
from gptoss.server.prompting import JsonFormat, Prompt, ToolChoice, build_prompt
from gptoss.server.schemas import SamplingFields
from gptoss.server.service import Service, sampling_params
from gptoss.tokenizer import Tokenizer


@dataclass
class Turn:
    prompt_tokens: int
    stream: TokenStream
    output: HarmonyOutput

    def feed(self, event: TokenEvent) -> list[Event]:
        """The harmony events one generated token produces (a stop string ends the sequence)."""
        events = self.output.feed(event)
        if self.output.stopped:
            self.stream.cancel(event.index)
        return events


def sampling_fields(**fields: Any) -> SamplingFields:
    """Sampling controls given under another API's names, checked as chat's are (a bad value is a
    400 that names it); None means the default."""
    try:
        return SamplingFields(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(p) for p in error["loc"])
        raise APIError(400, f"{field}: {error['msg']}", param=field) from None


async def start_turn(
    service: Service,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]],
    tool_choice: ToolChoice,
    reasoning_effort: str | None,
    sampling: SamplingFields,
    max_tokens: int | None,
    max_tokens_param: str,
    stop: Sequence[str] = (),
    json_format: JsonFormat | None = None,
    tool_param: str = "tools[{i}].function.parameters",
) -> Turn:
    """Render the chat, budget its tokens and submit it; `max_tokens` None: whatever the context
    leaves."""

    def prepare() -> tuple[Prompt, HarmonyOutput]:  # rendering and tokenizing: off the event loop
        prompt = build_prompt(
            service.runner,
            messages,
            tools=tools,
            tool_choice=tool_choice,
            reasoning_effort=reasoning_effort,
            json_format=json_format,
            tool_param=tool_param,
        )
        return prompt, HarmonyOutput(stop, prompt.tools_allowed)

    prompt, output = await run_in_threadpool(prepare)
    budget = service.completion_budget(len(prompt.tokens), max_tokens, max_tokens_param)
    params = sampling_params(sampling, budget, 0, None, Tokenizer.STOP_TOKENS)
    constraint = await run_in_threadpool(prompt.constraint, budget)
    stream = service.submit([SequenceRequest(prompt.tokens, params, 0, constraint)])
    return Turn(len(prompt.tokens), stream, output)


def record_repairs(service: Service, output: HarmonyOutput) -> None:
    """Count the harmony repairs the parser made, as chat does."""
    for kind, count in output.parser.warnings.items():
        service.metrics.harmony_repairs.labels(kind).inc(count)
