"""POST /tokenize, POST /detokenize and GET /tokenizer_info, as vLLM serves them (llama.cpp's
spellings of the fields are accepted too), and the prompt log-probabilities of an echoed
/v1/completions prompt.

lm-eval-harness's ``local-completions`` model finds these routes by itself and then tokenizes
through the server, so a likelihood evaluation needs no local copy of the tokenizer.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter
from pydantic import model_validator
from starlette.concurrency import run_in_threadpool

from gptoss.inference.scoring import PromptScores
from gptoss.server.errors import APIError
from gptoss.server.prompting import ToolChoice, build_prompt
from gptoss.server.schemas import ChatMessageIn, Request
from gptoss.server.service import ServiceDep
from gptoss.tokenizer import Tokenizer, get_tokenizer

router = APIRouter()


class TokenizeRequest(Request):
    model: str | None = None
    prompt: str | None = None
    content: str | None = None  # llama.cpp's name for `prompt`
    messages: list[ChatMessageIn] | None = None  # a chat, rendered as the next assistant turn's prompt
    add_special_tokens: bool = True  # gpt-oss adds none (no BOS): accepted for compatibility
    return_token_strs: bool = False
    with_pieces: bool = False  # llama.cpp's name for `return_token_strs`

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        given = [f for f in ("prompt", "content", "messages") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of prompt (or content) and messages")
        return self


class DetokenizeRequest(Request):
    model: str | None = None
    tokens: list[int]


def token_text(token: int) -> str:
    return get_tokenizer().decode_single_token_bytes(token).decode("utf-8", "replace")


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, service: ServiceDep) -> dict[str, Any]:
    """Text as the model's token ids. Harmony special tokens spelled in the text are read as the
    tokens themselves, as /v1/completions reads its prompt (so the ids round-trip through it)."""
    if body.model is not None:
        service.check_model(body.model)

    def encode() -> list[int]:  # rendering and tokenizing: off the event loop
        if body.messages is not None:
            messages = [m.model_dump(exclude_none=True) for m in body.messages]
            none = ToolChoice("none")
            return build_prompt(
                service.runner, messages, tools=[], tool_choice=none, reasoning_effort=None
            ).tokens
        text = body.prompt if body.prompt is not None else body.content
        return service.runner.fit_prompt(get_tokenizer().encode(text or "", allowed_special="all"))

    tokens = await run_in_threadpool(encode)
    reply: dict[str, Any] = {"count": len(tokens), "max_model_len": service.runner.context, "tokens": tokens}
    if body.return_token_strs or body.with_pieces:
        reply["token_strs"] = [token_text(t) for t in tokens]
    return reply


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, service: ServiceDep) -> dict[str, str]:
    if body.model is not None:
        service.check_model(body.model)
    vocab = min(service.runner.vocab_size, Tokenizer.N_VOCAB)
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="tokens")
    text = get_tokenizer().decode(body.tokens)
    return {"prompt": text, "content": text}


@router.get("/tokenizer_info")
async def tokenizer_info(service: ServiceDep) -> dict[str, Any]:
    """What a client needs to tokenize through this server: the special tokens (<|endoftext|>
    starts and ends a plain document) and the context length."""
    return {
        "tokenizer_class": "o200k_harmony",
        "eos_token": "<|endoftext|>",
        "bos_token": None,
        "pad_token": "<|endoftext|>",
        "model_max_length": service.runner.context,
        "vocab_size": service.runner.vocab_size,
    }


def prompt_logprobs(tokens: Sequence[int], scores: PromptScores) -> dict[str, list[Any]]:
    """An echoed prompt's entries of a completion's `logprobs`, as vLLM writes them: the first
    token's log-probability and alternatives are null (nothing precedes it)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    offsets, offset = [], 0
    for token in tokens:
        offsets.append(offset)
        offset += len(decoder.decode(get_tokenizer().decode_single_token_bytes(token)))
    tops: list[dict[str, float] | None] = [
        {get_tokenizer().decode([t]): lp for t, lp in top} for top in scores.top
    ]
    tops[0] = None
    return {
        "tokens": [token_text(t) for t in tokens],
        "token_logprobs": list(scores.logprobs),
        "top_logprobs": tops,
        "text_offset": offsets,
    }
