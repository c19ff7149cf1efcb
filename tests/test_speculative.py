"""Speculative decoding: the proposers find what they should, a verify pass computes what decoding
computes (bit for bit on the native path), and with speculation on the engine's output is the same
tokens, greedy or seeded, across sliding windows, stops and max_tokens."""

import os
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from scipy import stats

from conftest import random_model, tiny_config
from gptoss import ops
from gptoss.cli import main
from gptoss.inference import (
    Engine,
    ModelRunner,
    PrefixCache,
    SamplingParams,
    SequenceRequest,
    Session,
    generate,
    generate_stream,
)
from gptoss.inference.optimize import prepare_for_inference
from gptoss.inference.speculative import (
    NGramProposer,
    Speculation,
    SuffixAutomaton,
    SuffixProposer,
    speculation,
)
from gptoss.quant.mxfp4 import quantize_experts

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: fastest on one thread

native = pytest.mark.skipif(
    not ops.native_available() and not os.environ.get("GPTOSS_REQUIRE_NATIVE"),
    reason="native kernels not built: bit-for-bit verification is a property of the native path",
)


# ---------------------------------------------------------------------- proposers
def test_ngram_proposes_what_followed_the_latest_earlier_occurrence():
    p = NGramProposer(min_n=2, max_n=3)
    p.start(0, [1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 7, 1, 2])
    assert p.propose(0, 3) == [3, 5, 6]  # "1 2" last occurred before "3 5 6"
    p.extend(0, [3])
    assert p.propose(0, 2) == [5, 6]  # now "1 2 3" (the longest n) matches
    assert p.propose(0, 0) == []
    p.start(1, [1, 2, 3])
    assert p.propose(1, 4) == []  # nothing repeats
    p.finish(0)
    assert p.propose(0, 4) == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=40))
def test_suffix_automaton_finds_the_longest_repeated_suffix(text):
    automaton = SuffixAutomaton()
    for token in text:
        automaton.append(token)
    length, end = automaton.repeat()
    n = len(text)
    # brute force: the longest suffix that also ends somewhere before the end
    best = max(
        (m for m in range(1, n) for e in range(m, n) if text[e - m : e] == text[n - m :]),
        default=0,
    )
    assert length == best
    if best:
        assert text[end - best : end] == text[n - best :] and end < n


def test_suffix_proposer_reads_its_own_text_and_finished_requests():
    p = SuffixProposer(min_match=2)
    p.start(0, [5, 6, 7, 8, 9, 5, 6])
    assert p.propose(0, 3) == [7, 8, 9]
    p.finish(0)  # its text joins the corpus
    p.start(1, [1, 7, 8])
    assert p.propose(1, 2) == [9, 5]
    p.start(2, [4, 9, 6])  # "9 6" never occurred; "6" alone is too short
    assert p.propose(2, 3) == []
    p.start(3, [1, 5, 6, 7, 8, 9, 5, 6])  # the corpus' text to its end, never into a separator
    p.finish(3)
    p.start(4, [8, 9, 5, 6])
    assert p.propose(4, 10) == [7, 8, 9, 5, 6]


class Fixed:
    """A proposer that always proposes the same tokens."""

    def __init__(self, tokens):
        self.tokens = tokens

    def start(self, seq, tokens):
        pass

    def extend(self, seq, tokens):
        pass

    def propose(self, seq, limit):
        return self.tokens[:limit]

    def finish(self, seq):
        pass


def test_the_draft_length_follows_acceptance_and_measured_cost():
    spec = Speculation(Fixed(list(range(7))), max_draft=7)
    for fed, seconds in {1: 1.0, 2: 1.2, 3: 1.3, 4: 1.4, 5: 2.8, 6: 2.9, 7: 3.0, 8: 3.1}.items():
        spec.timed(fed, seconds)
    for _ in range(10):  # everything accepted: up to 3 proposals, one pass of 4 (the 2nd pass costs 2x)
        spec.verified(0, 3, 3, 4)
    assert len(spec.draft(0, 7)) == 3
    assert spec.draft(0, 2) == [0, 1]  # never more than the sequence may still emit
    for _ in range(10):  # nothing accepted: plain decoding...
        spec.verified(0, 1, 0, 1)
    lengths = [len(spec.draft(0, 7)) for _ in range(Speculation.PROBE_EVERY + 1)]
    assert lengths == [0] * Speculation.PROBE_EVERY + [1]  # ...with a probe now and then
    assert Speculation(Fixed([1, 2, 3]), max_draft=2, adaptive=False).draft(0, 7) == [1, 2]
    with pytest.raises(ValueError, match="max_draft"):
        Speculation(Fixed([]), max_draft=0)


# ---------------------------------------------------------------------- models
def dense_bf16(window: int = 5):
    """Dense-tensor experts (grouped GEMM), bf16, native linears: the bundled model's layout."""
    config = tiny_config(sliding_window=window)
    return prepare_for_inference(random_model(config, seed=3).to(torch.bfloat16))


def mxfp4(window: int = 12):
    """MXFP4 experts, bf16 elsewhere: the released checkpoints' layout (the native decode plans)."""
    config = tiny_config(hidden_size=128, intermediate_size=96, sliding_window=window)
    return prepare_for_inference(quantize_experts(random_model(config, seed=5)).to(torch.bfloat16))


MODELS = {"dense": dense_bf16(), "mxfp4": mxfp4()}


def started(model, prompt, capacity):
    """A runner decoding `prompt` (its first logits taken), and those logits."""
    runner = ModelRunner(model, 1, capacity)
    runner.prefill(0, prompt, last=True)
    runner.first = runner.decode({0: None})[0]
    return runner


@pytest.fixture(params=["best", "avx512", "avx2"])
def isa(request):
    """Each instruction set's kernels this CPU can run (the best one, then older ones)."""
    if not ops.native_available():
        yield None
        return
    used = ops.set_isa(request.param)
    if request.param != "best" and used != request.param:
        ops.set_isa("best")
        pytest.skip(f"this CPU cannot run the {request.param} kernels")
    yield used
    ops.set_isa("best")


@native
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("length", [1, 3, 9, 12, 30])
def test_verify_gives_decodings_logits_bit_for_bit_and_takes_back_rejected_tokens(name, length, isa):
    model = MODELS[name]
    g = torch.Generator().manual_seed(length)
    prompt = torch.randint(2, 300, (length,), generator=g).tolist()
    fed = torch.randint(2, 300, (8,), generator=g).tolist()
    reference = started(model, prompt, 64)
    decoded = [reference.decode({0: t})[0].clone() for t in fed]
    runner = started(model, prompt, 64)
    room = runner.verify_room(0)
    fed = fed[:room]
    logits = runner.verify(0, fed)
    for row, expected in zip(logits, decoded, strict=False):
        assert torch.equal(row, expected)
    # keep 2, then continue: the same logits as a sequence that only ever fed those 2
    runner.settle(0, 2)
    assert runner.length(0) == length + 2
    again = started(model, prompt, 64)
    for t in fed[:2]:
        again.decode({0: t})
    for t in (17, 18, 19, 20, 21, 22):  # crossing the window past the restored ring slots
        assert torch.equal(runner.decode({0: t})[0], again.decode({0: t})[0])


def test_verify_refuses_what_does_not_fit():
    model = MODELS["dense"]
    runner = started(model, [3, 4, 5], 6)
    assert runner.verify_room(0) == 3
    with pytest.raises(ValueError, match="does not fit"):
        runner.verify(0, [1, 2, 3, 4])
    with pytest.raises(RuntimeError, match="no verify pass"):
        runner.settle(0, 1)


# ---------------------------------------------------------------------- the engine: same tokens
def letters(token: int) -> bytes:
    return bytes([97 + token % 7])


def run(model, prompt, params, spec: Speculation | None):
    runner = ModelRunner(model, 1, len(prompt) + params.max_tokens)
    engine = Engine(runner, default_stop_ids=[1], token_bytes=letters, speculation=spec)
    engine.add(SequenceRequest(prompt, params))
    events = []
    while engine.has_work:
        events += [event for _, event in engine.step()]
    return [(e.token, e.finish_reason, e.stop, e.logprob) for e in events]


@native
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(sorted(MODELS)),
    motif=st.lists(st.integers(2, 300), min_size=1, max_size=6),
    repeats=st.integers(1, 8),
    tail=st.lists(st.integers(2, 300), max_size=6),
    max_tokens=st.integers(1, 40),
    stop=st.lists(st.text("abcdefg", min_size=2, max_size=3), max_size=2),
    proposer=st.sampled_from(["ngram", "suffix"]),
    draft=st.integers(1, 7),
    adaptive=st.booleans(),
)
@example(  # cases where a dense-expert verify pass moved a logprob by 2.6e-5 and 2.1e-4 (tokens the same)
    name="dense", motif=[142, 223, 153, 270, 195, 178], repeats=5, tail=[142, 223, 153, 270, 195, 178],
    max_tokens=28, stop=[], proposer="ngram", draft=1, adaptive=False,
)  # fmt: skip
@example(
    name="dense", motif=[220, 231], repeats=1, tail=[200, 65, 149],
    max_tokens=30, stop=[], proposer="ngram", draft=2, adaptive=False,
)  # fmt: skip
def test_greedy_output_is_the_same_with_speculation(
    name, motif, repeats, tail, max_tokens, stop, proposer, draft, adaptive
):
    model = MODELS[name]
    prompt = motif * repeats + tail  # repeated text, as edits and quotes have: proposals get accepted
    params = SamplingParams(max_tokens=max_tokens, temperature=0, stop=stop, logprobs=0)
    plain = run(model, prompt, params, None)
    spec = speculation(proposer, max_draft=draft, adaptive=adaptive)
    speculative = run(model, prompt, params, spec)
    if name == "mxfp4":  # the native decode plans: every logit is decoding's, bit for bit
        assert speculative == plain
    else:
        # Dense-tensor experts run through PyTorch's grouped GEMM, not the native kernels: a verify
        # pass's logits have been seen to move in their last bits (2.6e-5 and 2.1e-4 in a
        # logprob) with every token the same, so the tokens are compared exactly and the logprobs
        # to 1e-3: above that rounding, below one bf16 step of a logit near 4 (2^-6).
        assert [e[:3] for e in speculative] == [e[:3] for e in plain]
        assert [e[3] for e in speculative] == pytest.approx([e[3] for e in plain], abs=1e-3)
    assert spec.stats.emitted + spec.stats.decode_passes <= len(plain) + 1


@native
def test_a_batch_that_shrinks_to_one_sequence_speculates_with_the_same_tokens():
    model = MODELS["dense"]
    prompts = [[3, 4, 5, 6] * 5, [7, 8, 9] * 6, [10, 11] * 4]
    params = [SamplingParams(max_tokens=n, temperature=0) for n in (4, 30, 9)]
    spec = speculation("suffix", adaptive=False)
    assert generate_all(model, prompts, params, spec) == generate_all(model, prompts, params, None)
    assert spec.stats.verify_passes > 0


@native
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("held", [18, 30])
def test_speculation_within_a_kv_budget_gives_the_same_tokens(name, held):
    """Verify passes take blocks only as far as the budget allows (and give back rejected tokens'):
    with room for the whole answer (30 tokens) or not (18), the speculative run is the plain one,
    token for token, and ends where it ends, with the same error when the cache is full."""
    model = MODELS[name]
    prompt, params = [7, 8, 9, 10, 11] * 6, SamplingParams(max_tokens=30, temperature=0)

    def outcome(spec):
        probe = ModelRunner(model, 1, 64, block_size=4)
        budget = probe.cache.blocks_for(len(prompt) + held) * probe.cache.pool.block_bytes
        runner = ModelRunner(model, 1, 64, kv_budget_bytes=budget, block_size=4)
        engine = Engine(runner, speculation=spec)
        engine.add(SequenceRequest(prompt, params))
        events = []
        while engine.has_work:
            events += [event for _, event in engine.step()]
        return [getattr(e, "message", None) or (e.token, e.finish_reason) for e in events]

    spec = speculation("suffix", adaptive=False)
    plain = outcome(None)
    assert outcome(spec) == plain
    assert spec.stats.verify_passes > 0
    assert ("KV cache is full" in str(plain[-1])) == (held < params.max_tokens)


def generate_all(model, prompts, params, spec):
    return [
        (e.index, e.token, e.finish_reason)
        for e in generate_stream(model, prompts, params, token_bytes=letters, speculation=spec)
    ]


@native
def test_speculation_accepts_proposals_and_saves_passes():
    model = MODELS["mxfp4"]
    prompt = [7, 8, 9, 10, 11] * 6
    params = SamplingParams(max_tokens=40, temperature=0)
    plain = generate(model, [prompt], 40, 0)
    spec = speculation("suffix", adaptive=False)
    assert generate(model, [prompt], 40, 0, speculation=spec) == plain
    s = spec.stats
    assert s.accepted > 0 and s.verify_passes > 0
    assert s.tokens_per_forward > 1
    assert s.verify_passes + s.decode_passes < params.max_tokens


@native
def test_seeded_sampling_gives_the_same_tokens_with_speculation():
    model = MODELS["dense"]
    prompt = [20, 21, 22, 23] * 5
    for seed in range(8):
        params = SamplingParams(max_tokens=24, temperature=0.8, top_k=3, seed=seed, repetition_penalty=1.1)
        assert run(model, prompt, params, speculation("suffix", adaptive=False)) == run(
            model, prompt, params, None
        )


class SecondLikeliest:
    """A proposer that names, after each token, a fixed token chosen in advance (a point-mass draft)."""

    def __init__(self, after: dict[int, int]) -> None:
        self.after, self.last = after, None

    def start(self, seq, tokens):
        self.last = tokens[-1]

    def extend(self, seq, tokens):
        self.last = tokens[-1]

    def propose(self, seq, limit):
        return [self.after[self.last]] if limit and self.last in self.after else []

    def finish(self, seq):
        pass


@native
def test_sampled_tokens_follow_the_models_distribution_whatever_is_proposed():
    """With a point-mass draft d, speculative sampling accepts d with probability p(d) and emits a
    token distributed as p: over many seeds, the second token's rank under the model's distribution
    (given the first) and the acceptances match their expectations (chi-square, normal tests)."""
    model = MODELS["dense"]
    prompt = [40, 41, 42]
    k = 3
    params = SamplingParams(max_tokens=3, temperature=1.0, top_k=k)

    def top(logits):  # the tokens top-k keeps (ties at the k-th logit too), likeliest first
        logits = logits.float()
        kept = torch.nonzero(logits >= torch.topk(logits, k).values[-1])[:, 0]
        kept = kept[torch.argsort(logits[kept], descending=True, stable=True)]
        return kept.tolist(), torch.softmax(logits[kept], dim=0)

    first, _ = top(started(model, prompt, 8).first)
    after = {t1: top(started(model, prompt, 8).decode({0: t1})[0]) for t1 in first}
    draft_after = {t1: ids[1] for t1, (ids, _) in after.items()}  # likely, but not the likeliest
    observed, expected = Counter(), Counter()
    accepted, expected_accepted, variance = 0, 0.0, 0.0
    n = 400
    for seed in range(n):
        spec = Speculation(SecondLikeliest(draft_after), max_draft=1, adaptive=False)
        events = run(model, prompt, SamplingParams(**{**params.__dict__, "seed": seed}), spec)
        (t1, *_), (t2, *_), _ = events
        ids, probs = after[t1]
        observed[ids.index(t2)] += 1  # the emitted token's rank
        for rank, p in enumerate(probs.tolist()):
            expected[rank] += p
        accepted += spec.stats.accepted
        p_draft = float(probs[1])
        expected_accepted += p_draft
        variance += p_draft * (1 - p_draft)
    ranks = sorted(expected)
    assert stats.chisquare([observed[r] for r in ranks], [expected[r] for r in ranks]).pvalue > 1e-3
    assert abs(accepted - expected_accepted) < 4 * variance**0.5


@native
def test_prefix_cache_and_speculation_together_give_the_same_tokens():
    """Verified tokens reach the prefix cache as decoded ones do: a request that continues an
    earlier one's output restores the states that one stored and goes on exactly."""
    model = MODELS["mxfp4"]
    params = SamplingParams(max_tokens=24, temperature=0)

    def flow(spec):
        runner = ModelRunner(model, 1, 96, prefix_cache=PrefixCache(1 << 24))
        engine = Engine(runner, default_stop_ids=[1], token_bytes=letters, speculation=spec)
        prompt, outputs = [30, 31, 32, 33, 34] * 4, []
        for _ in range(2):
            engine.add(SequenceRequest(prompt, params))
            tokens = []
            while engine.has_work:
                tokens += [event.token for _, event in engine.step()]
            outputs.append(tokens)
            prompt = prompt + tokens[:-1] + [9]  # the next continues all of its output that was fed
        return outputs, runner.prefix_cache.stats.hit_tokens

    (plain, plain_hit), (fast, hit) = flow(None), flow(speculation("suffix", adaptive=False))
    assert fast == plain
    assert hit == plain_hit == 20 + 23  # the first prompt and its 23 fed (verified) tokens


@native
def test_session_turns_are_the_same_with_speculation():
    model = MODELS["mxfp4"]
    outputs = []
    for spec in (None, speculation("suffix", adaptive=False)):
        session = Session(model, capacity=200, speculation=spec)
        turns = []
        for turn in ([5, 6, 7, 8, 5, 6, 7, 8, 5], [9, 5, 6, 7]):
            session.append(turn)
            turns.append([e.token for e in session.stream(SamplingParams(max_tokens=20, temperature=0))])
        outputs.append((turns, session.tokens))
    assert outputs[0] == outputs[1]


def test_an_engine_without_a_verifying_runner_refuses_speculation():
    class Scripted:
        vocab_size, context, max_batch, token_rows = 10, 10, 1, None

    with pytest.raises(ValueError, match="cannot verify"):
        Engine(Scripted(), speculation=speculation("ngram"))


@native
def test_cli_generate_with_speculation_prints_the_same_answer(capsys):
    request = "Write a Python function `count_vowels(text)` to return the number of vowels in text."
    common = ["generate", request, "--temperature", "0", "--max-tokens", "120"]
    assert main(common) == 0
    plain = capsys.readouterr().out
    assert main([*common, "--speculative", "suffix", "--draft-tokens", "3"]) == 0
    assert capsys.readouterr().out == plain
    with pytest.raises(SystemExit, match="--draft-tokens must lie in 1..64"):
        main([*common, "--speculative", "ngram", "--draft-tokens", "0"])


def test_the_suffix_corpus_keeps_recent_requests_within_its_budget():
    p = SuffixProposer(corpus_tokens=50)
    for i in range(12):  # 12 requests of 20 tokens: the corpus keeps the newest few
        p.start(i, [100 + i] * 2 + list(range(18)))
        p.finish(i)
    p.start(99, [111, 111, 0, 1])
    assert p.propose(99, 3) == [2, 3, 4]  # the newest request is there
    p.start(98, [100, 100, 0])  # the first is gone ("0" alone is too short a match)
    assert p.propose(98, 3) == []
    p.start(97, [101, 101, 0])  # and so is the second
    assert p.propose(97, 3) == []
