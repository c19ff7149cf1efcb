"""Perplexity with sliding windows, and the batched scorer under it, against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import random_model, tiny_config
from gptoss.eval import LocalModel, run_perplexity
from gptoss.eval.perplexity import load_tokens, windows
from gptoss.tokenizer import Tokenizer, get_tokenizer
from gptoss.train.data import write_dataset, write_shard
from test_eval_mmlu import real_vocab_model

TEXT = (
    "Perplexity measures how surprised a language model is by a text. A sliding window lets a short "
    "model read a long document: each token is scored once, with as much context as the window allows. "
) * 3


@pytest.fixture(scope="module")
def tiny():
    """A small-vocabulary model: token-level scoring needs no tokenizer."""
    return LocalModel(random_model(tiny_config(), seed=3), batch_size=3)


def brute_force_logprobs(model, tokens: list[int], begin: int, end: int) -> list[float]:
    """log p(tokens[t] | tokens[begin:t]) for t in begin+1..end-1, from one plain forward pass."""
    with torch.no_grad():
        logprobs = model(torch.tensor([tokens[begin : end - 1]]))[0].float().log_softmax(-1)
    return [logprobs[t - begin - 1, tokens[t]].item() for t in range(begin + 1, end)]


@pytest.mark.parametrize(("n", "window", "stride"), [(10, 4, 2), (10, 4, 4), (9, 3, 1), (5, 8, 4), (2, 1, 1)])
def test_windows_score_every_token_once_with_enough_context(n, window, stride):
    spans = list(windows(n, window, stride))
    scored = [t for _, first, end in spans for t in range(first, end)]
    assert scored == list(range(1, n))
    for i, (begin, first, end) in enumerate(spans):
        assert end - 1 - begin <= window  # the model never reads more than a window
        assert first - begin >= (1 if i == 0 else window - stride + 1)


def test_batched_scoring_equals_one_forward_per_request(tiny):
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, tiny.config.vocab_size, size=40).tolist()
    requests = [(tokens[:5], tokens[5:9]), (tokens[3:20], tokens[20:21]), (tokens[:30], tokens[30:40])]
    requests.append((tokens[3:20], tokens[20:23]))  # shares a prefix with the second request
    got = tiny.loglikelihood_tokens(requests)
    for (context, continuation), (logprob, greedy) in zip(requests, got, strict=True):
        whole = context + continuation
        expected = brute_force_logprobs(tiny.model, whole, 0, len(whole))[-len(continuation) :]
        assert logprob == pytest.approx(sum(expected), abs=1e-4)
        with torch.no_grad():
            argmax = tiny.model(torch.tensor([whole[:-1]]))[0, -len(continuation) :].argmax(-1).tolist()
        assert greedy == (argmax == continuation)


def test_contexts_longer_than_max_length_are_cut_from_the_left(tiny):
    short = LocalModel(tiny.model, max_length=8)
    tokens = list(range(10, 30))
    [(logprob, _)] = short.loglikelihood_tokens([(tokens[:17], tokens[17:])])
    assert logprob == pytest.approx(sum(brute_force_logprobs(tiny.model, tokens, 11, 20)[-3:]), abs=1e-4)


def test_token_shard_perplexity_equals_brute_force(tiny, tmp_path):
    rng = np.random.default_rng(1)
    tokens = rng.integers(2, tiny.config.vocab_size, size=50)
    shard = write_shard(tmp_path / "shard.bin", tokens, tiny.config.vocab_size, eot_id=1)
    for window, stride in [(12, 5), (12, 12), (64, 32)]:
        result = run_perplexity(tiny, shard, window=window, stride=stride, progress=False)
        expected = []
        for begin, first, end in windows(len(tokens), window, stride):
            expected += brute_force_logprobs(tiny.model, tokens.tolist(), begin, end)[first - begin - 1 :]
        assert result.counts["tokens"] == 49
        assert result.metrics["perplexity"] == pytest.approx(math.exp(-sum(expected) / 49), rel=1e-4)
    # A whole-sequence window is the textbook perplexity.
    full = brute_force_logprobs(tiny.model, tokens.tolist(), 0, 50)
    result = run_perplexity(tiny, shard, window=64, progress=False)
    assert result.metrics["nll_per_token"] == pytest.approx(-sum(full) / 49, abs=1e-5)
    # Sliding windows see more context than disjoint ones; on random weights both stay finite.
    assert result.counts["windows"] == 1


def test_a_dataset_directory_is_read_through_its_manifest(tmp_path):
    val = np.arange(2, 60, dtype=np.uint32)
    write_dataset(tmp_path / "data", {"train": val[::-1].copy(), "val": val}, vocab_size=320, eot_id=1)
    tokens, is_text = load_tokens(tmp_path / "data", split="val")
    assert not is_text and tokens.tolist() == val.tolist()
    assert load_tokens(tmp_path / "data", split="val", max_tokens=10)[0].tolist() == tokens[:10].tolist()


def test_text_perplexity_scores_every_token_and_reports_bits_per_byte(tmp_path):
    model = LocalModel(real_vocab_model(), batch_size=2)
    path = tmp_path / "essay.txt"
    path.write_text(TEXT)
    ids = get_tokenizer().encode_ordinary(TEXT)
    result = run_perplexity(model, path, window=32, stride=16, progress=False)
    assert result.counts["tokens"] == len(ids)  # the leading <|endoftext|> lets the first count
    assert result.counts["bytes"] == len(TEXT.encode())
    nll = result.metrics["nll_per_token"] * len(ids)
    assert result.metrics["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(TEXT.encode()))
    expected = []
    tokens = [Tokenizer.ENDOFTEXT, *ids]
    for begin, first, end in windows(len(tokens), 32, 16):
        expected += brute_force_logprobs(model.model, tokens, begin, end)[first - begin - 1 :]
    assert result.metrics["perplexity"] == pytest.approx(math.exp(-sum(expected) / len(ids)), rel=1e-4)
