"""The lm-evaluation-harness adapter: each request type against brute force, then a tiny local
task run end to end through `lm_eval.simple_evaluate`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gptoss.eval import LocalModel
from gptoss.eval.perplexity import windows
from gptoss.inference import generate
from gptoss.tokenizer import Tokenizer, get_tokenizer
from test_eval_mmlu import real_vocab_model
from test_eval_perplexity import brute_force_logprobs

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from gptoss.eval.lm_eval_adapter import GptOssLM  # noqa: E402

TASK_DATA = Path(__file__).parent / "fixtures" / "lm_eval" / "tiny_qa.jsonl"


@pytest.fixture(scope="module")
def adapter():
    return GptOssLM(real_vocab_model(seed=2), batch_size=2, max_length=8, max_gen_toks=6)


def instance(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_loglikelihood_matches_the_local_scorer(adapter):
    pairs = [("The sky on a clear day is", " blue"), ("The sky on a clear day is", " green"), ("", "Hello")]
    got = adapter.loglikelihood([instance("loglikelihood", *p) for p in pairs])
    assert got == adapter.scorer.loglikelihood(pairs)
    # An empty context is a document start: <|endoftext|> then the text.
    tokens = [Tokenizer.ENDOFTEXT, *get_tokenizer().encode_ordinary("Hello")]
    assert got[2][0] == pytest.approx(
        sum(brute_force_logprobs(adapter.scorer.model, tokens, 0, len(tokens))), abs=1e-4
    )


def test_loglikelihood_rolling_covers_every_token_in_disjoint_windows(adapter):
    text = "Rolling windows cover a text longer than the eight tokens this model reads at once. " * 2
    [total] = adapter.loglikelihood_rolling([instance("loglikelihood_rolling", text)])
    tokens = [Tokenizer.ENDOFTEXT, *get_tokenizer().encode_ordinary(text)]
    assert len(tokens) > 4 * adapter.max_length
    expected = 0.0
    for begin, first, end in windows(len(tokens), adapter.max_length, adapter.max_length):
        expected += sum(brute_force_logprobs(adapter.scorer.model, tokens, begin, end)[first - begin - 1 :])
    assert total == pytest.approx(expected, abs=1e-3)


def test_generate_until_is_greedy_and_stops_at_until(adapter):
    model = adapter.scorer.model
    context = "Once upon a time"
    [free] = adapter.generate_until([instance("generate_until", context, {"until": [], "max_gen_toks": 6})])
    ids = generate(
        model,
        [get_tokenizer().encode_ordinary(context)],
        max_new_tokens=6,
        temperature=0.0,
        stop_token_ids=sorted(Tokenizer.STOP_TOKENS | {model.config.eos_token_id}),
    )[0]
    assert free == get_tokenizer().decode([t for t in ids if t < Tokenizer.ENDOFTEXT])
    until = free[len(free) // 2 :][:2]
    [cut] = adapter.generate_until(
        [instance("generate_until", context, {"until": [until], "max_gen_toks": 6})]
    )
    assert until and cut == free[: free.find(until)]


def test_a_tiny_local_task_runs_through_simple_evaluate(adapter, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    data = {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(TASK_DATA)}},
        "test_split": "test",
    }
    task = data | {
        "task": "tiny_qa",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    out = simple_evaluate(model=adapter, tasks=[task], bootstrap_iters=0, task_manager=TaskManager())
    acc = out["results"]["tiny_qa"]["acc,none"]

    import json

    docs = [json.loads(line) for line in TASK_DATA.read_text().splitlines()]
    scorer = LocalModel(adapter.scorer.model)
    right = 0
    for doc in docs:
        scores = [lp for lp, _ in scorer.loglikelihood([(doc["question"], " " + c) for c in doc["choices"]])]
        right += max(range(len(scores)), key=scores.__getitem__) == doc["label"]
    assert acc == pytest.approx(right / len(docs))
    assert torch.is_grad_enabled()  # the scorer's no_grad does not leak
