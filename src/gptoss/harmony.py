"""The harmony chat format: rendering, OpenAI-chat conversion, and a streaming parser that never raises.

Rendering is openai-harmony's (token-identical by construction); we only choose which messages
to render. Parsing model output is hand-written: openai-harmony's StreamableParser raises
HarmonyError on malformed output (an unknown role, text between messages, a doubled <|start|>,
EOS inside a header), and a server must turn whatever the model emits into the most sensible
text instead of an HTTP 500. Each anomaly is counted in ``StreamParser.warnings``.
"""

from __future__ import annotations

import codecs
import json
import re
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    RenderConversationConfig,
    Role,
    SystemContent,
    TextContent,
    ToolDescription,
)

from gptoss.tokenizer import Tokenizer, get_harmony_encoding, get_tokenizer

__all__ = [
    "Event",
    "MessageEnd",
    "ReasoningDelta",
    "StreamParser",
    "TextDelta",
    "ToolCallDelta",
    "ToolCallStart",
    "chat_messages_to_harmony",
    "developer_message",
    "harmony_to_chat_messages",
    "parse_completion",
    "render_for_completion",
    "render_for_training",
    "system_message",
]

_EFFORTS = {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}
# We decide which reasoning to keep ourselves (see _drop_stale_reasoning), so the library must not.
_RENDER_ALL = RenderConversationConfig(auto_drop_analysis=False)
_JSON = "<|constrain|>json"  # the content type gpt-oss writes on function calls


# ---------------------------------------------------------------------------------------------
# Building and rendering conversations
# ---------------------------------------------------------------------------------------------


def system_message(
    reasoning_effort: str = "medium", *, knowledge_cutoff: str = "2024-06", current_date: str | None = None
) -> Message:
    """The harmony system message. Identity and channel list keep openai-harmony's defaults,
    which are what gpt-oss was trained with."""
    effort = _EFFORTS.get(reasoning_effort.lower())
    if effort is None:
        raise ValueError(f"reasoning_effort must be one of {sorted(_EFFORTS)}, got {reasoning_effort!r}")
    content = SystemContent.new().with_reasoning_effort(effort).with_knowledge_cutoff(knowledge_cutoff)
    if current_date is not None:
        content = content.with_conversation_start_date(current_date)
    return Message.from_role_and_content(Role.SYSTEM, content)


def developer_message(
    instructions: str | None = None, tools: Sequence[Mapping[str, Any]] | None = None
) -> Message | None:
    """The developer message (the usual "system prompt" plus function tools), or None if empty.

    ``tools`` are OpenAI-style (``{"type": "function", "function": {...}}``) or bare function
    objects with ``name``, ``description`` and a JSON Schema ``parameters``.
    """
    if not instructions and not tools:
        return None
    content = DeveloperContent.new()
    if instructions:
        content = content.with_instructions(instructions)
    if tools:
        content = content.with_function_tools([_tool_description(tool) for tool in tools])
    return Message.from_role_and_content(Role.DEVELOPER, content)


def _tool_description(tool: Mapping[str, Any]) -> ToolDescription:
    fn = tool.get("function", tool)
    if "name" not in fn:
        raise ValueError(f"tool has no name: {tool!r}")
    return ToolDescription.new(fn["name"], fn.get("description") or "", parameters=fn.get("parameters"))


def _drop_stale_reasoning(messages: Sequence[Message], keep_last_turn: bool) -> list[Message]:
    """Drop the analysis messages of turns that ended in a final answer, as the harmony spec says.

    Reasoning of the turn in progress (a tool-call loop) is kept, since the model continues it.
    We do this ourselves because openai-harmony's ``auto_drop_analysis`` (0.0.8) only drops
    reasoning before the *first* final message, and only when the last assistant message is
    final: later turns' reasoning stays in the prompt. For training, the last turn is the target
    and keeps its reasoning.
    """
    kept: list[Message] = []
    turn_has_final = False  # whether the turn of the message being looked at ended in `final`
    in_last_turn = True
    for m in reversed(messages):  # backwards, so a turn's ending is known before its reasoning
        stale = turn_has_final and not (keep_last_turn and in_last_turn)
        if m.author.role == Role.USER:
            turn_has_final, in_last_turn = False, False
        elif m.author.role == Role.ASSISTANT and m.channel == "final":
            turn_has_final = True
        elif m.author.role == Role.ASSISTANT and m.channel == "analysis" and stale:
            continue
        kept.append(m)
    return kept[::-1]


# openai-harmony renders in Rust without releasing the GIL, ~0.5 s per MB of text: a server thread
# rendering a huge prompt would freeze the event loop. Message bodies longer than this are rendered
# as a short placeholder and tokenized apart (tiktoken lets other threads run), then spliced in.
_SPLICE_CHARS = 2048
_PLACEHOLDER = "gptoss-splice-{}-"


def render_for_completion(messages: Sequence[Message]) -> list[int]:
    """Prompt tokens for the next assistant turn, ending with ``<|start|>assistant``."""
    messages = _drop_stale_reasoning(messages, keep_last_turn=False)
    bodies: dict[int, str] = {}  # message index → body rendered apart
    shown = []
    for i, m in enumerate(messages):
        text = m.content[0].text if len(m.content) == 1 and isinstance(m.content[0], TextContent) else ""
        if m.author.role not in (Role.SYSTEM, Role.DEVELOPER) and len(text) > _SPLICE_CHARS:
            bodies[i] = text
            m = m.model_copy(update={"content": [TextContent(text=_PLACEHOLDER.format(i))]})
        shown.append(m)
    tokens = get_harmony_encoding().render_conversation_for_completion(
        Conversation.from_messages(shown), Role.ASSISTANT, _RENDER_ALL
    )
    if bodies:
        tokens = _splice(tokens, bodies, messages)
    return tokens


def _splice(tokens: list[int], bodies: dict[int, str], messages: Sequence[Message]) -> list[int]:
    """Replace each placeholder body (it stands alone between ``<|message|>`` and the message's end
    token, where harmony encodes a body as ordinary text) with its text's tokens."""
    tokenizer = get_tokenizer()
    out, start = [], 0
    for i, text in bodies.items():
        marker = [Tokenizer.MESSAGE, *tokenizer.encode_ordinary(_PLACEHOLDER.format(i))]
        at = _find(tokens, marker, start)
        if at < 0:  # not rendered as a plain body: render that message the slow, certain way
            return get_harmony_encoding().render_conversation_for_completion(
                Conversation.from_messages(list(messages)), Role.ASSISTANT, _RENDER_ALL
            )
        out += tokens[start : at + 1] + tokenizer.encode_ordinary_in_pieces(text)
        start = at + len(marker)
    return out + tokens[start:]


def _find(tokens: list[int], marker: list[int], start: int) -> int:
    first = marker[0]
    for at in range(start, len(tokens) - len(marker) + 1):
        if tokens[at] == first and tokens[at : at + len(marker)] == marker:
            return at
    return -1


def render_for_training(messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
    """Tokens of a whole conversation, and a loss mask that is True on the tokens to learn.

    The mask covers the assistant messages of the last turn (after the last user message),
    exactly the tokens the model generates at inference: everything after the
    ``<|start|>assistant`` that the prompt supplies, including the ``<|start|>assistant`` between
    its own consecutive messages and the closing ``<|return|>``/``<|call|>``. Earlier turns are
    context only: their reasoning is dropped (as at inference), so learning them would teach the
    model to answer without thinking.
    """
    kept = _drop_stale_reasoning(messages, keep_last_turn=True)
    tokens = get_harmony_encoding().render_conversation_for_training(
        Conversation.from_messages(kept), _RENDER_ALL
    )
    # Every rendered message starts with <|start|>, and text is encoded without specials, so the
    # <|start|> positions are the message boundaries.
    starts = [i for i, t in enumerate(tokens) if t == Tokenizer.START]
    assert len(starts) == len(kept), "a rendered message did not begin with <|start|>"
    ends = [*starts[1:], len(tokens)]
    prefill = 1 + len(get_tokenizer().encode_ordinary(Role.ASSISTANT.value))
    last_user = max((i for i, m in enumerate(kept) if m.author.role == Role.USER), default=-1)
    mask = [False] * len(tokens)
    for i in range(last_user + 1, len(kept)):
        if kept[i].author.role != Role.ASSISTANT:
            continue
        begin = starts[i]
        if i == 0 or kept[i - 1].author.role != Role.ASSISTANT:
            begin += prefill
        mask[begin : ends[i]] = [True] * (ends[i] - begin)
    return tokens, mask


# ---------------------------------------------------------------------------------------------
# OpenAI chat messages <-> harmony messages
# ---------------------------------------------------------------------------------------------


def _text(content: Any) -> str:
    """Text of an OpenAI message ``content``: a string, None, or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text":
                raise ValueError(f"gpt-oss reads text only; unsupported content part {part!r}")
            texts.append(part["text"])
        return "".join(texts)
    raise ValueError(f"message content must be a string or a list of text parts, got {content!r}")


def _assistant(text: str, channel: str) -> Message:
    return Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)


def chat_messages_to_harmony(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    reasoning_effort: str = "medium",
    knowledge_cutoff: str = "2024-06",
    current_date: str | None = None,
) -> list[Message]:
    """Convert an OpenAI-style chat (plus its ``tools``) into a full harmony conversation.

    The harmony system message carries the metadata. OpenAI ``system`` and ``developer``
    messages are both what harmony calls developer instructions, so they are joined into one
    developer message together with the tools. Assistant ``reasoning_content`` (or
    ``reasoning``) becomes an analysis message; ``tool_calls`` become commentary messages to
    ``functions.NAME``, with any accompanying content as a preamble before them; tool results
    find their function name through ``tool_call_id``. Raises ValueError on malformed input.
    """
    instructions = [_text(m.get("content")) for m in messages if m.get("role") in ("system", "developer")]
    out = [system_message(reasoning_effort, knowledge_cutoff=knowledge_cutoff, current_date=current_date)]
    developer = developer_message("\n\n".join(i for i in instructions if i) or None, tools)
    if developer is not None:
        out.append(developer)
    call_names: dict[str, str] = {}  # tool_call_id -> function name
    for m in messages:
        role = m.get("role")
        if role in ("system", "developer"):
            continue
        if role == "user":
            out.append(Message.from_role_and_content(Role.USER, _text(m.get("content"))))
        elif role == "assistant":
            out.extend(_assistant_to_harmony(m, call_names))
        elif role == "tool":
            name = call_names.get(m.get("tool_call_id", "")) or m.get("name")
            if not name:
                raise ValueError(
                    f"tool message answers no earlier tool call (tool_call_id={m.get('tool_call_id')!r})"
                )
            author = Author.new(Role.TOOL, f"functions.{name}")
            result = Message.from_author_and_content(author, _text(m.get("content")))
            out.append(result.with_channel("commentary").with_recipient("assistant"))
        else:
            raise ValueError(f"unsupported chat message role {role!r}")
    return out


def _assistant_to_harmony(m: Mapping[str, Any], call_names: dict[str, str]) -> list[Message]:
    reasoning = _text(m.get("reasoning_content") or m.get("reasoning"))
    content = _text(m.get("content"))
    calls = m.get("tool_calls") or []
    out = [_assistant(reasoning, "analysis")] if reasoning else []
    if calls:
        if content:
            out.append(_assistant(content, "commentary"))  # a preamble, shown to the user
        for call in calls:
            fn = call["function"]
            arguments = fn.get("arguments") or ""
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments)
            if "id" in call:
                call_names[call["id"]] = fn["name"]
            message = _assistant(arguments, "commentary").with_recipient(f"functions.{fn['name']}")
            out.append(message.with_content_type(_JSON))
    elif content or not reasoning:
        out.append(_assistant(content, "final"))
    return out


def _message_text(m: Message) -> str:
    return "".join(c.text for c in m.content if isinstance(c, TextContent))


_Kind = Literal["reasoning", "text", "tool_call"]


def _kind(role: Role, channel: str | None, recipient: str | None) -> _Kind | None:
    """What an assistant message is for the chat API; None for other roles."""
    if role != Role.ASSISTANT:
        return None
    if recipient is not None:
        return "tool_call"
    if channel in (None, "final", "commentary"):  # commentary without recipient: a user-visible preamble
        return "text"
    return "reasoning"  # analysis, and unknown channels: hiding stray text beats leaking chain of thought


def _function_name(recipient: str) -> str:
    return recipient.removeprefix("functions.")


def harmony_to_chat_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Convert harmony messages (a parsed completion, or a whole conversation) to OpenAI chat form.

    Consecutive assistant messages become one chat message with ``content`` (final text and
    preambles), ``reasoning_content`` and ``tool_calls``; tool calls get fresh ids, which the
    following tool results reference. The system message (metadata) and tool definitions are
    not chat messages and are left out; developer instructions come back as a ``system`` message.
    """
    out: list[dict[str, Any]] = []
    unanswered: list[dict[str, Any]] = []  # tool calls waiting for their result, oldest first
    for m in messages:
        role = m.author.role
        text = _message_text(m)
        if role == Role.DEVELOPER:
            instructions = next((c.instructions for c in m.content if isinstance(c, DeveloperContent)), None)
            if instructions or text:
                out.append({"role": "system", "content": instructions or text})
        elif role == Role.USER:
            out.append({"role": "user", "content": text})
        elif role == Role.TOOL:
            name = _function_name(m.author.name or "")
            call = next((c for c in unanswered if c["function"]["name"] == name), None)
            if call is not None:
                unanswered.remove(call)
            call_id = call["id"] if call is not None else _new_call_id()
            out.append({"role": "tool", "tool_call_id": call_id, "content": text})
        elif role == Role.ASSISTANT:
            if not out or out[-1]["role"] != "assistant":
                out.append({"role": "assistant", "content": None})
            chat = out[-1]
            kind = _kind(role, m.channel, m.recipient)
            if kind == "reasoning":
                chat["reasoning_content"] = "\n\n".join(filter(None, [chat.get("reasoning_content"), text]))
            elif kind == "text":
                chat["content"] = (chat["content"] or "") + text
            else:
                function = {"name": _function_name(m.recipient or ""), "arguments": text}
                call = {"id": _new_call_id(), "type": "function", "function": function}
                chat.setdefault("tool_calls", []).append(call)
                unanswered.append(call)
    for chat in out:  # an assistant message without tool calls always has (possibly empty) content
        if chat["role"] == "assistant" and chat["content"] is None and "tool_calls" not in chat:
            chat["content"] = ""
    return out


def _new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# ---------------------------------------------------------------------------------------------
# Streaming parser
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """Chain-of-thought text (the analysis channel); not held to the safety bar of answers."""

    text: str


@dataclass(frozen=True, slots=True)
class TextDelta:
    """User-visible text: the final answer, or a commentary preamble before tool calls."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    """A tool call begins; ``name`` is the function name (``functions.`` stripped)."""

    name: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of the current tool call's arguments (JSON text, as the model writes it)."""

    arguments: str


@dataclass(frozen=True, slots=True)
class MessageEnd:
    """A message is complete. ``stop`` is the token that ended it: ``"end"``, ``"return"`` (the
    answer is done), ``"call"`` (run the tool), or None if the stream stopped first."""

    message: Message
    stop: Literal["end", "return", "call"] | None


Event = ReasoningDelta | TextDelta | ToolCallStart | ToolCallDelta | MessageEnd

_STOPS: dict[int, Literal["end", "return", "call"]] = {
    Tokenizer.END: "end",
    Tokenizer.RETURN: "return",
    Tokenizer.CALL: "call",
    Tokenizer.ENDOFTEXT: "return",  # the checkpoint's generic EOS also ends the answer
}
_HEADER_SPECIALS = frozenset({Tokenizer.CHANNEL, Tokenizer.CONSTRAIN})
_KNOWN_CHANNELS = frozenset({"analysis", "commentary", "final"})
_ROLES = {r.value: r for r in Role}
# Real headers are under 20 tokens; a longer one means the model forgot <|message|> and is
# writing content, which we should stream rather than buffer until the end.
_MAX_HEADER_TOKENS = 64
# One field of a header such as "assistant to=functions.f<|channel|>commentary <|constrain|>json".
_FIELD = re.compile(
    r"\s*(?:<\|channel\|>(?P<channel>[^\s<]+)"
    r"|<\|constrain\|>(?P<constrain>[^\s<]+)"
    r"|(?P<marker><\|channel\|>|<\|constrain\|>)"
    r"|to=(?P<to>[^\s<]+)"
    r"|(?P<word>.+?)(?=\s|<\|channel\|>|<\|constrain\|>|$))"
)


@dataclass
class _Header:
    role: Role
    name: str | None
    channel: str | None
    recipient: str | None
    content_type: str | None


@dataclass
class _Open:
    header: _Header
    kind: _Kind | None
    decoder: codecs.IncrementalDecoder
    parts: list[str]


class StreamParser:
    """Turns generated tokens into events, one token at a time, and never raises.

    Feed every generated token, stop tokens included, then call ``finish()``. ``role`` is the
    role the prompt's prefill already opened (``<|start|>assistant``); None expects a
    ``<|start|>`` first. Malformed output is repaired into the most plausible messages and each
    repair is counted in ``warnings`` (a Counter keyed by kind of anomaly).
    """

    def __init__(self, role: str | None = Role.ASSISTANT.value) -> None:
        self.warnings: Counter[str] = Counter()
        self._tokenizer = get_tokenizer()
        self._role_hint = role  # the role of the next header when the header itself has none
        self._header: list[int] | None = [] if role is not None else None  # None: between messages
        self._open: _Open | None = None

    def feed(self, token: int) -> list[Event]:
        """Consume one token; return the events it completes (often none or one)."""
        events: list[Event] = []
        token = int(token)
        if not 0 <= token < Tokenizer.N_VOCAB:
            self.warnings["unknown_token"] += 1
        elif self._open is not None:
            self._feed_content(token, events)
        elif self._header is not None:
            self._feed_header(token, events)
        else:
            self._feed_between(token, events)
        return events

    def finish(self) -> list[Event]:
        """End of stream: flush what is pending, closing a truncated message with ``stop=None``."""
        events: list[Event] = []
        if self._open is not None:
            self.warnings["truncated"] += 1
            self._close(None, events)
        elif self._header:  # cut off inside a header: keep only text the model already wrote
            self.warnings["truncated"] += 1
            header, leftover = self._parse_header(self._header, self._role_hint, complete=False)
            if leftover:
                self._open_message(header, leftover, events)
                self._close(None, events)
        self._header = None
        return events

    # -- states ------------------------------------------------------------------------------

    def _feed_between(self, token: int, events: list[Event]) -> None:
        if token == Tokenizer.START:
            self._start_header(None)
        elif token == Tokenizer.MESSAGE:  # content with no header at all: plain assistant text
            self.warnings["missing_start"] += 1
            self._open_message(_Header(Role.ASSISTANT, None, None, None, None), "", events)
        elif token in _HEADER_SPECIALS:  # "<|channel|>final..." without "<|start|>assistant"
            self.warnings["missing_start"] += 1
            self._start_header(Role.ASSISTANT.value, token)
        elif token < Tokenizer.STARTOFTEXT:  # text: most likely a header whose <|start|> is missing
            self.warnings["missing_start"] += 1
            self._start_header(None, token)
        else:
            self.warnings["stray_special"] += 1

    def _feed_header(self, token: int, events: list[Event]) -> None:
        assert self._header is not None
        if token == Tokenizer.MESSAGE:
            header, _ = self._parse_header(self._header, self._role_hint, complete=True)
            self._header = None
            self._open_message(header, "", events)
        elif token == Tokenizer.START:
            self.warnings["abandoned_header" if self._header else "repeated_start"] += 1
            self._start_header(None)
        elif token in _STOPS:
            if not self._header:
                self.warnings["empty_message"] += 1
                self._header = None
                return
            self.warnings["missing_message"] += 1
            self._open_from_partial_header(events)
            self._close(_STOPS[token], events)
        elif token in _HEADER_SPECIALS or token < Tokenizer.STARTOFTEXT:
            self._header.append(token)
            if len(self._header) > _MAX_HEADER_TOKENS:
                self.warnings["missing_message"] += 1
                self._open_from_partial_header(events)
        else:
            self.warnings["stray_special"] += 1

    def _feed_content(self, token: int, events: list[Event]) -> None:
        if token in _STOPS:
            self._close(_STOPS[token], events)
        elif token in (Tokenizer.START, Tokenizer.CHANNEL):  # a new message began without <|end|>
            self.warnings["missing_end"] += 1
            self._close("end", events)
            if token == Tokenizer.START:
                self._start_header(None)
            else:
                self._start_header(Role.ASSISTANT.value, token)
        elif token >= Tokenizer.STARTOFTEXT:  # <|message|>, <|constrain|>, reserved ids: no text
            self.warnings["stray_special"] += 1
        else:
            assert self._open is not None
            self._emit(self._open.decoder.decode(self._tokenizer.decode_single_token_bytes(token)), events)

    # -- helpers -----------------------------------------------------------------------------

    def _start_header(self, role_hint: str | None, first_token: int | None = None) -> None:
        self._header = [] if first_token is None else [first_token]
        self._role_hint = role_hint

    def _open_from_partial_header(self, events: list[Event]) -> None:
        """The header ended without <|message|>: keep its metadata, the rest is content."""
        assert self._header is not None
        header, leftover = self._parse_header(self._header, self._role_hint, complete=False)
        self._header = None
        self._open_message(header, leftover, events)

    def _open_message(self, header: _Header, text: str, events: list[Event]) -> None:
        kind = _kind(header.role, header.channel, header.recipient)
        if kind is not None and header.recipient is None:
            if header.channel is None:
                self.warnings["missing_channel"] += 1
            elif header.channel not in _KNOWN_CHANNELS:
                self.warnings["unknown_channel"] += 1
        self._open = _Open(header, kind, codecs.getincrementaldecoder("utf-8")("replace"), [])
        if kind == "tool_call":
            events.append(ToolCallStart(_function_name(header.recipient or "")))
        self._emit(text, events)

    def _emit(self, text: str, events: list[Event]) -> None:
        assert self._open is not None
        if not text:
            return
        self._open.parts.append(text)
        if self._open.kind == "reasoning":
            events.append(ReasoningDelta(text))
        elif self._open.kind == "text":
            events.append(TextDelta(text))
        elif self._open.kind == "tool_call":
            events.append(ToolCallDelta(text))

    def _close(self, stop: Literal["end", "return", "call"] | None, events: list[Event]) -> None:
        assert self._open is not None
        self._emit(self._open.decoder.decode(b"", final=True), events)
        h = self._open.header
        message = Message(
            author=Author(role=h.role, name=h.name),
            content=[TextContent(text="".join(self._open.parts))],
            channel=h.channel,
            recipient=h.recipient,
            content_type=h.content_type,
        )
        events.append(MessageEnd(message, stop))
        self._open = None

    def _parse_header(self, tokens: list[int], role_hint: str | None, complete: bool) -> tuple[_Header, str]:
        """Read role, channel, recipient and content type; return them and any leftover text.

        With ``complete`` (the header ended on <|message|>) a bare word is a content type
        ("commentary json") and other stray words are dropped; otherwise the header was cut
        short and everything from the first word that is not metadata on is content.
        """
        text = b"".join(map(self._tokenizer.decode_single_token_bytes, tokens)).decode("utf-8", "replace")
        role_word, channel, recipient, content_type = role_hint, None, None, None
        leftover, pos = "", 0
        while (field := _FIELD.match(text, pos)) is not None:
            pos = field.end()
            word = field["word"]
            if field["channel"] is not None and channel is None:
                channel = field["channel"]
            elif field["constrain"] is not None and content_type is None:
                content_type = f"<|constrain|>{field['constrain']}"
            elif field["to"] is not None and recipient is None:
                recipient = field["to"]
            elif word is not None and role_word is None:
                role_word = word
            elif word is not None and not complete:
                leftover = text[field.start("word") :]
                break
            elif word is not None and content_type is None:
                content_type = word
            else:  # an empty or repeated field, or junk
                self.warnings["bad_header"] += 1
        return self._header_of(role_word, channel, recipient, content_type), leftover

    def _header_of(
        self, role_word: str | None, channel: str | None, recipient: str | None, content_type: str | None
    ) -> _Header:
        role, name = _ROLES.get(role_word or ""), None
        if role is None and role_word is not None and (recipient is not None or "." in role_word):
            role, name = Role.TOOL, role_word  # a tool's output: "functions.get_weather to=assistant"
        elif role is None:
            self.warnings["unknown_role"] += 1
            role = Role.ASSISTANT  # whatever the model writes is the assistant's
        return _Header(role, name, channel, recipient, content_type)


def parse_completion(tokens: Iterable[int], role: str | None = Role.ASSISTANT.value) -> list[Message]:
    """All messages in a completion (tokens generated after ``<|start|>assistant``), never raising."""
    parser = StreamParser(role)
    events = [event for token in tokens for event in parser.feed(token)]
    events += parser.finish()
    return [event.message for event in events if isinstance(event, MessageEnd)]
