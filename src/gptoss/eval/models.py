"""What the evaluation tasks need from a model, and the local implementation of it.

Tasks talk to an `EvalModel`: log-likelihoods of multiple-choice continuations and text
generation (harmony chat or raw completion). `LocalModel` wraps a `GptOss` in this process;
`gptoss.eval.endpoint.EndpointModel` talks to any OpenAI-compatible server.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from gptoss.harmony import parse_completion
from gptoss.inference import SamplingParams, generate_stream
from gptoss.inference.chat import HARMONY_STOP_TOKENS, harmony_prompt
from gptoss.inference.runner import ATTENTION_SCORE_BUDGET, model_device
from gptoss.model import GptOss
from gptoss.tokenizer import Tokenizer, get_tokenizer
from gptoss.vocab import fit_tokens

DEFAULT_MAX_LENGTH = 8192
# Rows of the output head computed at once: (rows, 201088) fp32 logits are 0.8 MB per row.
_HEAD_CHUNK = 256


@dataclass(frozen=True)
class GenerationRequest:
    """One text to generate. `chat`: `prompt` is a user message and the reply is the final answer
    (harmony; `reasoning_effort` defaults to medium); otherwise `prompt` is text to continue, cut
    at the first of the `stop` strings."""

    prompt: str
    chat: bool
    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    reasoning_effort: str | None = None


class EvalModel(Protocol):
    """A model as the evaluation tasks see it."""

    name: str
    # How many requests a task should hand over per call (a batch, or enough to keep a server busy).
    preferred_batch: int

    def multiple_choice(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[list[float]]:
        """For each (context, choices): the log-likelihood of each choice as a continuation."""
        ...

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]: ...


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any stop string."""
    cut = min((i for s in stop if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def final_answer(tokens: Sequence[int]) -> str:
    """The text of the final-channel messages of a harmony completion ("" if it never got there)."""
    return "".join(
        content.text
        for message in parse_completion(tokens)
        if message.channel == "final"
        for content in message.content
        if hasattr(content, "text")
    )


class LocalModel:
    """A `GptOss` in this process, scored without a KV cache (full forward passes, batched)."""

    def __init__(
        self, model: GptOss, *, name: str | None = None, batch_size: int = 8, max_length: int | None = None
    ) -> None:
        self.model = model.eval()
        self.config = model.config
        self.name = name or self.config.name
        self.batch_size = batch_size
        self.preferred_batch = batch_size
        self.max_length = min(max_length or DEFAULT_MAX_LENGTH, self.config.max_position_embeddings)

    # ------------------------------------------------------------------ text ↔ tokens
    @property
    def tokenizer(self) -> Tokenizer:
        if self.config.vocab_size < Tokenizer.N_VOCAB:
            raise ValueError(
                f"{self.name} has a {self.config.vocab_size}-token vocabulary, smaller than "
                f"o200k_harmony's {Tokenizer.N_VOCAB}: text tasks need the real vocabulary"
            )
        return get_tokenizer()

    def encode(self, text: str) -> list[int]:
        """Text as tokens; special-token spellings in eval data are plain text, never control tokens."""
        return self.tokenizer.encode_ordinary(text)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Tokens of context and continuation as the model reads them together (lm-eval's rule).

        BPE merges across the boundary, so the continuation's tokens are those of the whole text
        after the context's; a trailing space moves to the continuation, where " A"-style tokens
        carry it. An empty context becomes <|endoftext|>, a document start.
        """
        stripped = context.rstrip(" ")
        continuation = context[len(stripped) :] + continuation
        if not stripped:
            return [Tokenizer.ENDOFTEXT], self.encode(continuation)
        whole = self.encode(stripped + continuation)
        context_tokens = self.encode(stripped)
        return context_tokens, whole[len(context_tokens) :]

    # ------------------------------------------------------------------ scoring
    def _rows_per_pass(self, length: int) -> int:
        """Sequences of `length` per forward pass: `batch_size`, fewer when attention scores
        (fp32, about three live copies) would pass the engine's memory budget."""
        per_row = 12 * self.config.num_attention_heads * length * length
        return max(1, min(self.batch_size, ATTENTION_SCORE_BUDGET // per_row))

    def _target_logprobs(self, hidden: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """log p(target) and whether it is the argmax, for hidden states (N, H) and targets (N,)."""
        logprobs, greedy = [], []
        for start in range(0, len(targets), _HEAD_CHUNK):
            logits = self.model.lm_head(hidden[start : start + _HEAD_CHUNK]).float()
            chosen = targets[start : start + _HEAD_CHUNK]
            picked = logits.gather(1, chosen[:, None])[:, 0]
            logprobs.append(picked - torch.logsumexp(logits, dim=-1))
            greedy.append(logits.argmax(dim=-1) == chosen)
        return torch.cat(logprobs), torch.cat(greedy)

    @torch.no_grad()
    def loglikelihood_tokens(
        self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> list[tuple[float, bool]]:
        """For each (context, continuation) of token ids: the continuation's summed log-probability
        and whether greedy decoding would have produced it.

        Context beyond `max_length` is cut from the left. Requests that feed the model the same
        tokens (choices of one token after one context) share one forward pass.
        """
        device = model_device(self.model)
        inputs: dict[tuple[int, ...], list[int]] = {}  # model input → indices of its requests
        scored: list[list[int]] = []  # per request: the continuation tokens that fit, to score
        for i, (context, continuation) in enumerate(requests):
            if not continuation:
                raise ValueError("a continuation must hold at least one token")
            if not context:
                raise ValueError("a context must hold at least one token (use <|endoftext|> for none)")
            # A trimmed vocabulary spells the ids it lacks in bytes (the same text, more tokens).
            context, continuation = fit_tokens(self.model, context), fit_tokens(self.model, continuation)
            whole = [*context, *continuation][-(self.max_length + 1) :]
            key = tuple(whole[:-1])
            bad = [t for t in whole if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(
                    f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})"
                )
            inputs.setdefault(key, []).append(i)
            scored.append(list(continuation[-(len(whole) - 1) :]))
        logprobs = [0.0] * len(requests)
        greedy = [True] * len(requests)
        order = sorted(inputs, key=len, reverse=True)  # similar lengths share a batch: little padding
        start = 0
        while start < len(order):
            batch = order[start : start + self._rows_per_pass(len(order[start]))]
            start += len(batch)
            width = len(batch[0])
            ids = torch.full((len(batch), width), self.config.pad_token_id, dtype=torch.long)
            for row, key in enumerate(batch):
                ids[row, : len(key)] = torch.tensor(key)
            # Right padding: causal attention never lets a real position see the pad after it.
            positions = torch.arange(width).expand(len(batch), -1)
            hidden = self.model.model(ids.to(device), positions.to(device))  # (B, T, H)
            rows, cols, targets, owners = [], [], [], []
            for row, key in enumerate(batch):
                for i in inputs[key]:
                    first = len(key) - len(scored[i])  # the position whose output predicts scored[i][0]
                    rows += [row] * len(scored[i])
                    cols += range(first, len(key))
                    targets += scored[i]
                    owners += [i] * len(scored[i])
            token_logprobs, token_greedy = self._target_logprobs(
                hidden[torch.tensor(rows), torch.tensor(cols)], torch.tensor(targets, device=device)
            )
            for i, lp, g in zip(owners, token_logprobs.tolist(), token_greedy.tolist(), strict=True):
                logprobs[i] += lp
                greedy[i] = greedy[i] and g
        return list(zip(logprobs, greedy, strict=True))

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in requests])

    def multiple_choice(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[list[float]]:
        flat = [(context, choice) for context, choices in requests for choice in choices]
        scores = iter(lp for lp, _ in self.loglikelihood(flat))
        return [[next(scores) for _ in choices] for _, choices in requests]

    # ------------------------------------------------------------------ generation
    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        prompts, params = [], []
        stops = sorted(Tokenizer.STOP_TOKENS | {self.config.eos_token_id})
        for r in requests:
            if r.chat:
                prompts.append(harmony_prompt(r.prompt, r.reasoning_effort or "medium"))
            else:
                prompts.append(self.encode(r.prompt))
            params.append(
                SamplingParams(
                    max_tokens=r.max_tokens,
                    temperature=r.temperature,
                    top_p=r.top_p,
                    seed=r.seed,
                    stop=() if r.chat else r.stop,  # stop strings would also match the reasoning
                    stop_token_ids=HARMONY_STOP_TOKENS if r.chat else stops,
                )
            )
        outputs: list[list[int]] = [[] for _ in requests]
        token_bytes = self.tokenizer.decode_single_token_bytes
        for event in generate_stream(self.model, prompts, params, token_bytes=token_bytes):
            outputs[event.index].append(event.token)
        texts = []
        for r, tokens in zip(requests, outputs, strict=True):
            if r.chat:
                texts.append(final_answer(tokens))
            else:
                text = self.tokenizer.decode([t for t in tokens if t < Tokenizer.ENDOFTEXT])
                texts.append(truncate_at_stop(text, r.stop))
        return texts
