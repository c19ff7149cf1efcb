"""Any OpenAI-compatible server (ours, vLLM, Ollama, ...) as an `EvalModel`, through the official
`openai` client, with requests sent `concurrency` at a time.

What each task needs from the server:
- generation (HumanEval): /v1/chat/completions (chat) or /v1/completions (raw);
- multiple choice (MMLU): /v1/completions with `logprobs` (the top next-token log-probabilities):
  a choice's score is its log-probability among the `top_logprobs` most likely next tokens, -inf
  when it is not among them, which still ranks the choices correctly whenever the best one is;
- perplexity: /v1/completions returning log-probabilities of the prompt itself (`echo` with
  `logprobs`, as vLLM does). Prompts are sent as token ids, which assumes the server's model uses
  o200k_harmony, as every gpt-oss model does.
A server that lacks what a task needs raises `EndpointUnsupported` saying so.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import openai

from gptoss.eval.models import GenerationRequest, truncate_at_stop

T = TypeVar("T")
R = TypeVar("R")

# OpenAI's own API takes at most 4 stop strings; the rest are applied here, after the fact.
_MAX_SERVER_STOPS = 4


class EndpointUnsupported(RuntimeError):
    """The server cannot do what a task needs (e.g. no log-probabilities)."""


class EndpointModel:
    """A model behind an OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1)."""

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        concurrency: int = 8,
        top_logprobs: int = 20,
        timeout: float = 600.0,
    ) -> None:
        self.base_url = base_url
        self.client = openai.OpenAI(
            base_url=base_url,
            api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none",
            timeout=timeout,
            max_retries=2,
        )
        self.concurrency = concurrency
        self.preferred_batch = 4 * concurrency  # enough to keep every connection busy
        self.top_logprobs = top_logprobs
        self.name = model or self._only_model()

    def _only_model(self) -> str:
        try:
            models = [m.id for m in self.client.models.list()]
        except openai.APIError as exc:
            raise EndpointUnsupported(
                f"{self.base_url}: cannot list models ({exc}); pass the model name"
            ) from exc
        if len(models) != 1:
            raise ValueError(f"{self.base_url} serves {len(models)} models ({', '.join(models)}); pick one")
        return models[0]

    def _map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(fn, items))

    # ------------------------------------------------------------------ generation
    def _generate_one(self, r: GenerationRequest) -> str:
        sampling: dict[str, Any] = {
            "max_tokens": r.max_tokens,
            "temperature": r.temperature,
            "top_p": r.top_p,
        }
        if r.seed is not None:
            sampling["seed"] = r.seed
        if r.chat:
            if r.reasoning_effort:
                sampling["reasoning_effort"] = r.reasoning_effort
            reply = self.client.chat.completions.create(
                model=self.name, messages=[{"role": "user", "content": r.prompt}], **sampling
            )
            return reply.choices[0].message.content or ""
        stop = list(r.stop[:_MAX_SERVER_STOPS]) or None
        reply = self.client.completions.create(model=self.name, prompt=r.prompt, stop=stop, **sampling)
        return truncate_at_stop(reply.choices[0].text, r.stop)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        return self._map(self._generate_one, requests)

    # ------------------------------------------------------------------ log-likelihoods
    def _choices_one(self, request: tuple[str, Sequence[str]]) -> list[float]:
        context, choices = request
        try:
            reply = self.client.completions.create(
                model=self.name, prompt=context, max_tokens=1, temperature=0.0, logprobs=self.top_logprobs
            )
        except openai.BadRequestError as exc:
            raise EndpointUnsupported(
                f"{self.base_url} refused a completion with logprobs={self.top_logprobs} ({exc.message}); "
                "multiple-choice tasks need /v1/completions with top log-probabilities "
                "(try a smaller --top-logprobs) or a local model"
            ) from exc
        logprobs = reply.choices[0].logprobs
        if logprobs is None or not logprobs.top_logprobs:
            raise EndpointUnsupported(
                f"{self.base_url} returned no log-probabilities on /v1/completions; multiple-choice "
                "tasks need them (or a local model)"
            )
        top = logprobs.top_logprobs[0]
        return [top.get(choice, -math.inf) for choice in choices]

    def multiple_choice(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[list[float]]:
        return self._map(self._choices_one, requests)

    def _loglikelihood_one(self, request: tuple[Sequence[int], Sequence[int]]) -> tuple[float, bool]:
        context, continuation = request
        prompt = [*context, *continuation]
        try:
            reply = self.client.completions.create(
                model=self.name, prompt=prompt, max_tokens=1, temperature=0.0, logprobs=1, echo=True
            )
        except openai.BadRequestError as exc:
            raise EndpointUnsupported(
                f"{self.base_url} does not return log-probabilities of the prompt ({exc.message}). "
                "Perplexity and other log-likelihood tasks need a local model or a server that "
                "supports echo with logprobs on /v1/completions (vLLM does)"
            ) from exc
        logprobs = reply.choices[0].logprobs
        scored = logprobs.token_logprobs[len(context) : len(prompt)] if logprobs else []
        if len(scored) != len(continuation) or any(lp is None for lp in scored):
            raise EndpointUnsupported(f"{self.base_url} returned no log-probabilities for the prompt tokens")
        tops = (logprobs.top_logprobs or [])[len(context) : len(prompt)]
        tokens = logprobs.tokens[len(context) : len(prompt)]
        greedy = len(tops) == len(tokens) and all(
            top and max(top, key=top.get) == token for top, token in zip(tops, tokens, strict=True)
        )
        return sum(scored), greedy

    def loglikelihood_tokens(
        self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> list[tuple[float, bool]]:
        """Like `LocalModel.loglikelihood_tokens`, from the server's prompt log-probabilities."""
        return self._map(self._loglikelihood_one, requests)
