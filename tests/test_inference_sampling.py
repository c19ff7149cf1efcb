"""Sampling: every control changes what is sampled (each test would fail if its control were
ignored), seeds reproduce, logprobs are the model's."""

import math

import pytest
import torch

from conftest import random_model, tiny_config
from gptoss.inference import SamplingParams, generate, generate_stream
from gptoss.inference.sampling import Sampler

VOCAB = 320


@pytest.fixture(scope="module")
def model():
    # A wide spread makes next-token distributions peaked enough that the filters bite.
    return random_model(tiny_config(), seed=21, spread=3.0)


PROMPTS = [[5, 17, 99, 4], [250, 3]]


def sample(model, prompts=PROMPTS, n=24, **options):
    options.setdefault("stop_token_ids", [])
    return generate(model, prompts, n, **options)


def events(model, n=24, **options):
    options.setdefault("stop_token_ids", [])
    return list(generate_stream(model, PROMPTS, SamplingParams(max_tokens=n, **options)))


def test_same_seed_same_tokens_and_another_seed_other_tokens(model):
    a = sample(model, temperature=1.0, seed=7)
    assert a == sample(model, temperature=1.0, seed=7)
    assert a != sample(model, temperature=1.0, seed=8)


def test_unseeded_sampling_follows_torch_manual_seed(model):
    torch.manual_seed(3)
    a = sample(model, temperature=1.0)
    torch.manual_seed(3)
    assert a == sample(model, temperature=1.0)


def test_temperature_zero_is_greedy_and_a_tiny_temperature_approaches_it(model):
    greedy = sample(model, temperature=0)
    assert greedy == sample(model, temperature=1e-4, seed=1)
    assert greedy != sample(model, temperature=1.0, seed=1)


def test_top_k_keeps_only_the_k_most_likely(model):
    assert sample(model, temperature=1.0, top_k=1, seed=2) == sample(model, temperature=0)
    picked = events(model, temperature=1.0, top_k=3, seed=2, logprobs=3)
    assert all(e.token in [t for t, _ in e.top_logprobs] for e in picked)
    unfiltered = events(model, temperature=1.0, seed=2, logprobs=3)
    assert not all(e.token in [t for t, _ in e.top_logprobs] for e in unfiltered)  # the test bites


def nucleus_rank(event):
    """Probability mass of the tokens strictly more likely than the chosen one."""
    chosen = event.logprob
    return sum(math.exp(lp) for _, lp in event.top_logprobs if lp > chosen)


def test_top_p_samples_inside_the_nucleus(model):
    assert sample(model, temperature=1.0, top_p=1e-6, seed=3) == sample(model, temperature=0)
    picked = events(model, temperature=1.0, top_p=0.5, seed=3, logprobs=VOCAB)
    assert all(nucleus_rank(e) < 0.5 for e in picked)
    unfiltered = events(model, temperature=1.0, seed=3, logprobs=VOCAB)
    assert not all(nucleus_rank(e) < 0.5 for e in unfiltered)


def test_min_p_drops_tokens_far_below_the_most_likely(model):
    def ok(e):
        return e.logprob >= math.log(0.3) + e.top_logprobs[0][1] - 1e-6

    assert all(ok(e) for e in events(model, temperature=1.0, min_p=0.3, seed=4, logprobs=1))
    assert not all(ok(e) for e in events(model, temperature=1.0, seed=4, logprobs=1))


def test_presence_and_frequency_penalties_stop_repetition(model):
    greedy = sample(model, temperature=0)
    assert any(len(set(row)) < len(row) for row in greedy)  # the random model repeats itself
    for option in ("presence_penalty", "frequency_penalty"):
        rows = sample(model, temperature=0, **{option: 100.0})
        assert all(len(set(row)) == len(row) for row in rows), option


def test_repetition_penalty_also_counts_the_prompt(model):
    prompt = [sample(model, [[5, 17, 99, 4]], n=1, temperature=0)[0][0]] * 3  # its own greedy pick
    rows = sample(model, [prompt], n=8, temperature=0, repetition_penalty=1e3)
    assert prompt[0] not in rows[0]


def test_logit_bias_forces_and_bans(model):
    assert sample(model, temperature=1.0, seed=5, logit_bias={42: 100.0}) == [[42] * 24] * 2
    greedy = sample(model, temperature=0)
    banned = sample(model, temperature=0, logit_bias={t: -100.0 for t in greedy[0]})
    assert not set(banned[0]) & set(greedy[0])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sample(model, logit_bias={VOCAB: 1.0})


def test_stop_strings_end_generation_on_the_token_that_completes_them(model):
    def detokenize(ids):  # any id → text map will do; one letter per token makes the test exact
        return "".join(chr(ord("a") + t % 26) for t in ids)

    free = sample(model, [PROMPTS[0]], n=20, temperature=0)[0]
    stop = detokenize(free[5:7])
    first = detokenize(free).index(stop) + len(stop)  # the first occurrence may come earlier
    out = list(
        generate_stream(
            model,
            [PROMPTS[0]],
            SamplingParams(max_tokens=20, temperature=0, stop=[stop]),
            token_bytes=lambda t: detokenize([t]).encode(),
        )
    )
    assert [e.token for e in out] == free[:first]
    assert out[-1].finish_reason == "stop" and out[-1].stop == stop


def test_max_tokens_and_default_eos_stop(model):
    out = events(model, n=5, temperature=0)
    assert [sum(e.index == i for e in out) for i in (0, 1)] == [5, 5]
    assert {e.finish_reason for e in out if e.finish_reason} == {"length"}
    eos = model.config.eos_token_id
    forced = generate(model, PROMPTS, 9, temperature=0, logit_bias={eos: 100.0})
    assert forced == [[eos], [eos]]  # stop_token_ids=None means the config's EOS


def test_logprobs_are_the_models_log_softmax(model):
    out = list(generate_stream(model, [PROMPTS[0]], SamplingParams(max_tokens=4, temperature=0, logprobs=5)))
    seq = list(PROMPTS[0])
    for e in out:
        with torch.no_grad():
            expected = torch.log_softmax(model(torch.tensor([seq]))[0, -1], dim=-1)
        assert e.logprob == pytest.approx(expected[e.token].item(), abs=1e-4)
        top = expected.topk(5)
        assert [t for t, _ in e.top_logprobs] == top.indices.tolist()
        assert [lp for _, lp in e.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        seq.append(e.token)


def test_per_row_params_in_one_batch(model):
    params = [
        SamplingParams(max_tokens=6, temperature=0, stop_token_ids=[]),
        SamplingParams(max_tokens=6, seed=9),
    ]
    out = list(generate_stream(model, PROMPTS, params))
    row0 = [e.token for e in out if e.index == 0]
    row1 = [e.token for e in out if e.index == 1]
    assert row0 == sample(model, [PROMPTS[0]], n=6, temperature=0)[0]
    assert row1 == generate(model, [PROMPTS[1]], 6, seed=9)[0]  # a row's draws ignore its neighbours


# ---------------------------------------------------------------------- the sampler on crafted logits
def pick(logits, prompt=(), generated=(), **options):
    sampler = Sampler([SamplingParams(temperature=0, **options)], [list(prompt)], len(logits))
    for token in generated:
        sampler.observe([token])
    return sampler.sample(torch.tensor([logits]))[0].token


def test_presence_counts_once_and_frequency_per_occurrence():
    logits = [3.0, 2.5, 0.0, 0.0, 0.0]
    assert pick(logits, generated=[0, 0], presence_penalty=0.4) == 0  # 3 - 0.4 > 2.5
    assert pick(logits, generated=[0, 0], presence_penalty=0.6) == 1
    assert pick(logits, generated=[0, 0], frequency_penalty=0.2) == 0  # 3 - 2·0.2 > 2.5
    assert pick(logits, generated=[0, 0], frequency_penalty=0.3) == 1  # 3 - 2·0.3 < 2.5
    assert pick(logits, generated=[0, 0], frequency_penalty=0.0) == 0


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    assert pick([2.0, 1.5, 0.0], prompt=[0], repetition_penalty=1.2) == 0  # 2/1.2 > 1.5
    assert pick([2.0, 1.5, 0.0], prompt=[0], repetition_penalty=1.5) == 1
    assert pick([-1.0, -1.2, -9.0], prompt=[0], repetition_penalty=1.5) == 1  # -1.5 < -1.2
    assert pick([2.0, 1.5, 0.0], generated=[0], repetition_penalty=1.5) == 1


@pytest.mark.parametrize(
    "options",
    [{"temperature": -1}, {"top_p": -0.1}, {"top_k": -1}, {"min_p": 2}, {"max_tokens": 0}, {"stop": "x"}],
)
def test_invalid_params_are_refused(options):
    with pytest.raises(ValueError, match="invalid SamplingParams"):
        SamplingParams(**options)
