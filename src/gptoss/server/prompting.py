"""From an API request to prompt tokens: harmony rendering, tool choice and response formats.

`tool_choice` is enforced, not merely requested: "none" leaves the tools out of the prompt (the
model cannot call what it was not shown), "required" and a named function force the tool-call
header with a `PrefixConstraint` (spelled in the model's own vocabulary, so that trimmed models can
write it), so the model's first message is that call.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from openai_harmony import Message, Role

from gptoss.harmony import chat_messages_to_harmony, render_for_completion
from gptoss.inference import PrefixConstraint, Runner
from gptoss.server.errors import APIError
from gptoss.tokenizer import Tokenizer, get_harmony_encoding, get_tokenizer

# "minimal" is what newer OpenAI clients send for the least reasoning; gpt-oss's least is "low".
_EFFORT = {"minimal": "low", "low": "low", "medium": "medium", "high": "high"}


@dataclass(frozen=True)
class ToolChoice:
    mode: str  # "auto", "none" or "required"
    name: str | None = None  # the one function that must be called


@dataclass(frozen=True)
class Prompt:
    tokens: list[int]  # as the model reads them
    forced_headers: tuple[tuple[int, ...], ...]  # the output must begin with one (none: free)
    tools_allowed: bool  # False: a tool call the model makes anyway is dropped, not shown

    def constraint(self) -> PrefixConstraint | None:
        """A fresh constraint for one sequence (constraints follow their sequence's tokens)."""
        return PrefixConstraint(self.forced_headers) if self.forced_headers else None


@dataclass(frozen=True)
class JsonFormat:
    """A requested JSON answer: any object (`schema` None) or one matching a JSON Schema."""

    name: str
    schema: dict[str, Any] | None
    description: str | None = None


def parse_tool_choice(choice: Any, tool_names: Sequence[str]) -> ToolChoice:
    """Normalise chat (`{"type": "function", "function": {"name": ...}}`) and Responses
    (`{"type": "function", "name": ...}`) tool choices, checked against the tools given."""
    if choice is None:
        return ToolChoice("auto" if tool_names else "none")
    if isinstance(choice, str):
        if choice == "required" and not tool_names:
            raise APIError(400, 'tool_choice "required" needs at least one tool', param="tool_choice")
        return ToolChoice(choice)
    name = choice.function.name if hasattr(choice, "function") else choice.name
    if name not in tool_names:
        raise APIError(
            400, f"tool_choice names function {name!r}, which is not among the tools", param="tool_choice"
        )
    return ToolChoice("required", name)


def build_prompt(
    runner: Runner,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]],
    tool_choice: ToolChoice,
    reasoning_effort: str | None,
    json_format: JsonFormat | None = None,
) -> Prompt:
    """Prompt tokens for the next assistant turn of an OpenAI-style chat (`tools` are function
    definitions: name, description, parameters), in `runner`'s vocabulary. CPU work (rendering,
    tokenizing): call it off the event loop."""
    messages = list(messages)
    if json_format is not None:
        messages.append({"role": "developer", "content": response_format_instructions(json_format)})
    shown = list(tools) if tool_choice.mode != "none" else []
    try:
        conversation = chat_messages_to_harmony(
            messages, shown or None, reasoning_effort=_EFFORT[reasoning_effort or "medium"]
        )
        tokens = render_for_completion(conversation)
    except (ValueError, KeyError, TypeError) as exc:  # UnicodeError (a lone surrogate) included
        raise APIError(400, f"invalid messages: {exc}", param="messages") from None
    headers: tuple[tuple[int, ...], ...] = ()
    if tool_choice.mode == "required":
        names = [tool_choice.name] if tool_choice.name else [t["name"] for t in shown]
        headers = tuple(tuple(runner.fit_prompt(tool_call_header(name))) for name in names)
    return Prompt(runner.fit_prompt(tokens), headers, tools_allowed=bool(shown))


@functools.lru_cache(maxsize=1024)
def tool_call_header(name: str) -> tuple[int, ...]:
    """The tokens gpt-oss writes after ``<|start|>assistant`` to call function `name`, through
    ``<|message|>`` (as openai-harmony renders such a message, so the tokenisation is canonical)."""
    message = (
        Message.from_role_and_content(Role.ASSISTANT, "")
        .with_channel("commentary")
        .with_recipient(f"functions.{name}")
        .with_content_type("<|constrain|>json")
    )
    tokens = get_harmony_encoding().render(message)
    start = tokens.index(Tokenizer.START) + 1 + len(get_tokenizer().encode_ordinary(Role.ASSISTANT.value))
    return tuple(tokens[start : tokens.index(Tokenizer.MESSAGE) + 1])


def response_format_instructions(fmt: JsonFormat) -> str:
    """The harmony spec's "# Response Formats" developer section."""
    if fmt.schema is None:
        return "# Response Formats\n\nAnswer with a single valid JSON object and nothing else."
    description = f"// {fmt.description}\n" if fmt.description else ""
    return f"# Response Formats\n\n## {fmt.name}\n\n{description}{json.dumps(fmt.schema)}"
