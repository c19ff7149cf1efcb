"""Allowed-token constraints (`sampling.TokenConstraint`s) that the engine applies while sampling."""

from __future__ import annotations

from collections.abc import Sequence


class PrefixConstraint:
    """The generated tokens must begin with one of `choices`; after that, decoding is free.

    This forces a tool-call header (``tool_choice`` "required" or a named function): only tokens
    that keep the output on some choice's path are allowed. The choices must be spelled in the
    model's own vocabulary (`gptoss.vocab.fit_tokens`), or a trimmed model could write none of them.
    """

    def __init__(self, choices: Sequence[Sequence[int]]) -> None:
        if not choices or not all(choices):
            raise ValueError("a prefix constraint needs at least one non-empty choice")
        self.choices = [tuple(c) for c in choices]
        self.generated: list[int] = []

    def allowed(self) -> list[int] | None:
        k = len(self.generated)
        allowed = set()
        for c in self.choices:
            n = min(k, len(c))
            if tuple(self.generated[:n]) != c[:n]:
                continue
            if n == len(c):  # a whole choice is written
                return None
            allowed.add(c[k])
        return sorted(allowed) or None  # off every path (cannot happen when masking): stop constraining

    def advance(self, token: int) -> None:
        if len(self.generated) < max(map(len, self.choices)):
            self.generated.append(token)
