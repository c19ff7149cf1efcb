"""From generated tokens to what the API returns, one token at a time.

`HarmonyOutput` (chat and Responses) runs harmony's never-raising `StreamParser` and keeps its three
streams apart: reasoning, visible text, tool calls. Reasoning and tool calls never reach `content`
whatever the model emits; stop strings apply to the visible text only. `TextOutput` is the raw
text of /v1/completions.
"""

from __future__ import annotations

import codecs
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gptoss.harmony import (
    Event,
    MessageEnd,
    ReasoningDelta,
    StreamParser,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
)
from gptoss.inference import TokenEvent
from gptoss.inference.stops import StopStrings
from gptoss.server.jsonschema_safe import validator
from gptoss.server.prompting import JsonFormat
from gptoss.tokenizer import get_tokenizer


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""


def new_id(prefix: str) -> str:
    """A fresh id in OpenAI's style: "chatcmpl-…", "call_…", "resp_…"."""
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def token_logprob(token: int, logprob: float, top: Sequence[tuple[int, float]] | None) -> dict[str, Any]:
    """One entry of chat `logprobs.content`: token text, its bytes, and the alternatives."""

    def entry(t: int, lp: float) -> dict[str, Any]:
        raw = get_tokenizer().decode_single_token_bytes(t)
        return {"token": raw.decode("utf-8", "replace"), "logprob": lp, "bytes": list(raw)}

    return entry(token, logprob) | {"top_logprobs": [entry(t, lp) for t, lp in top or ()]}


class HarmonyOutput:
    """One choice of a chat or Responses request.

    `feed` returns the harmony events to show for a token, already filtered: text cut at a stop
    string, tool calls dropped when the request allows none. The totals (`reasoning`, `content`,
    `tool_calls`, token counts) are kept for non-streaming answers.
    """

    def __init__(self, stop: Sequence[str] = (), tools_allowed: bool = True, logprobs: bool = False) -> None:
        self.parser = StreamParser()
        self.stopper = StopStrings(stop)
        self.tools_allowed = tools_allowed
        self.want_logprobs = logprobs
        self.reasoning = ""
        self.content = ""
        self.tool_calls: list[ToolCall] = []
        self.logprobs: list[dict[str, Any]] = []  # for content tokens
        self.completion_tokens = 0
        self.reasoning_tokens = 0
        self.stopped = False  # a stop string ended the text: cancel the sequence
        self.engine_finish: str | None = None
        self._last_stop: str | None = None  # the token that ended the last message
        self._dropping_call = False

    @property
    def finished(self) -> bool:
        return self.stopped or self.engine_finish is not None

    @property
    def finish_reason(self) -> str:
        if self.stopped:
            return "stop"
        if self.engine_finish == "length":
            return "length"
        return "tool_calls" if self.tool_calls and self._last_stop == "call" else "stop"

    def feed(self, event: TokenEvent) -> list[Event]:
        if self.stopped:
            return []
        self.completion_tokens += 1
        events = self.parser.feed(event.token)
        if event.finish_reason is not None:
            self.engine_finish = event.finish_reason
            events += self.parser.finish()
        out = self._filter(events)
        if any(isinstance(e, ReasoningDelta) for e in out):
            self.reasoning_tokens += 1
        if self.want_logprobs and event.logprob is not None and any(isinstance(e, TextDelta) for e in out):
            self.logprobs.append(token_logprob(event.token, event.logprob, event.top_logprobs))
        return out

    def _filter(self, events: list[Event]) -> list[Event]:
        out: list[Event] = []
        for e in events:
            if isinstance(e, ReasoningDelta):
                self.reasoning += e.text
                out.append(e)
            elif isinstance(e, TextDelta):
                text, found = self.stopper.push(e.text)
                if text:
                    self.content += text
                    out.append(TextDelta(text))
                if found is not None:
                    self.stopped = True
                    return out
            elif isinstance(e, ToolCallStart):
                self._dropping_call = not self.tools_allowed
                if not self._dropping_call:
                    self.tool_calls.append(ToolCall(new_id("call_"), e.name))
                    out.append(e)
            elif isinstance(e, ToolCallDelta):
                if not self._dropping_call:
                    self.tool_calls[-1].arguments += e.arguments
                    out.append(e)
            elif isinstance(e, MessageEnd):
                if tail := self.stopper.flush():  # a stop string does not span messages
                    self.content += tail
                    out.append(TextDelta(tail))
                self._last_stop = e.stop
                self._dropping_call = False
                out.append(e)
        return out


class TextOutput:
    """One choice of /v1/completions: the decoded text, stop tokens left out."""

    def __init__(self, stop: Sequence[str] = (), logprobs: int | None = None, offset: int = 0) -> None:
        self.stopper = StopStrings(stop)
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.want_logprobs = logprobs
        self.text = ""
        self.completion_tokens = 0
        self.stopped = False
        self.engine_finish: str | None = None
        self.offset = offset  # where the generated text starts (after an echoed prompt)
        self.logprobs: dict[str, list[Any]] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }

    @property
    def finished(self) -> bool:
        return self.stopped or self.engine_finish is not None

    @property
    def finish_reason(self) -> str:
        return "stop" if self.stopped else self.engine_finish or "stop"

    def feed(self, event: TokenEvent) -> str:
        """The new text this token releases."""
        if self.stopped:
            return ""
        self.completion_tokens += 1
        self.engine_finish = event.finish_reason
        raw = b"" if event.stop is not None else get_tokenizer().decode_single_token_bytes(event.token)
        piece = self.decoder.decode(raw, final=event.finish_reason is not None)
        if self.want_logprobs is not None and event.logprob is not None:
            top = {get_tokenizer().decode([t]): lp for t, lp in event.top_logprobs or ()}
            self.logprobs["tokens"].append(raw.decode("utf-8", "replace"))
            self.logprobs["token_logprobs"].append(event.logprob)
            self.logprobs["top_logprobs"].append(top)
            self.logprobs["text_offset"].append(self.offset + len(self.text) + len(self.stopper.pending))
        text, found = self.stopper.push(piece)
        self.stopped = found is not None
        if event.finish_reason is not None and not self.stopped:
            text += self.stopper.flush()
        self.text += text
        return text


def check_json_format(fmt: JsonFormat, text: str) -> str | None:
    """Why `text` does not satisfy the requested JSON format, or None if it does."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"the answer is not valid JSON: {exc}"
    if fmt.schema is None:
        return None if isinstance(value, dict) else "the answer is JSON but not an object"
    error = next(iter(validator(fmt.schema).iter_errors(value)), None)
    return None if error is None else f"the answer does not match schema {fmt.name!r}: {error.message}"
