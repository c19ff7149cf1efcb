"""Harmony-aware constrained decoding: the answer follows a grammar, the reasoning stays free.

A `HarmonyGrammar` describes one assistant turn as gpt-oss writes it after ``<|start|>assistant``:
an optional analysis message and (when tools are shown) an optional commentary preamble, both free
text, then the answer: a final message whose body follows the requested format (a JSON Schema, a
regex, a choice, a Lark or GBNF grammar, or free text), or a tool call whose arguments follow the
tool's JSON Schema. `tool_choice` "required" or a named function leaves only the calls. The grammar
is llguidance's (JSON Schema, regex and Lark with harmony's special tokens); each part is compiled
on its own first, so a part llguidance cannot compile is reported by the request field it came
from. llguidance never fetches anything: an external ``$ref`` is a compile error, not a download.

The free messages take at most half of the sequence's token budget between them, so the
constrained answer always has room to finish (a model that reasons on and on is made to answer).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import llguidance
import llguidance.torch
import numpy as np
import torch
from llguidance import LLMatcher

from gptoss.tokenizer import Tokenizer, get_tokenizer
from gptoss.vocab import VocabularyFit

BodyKind = Literal["json_schema", "regex", "choice", "grammar"]

# JSON whitespace between tokens, bounded: a free `[ \t\n\r]+` lets a model that likes whitespace
# (or a random-weight one) pad forever; one space, or a newline and up to 15 spaces or tabs, still
# allows compact and indented, multi-line JSON.
_JSON_OPTIONS = {"whitespace_pattern": r"(\n[ \t]{0,15}|[ ])?"}
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


class GrammarError(ValueError):
    """A request's format or schema cannot be compiled; `param` names the request field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@functools.lru_cache(maxsize=4)
def llg_tokenizer(rows: tuple[int, ...] | None = None) -> llguidance.LLTokenizer:
    """llguidance's view of o200k_harmony as a model with token ids `rows` (None: all) writes it.

    llguidance allows only the canonical tokenization of text the grammar forces (a tool's name,
    a channel's), so a trimmed model must be described as it is: ids without rows have no bytes,
    and text is tokenized as the model reads it (`gptoss.vocab.VocabularyFit`). Built once per
    vocabulary: about 1.5 s for the whole one (llguidance's own BPE), 0.2 s for a trimmed one.
    """
    enc = get_tokenizer()
    # o200k_base's <|endofprompt|> and harmony's <|reserved_200018|> name the same id; llguidance
    # needs one name per id.
    special = {name: i for name, i in enc._special_tokens.items() if name != "<|endofprompt|>"}
    if rows is None:
        return llguidance.LLTokenizer.from_tiktoken(
            encoder=enc._mergeable_ranks,
            special_tokens=special,
            pattern=enc._pat_str,
            eos_token=Tokenizer.ENDOFTEXT,
            n_vocab=Tokenizer.N_VOCAB,
        )
    return llguidance.LLTokenizer(
        llguidance.TokenizerWrapper(_TrimmedVocabulary(rows, special)), n_vocab=Tokenizer.N_VOCAB
    )


class _TrimmedVocabulary:
    """A trimmed vocabulary in the shape `llguidance.TokenizerWrapper` reads."""

    eos_token_id = Tokenizer.ENDOFTEXT
    bos_token_id = None

    def __init__(self, rows: tuple[int, ...], special: dict[str, int]) -> None:
        self.fit = VocabularyFit(rows)
        names = {i: name for name, i in special.items()}
        self.special_token_ids = [i for i in rows if i in names]
        enc = get_tokenizer()
        self.tokens = [b""] * Tokenizer.N_VOCAB  # no bytes: never allowed
        for i in rows:
            self.tokens[i] = names[i].encode() if i in names else enc.decode_single_token_bytes(i)

    def __call__(self, text: bytes) -> list[int]:
        return self.fit(get_tokenizer().encode_ordinary(text.decode("utf-8", "replace"))).tolist()


@dataclass(frozen=True)
class Body:
    """What the final answer's text must be. `spec`: a JSON Schema (dict), a regex (str), the
    choices (list of str) or a Lark/GBNF grammar (str); `param` is the request field it came from."""

    kind: BodyKind
    spec: Any
    param: str


@dataclass(frozen=True)
class ToolArgs:
    """A callable function and the schema its arguments follow (None: any JSON object)."""

    name: str
    schema: dict[str, Any] | None
    param: str
    strict: bool = True  # False: a schema llguidance cannot compile falls back to any JSON object


def _compile_part(kind: BodyKind, spec: Any, param: str, rows: tuple[int, ...] | None) -> dict[str, Any]:
    """One part as an llguidance sub-grammar, checked alone so that errors name `param`."""
    try:
        if kind == "json_schema":
            text = LLMatcher.grammar_from_json_schema(spec, overrides=_JSON_OPTIONS)
        elif kind == "choice":
            if not spec or not all(isinstance(c, str) and c for c in spec):
                raise GrammarError(f"{param} must be a non-empty list of non-empty strings", param)
            text = llguidance.grammar_from("choice", spec)
        else:
            text = llguidance.grammar_from("regex" if kind == "regex" else "grammar", spec)
    except ValueError as exc:  # GrammarError included; llguidance's converters raise ValueError
        raise GrammarError(str(exc), getattr(exc, "param", param)) from None
    is_error, messages = LLMatcher.validate_grammar_with_warnings(text, llg_tokenizer(rows))
    if is_error:
        raise GrammarError(f"{param} cannot be compiled into a grammar: {messages[0].strip()}", param)
    if not text.lstrip().startswith("{"):  # plain Lark text
        return {"lark_grammar": text}
    grammars = json.loads(text)["grammars"]
    if len(grammars) != 1:
        raise GrammarError(f"{param} must define exactly one grammar", param)
    return grammars[0]


@dataclass(frozen=True)
class HarmonyGrammar:
    """The grammar of one assistant turn. `body` None: the final answer is free text;
    `must_call`: the answer must be one of the `tools`' calls (no final message); `rows`: the
    token ids of the model's trimmed vocabulary (None: the whole vocabulary)."""

    body: Body | None
    tools: tuple[ToolArgs, ...] = ()
    must_call: bool = False
    rows: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.must_call and not self.tools:
            raise ValueError("a turn that must call a tool needs at least one tool")

    @functools.cached_property
    def _parts(self) -> list[dict[str, Any]]:
        """The compiled sub-grammars: the body's (if any), then each tool's arguments."""
        parts = []
        if self.body is not None:
            parts.append(
                _compile_part(self.body.kind, self.body.spec, self.body.param, self.rows) | {"name": "body"}
            )
        for i, tool in enumerate(self.tools):
            schema = tool.schema if tool.schema is not None else _ANY_OBJECT
            try:
                part = _compile_part("json_schema", schema, tool.param, self.rows)
            except GrammarError:
                if tool.strict:
                    raise
                part = _compile_part("json_schema", _ANY_OBJECT, tool.param, self.rows)
            parts.append(part | {"name": f"args{i}"})
        return parts

    def check(self) -> None:
        """Compile every part now; raise `GrammarError` naming the first bad one."""
        self.grammar(1)

    def grammar(self, max_tokens: int) -> str:
        """The llguidance grammar for a sequence that may generate `max_tokens` tokens."""
        lark = self._lark(max(1, max_tokens // 2 // (2 if self.tools else 1)))
        return json.dumps({"grammars": [{"lark_grammar": lark}, *self._parts]})

    def _lark(self, free_tokens: int) -> str:
        answers = [] if self.must_call else ["final"]
        rules = []
        for i, tool in enumerate(self.tools):
            to = json.dumps(f" to=functions.{tool.name}")
            commentary_to = json.dumps(f"commentary to=functions.{tool.name}")
            answers.append(f"call{i}")
            rules.append(
                f'call{i}: ({to} <|channel|> "commentary" | <|channel|> {commentary_to}) '
                f"content_type? <|message|> @args{i} <|call|>"
            )
        body = "@body" if self.body is not None else "free_text"
        lines = [
            f"start: analysis? {'preamble? ' if self.tools else ''}answer",
            'analysis: <|channel|> "analysis" <|message|> reasoning <|end|> <|start|> "assistant"',
            'preamble: <|channel|> "commentary" <|message|> reasoning <|end|> <|start|> "assistant"',
            f"reasoning[max_tokens={free_tokens}]: /(?s:.*)/",
            "answer: " + " | ".join(answers),
            f'final: <|channel|> "final" <|message|> {body} <|return|>',
            "free_text: /(?s:.*)/",
            'content_type: " " <|constrain|> "json" | " json"',
            *rules,
        ]
        return "\n".join(lines) + "\n"

    def constraint(self, max_tokens: int) -> GrammarConstraint:
        """A fresh constraint for one sequence of at most `max_tokens` tokens."""
        return GrammarConstraint(self.grammar(max_tokens), self.rows)


@functools.cache
def _executor() -> llguidance.LLExecutor:
    return llguidance.LLExecutor()


class GrammarConstraint:
    """A `sampling.TokenConstraint` that follows an llguidance grammar, token by token.

    `allowed` is a boolean mask over the full o200k_harmony vocabulary; with a trimmed model's
    `rows` it allows only ids the model has (every text can be spelled in its byte tokens).
    """

    def __init__(self, grammar: str, rows: tuple[int, ...] | None = None) -> None:
        tokenizer = llg_tokenizer(rows)
        self.vocab_size = tokenizer.vocab_size
        self.matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise ValueError(f"invalid grammar: {self.matcher.get_error()}")
        self._next_bits: np.ndarray | None = None  # the next mask, when `prepare_batch` computed it

    @staticmethod
    def prepare_batch(constraints: Sequence[GrammarConstraint]) -> None:
        """Compute the next masks of a batch's constraints together, on llguidance's threads, rather
        than one row after another; each constraint's `allowed` then returns its own."""
        live = [c for c in constraints if not c.matcher.is_error()]
        sizes = {c.vocab_size for c in live}
        if len(live) < 2 or len(sizes) != 1:
            return
        bitmask = torch.zeros(llguidance.torch.get_bitmask_shape(len(live), sizes.pop()), dtype=torch.int32)
        matchers = [(c.matcher, i) for i, c in enumerate(live)]
        llguidance.torch.fill_next_token_bitmask_par(_executor(), matchers, bitmask)
        for constraint, bits in zip(live, bitmask.numpy().view(np.uint8), strict=True):
            constraint._next_bits = bits

    def allowed(self) -> torch.Tensor:
        """Once the grammar is complete, only <|endoftext|> (a stop token) is allowed."""
        if self.matcher.is_error():
            raise RuntimeError(f"the grammar constraint failed: {self.matcher.get_error()}")
        bits = self._next_bits
        if bits is None:
            bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        self._next_bits = None
        return torch.from_numpy(np.unpackbits(bits, bitorder="little")[: Tokenizer.N_VOCAB].view(np.bool_))

    def advance(self, token: int) -> None:
        self._next_bits = None
        self.matcher.consume_token(token)  # a refused token puts the matcher in error: `allowed` says so

    def is_accepting(self) -> bool:
        return self.matcher.is_accepting()


def plain_grammar(body: Body, rows: tuple[int, ...] | None = None) -> str:
    """The grammar of raw text (no harmony around it): `body` alone; once it is complete only
    <|endoftext|> may follow."""
    part = _compile_part(body.kind, body.spec, body.param, rows) | {"name": "body"}
    return json.dumps({"grammars": [{"lark_grammar": "start: @body\n"}, part]})


def body_from_fields(fields: Sequence[tuple[str, Any]]) -> Body | None:
    """The one final-body constraint among vLLM/llama.cpp request fields given as (name, value)
    pairs: guided_json, guided_regex, guided_choice, guided_grammar, grammar, json_schema,
    structured_outputs ({json, regex, choice, grammar}). More than one is an error."""
    found: list[Body] = []
    for name, value in fields:
        if value is None:
            continue
        if name == "structured_outputs":
            if not isinstance(value, dict):
                raise GrammarError("structured_outputs must be an object", name)
            keys = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}
            unknown = sorted(set(value) - set(keys) - {"json_object"})
            if unknown:
                raise GrammarError(f"structured_outputs: unsupported keys {unknown}", name)
            for key, kind in keys.items():
                if value.get(key) is not None:
                    found.append(_body(kind, value[key], f"{name}.{key}"))
            if value.get("json_object"):
                found.append(Body("json_schema", _ANY_OBJECT, f"{name}.json_object"))
            continue
        kind = {
            "guided_json": "json_schema",
            "json_schema": "json_schema",
            "guided_regex": "regex",
            "guided_choice": "choice",
            "guided_grammar": "grammar",
            "grammar": "grammar",
        }[name]
        found.append(_body(kind, value, name))
    if len(found) > 1:
        names = ", ".join(b.param for b in found)
        raise GrammarError(f"give one output constraint, not several ({names})", found[1].param)
    return found[0] if found else None


def _body(kind: BodyKind, value: Any, param: str) -> Body:
    if kind == "json_schema":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise GrammarError(f"{param} is not valid JSON: {exc}", param) from None
        if not isinstance(value, dict):
            raise GrammarError(f"{param} must be a JSON Schema object", param)
    elif kind == "choice":
        if not isinstance(value, list):
            raise GrammarError(f"{param} must be a list of strings", param)
    elif not isinstance(value, str) or not value:
        raise GrammarError(f"{param} must be a non-empty string", param)
    return Body(kind, value, param)
