"""Prompt log-probabilities: `score_tokens` against one plain forward pass, /v1/completions with
``echo`` + ``logprobs`` (and ``max_tokens`` 0), /tokenize and /detokenize, and lm-eval-harness's own
``local-completions`` model against a live server, equal per example to our local evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import openai
import pytest
import torch

from conftest import random_model, tiny_config
from gptoss import load_model
from gptoss.checkpoint import DEFAULT_MODEL
from gptoss.eval import LocalModel
from gptoss.inference import ModelRunner
from gptoss.inference.scoring import score_tokens
from gptoss.tokenizer import get_tokenizer
from gptoss.vocab import fit_tokens
from test_eval_perplexity import brute_force_logprobs
from test_server_support import MODEL, ScriptedRunner, live_server, model_server

TASK_DATA = Path(__file__).parent / "fixtures" / "lm_eval" / "tiny_qa.jsonl"


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    with model_server(tmp_path_factory.mktemp("scoring")) as server:
        server.model = server.app.state.service.runner.model
        yield server


@pytest.mark.parametrize(("length", "chunk"), [(1, 4), (2, 4), (23, 4), (23, 64)])
def test_score_tokens_matches_one_forward_pass(length, chunk):
    model = random_model(tiny_config(), seed=3)  # sliding window 5: chunks cross it
    tokens = torch.randint(0, 320, (length,), generator=torch.Generator().manual_seed(length)).tolist()
    scores = score_tokens(model, tokens, top=3, prefill_chunk=chunk)
    assert scores.logprobs[0] is None and scores.top[0] == []
    assert len(scores.logprobs) == len(scores.top) == length
    if length > 1:
        assert scores.logprobs[1:] == pytest.approx(brute_force_logprobs(model, tokens, 0, length), abs=1e-5)
        with torch.no_grad():
            table = model(torch.tensor([tokens[:-1]]))[0].float().log_softmax(-1)
        for position, top in enumerate(scores.top[1:]):
            assert [t for t, _ in top] == table[position].topk(3).indices.tolist()
            assert all(
                lp >= scores.logprobs[position + 1] - 1e-5 or t != tokens[position + 1] for t, lp in top
            )


def test_score_tokens_refuses_bad_input():
    model = random_model(tiny_config(), seed=3)
    too_long = [1] * (model.config.max_position_embeddings + 1)
    for tokens, words in (([], "empty"), ([5, 999], "999"), (too_long, "context")):
        with pytest.raises(ValueError, match=words):
            score_tokens(model, tokens)


def test_echo_with_logprobs_returns_the_prompt_scores(real):
    client = real.client()
    text = "The quick brown fox jumps over the lazy dog"
    tokens = get_tokenizer().encode_ordinary(text)
    expected = score_tokens(real.model, tokens, top=2)

    scored = client.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=2)
    [choice] = scored.choices
    assert choice.text == text and choice.finish_reason == "length"
    assert scored.usage.prompt_tokens == len(tokens) and scored.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.tokens == [get_tokenizer().decode([t]) for t in tokens]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(expected.logprobs[1:], abs=1e-5)
    assert [len(top) for top in lp.top_logprobs[1:]] == [2] * (len(tokens) - 1)
    assert lp.text_offset == [len(get_tokenizer().decode(tokens[:i])) for i in range(len(tokens))]

    # With generation after the echo (lm-eval's request): the prompt's entries, then the new token's.
    both = client.completions.create(
        model=MODEL, prompt=tokens, max_tokens=1, echo=True, logprobs=1, temperature=0, n=2
    )
    for choice in both.choices:
        assert len(choice.logprobs.token_logprobs) == len(tokens) + 1
        assert choice.logprobs.token_logprobs[1 : len(tokens)] == pytest.approx(
            expected.logprobs[1:], abs=1e-5
        )
        assert choice.text.startswith(text) and len(choice.logprobs.tokens) == len(tokens) + 1
    streamed = client.completions.create(
        model=MODEL, prompt=text, max_tokens=2, echo=True, logprobs=0, stream=True
    )
    chunks = list(streamed)
    assert chunks[0].choices[0].text == text
    assert chunks[0].choices[0].logprobs.token_logprobs[1:] == pytest.approx(expected.logprobs[1:], abs=1e-5)


def test_scoring_needs_a_model_and_max_tokens_zero_does_not_stream(real, tmp_path):
    with pytest.raises(openai.BadRequestError, match="does not stream"):
        real.client().completions.create(model=MODEL, prompt="hi", max_tokens=0, stream=True)
    with live_server(ScriptedRunner(lambda prompt: []), tmp_path) as scripted:
        with pytest.raises(openai.BadRequestError, match="cannot score"):
            scripted.client().completions.create(
                model=MODEL, prompt="hi", max_tokens=0, echo=True, logprobs=0
            )
        echoed = scripted.client().completions.create(model=MODEL, prompt="hi", max_tokens=0, echo=True)
        assert echoed.choices[0].text == "hi"  # echo alone needs no model


def test_tokenize_and_detokenize(real):
    text = "Hello <|start|> world"
    reply = httpx.post(f"{real.url}/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert reply["tokens"] == get_tokenizer().encode(text, allowed_special="all")
    assert reply["count"] == len(reply["tokens"]) and reply["max_model_len"] == 512
    assert "".join(reply["token_strs"]) == text
    llama = httpx.post(f"{real.url}/tokenize", json={"content": text}).json()
    assert llama["tokens"] == reply["tokens"]
    back = httpx.post(f"{real.url}/detokenize", json={"tokens": reply["tokens"], "model": MODEL}).json()
    assert back["prompt"] == back["content"] == text
    chat = httpx.post(f"{real.url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert (
        get_tokenizer().decode(chat["tokens"]).endswith("<|start|>user<|message|>hi<|end|><|start|>assistant")
    )
    info = httpx.get(f"{real.url}/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 512


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        ("/tokenize", {}, "exactly one"),
        ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "exactly one"),
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", {"prompt": "a", "model": "other"}, "other"),
        ("/detokenize", {"tokens": [1, 10**7]}, "outside the vocabulary"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
        ("/detokenize", {}, "tokens"),
    ],
)
def test_tokenizer_routes_refuse_bad_input(real, path, body, words):
    reply = httpx.post(real.url + path, json=body)
    assert 400 <= reply.status_code < 500 and words in reply.json()["error"]["message"]


def test_lm_eval_local_completions_matches_the_local_scorer(real, tmp_path, monkeypatch):
    """lm-eval-harness's own API model, tokenizing through /tokenize: per example, the same
    log-likelihoods as `LocalModel` on the same weights."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.openai_completions import LocalCompletionsAPI  # "local-completions"
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    task = {
        "task": "tiny_qa_remote",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(TASK_DATA)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    out = lm_eval.simple_evaluate(
        model=LocalCompletionsAPI(
            base_url=f"{real.url}/v1/completions", model=MODEL, max_retries=1, max_length=512
        ),
        tasks=[task],
        bootstrap_iters=0,
        log_samples=True,
        task_manager=TaskManager(include_defaults=False),  # our one task: no index of lm-eval's
    )
    metrics = httpx.get(f"{real.url}/metrics").text
    assert 'route="/tokenize"' in metrics  # lm-eval chose the server's tokenizer by itself
    samples = out["samples"]["tiny_qa_remote"]
    docs = [json.loads(line) for line in TASK_DATA.read_text().splitlines()]
    assert len(samples) == len(docs)
    local = LocalModel(real.model)
    right = 0
    for sample in samples:
        pairs = [tuple(arguments[:2]) for arguments in sample["arguments"]]
        expected = local.loglikelihood(pairs)
        got = [resp[0] for resp in sample["resps"]]
        for (lp, greedy), (want, want_greedy) in zip(got, expected, strict=True):
            assert lp == pytest.approx(want, abs=1e-4) and greedy == want_greedy
        scores = [lp for lp, _ in expected]
        right += max(range(len(scores)), key=scores.__getitem__) == sample["doc"]["label"]
    assert out["results"]["tiny_qa_remote"]["acc,none"] == pytest.approx(right / len(docs))
    assert all(math.isfinite(lp) for sample in samples for (lp, _) in (r[0] for r in sample["resps"]))


def test_the_bundled_trimmed_vocabulary_model_scores_what_it_reads(tmp_path):
    """gptoss-nano keeps rows for 12,288 ids and spells the rest in bytes: /tokenize reports the
    ids it reads, and every one of them gets a finite log-probability, equal to the local scorer's."""
    nano = load_model(DEFAULT_MODEL, dtype=torch.float32)
    runner = ModelRunner(nano, max_batch=2, context=256, prefill_chunk=16)
    text = "def slugify(text): return antidisestablishmentarianism"
    with live_server(runner, tmp_path) as server:
        tokens = httpx.post(f"{server.url}/tokenize", json={"prompt": text}).json()["tokens"]
        assert tokens == fit_tokens(nano, get_tokenizer().encode_ordinary(text))
        assert tokens != get_tokenizer().encode_ordinary(text)  # some ids were respelled
        reply = server.client().completions.create(
            model=MODEL, prompt=tokens, max_tokens=0, echo=True, logprobs=1
        )
    scored = reply.choices[0].logprobs.token_logprobs
    assert reply.choices[0].text == text and all(math.isfinite(lp) for lp in scored[1:])
    [(expected, _)] = LocalModel(nano).loglikelihood_tokens([(tokens[:1], tokens[1:])])
    assert sum(scored[1:]) == pytest.approx(expected, abs=1e-3)
