"""gptoss models inside EleutherAI's lm-evaluation-harness (`pip install lm-eval`).

    from lm_eval import simple_evaluate
    from gptoss.eval.lm_eval_adapter import GptOssLM

    simple_evaluate(model=GptOssLM("path/to/checkpoint"), tasks=["hellaswag"])

Importing this module also registers the class under the name "gptoss" in lm-eval's registry.
Scoring goes through `LocalModel` (one scorer for every task), with lm-eval's own tokenization
rule and rolling windows, so numbers compare with lm-eval's Hugging Face backend.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from gptoss.eval.models import GenerationRequest, LocalModel
from gptoss.model import GptOss
from gptoss.tokenizer import Tokenizer


@register_model("gptoss")
class GptOssLM(LM):
    """`pretrained` is a checkpoint directory, a preset name (random weights) or a loaded GptOss."""

    def __init__(
        self,
        pretrained: str | GptOss = "gpt-oss-nano",
        device: str = "cpu",
        dtype: str | None = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
    ) -> None:
        super().__init__()
        if isinstance(pretrained, GptOss):
            model, name = pretrained, pretrained.config.name
        else:
            import torch

            from gptoss.checkpoint import load_model

            model = load_model(pretrained, device=device, dtype=getattr(torch, dtype) if dtype else None)
            name = str(pretrained)
        # lm-eval passes command-line values as strings; "auto" batch sizing is not supported.
        size = int(batch_size) if str(batch_size).isdigit() else 8
        self.scorer = LocalModel(
            model, name=name, batch_size=size, max_length=int(max_length) if max_length else None
        )
        self.max_gen_toks = int(max_gen_toks)

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [req.args for req in requests]
        out: list[tuple[float, bool]] = []
        step = self.scorer.batch_size * 8  # hand over several batches at once: shared contexts dedupe
        for start in tqdm(range(0, len(pairs), step), disable=disable_tqdm, desc="loglikelihood"):
            out += self.scorer.loglikelihood(pairs[start : start + step])
        return out

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling"):
            (text,) = req.args
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self.scorer.encode(text),
                    prefix_token=Tokenizer.ENDOFTEXT,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            out.append(sum(lp for lp, _ in self.scorer.loglikelihood_tokens(windows)))
        return out

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        generation = [self._request(*req.args) for req in requests]
        out: list[str] = []
        step = self.scorer.batch_size
        for start in tqdm(range(0, len(generation), step), disable=disable_tqdm, desc="generate_until"):
            out += self.scorer.generate(generation[start : start + step])
        return out

    def _request(self, context: str, gen_kwargs: dict[str, Any]) -> GenerationRequest:
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        sample = gen_kwargs.get("do_sample", False)
        return GenerationRequest(
            prompt=context,
            chat=False,
            max_tokens=int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)),
            temperature=float(gen_kwargs.get("temperature", 1.0)) if sample else 0.0,
            top_p=float(gen_kwargs.get("top_p", 1.0)) if sample else 1.0,
            stop=tuple(until),
        )
