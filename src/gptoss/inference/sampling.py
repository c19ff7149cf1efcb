"""Sampling controls and the one sampler that applies them to a batch of next-token logits.

Order, per row: raw log-probabilities (reported as logprobs) → the row's logits processors (logit
bias, repetition penalty, presence/frequency penalties, an allowed-token constraint) → greedy
argmax if temperature is 0, else temperature → top-k → top-p → min-p → a draw from the row's own
seeded generator. Each row has its own controls and generator, so a row's tokens do not depend on
which other rows share its batch; rows join and leave the batch as sequences come and go.

A row whose sampling fails (a constraint that allows nothing, numbers that turn into NaN) gets a
`SampleError` instead of a token; the other rows of the batch are sampled as if it were not there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

# Sampling runs in float32: positive controls smaller than its smallest normal number would
# underflow to zero (and divide into inf or NaN), so they are refused with a clear message.
_FP32_TINY = torch.finfo(torch.float32).tiny
_SEED_MODULUS = 2**64  # torch generators take 64-bit seeds; any integer seed maps onto one


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the tokens of one sequence (names and meanings follow the OpenAI API).

    - temperature: 0 is greedy; otherwise logits are divided by it before sampling.
    - top_k (0 = off), top_p (1 = off; 0 keeps only the most likely token), min_p (0 = off; drops
      tokens whose probability is below min_p times the most likely one's): nucleus-style filters,
      applied in that order.
    - presence_penalty / frequency_penalty: subtracted from a token's logit once if it was
      generated before / once per earlier occurrence in the generated tokens.
    - repetition_penalty (1 = off): divides positive and multiplies negative logits of tokens seen
      in the prompt or the generated tokens (CTRL / transformers semantics).
    - logit_bias: token id → value added to its logit (-100 bans it, +100 forces it).
    - seed: same seed, same prompt, same model → same tokens. None draws one from torch's RNG.
      Any integer is accepted (taken modulo 2**64).
    - stop_token_ids: generation stops after emitting one (it is included in the output); None
      means the model's `eos_token_id`. stop: strings that end generation once the decoded
      output contains them (the token completing one is included).
    - logprobs: None for none; n ≥ 0 reports each token's log-probability and the n most likely
      alternatives, from the model's raw distribution (before any of the controls above).
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop_token_ids: Sequence[int] | None = None
    stop: Sequence[str] = ()
    logprobs: int | None = None

    def __post_init__(self) -> None:
        problems = []
        floats = (
            "temperature",
            "top_p",
            "min_p",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
        )
        for name in floats:
            if not math.isfinite(getattr(self, name)):
                problems.append(f"{name} must be a finite number, got {getattr(self, name)}")
        if problems:
            raise ValueError("invalid SamplingParams: " + "; ".join(problems))
        if self.max_tokens < 1:
            problems.append(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        elif 0 < self.temperature < _FP32_TINY:
            problems.append(
                f"temperature {self.temperature} is too small to compute with (below {_FP32_TINY:.3g}); "
                "use 0 for greedy decoding"
            )
        if not 0 <= self.top_p <= 1:
            problems.append(f"top_p must lie in [0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            problems.append(f"min_p must lie in [0, 1], got {self.min_p}")
        if self.repetition_penalty < _FP32_TINY or self.repetition_penalty > 1 / _FP32_TINY:
            problems.append(
                f"repetition_penalty must lie in [{_FP32_TINY:.3g}, {1 / _FP32_TINY:.3g}] (1 = off), "
                f"got {self.repetition_penalty}"
            )
        if any(not math.isfinite(v) for v in self.logit_bias.values()):
            problems.append("logit_bias values must be finite numbers")
        if self.logprobs is not None and self.logprobs < 0:
            problems.append(f"logprobs must be None or >= 0, got {self.logprobs}")
        if isinstance(self.stop, str):
            problems.append("stop must be a list of strings, not one string")
        if problems:
            raise ValueError("invalid SamplingParams: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class TokenConstraint(Protocol):
    """Which tokens a sequence may take next (a grammar, a forced header); it follows the tokens
    the sequence actually takes."""

    def allowed(self) -> Sequence[int] | Tensor | None:
        """Token ids allowed next, a boolean mask over the vocabulary, or None when any token is."""
        ...

    def advance(self, token: int) -> None:
        """`token` was taken."""
        ...


def _prepare_constraints(constraints: Sequence[TokenConstraint]) -> None:
    """A constraint class may compute a whole batch's next masks at once (a static
    `prepare_batch(constraints)`, e.g. on several threads); its rows' `allowed` then return them."""
    groups: dict[type, list[TokenConstraint]] = {}
    for constraint in constraints:
        if hasattr(constraint, "prepare_batch"):
            groups.setdefault(type(constraint), []).append(constraint)
    for kind, group in groups.items():
        kind.prepare_batch(group)


@dataclass(frozen=True)
class Choice:
    """The sampled token of one row, with its log-probabilities when they were asked for."""

    token: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None


@dataclass(frozen=True)
class SampleError:
    """Why one row could not be sampled (the sequence ends with this error; its neighbours go on)."""

    message: str


class _Row:
    """One sequence's sampling state: its controls, generator and processor state."""

    def __init__(
        self,
        params: SamplingParams,
        prompt: Sequence[int],
        vocab_size: int,
        device: torch.device,
        constraint: TokenConstraint | None,
    ) -> None:
        self.params = params
        self.constraint = constraint
        self.bias: tuple[Tensor, Tensor] | None = None  # (token ids, values)
        if params.logit_bias:
            ids = [int(t) for t in params.logit_bias]
            bad = next((t for t in ids if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise ValueError(f"logit_bias token {bad} is outside the vocabulary (0..{vocab_size - 1})")
            values = [float(v) for v in params.logit_bias.values()]
            self.bias = (torch.tensor(ids, device=device), torch.tensor(values, device=device))
        # Dense (vocab,) tables only for rows that need them: 0.8 MB each at 201,088 tokens.
        self.counts: Tensor | None = None  # occurrences in the generated tokens
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(vocab_size, device=device)
        self.seen: Tensor | None = None  # in the prompt or generated
        if params.repetition_penalty != 1:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[torch.tensor(list(prompt), dtype=torch.long, device=device)] = True
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
        self.generator = torch.Generator(device=device).manual_seed(seed % _SEED_MODULUS)

    @property
    def has_processors(self) -> bool:
        return (
            self.bias is not None
            or self.counts is not None
            or self.seen is not None
            or (self.constraint is not None)
        )

    def process(self, logits: Tensor) -> Tensor:
        """The logits processors, in order, on this row's logits (V,) (a new tensor)."""
        p = self.params
        if self.bias is not None:
            logits = logits.index_add(0, self.bias[0], self.bias[1])
        if self.seen is not None:
            penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(self.seen, penalised, logits)
        if self.counts is not None:
            logits = logits - p.frequency_penalty * self.counts - p.presence_penalty * (self.counts > 0)
        if self.constraint is not None and (allowed := self.constraint.allowed()) is not None:
            if isinstance(allowed, Tensor):
                logits = logits.masked_fill(~allowed.to(logits.device, non_blocking=True), float("-inf"))
            else:
                index = torch.as_tensor(list(allowed), dtype=torch.long, device=logits.device)
                masked = torch.full_like(logits, float("-inf"))
                masked[index] = logits[index]
                logits = masked
        return logits

    def observe(self, token: int) -> None:
        if self.counts is not None:
            self.counts[token] += 1
        if self.seen is not None:
            self.seen[token] = True
        if self.constraint is not None:
            self.constraint.advance(token)


class Sampler:
    """Per-row sampling state for a batch whose rows come (`join`) and go (`keep`)."""

    def __init__(
        self,
        params: Sequence[SamplingParams] = (),
        prompts: Sequence[Sequence[int]] = (),
        vocab_size: int = 0,
        device: torch.device | str = "cpu",
        constraints: Sequence[TokenConstraint | None] | None = None,
    ) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.rows: list[_Row] = []
        constraints = constraints or [None] * len(params)
        for p, prompt, constraint in zip(params, prompts, constraints, strict=True):
            self.join(p, prompt, constraint)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def params(self) -> list[SamplingParams]:
        return [row.params for row in self.rows]

    def join(
        self, params: SamplingParams, prompt: Sequence[int], constraint: TokenConstraint | None = None
    ) -> None:
        """Add a row at the end of the batch."""
        self.rows.append(_Row(params, prompt, self.vocab_size, self.device, constraint))

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only `rows`, in this order (as the KV cache does when sequences finish)."""
        self.rows = [self.rows[r] for r in rows]

    def sample(self, logits: Tensor) -> list[Choice | SampleError]:
        """Pick one token per row from next-token logits (rows, vocab)."""
        raw = logits.float()
        try:
            return self._sample(raw, list(range(len(self.rows))))
        except Exception:  # some row is bad: sample each alone, so that only that row fails
            return [self._sample_alone(raw, r) for r in range(len(self.rows))]

    def _sample_alone(self, raw: Tensor, r: int) -> Choice | SampleError:
        try:
            return self._sample(raw, [r])[0]
        except Exception as exc:
            return SampleError(f"sampling failed: {exc}")

    def _sample(self, raw: Tensor, rows: list[int]) -> list[Choice | SampleError]:
        processed = [i for i, r in enumerate(rows) if self.rows[r].has_processors]
        everyone = len(rows) == len(raw)
        logits = raw[rows] if processed or not everyone else raw  # a copy only when rows change
        _prepare_constraints([c for i in processed if (c := self.rows[rows[i]].constraint) is not None])
        for i in processed:
            logits[i] = self.rows[rows[i]].process(logits[i])
        # A row can be sampled when its best logit is finite (NaN or all -inf are not).
        finite = torch.isfinite(logits.amax(dim=-1)).tolist()
        ok = [i for i, f in enumerate(finite) if f]
        tokens = logits.argmax(dim=-1)  # the greedy rows' answer; sampled rows overwrite theirs
        sampled = [i for i in ok if not self.rows[rows[i]].params.greedy]
        if sampled:
            probs = self._filtered_probs(logits[sampled], [rows[i] for i in sampled])
            for j, i in enumerate(sampled):
                tokens[i] = torch.multinomial(probs[j], 1, generator=self.rows[rows[i]].generator)[0]
        choices = self._choices(
            raw if everyone else raw[rows], tokens, [self.rows[r].params.logprobs for r in rows]
        )
        return [
            choices[i] if finite[i] else SampleError(
                "no token can be sampled: every token's logit is -inf or NaN after the logits processors "
                "(logit_bias, penalties or a constraint exclude them all)"
            )
            for i in range(len(rows))
        ]  # fmt: skip

    def _filtered_probs(self, logits: Tensor, rows: list[int]) -> Tensor:
        """Probabilities (n, vocab) after temperature, top-k, top-p and min-p for rows `rows`."""
        params = [self.rows[r].params for r in rows]
        device = logits.device
        # Subtract each row's largest logit first: then no temperature (however small) can turn
        # a logit into inf, and the best token's scaled logit is exactly 0.
        logits = logits - logits.amax(dim=-1, keepdim=True)
        logits = logits / torch.tensor([p.temperature for p in params], device=device)[:, None]
        logits = logits.nan_to_num(nan=float("-inf"))
        top_k = [p.top_k for p in params]
        if any(top_k):
            k_max = min(max(top_k), logits.shape[-1])
            kth = torch.topk(logits, k_max, dim=-1).values  # (n, k_max), descending
            k = torch.tensor([min(k, k_max) if k else k_max for k in top_k], device=device)
            threshold = kth.gather(1, (k - 1)[:, None])
            off = torch.tensor([k == 0 for k in top_k], device=device)[:, None]
            logits = torch.where(off | (logits >= threshold), logits, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
        if bool((top_p < 1).any()):
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # Keep a token if the tokens strictly more likely than it hold less than top_p; the
            # most likely token always stays (top_p 0 is greedy-like, never an empty set).
            before = sorted_probs.cumsum(dim=-1) - sorted_probs
            drop_sorted = before >= top_p[:, None]
            drop_sorted[:, 0] = False
            probs = probs.masked_fill(drop_sorted.scatter(1, order, drop_sorted), 0.0)
        min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device)
        if bool((min_p > 0).any()):
            floor = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
            probs = probs.masked_fill(probs < floor, 0.0)
        return probs

    @staticmethod
    def _choices(raw: Tensor, tokens: Tensor, wanted: list[int | None]) -> list[Choice]:
        token_list = tokens.tolist()
        if all(n is None for n in wanted):
            return [Choice(t) for t in token_list]
        logprobs = torch.log_softmax(raw, dim=-1)
        chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
        n_max = max(n or 0 for n in wanted)
        top_values, top_ids = torch.topk(logprobs, n_max, dim=-1) if n_max else (None, None)
        choices = []
        for r, (token, n) in enumerate(zip(token_list, wanted, strict=True)):
            if n is None:
                choices.append(Choice(token))
                continue
            top = ()
            if n:
                top = tuple(zip(top_ids[r, :n].tolist(), top_values[r, :n].tolist(), strict=True))
            choices.append(Choice(token, chosen[r], top))
        return choices

    def observe(self, tokens: Sequence[int | None]) -> None:
        """Record each row's newly generated token (None for a row that got no token)."""
        for row, token in zip(self.rows, tokens, strict=True):
            if token is not None:
                row.observe(token)
