"""Speculative decoding without a draft model: propose tokens from text already seen, verify several
in one forward pass, keep what the model would have produced anyway.

Decoding one token reads every active weight once; verifying k proposed tokens in one pass reads the
dense weights once and the experts of the tokens' union, so an accepted proposal costs little.
Agent, coding and editing work repeats text from its prompt and from earlier outputs, which is what
the proposers here look up:

- `NGramProposer` (prompt lookup, as llama.cpp's lookup and vLLM's ngram): the latest earlier
  occurrence of the sequence's last n tokens, and what followed it.
- `SuffixProposer` (suffix decoding): the longest suffix of the sequence that occurs earlier in it
  or in the outputs of recent requests, found with suffix automata, and what followed it.

Both implement `Proposer`, which a draft model could implement as well. `Speculation` decides, from
measured acceptance and measured pass times, how many proposed tokens are worth verifying (none when
it does not pay); the engine verifies them (`ModelRunner.verify`) and keeps the longest run the
sampler agrees with. The engine samples every position exactly as plain decoding would, with the
row's own generator, and accepts a proposed token when the sample equals it: for a proposer that
names one token (a point mass), that is the standard speculative rejection rule (accept with
probability p(token); on rejection, a draw from p without that token, renormalised), and the output
of a seeded run is the same tokens with speculation on or off.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:  # (the CLI imports this module for its choices: no torch at import)
    from torch import Tensor

ProposerName = Literal["ngram", "suffix"]
PROPOSERS: tuple[str, ...] = ("ngram", "suffix")

# A verify pass feeds the drafted tokens as rows of decode-sized kernel calls. The native bf16 and
# MXFP4 kernels sum one activation row in the same order whether a call has 1 or up to 4 rows
# (their 2-4-row decode paths); with more rows they switch to other kernels whose rounding differs.
# So a pass feeds at most this many tokens at a time, which keeps every position's logits equal,
# bit for bit, to those of one-token decoding.
EXACT_ROWS = 4
DEFAULT_MAX_DRAFT = 7  # two passes of EXACT_ROWS tokens: the last sampled token and 7 proposals


class Proposer(Protocol):
    """Proposes how sequences continue. The engine tells it each sequence's text as it grows."""

    def start(self, seq: int, tokens: Sequence[int]) -> None:
        """Sequence `seq` begins (or resumes) with `tokens` (its prompt, or whole history)."""
        ...

    def extend(self, seq: int, tokens: Sequence[int]) -> None:
        """`tokens` were appended to `seq`."""
        ...

    def propose(self, seq: int, limit: int) -> list[int]:
        """Up to `limit` tokens that may follow `seq`'s text (none when nothing suggests any)."""
        ...

    def finish(self, seq: int) -> None:
        """`seq` ended; forget it (a proposer may keep its text for later requests)."""
        ...


# ---------------------------------------------------------------------- n-gram prompt lookup
class NGramProposer:
    """Prompt lookup: the continuation of the latest earlier occurrence of the last n tokens, for
    the longest n from `max_n` down to `min_n` that has one."""

    def __init__(self, min_n: int = 2, max_n: int = 4) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n, self.max_n = min_n, max_n
        self._text: dict[int, list[int]] = {}
        # per sequence and n: n-gram → the index just past its latest occurrence, and the one before
        # it (the latest is often the sequence's own suffix, which has no continuation yet)
        self._index: dict[int, dict[int, dict[tuple[int, ...], tuple[int, int]]]] = {}

    def start(self, seq: int, tokens: Sequence[int]) -> None:
        self._text[seq] = []
        self._index[seq] = {n: {} for n in range(self.min_n, self.max_n + 1)}
        self.extend(seq, tokens)

    def extend(self, seq: int, tokens: Sequence[int]) -> None:
        text, index = self._text[seq], self._index[seq]
        for token in tokens:
            text.append(token)
            end = len(text)
            for n, table in index.items():
                if end >= n:
                    gram = tuple(text[end - n :])
                    latest = table.get(gram)
                    table[gram] = (end, latest[0] if latest else -1)

    def propose(self, seq: int, limit: int) -> list[int]:
        text, index = self._text.get(seq), self._index.get(seq)
        if not text or index is None or limit < 1:
            return []
        end = len(text)
        for n in range(self.max_n, self.min_n - 1, -1):
            if end < n:
                continue
            found = index[n].get(tuple(text[end - n :]))
            if found is None:
                continue
            at = found[0] if found[0] < end else found[1]  # skip the suffix itself
            if at > 0:
                return text[at : at + limit]
        return []

    def finish(self, seq: int) -> None:
        self._text.pop(seq, None)
        self._index.pop(seq, None)


# ---------------------------------------------------------------------- suffix decoding
class SuffixAutomaton:
    """The suffix automaton of a growing token sequence (Blumer et al.; built online, linear time).

    Written here because no maintained package offers an incremental one over integer tokens with
    the end-position queries proposing needs; it is ~50 lines. Each state is a set of substrings
    that end at the same positions: `first_end[s]` is where its first occurrence ends (an index
    into `text`, exclusive), `length[s]` its longest substring's length."""

    def __init__(self) -> None:
        self.text: list[int] = []
        self.next: list[dict[int, int]] = [{}]
        self.link: list[int] = [-1]
        self.length: list[int] = [0]
        self.first_end: list[int] = [0]
        self.last = 0

    def append(self, token: int) -> None:
        self.text.append(token)
        cur = self._state(self.length[self.last] + 1, len(self.text))
        p = self.last
        while p != -1 and token not in self.next[p]:
            self.next[p][token] = cur
            p = self.link[p]
        if p == -1:
            self.link[cur] = 0
        else:
            q = self.next[p][token]
            if self.length[p] + 1 == self.length[q]:
                self.link[cur] = q
            else:
                clone = self._state(self.length[p] + 1, self.first_end[q])
                self.next[clone] = dict(self.next[q])
                self.link[clone] = self.link[q]
                while p != -1 and self.next[p].get(token) == q:
                    self.next[p][token] = clone
                    p = self.link[p]
                self.link[q] = self.link[cur] = clone
        self.last = cur

    def _state(self, length: int, first_end: int) -> int:
        self.next.append({})
        self.link.append(-1)
        self.length.append(length)
        self.first_end.append(first_end)
        return len(self.length) - 1

    def step(self, state: int, matched: int, token: int) -> tuple[int, int]:
        """Matching statistics: from (state, matched length) after some text, the state and length
        of the longest suffix of text + `token` that occurs in this sequence."""
        while state and token not in self.next[state]:
            state = self.link[state]
            matched = self.length[state]
        if token in self.next[state]:
            return self.next[state][token], matched + 1
        return 0, 0

    def repeat(self) -> tuple[int, int]:
        """The longest suffix of the text that also occurs earlier: (its length, where that earlier
        occurrence ends); (0, 0) if none."""
        state = self.last
        while state > 0:
            state = self.link[state]
            if state > 0 and self.first_end[state] < len(self.text):
                return self.length[state], self.first_end[state]
        return 0, 0


class SuffixProposer:
    """Suffix decoding: the longest suffix of the sequence that occurred before, in the sequence
    itself or in the last `corpus_tokens` tokens of finished sequences (prompts and outputs), and
    what followed it there (a shorter suffix's continuation when the longest one's ended a text).
    A match shorter than `min_match` proposes nothing."""

    def __init__(self, min_match: int = 2, corpus_tokens: int = 1 << 16) -> None:
        self.min_match = min_match
        self.corpus_tokens = corpus_tokens
        self._own: dict[int, SuffixAutomaton] = {}
        self._cursor: dict[int, tuple[int, int]] = {}  # matching state in the corpus automaton
        self._recent: deque[list[int]] = deque()  # finished texts the corpus holds, oldest first
        self._corpus = SuffixAutomaton()

    def start(self, seq: int, tokens: Sequence[int]) -> None:
        self._own[seq] = SuffixAutomaton()
        self._cursor[seq] = (0, 0)
        self.extend(seq, tokens)

    def extend(self, seq: int, tokens: Sequence[int]) -> None:
        own = self._own[seq]
        state, matched = self._cursor[seq]
        for token in tokens:
            own.append(token)
            state, matched = self._corpus.step(state, matched, token)
        self._cursor[seq] = (state, matched)

    def propose(self, seq: int, limit: int) -> list[int]:
        own = self._own.get(seq)
        if own is None or limit < 1:
            return []
        length, end = own.repeat()
        state, matched = self._cursor[seq]
        corpus = self._corpus
        while matched > length and matched >= self.min_match:
            start = corpus.first_end[state]
            tokens = corpus.text[start : start + limit]
            tokens = tokens[: tokens.index(-1)] if -1 in tokens else tokens
            if tokens:
                return tokens
            state = corpus.link[state]  # that occurrence ended a text: a shorter suffix's
            matched = corpus.length[state]
        if length >= self.min_match:
            return own.text[end : end + limit]
        return []

    def finish(self, seq: int) -> None:
        own = self._own.pop(seq, None)
        self._cursor.pop(seq, None)
        if own is None or not own.text:
            return
        # Appended after a separator (-1, no token), which keeps matches inside one text. The
        # automaton only grows, so running sequences' cursors stay valid. It is rebuilt from the
        # newest texts once it holds twice its budget: a rebuild every `corpus_tokens` finished
        # tokens, never one per request (this runs on the engine's thread, between steps).
        text = own.text[-self.corpus_tokens :]
        self._recent.append(text)
        for token in (*text, -1):
            self._corpus.append(token)
        if len(self._corpus.text) <= 2 * self.corpus_tokens:
            return
        held = sum(map(len, self._recent))
        while held > self.corpus_tokens and len(self._recent) > 1:
            held -= len(self._recent.popleft())
        self._corpus = SuffixAutomaton()
        for kept in self._recent:
            for token in (*kept, -1):
                self._corpus.append(token)
        for other, automaton in self._own.items():  # their cursors pointed into the old automaton
            state, matched = 0, 0
            for token in automaton.text[-256:]:
                state, matched = self._corpus.step(state, matched, token)
            self._cursor[other] = (state, matched)


def make_proposer(name: str) -> Proposer:
    if name == "ngram":
        return NGramProposer()
    if name == "suffix":
        return SuffixProposer()
    raise ValueError(f"unknown proposer {name!r}: choose one of {', '.join(PROPOSERS)}")


# ---------------------------------------------------------------------- when and how much to verify
@dataclass
class SpeculationStats:
    """Counters over the engine's life (the server's /metrics reads them)."""

    verify_passes: int = 0  # forward passes that verified proposed tokens
    proposed: int = 0  # proposed tokens verified
    accepted: int = 0  # of those, the ones the model agreed with
    emitted: int = 0  # tokens those passes produced (accepted + one of the model's own, at most)
    decode_passes: int = 0  # plain one-token passes of a sequence that speculation could have served

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_forward(self) -> float:
        passes = self.verify_passes + self.decode_passes
        return (self.emitted + self.decode_passes) / passes if passes else 0.0


@dataclass
class _Acceptance:
    """A sequence's recent acceptance: proposed tokens the model agreed with and disagreed with
    (decayed so that it follows the text: quoting, then writing anew)."""

    agreed: float = 1.0
    refused: float = 1.0
    idle: int = 0  # steps since the last verify

    @property
    def rate(self) -> float:
        return self.agreed / (self.agreed + self.refused)


@dataclass
class Speculation:
    """How an `Engine` speculates: a proposer, the most tokens a pass verifies, and whether the
    draft length adapts (from each sequence's measured acceptance and the measured time of passes of
    each length) or is always the most the proposer offers, up to `max_draft`."""

    proposer: Proposer = field(default_factory=SuffixProposer)
    max_draft: int = DEFAULT_MAX_DRAFT
    adaptive: bool = True
    stats: SpeculationStats = field(default_factory=SpeculationStats, init=False)
    # seconds per step that fed n tokens (n = 1: plain decode), exponentially averaged
    _seconds: dict[int, float] = field(default_factory=dict, init=False)
    _acceptance: dict[int, _Acceptance] = field(default_factory=dict, init=False)

    PROBE_EVERY = 16  # a sequence that stopped speculating tries one proposal this often
    DECAY = 0.8  # weight of the past in acceptance and timing averages
    MARGIN = 1.1  # the expected gain below which plain decoding stays (timings are noisy)

    def __post_init__(self) -> None:
        if not 1 <= self.max_draft <= 64:
            raise ValueError(f"max_draft must lie in 1..64, got {self.max_draft}")

    def draft(self, seq: int, limit: int) -> list[int]:
        """The proposed tokens worth verifying for `seq` now (at most `limit`); [] for plain decode."""
        limit = min(limit, self.max_draft)
        if limit < 1:
            return []
        tokens = self.proposer.propose(seq, limit)
        if not tokens or not self.adaptive:
            return tokens
        acceptance = self._acceptance.setdefault(seq, _Acceptance())
        k = self._best_length(acceptance.rate, len(tokens))
        if k == 0 and acceptance.idle >= self.PROBE_EVERY:
            k = 1
        acceptance.idle = 0 if k else acceptance.idle + 1
        return tokens[:k]

    def _best_length(self, rate: float, most: int) -> int:
        """The draft length with the most expected tokens per second (0: plain decoding). With
        each proposed token accepted with probability `rate` once its predecessors are, k proposals
        yield 1 + rate + ... + rate^k tokens."""
        best, best_speed = 0, self.MARGIN / self._time(1)
        expected = 1.0
        for k in range(1, most + 1):
            expected += rate**k
            speed = expected / self._time(k + 1)
            if speed > best_speed:
                best, best_speed = k, speed
        return best

    def _time(self, fed: int) -> float:
        """Measured seconds of a pass of `fed` tokens; before any measurement, a guess in which
        passes of up to `EXACT_ROWS` tokens cost about one token's (the dense weights dominate)."""
        if fed in self._seconds:
            return self._seconds[fed]
        one = self._seconds.get(1, 1.0)
        passes = -(-fed // EXACT_ROWS)
        return one * passes * (1 + 0.05 * (fed - passes))

    def timed(self, fed: int, seconds: float) -> None:
        """A step that fed `fed` tokens took `seconds` (its pass, sampling and proposing)."""
        old = self._seconds.get(fed)
        self._seconds[fed] = seconds if old is None else self.DECAY * old + (1 - self.DECAY) * seconds

    def verified(self, seq: int, proposed: int, accepted: int, emitted: int) -> None:
        self.stats.verify_passes += 1
        self.stats.proposed += proposed
        self.stats.accepted += accepted
        self.stats.emitted += emitted
        a = self._acceptance.setdefault(seq, _Acceptance())
        a.agreed = self.DECAY * a.agreed + accepted
        a.refused = self.DECAY * a.refused + (accepted < proposed)

    def forget(self, seq: int) -> None:
        self._acceptance.pop(seq, None)
        self.proposer.finish(seq)


def speculation(
    name: str | None, max_draft: int = DEFAULT_MAX_DRAFT, adaptive: bool = True
) -> Speculation | None:
    """A `Speculation` with the named proposer ('ngram', 'suffix'), or None for 'off' / None."""
    if name in (None, "off"):
        return None
    return Speculation(make_proposer(name), max_draft=max_draft, adaptive=adaptive)


@runtime_checkable
class Verifier(Protocol):
    """What a `Runner` offers for speculation (`ModelRunner` does)."""

    def verify_room(self, seq: int) -> int: ...

    def verify(self, seq: int, tokens: Sequence[int]) -> Tensor: ...

    def settle(self, seq: int, kept: int) -> None: ...
