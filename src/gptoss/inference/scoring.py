"""Prompt log-probabilities: how likely the model finds each token of a given text.

`score_tokens` prefills the tokens through a one-row `KVCache` in chunks, as generation does (so a
long prompt never needs the whole attention matrix at once), and reads the output head at every
position rather than only the last. This is what `/v1/completions` with ``echo`` and ``logprobs``
returns, and what log-likelihood evaluations (lm-eval-harness's ``local-completions``) consume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gptoss.inference.cache import KVCache
from gptoss.inference.runner import DEFAULT_PREFILL_CHUNK, model_device, model_dtype, prefill
from gptoss.model import GptOss

# Positions whose output-head logits are live at once: (rows, 201088) fp32 is 0.8 MB per row.
_HEAD_ROWS = 256


@dataclass(frozen=True)
class PromptScores:
    """Per token of the prompt: log p(token | the tokens before it), and the `top` likeliest tokens
    at that position as (id, logprob). The first token has no predecessor: None and no
    alternatives."""

    logprobs: list[float | None]
    top: list[list[tuple[int, float]]]


@torch.inference_mode()
def score_tokens(
    model: GptOss, tokens: Sequence[int], top: int = 0, prefill_chunk: int = DEFAULT_PREFILL_CHUNK
) -> PromptScores:
    """Log-probabilities of `tokens` under `model`, each given the ones before it."""
    config = model.config
    if not tokens:
        raise ValueError("nothing to score: the token list is empty")
    if len(tokens) > config.max_position_embeddings:
        raise ValueError(
            f"{len(tokens)} tokens exceed the model's context of {config.max_position_embeddings}"
        )
    bad = [t for t in tokens if not 0 <= t < config.vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{config.vocab_size - 1})")
    if not 0 <= top <= config.vocab_size:
        raise ValueError(f"top must lie in 0..{config.vocab_size}, got {top}")
    logprobs: list[float | None] = [None]
    alternatives: list[list[tuple[int, float]]] = [[]]
    inputs = torch.tensor(list(tokens), dtype=torch.long, device=model_device(model))
    # The last token predicts nothing that is scored: only the tokens before it are fed.
    cache = KVCache(config, 1, max(len(tokens) - 1, 1), model_dtype(model), model_device(model))

    def score_chunk(done: int, hidden: torch.Tensor) -> None:
        for start in range(0, len(hidden), _HEAD_ROWS):
            rows = hidden[start : start + _HEAD_ROWS]
            targets = inputs[done + start + 1 : done + start + 1 + len(rows)]
            table = torch.log_softmax(model.lm_head(rows).float(), dim=-1)
            logprobs.extend(table.gather(1, targets[:, None])[:, 0].tolist())
            if top:
                values, ids = table.topk(top, dim=-1)
                alternatives.extend(
                    list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)
                )
            else:
                alternatives.extend([] for _ in range(len(rows)))

    if len(tokens) > 1:
        prefill(model, cache, 0, tokens[:-1], prefill_chunk, score_chunk)
    return PromptScores(logprobs, alternatives)
