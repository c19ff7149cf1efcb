"""Harmony chat on top of the engine: one-shot prompts, streamed text, and multi-turn sessions whose
history stays in the KV cache.

Harmony drops the reasoning of a turn once it has ended in a final answer. A `ChatSession` keeps
the prompt exactly as harmony renders it without prefilling the history again: it marks the cache
before each assistant turn and, when the turn ends in a final answer, rewinds to the mark and
prefills only the answer (without its reasoning) before the next user message.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence
from dataclasses import replace

from openai_harmony import Message, Role

from gptoss.harmony import (
    Event,
    MessageEnd,
    StreamParser,
    developer_message,
    render_for_completion,
    system_message,
)
from gptoss.inference.engine import Mark, Session
from gptoss.inference.sampling import SamplingParams
from gptoss.inference.speculative import Speculation
from gptoss.model import GptOss
from gptoss.tokenizer import Tokenizer, get_harmony_encoding, get_tokenizer

# A completion ends on <|return|> or <|call|> (or the generic EOS); <|end|> only closes a message.
HARMONY_STOP_TOKENS = tuple(sorted(Tokenizer.STOP_TOKENS))


def header_messages(reasoning_effort: str = "medium", instructions: str | None = None) -> list[Message]:
    """The system message (with the reasoning effort) and, if there are instructions, the developer one."""
    developer = developer_message(instructions)
    return [system_message(reasoning_effort)] + ([developer] if developer else [])


def harmony_prompt(text: str, reasoning_effort: str = "medium", instructions: str | None = None) -> list[int]:
    """Prompt tokens for a one-shot question, ending with `<|start|>assistant`."""
    user = Message.from_role_and_content(Role.USER, text)
    return render_for_completion([*header_messages(reasoning_effort, instructions), user])


def assistant_prefix() -> list[int]:
    """`<|start|>assistant`: what a prompt ends with so that the model writes the assistant's turn."""
    return [Tokenizer.START, *get_tokenizer().encode_ordinary(Role.ASSISTANT.value)]


def render_messages(messages: Sequence[Message]) -> list[int]:
    encoding = get_harmony_encoding()
    return [token for m in messages for token in encoding.render(m)]


class TextDecoder:
    """Token ids → text, one token at a time, holding back bytes of an incomplete UTF-8 character."""

    def __init__(self) -> None:
        self._tokenizer = get_tokenizer()
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, token: int) -> str:
        return self._utf8.decode(self._tokenizer.decode_single_token_bytes(token))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class ChatSession:
    """A multi-turn harmony conversation with one model; `send` streams harmony parser events."""

    def __init__(
        self,
        model: GptOss,
        reasoning_effort: str = "medium",
        instructions: str | None = None,
        capacity: int | None = None,
        params: SamplingParams | None = None,
        speculation: Speculation | None = None,
    ) -> None:
        self.session = Session(model, capacity, speculation=speculation)
        self.reasoning_effort = reasoning_effort
        self.instructions = instructions
        self.params = replace(params or SamplingParams(max_tokens=4096), stop_token_ids=HARMONY_STOP_TOKENS)
        self.messages: list[Message] = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system and developer messages stay)."""
        self.messages = header_messages(self.reasoning_effort, self.instructions)
        self.session.reset()
        self.session.append(render_messages(self.messages))

    def set_reasoning_effort(self, effort: str) -> None:
        """Change the effort for the following turns.

        The effort lives in the system message at the very start, so the conversation is prefilled
        again once (at the next turn); ordinary turns never do that.
        """
        header = header_messages(effort, self.instructions)  # validates `effort`
        self.reasoning_effort = effort
        self.messages = header + self.messages[len(header) :]
        self.session.reset()
        self.session.append(render_for_completion(self.messages)[: -len(assistant_prefix())])

    @property
    def num_tokens(self) -> int:
        """Tokens of the conversation so far (cached or queued)."""
        return len(self.session.tokens) + len(self.session.pending)

    def send(self, text: str, params: SamplingParams | None = None) -> Iterator[Event]:
        """Add a user message and stream the assistant's reply as harmony events.

        Stopping the iteration early (e.g. on Ctrl-C) keeps what was generated so far as a
        truncated reply.
        """
        params = self.params if params is None else replace(params, stop_token_ids=HARMONY_STOP_TOKENS)
        user = Message.from_role_and_content(Role.USER, text)
        mark = self._begin_turn(user)
        parser = StreamParser(Role.ASSISTANT.value)
        produced: list[Message] = []
        stopped = False
        try:
            for event in self.session.stream(params):
                stopped = event.finish_reason == "stop"
                for harmony_event in parser.feed(event.token):
                    if isinstance(harmony_event, MessageEnd):
                        produced.append(harmony_event.message)
                    yield harmony_event
        finally:
            for harmony_event in parser.finish():  # a message cut short still enters the history
                if isinstance(harmony_event, MessageEnd):
                    produced.append(harmony_event.message)
            self._end_turn(mark, produced, stopped)

    def _begin_turn(self, user: Message) -> Mark:
        """Queue the user message, prefill it, and mark the cache before the assistant speaks."""
        self.session.append(render_messages([user]))
        self.messages.append(user)
        self.session.feed()
        mark = self.session.mark()
        self.session.append(assistant_prefix())
        return mark

    def _end_turn(self, mark: Mark, produced: list[Message], stopped: bool) -> None:
        """Record the reply and leave the cache holding exactly harmony's rendering of the history."""
        self.messages.extend(produced)
        reasoning = [m for m in produced if m.channel == "analysis"]
        if stopped and reasoning and produced[-1].channel == "final":
            # The reasoning leaves the prompt: go back to before the reply, keep only the rest.
            self.session.rewind(mark)
            self.session.append(render_messages([m for m in produced if m.channel != "analysis"]))
        else:
            # The stop token (dropped by the session) or the cut-off reply gets its closing <|end|>.
            self.session.append([Tokenizer.END])
