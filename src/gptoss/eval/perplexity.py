"""Perplexity of a text file or of token shards, with sliding windows.

The model reads `window` tokens at a time and the window moves `stride` tokens at a time; each
token is scored once, in the first window that reaches it, so every scored token sees at least
`window - stride` earlier tokens (all of them in the first window). stride == window gives
disjoint windows (lm-eval's rolling log-likelihood): fastest, but tokens right after a boundary
see little context and the perplexity comes out higher.

A text file is read as one document that starts after <|endoftext|> (so its first token is scored
too, and bits per byte covers every byte). Token shards are the format of `gptoss prepare-data`
(`gptoss.train.data`): a dataset directory (one split) or a single shard file.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

from gptoss.eval.results import EvalResult
from gptoss.tokenizer import Tokenizer, get_tokenizer
from gptoss.train.data import MAGIC, TokenSplit, read_shard

DEFAULT_WINDOW = 2048


class TokenScorer(Protocol):
    name: str
    preferred_batch: int

    def loglikelihood_tokens(
        self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> list[tuple[float, bool]]: ...


def load_tokens(
    path: str | Path, split: str = "val", max_tokens: int | None = None
) -> tuple[np.ndarray, bool]:
    """Tokens of a text file, a shard file or a dataset directory (its `split`); and whether the
    source was text (then every token but the leading <|endoftext|> is ordinary text)."""
    path = Path(path)
    if path.is_dir():
        tokens = TokenSplit(path, split)
        return tokens.read(0, min(len(tokens), max_tokens or len(tokens))), False
    with open(path, "rb") as f:
        is_shard = f.read(len(MAGIC)) == MAGIC
    if is_shard:
        return np.asarray(read_shard(path)[:max_tokens], dtype=np.int64), False
    text = path.read_text(encoding="utf-8")
    tokens = [Tokenizer.ENDOFTEXT, *get_tokenizer().encode_ordinary(text)]
    return np.asarray(tokens[:max_tokens], dtype=np.int64), True


def windows(n: int, window: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, first, end) per window over n tokens: the model reads tokens begin..end-2 (at most
    `window` of them) and tokens first..end-1 are scored. The first window scores `window` tokens,
    each later one the next `stride`, with at least window - stride + 1 tokens of context.
    Token 0 has no context and is never scored."""
    if window < 1 or not 1 <= stride <= window:
        raise ValueError(f"need 1 <= stride <= window, got window={window}, stride={stride}")
    scored_until = 1
    while scored_until < n:
        end = min(scored_until + (window if scored_until == 1 else stride), n)
        yield max(0, end - 1 - window), scored_until, end
        scored_until = end


def run_perplexity(
    model: TokenScorer,
    source: str | Path,
    *,
    window: int | None = None,
    stride: int | None = None,
    split: str = "val",
    max_tokens: int | None = None,
    progress: bool = True,
) -> EvalResult:
    """Perplexity (and, for text, bits per byte) of `model` on `source`."""
    longest = getattr(model, "max_length", None) or DEFAULT_WINDOW
    window = window or min(DEFAULT_WINDOW, longest)
    if window > longest:
        raise ValueError(f"window {window} is longer than the {longest} tokens {model.name} reads at once")
    stride = stride or max(1, window // 2)
    tokens, is_text = load_tokens(source, split, max_tokens)
    if len(tokens) < 2:
        raise ValueError(f"{source} holds {len(tokens)} tokens; perplexity needs at least 2")
    spans = list(windows(len(tokens), window, stride))
    nll, scored = 0.0, 0
    step = max(1, model.preferred_batch)
    with tqdm(total=len(tokens) - 1, desc="perplexity", unit="tok", disable=not progress) as bar:
        for start in range(0, len(spans), step):
            chunk = spans[start : start + step]
            requests = [(tokens[b:f].tolist(), tokens[f:e].tolist()) for b, f, e in chunk]
            for (logprob, _), (_, f, e) in zip(model.loglikelihood_tokens(requests), chunk, strict=True):
                nll -= logprob
                scored += e - f
            bar.update(sum(e - f for _, f, e in chunk))
    metrics = {"perplexity": math.exp(nll / scored), "nll_per_token": nll / scored}
    counts = {"tokens": scored, "windows": len(spans)}
    if is_text:
        # Bytes of exactly the scored tokens, so that a --max-tokens cut stays consistent.
        text_bytes = len(get_tokenizer().decode_bytes(tokens[1:].tolist()))
        metrics["bits_per_byte"] = nll / math.log(2) / text_bytes
        counts["bytes"] = text_bytes
    return EvalResult(
        task="perplexity",
        model=model.name,
        metrics=metrics,
        counts=counts,
        config={
            "source": str(source),
            "window": window,
            "stride": stride,
            "split": split,
            "max_tokens": max_tokens,
        },
    )
