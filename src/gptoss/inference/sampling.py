"""Sampling controls and the one sampler that applies them to a batch of next-token logits.

Order, per row: raw log-probabilities (reported as logprobs) → logit bias → repetition penalty →
presence/frequency penalties → greedy argmax if temperature is 0, else temperature → top-k →
top-p → min-p → a draw from the row's own seeded generator. Each row has its own controls and
generator, so a row's tokens do not depend on which other rows share its batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the tokens of one sequence (names and meanings follow the OpenAI API).

    - temperature: 0 is greedy; otherwise logits are divided by it before sampling.
    - top_k (0 = off), top_p (1 = off), min_p (0 = off; drops tokens whose probability is below
      min_p times the most likely one's): nucleus-style filters, applied in that order.
    - presence_penalty / frequency_penalty: subtracted from a token's logit once if it was
      generated before / once per earlier occurrence in the generated tokens.
    - repetition_penalty (1 = off): divides positive and multiplies negative logits of tokens seen
      in the prompt or the generated tokens (CTRL / transformers semantics).
    - logit_bias: token id → value added to its logit (-100 bans it, +100 forces it).
    - seed: same seed, same prompt, same model → same tokens. None draws one from torch's RNG.
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
        if self.max_tokens < 1:
            problems.append(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            problems.append(f"min_p must lie in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.logprobs is not None and self.logprobs < 0:
            problems.append(f"logprobs must be None or >= 0, got {self.logprobs}")
        if isinstance(self.stop, str):
            problems.append("stop must be a list of strings, not one string")
        if problems:
            raise ValueError("invalid SamplingParams: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Choice:
    """The sampled token of one row, with its log-probabilities when they were asked for."""

    token: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None


class Sampler:
    """Per-row sampling state for one batch: controls as tensors, seen-token counts, generators."""

    def __init__(
        self,
        params: Sequence[SamplingParams],
        prompts: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.params = list(params)
        rows = len(self.params)
        self.vocab_size = vocab_size

        def column(name: str) -> Tensor:
            return torch.tensor([getattr(p, name) for p in self.params], dtype=torch.float32, device=device)

        self.temperature = column("temperature")
        self.top_p = column("top_p")
        self.min_p = column("min_p")
        self.presence = column("presence_penalty")
        self.frequency = column("frequency_penalty")
        self.repetition = column("repetition_penalty")
        self.top_k = [p.top_k for p in self.params]

        # Dense per-row tables only when some row needs them (a (rows, vocab) tensor is 0.8 MB
        # per row at 201,088 tokens: small next to a decode step, but not free).
        self.bias: Tensor | None = None
        if any(p.logit_bias for p in self.params):
            self.bias = torch.zeros(rows, vocab_size, device=device)
            for r, p in enumerate(self.params):
                for token, value in p.logit_bias.items():
                    if not 0 <= int(token) < vocab_size:
                        raise ValueError(
                            f"logit_bias token {token} is outside the vocabulary (0..{vocab_size - 1})"
                        )
                    self.bias[r, int(token)] = value
        self.counts: Tensor | None = None  # (rows, vocab) occurrences in the generated tokens
        if any(p.presence_penalty or p.frequency_penalty for p in self.params):
            self.counts = torch.zeros(rows, vocab_size, device=device)
        self.seen: Tensor | None = None  # (rows, vocab) in the prompt or generated
        if any(p.repetition_penalty != 1 for p in self.params):
            self.seen = torch.zeros(rows, vocab_size, dtype=torch.bool, device=device)
            for r, prompt in enumerate(prompts):
                self.seen[r, torch.tensor(list(prompt), dtype=torch.long, device=device)] = True

        self.generators = []
        for p in self.params:
            seed = p.seed if p.seed is not None else int(torch.randint(0, 2**62, ()).item())
            self.generators.append(torch.Generator(device=device).manual_seed(seed))

    def __len__(self) -> int:
        return len(self.params)

    def sample(self, logits: Tensor) -> list[Choice]:
        """Pick one token per row from next-token logits (rows, vocab)."""
        logits = logits.float()
        raw = logits
        if self.bias is not None:
            logits = logits + self.bias
        if self.seen is not None:
            penalised = torch.where(
                logits > 0, logits / self.repetition[:, None], logits * self.repetition[:, None]
            )
            logits = torch.where(self.seen, penalised, logits)
        if self.counts is not None:
            logits = logits - self.frequency[:, None] * self.counts
            logits = logits - self.presence[:, None] * (self.counts > 0)

        tokens = logits.argmax(dim=-1)  # the greedy rows' answer; sampled rows overwrite theirs
        sampled = [r for r, p in enumerate(self.params) if not p.greedy]
        if sampled:
            probs = self._filtered_probs(logits[sampled], sampled)
            for i, r in enumerate(sampled):
                tokens[r] = torch.multinomial(probs[i], 1, generator=self.generators[r])[0]
        return self._choices(raw, tokens)

    def _filtered_probs(self, logits: Tensor, rows: list[int]) -> Tensor:
        """Probabilities (n, vocab) after temperature, top-k, top-p and min-p for rows `rows`."""
        logits = logits / self.temperature[rows, None]
        top_k = [self.top_k[r] for r in rows]
        if any(top_k):
            k_max = min(max(top_k), logits.shape[-1])
            kth = torch.topk(logits, k_max, dim=-1).values  # (n, k_max), descending
            k = torch.tensor([min(k, k_max) if k else k_max for k in top_k], device=logits.device)
            threshold = kth.gather(1, (k - 1)[:, None])
            off = torch.tensor([k == 0 for k in top_k], device=logits.device)[:, None]
            logits = torch.where(off | (logits >= threshold), logits, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        top_p = self.top_p[rows]
        if bool((top_p < 1).any()):
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # Keep a token if the tokens strictly more likely than it hold less than top_p.
            before = sorted_probs.cumsum(dim=-1) - sorted_probs
            drop_sorted = before >= top_p[:, None]
            probs = probs.masked_fill(drop_sorted.scatter(1, order, drop_sorted), 0.0)
        min_p = self.min_p[rows]
        if bool((min_p > 0).any()):
            floor = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
            probs = probs.masked_fill(probs < floor, 0.0)
        return probs

    def _choices(self, raw: Tensor, tokens: Tensor) -> list[Choice]:
        wanted = [p.logprobs for p in self.params]
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

    def observe(self, tokens: Sequence[int]) -> None:
        """Record each row's newly generated token (for the penalties)."""
        device = self.temperature.device
        index = torch.arange(len(tokens), device=device)
        ids = torch.tensor(list(tokens), dtype=torch.long, device=device)
        if self.counts is not None:
            self.counts[index, ids] += 1
        if self.seen is not None:
            self.seen[index, ids] = True

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows`, in this order (as the cache does when sequences finish)."""
        self.params = [self.params[r] for r in rows]
        self.generators = [self.generators[r] for r in rows]
        self.top_k = [self.top_k[r] for r in rows]
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "presence",
            "frequency",
            "repetition",
            "bias",
            "counts",
            "seen",
        ):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[rows])
