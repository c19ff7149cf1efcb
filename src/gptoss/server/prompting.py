"""From an API request to prompt tokens: harmony rendering, tool choice and response formats.

`tool_choice` is enforced, not merely requested: "none" leaves the tools out of the prompt (the
model cannot call what it was not shown); "required" and a named function make the turn's
grammar (`gptoss.inference.grammar`) end in a call, so the model's answer is that call. The same
grammar holds a requested output format (JSON Schema, regex, choice, grammar) to the final answer
and strict tools' arguments to their schemas, while the reasoning stays free.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gptoss.harmony import chat_messages_to_harmony, render_for_completion
from gptoss.inference import Runner
from gptoss.inference.grammar import (
    Body,
    GrammarConstraint,
    GrammarError,
    HarmonyGrammar,
    ToolArgs,
    plain_grammar,
)
from gptoss.server.errors import APIError

# "minimal" is what newer OpenAI clients send for the least reasoning; gpt-oss's least is "low".
_EFFORT = {"minimal": "low", "low": "low", "medium": "medium", "high": "high"}


@dataclass(frozen=True)
class ToolChoice:
    mode: str  # "auto", "none" or "required"
    name: str | None = None  # the one function that must be called


@dataclass(frozen=True)
class Prompt:
    tokens: list[int]  # as the model reads them
    grammar: HarmonyGrammar | None  # what the turn must follow (None: free)
    tools_allowed: bool  # False: a tool call the model makes anyway is dropped, not shown

    def constraint(self, max_tokens: int) -> GrammarConstraint | None:
        """A fresh constraint for one sequence of at most `max_tokens` tokens (constraints follow
        their sequence's tokens). A few milliseconds of CPU: call it off the event loop."""
        return self.grammar.constraint(max_tokens) if self.grammar is not None else None


@dataclass(frozen=True)
class JsonFormat:
    """A requested JSON answer: any object (`schema` None) or one matching a JSON Schema."""

    name: str
    schema: dict[str, Any] | None
    description: str | None = None
    param: str = "response_format"  # the request field it came from

    def body(self) -> Body:
        """The final answer's constraint."""
        return Body("json_schema", self.schema if self.schema is not None else {"type": "object"}, self.param)


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
    output: Body | None = None,
    tool_param: str = "tools[{i}].function.parameters",
) -> Prompt:
    """Prompt tokens for the next assistant turn of an OpenAI-style chat (`tools` are function
    definitions: name, description, parameters, strict), in `runner`'s vocabulary, and the turn's
    grammar. `json_format` asks for JSON (in the prompt and by the grammar); `output` constrains
    the answer without telling the model (vLLM's guided_* fields); `tool_param` names a tool's
    schema in errors. CPU work (rendering, tokenizing, compiling): call it off the event loop."""
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
    if output is None and json_format is not None:
        output = json_format.body()
    grammar = turn_grammar(shown, tool_choice, output, tool_param, runner.token_rows)
    return Prompt(runner.fit_prompt(tokens), grammar, tools_allowed=bool(shown))


def turn_grammar(
    tools: Sequence[Mapping[str, Any]],
    tool_choice: ToolChoice,
    output: Body | None,
    tool_param: str,
    rows: tuple[int, ...] | None,
) -> HarmonyGrammar | None:
    """The grammar of the turn, or None when nothing constrains it (then decoding costs nothing
    extra). Once a grammar runs, every shown tool's arguments follow its schema: strict tools'
    always (a schema that cannot be compiled is a 400), the others' where their schema compiles."""
    strict = any(t.get("strict") for t in tools)
    if output is None and tool_choice.mode != "required" and not strict:
        return None
    callable_ = [
        (i, t) for i, t in enumerate(tools) if tool_choice.name is None or t["name"] == tool_choice.name
    ]
    args = tuple(
        ToolArgs(t["name"], t.get("parameters"), tool_param.format(i=i), strict=bool(t.get("strict")))
        for i, t in callable_
    )
    grammar = HarmonyGrammar(output, args, must_call=tool_choice.mode == "required", rows=rows)
    try:
        grammar.check()
    except GrammarError as exc:
        raise APIError(400, str(exc), param=exc.param) from None
    return grammar


def response_format_instructions(fmt: JsonFormat) -> str:
    """The harmony spec's "# Response Formats" developer section."""
    if fmt.schema is None:
        return "# Response Formats\n\nAnswer with a single valid JSON object and nothing else."
    description = f"// {fmt.description}\n" if fmt.description else ""
    return f"# Response Formats\n\n## {fmt.name}\n\n{description}{json.dumps(fmt.schema)}"


def text_grammar(output: Body, rows: tuple[int, ...] | None) -> str:
    """The grammar of raw completions' text (no harmony): the body alone, compiled (a 400 names
    the field that cannot be)."""
    try:
        return plain_grammar(output, rows)
    except GrammarError as exc:
        raise APIError(400, str(exc), param=exc.param) from None
