"""Trimmed vocabularies: small models that keep embedding rows for only the token ids they use.

A 201,088-row embedding is 51M parameters at width 256, far more than a demonstration model's
blocks. A trimmed model (`ModelConfig.vocab_rows`) keeps rows for a chosen subset of the
o200k_harmony ids and still speaks those ids, so the tokenizer, harmony renderer, sampler and server
need no translation. Text whose tokens fall outside the subset is spelled with single-byte tokens,
which every subset contains: o200k is a byte-level BPE, so the bytes of any token decode to the same
text (`fit_tokens`). Nothing is lost, the text just takes more tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

from gptoss.model import GptOss
from gptoss.tokenizer import Tokenizer, get_tokenizer

# The harmony format's own tokens: every trimmed vocabulary keeps them.
HARMONY_TOKENS = (
    Tokenizer.STARTOFTEXT,
    Tokenizer.ENDOFTEXT,
    Tokenizer.RETURN,
    Tokenizer.CONSTRAIN,
    Tokenizer.CHANNEL,
    Tokenizer.START,
    Tokenizer.END,
    Tokenizer.MESSAGE,
    Tokenizer.CALL,
)


@functools.cache
def byte_token_ids() -> tuple[int, ...]:
    """The id of the single-byte token for each byte value 0..255."""
    tokenizer = get_tokenizer()
    return tuple(tokenizer.encode_single_token(bytes([b])) for b in range(256))


def choose_vocabulary(counts: np.ndarray, rows: int) -> np.ndarray:
    """The `rows` ids to keep, ascending: the byte tokens, the harmony tokens, then the most
    frequent of `counts` (occurrences per id, e.g. `np.bincount` of a tokenized corpus)."""
    required = sorted(set(byte_token_ids()) | set(HARMONY_TOKENS))
    if rows < len(required):
        raise ValueError(f"a trimmed vocabulary needs at least {len(required)} rows (bytes and harmony)")
    counts = np.asarray(counts, dtype=np.float64).copy()
    counts = np.pad(counts, (0, max(0, Tokenizer.N_VOCAB - len(counts))))
    counts[required] = -1  # taken anyway
    by_count = np.argsort(-counts, kind="stable")
    extra = [int(t) for t in by_count[: rows - len(required)] if counts[t] > 0]
    return np.array(sorted(required + extra), dtype=np.int64)


class VocabularyFit:
    """Spells token ids outside a trimmed vocabulary with its single-byte tokens."""

    def __init__(self, token_ids: Sequence[int] | np.ndarray | torch.Tensor) -> None:
        ids = np.asarray(token_ids, dtype=np.int64)
        self.has_row = np.zeros(Tokenizer.N_VOCAB, dtype=bool)
        self.has_row[ids] = True
        missing = [b for b in byte_token_ids() if not self.has_row[b]]
        if missing:
            raise ValueError(f"a trimmed vocabulary must hold all 256 byte tokens; {len(missing)} missing")

    def __call__(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64)
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= len(self.has_row)):
            bad = tokens[(tokens < 0) | (tokens >= len(self.has_row))][0]
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{len(self.has_row) - 1})")
        outside = np.flatnonzero(~self.has_row[tokens])
        if not len(outside):
            return tokens
        tokenizer, by_byte = get_tokenizer(), byte_token_ids()
        pieces, start = [], 0
        for i in outside:
            pieces.append(tokens[start:i])
            pieces.append(np.array([by_byte[b] for b in tokenizer.decode_single_token_bytes(int(tokens[i]))]))
            start = i + 1
        pieces.append(tokens[start:])
        return np.concatenate(pieces).astype(np.int64)


# Respelling is per token, so a long prompt goes a piece at a time: converting millions of Python
# ints at once would hold the GIL (and a server's event loop) for a noticeable time.
_FIT_PIECE = 1 << 16


def fit_tokens(model: GptOss, tokens: Sequence[int]) -> list[int]:
    """`tokens` as `model` can read them: unchanged, or respelled in bytes where it has no row."""
    if model.config.vocab_rows is None:
        return list(tokens)
    fit = VocabularyFit(model.model.token_ids.cpu())
    out: list[int] = []
    for start in range(0, len(tokens), _FIT_PIECE):
        out += fit(tokens[start : start + _FIT_PIECE]).tolist()
    return out


def token_rows(model: GptOss) -> tuple[int, ...] | None:
    """The ids `model` has rows for, ascending; None when it has the whole vocabulary."""
    if model.config.vocab_rows is None:
        return None
    return tuple(model.model.token_ids.cpu().tolist())
