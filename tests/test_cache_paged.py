"""The paged KV cache: the same numbers as a contiguous cache, bit for bit, whatever the batches do;
memory that follows the tokens held; and a full budget that makes sequences wait or ends only the
sequence that cannot grow."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import random_model, tiny_config
from contiguous_cache import ContiguousCache
from gptoss import ops
from gptoss.config import FULL, SLIDING
from gptoss.inference import KVCache, SamplingParams
from gptoss.inference.engine import Engine, SequenceFailure, SequenceRequest, TokenEvent
from gptoss.inference.optimize import prepare_for_inference
from gptoss.inference.runner import ModelRunner, forward_hidden
from gptoss.model import Block
from gptoss.ops import decode
from gptoss.quant.mxfp4 import quantize_experts
from gptoss.swap import rebuilt

ROWS = 4
BLOCK = 3  # small blocks, so that every sequence crosses several
CAPACITY = 40


def _fp32_model():
    return random_model(tiny_config(sliding_window=4), seed=21)


def _native_model():
    """MXFP4 experts and bf16 elsewhere: decode steps take the native kernel and its block tables."""
    config = tiny_config(hidden_size=128, intermediate_size=96, sliding_window=4)
    return prepare_for_inference(quantize_experts(random_model(config, seed=22)).to(torch.bfloat16))


def _general_path(model):
    """The same prepared model with its blocks on Block.forward: decode steps then go through
    NativeAttention, which attends over the cache's blocks where they lie (`KVCache.store`)."""
    model = copy.deepcopy(model)
    for i, block in enumerate(model.model.layers):
        model.model.layers[i] = rebuilt(block, Block)
    return model


MODELS = {"fp32": _fp32_model()}
if ops.native_available():
    MODELS["native bf16"] = _native_model()
    MODELS["native attention"] = _general_path(MODELS["native bf16"])

JOIN = st.tuples(st.just("join"), st.integers(1, 9), st.integers(1, 5), st.integers(0, 299))
LEAVE = st.tuples(st.just("leave"), st.integers(0, ROWS - 1))
DECODE = st.just(("decode",))


def _run(model, cache, ops_: list[tuple]) -> list[torch.Tensor]:
    """Sequences join (prefilled in chunks into the first free row), leave (the last row fills
    their hole, as the runner does) and decode greedily together; the logits of every pass."""
    running, feed, out = 0, [], []
    with torch.inference_mode():
        for op in ops_:
            if op[0] == "join" and running < ROWS:
                _, length, chunk, seed = op
                prompt = [(seed + 13 * i) % 300 + 2 for i in range(length)]
                cache.clear_row(running)
                for start in range(0, length, chunk):
                    ids = torch.tensor([prompt[start : start + chunk]])
                    hidden = forward_hidden(model, cache, ids, slice(running, running + 1))
                logits = model.lm_head(hidden[:, -1])
                out.append(logits)
                feed.append(int(logits[0].argmax()))
                running += 1
            elif op[0] == "leave" and running:
                row = op[1] % running
                cache.swap_rows(row, running - 1)
                cache.clear_row(running - 1)
                feed[row] = feed[-1]
                feed.pop()
                running -= 1
            elif op[0] == "decode" and running and max(cache.lengths[:running]) < CAPACITY:
                ids = torch.tensor([[t] for t in feed])
                logits = model.lm_head(forward_hidden(model, cache, ids, slice(0, running))[:, -1])
                out.append(logits)
                feed = logits.argmax(dim=-1).tolist()
    return out


@pytest.mark.parametrize("name", list(MODELS))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops_=st.lists(st.one_of(JOIN, LEAVE, DECODE, DECODE, DECODE), min_size=4, max_size=24))
def test_paged_logits_equal_the_contiguous_cache_bit_for_bit(name, ops_):
    """Batches joining and leaving, prompts prefilled in chunks, windows (4) and blocks (3) crossed:
    every logit of the paged cache equals the contiguous cache's, and it holds the blocks its rows
    need and no more."""
    model = MODELS[name]
    dtype = model.model.embed_tokens.weight.dtype
    paged = KVCache(model.config, ROWS, CAPACITY, dtype, block_size=BLOCK)
    ours = _run(model, paged, ops_)
    theirs = _run(model, ContiguousCache(model.config, ROWS, CAPACITY, dtype), ops_)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    assert paged.pool.used == sum(paged.blocks_for(n) for n in paged.lengths)


@pytest.mark.skipif(not ops.native_available(), reason="native kernels not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_over_many_rows_equals_the_kernel_over_a_gathered_copy(dtype):
    """More rows than the fused decode step takes (12): the attention over the blocks where they
    lie gives the bits of the same kernel over contiguous copies of them."""
    config = tiny_config(sliding_window=4)
    cache = KVCache(config, 12, CAPACITY, dtype, block_size=BLOCK)
    gen = torch.Generator().manual_seed(3)
    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    for row in range(12):  # rows of 1..12 tokens
        cache.begin(slice(row, row + 1), row + 1)
        for layer in range(config.num_hidden_layers):
            cache.update(layer, *torch.randn(2, 1, kv_heads, row + 1, dim, generator=gen).to(dtype))
        cache.end()
    cache.begin(slice(0, 12), 1)
    sinks = torch.randn(heads, generator=gen)
    for layer in range(config.num_hidden_layers):
        q = torch.randn(12, heads, 1, dim, generator=gen).to(dtype)
        view = cache.decode_view(layer)
        k, v = torch.randn(2, 12, kv_heads, 1, dim, generator=gen).to(dtype)
        cache.store(layer, k, v)
        ours = decode.paged_attention(q, view, sinks)
        gathered_k, gathered_v, visible = cache.update(layer, k, v)  # (writes the same values again)
        theirs = torch.empty_like(ours)
        ops._native_attention(q, gathered_k, gathered_v, visible, sinks.float().data_ptr(), theirs)
        assert torch.equal(ours, theirs)
    cache.end()


# ---------------------------------------------------------------------- memory
def test_the_cache_grows_with_the_tokens_held_and_gives_blocks_back():
    model = MODELS["fp32"]
    runner = ModelRunner(model, max_batch=3, context=64, kv_budget_bytes=None, block_size=4)
    cache = runner.cache
    rings = cache.nbytes
    assert cache.pool.used == 0
    runner.prefill(0, list(range(2, 12)), last=True)  # 10 tokens: 3 blocks
    assert cache.pool.used == 3 and cache.nbytes == rings + 3 * cache.pool.block_bytes
    runner.prefill(1, list(range(5, 10)), last=True)  # 5 tokens: 2 blocks
    assert cache.pool.used == 5
    runner.decode({0: None, 1: None})
    for token in range(3, 10):  # 7 steps: 17 and 12 tokens held
        runner.decode({0: token, 1: token})
    assert cache.pool.used == cache.blocks_for(17) + cache.blocks_for(12) == 8
    runner.release(0)
    assert cache.pool.used == 3 and cache.nbytes == rings + 3 * cache.pool.block_bytes
    runner.release(1)
    assert cache.pool.used == 0 and cache.nbytes == rings


def _budgeted_engine(blocks: int) -> Engine:
    model = MODELS["fp32"]
    probe = KVCache(model.config, 1, 8, block_size=4)
    runner = ModelRunner(model, 4, 64, kv_budget_bytes=blocks * probe.pool.block_bytes, block_size=4)
    return Engine(runner, prefill_budget=64)


def _drive(engine: Engine, requests: list[SequenceRequest]) -> tuple[dict, dict, list[int]]:
    ids = [engine.add(r) for r in requests]
    tokens: dict[int, list[int]] = {i: [] for i in ids}
    failures: dict[int, str] = {}
    most_running = []
    while engine.has_work:
        for seq, event in engine.step():
            if isinstance(event, TokenEvent):
                tokens[seq].append(event.token)
            else:
                assert isinstance(event, SequenceFailure)
                failures[seq] = event.message
        most_running.append(len(engine.running))
    assert engine.runner.cache.pool.used == 0  # every block given back
    return tokens, failures, most_running


def _alone(prompt: list[int], max_tokens: int) -> list[int]:
    engine = _budgeted_engine(10_000)
    tokens, failures, _ = _drive(engine, [_request(prompt, max_tokens)])
    assert not failures
    return next(iter(tokens.values()))


def _request(prompt: list[int], max_tokens: int) -> SequenceRequest:
    return SequenceRequest(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, stop_token_ids=[]))


def test_a_full_budget_makes_new_sequences_wait_then_serves_them_unchanged():
    prompts = [[(7 * i + k) % 300 + 2 for i in range(10)] for k in range(3)]
    # 6 blocks of 4: one sequence of 10 + 8 tokens at a time.
    tokens, failures, running = _drive(_budgeted_engine(6), [_request(p, 8) for p in prompts])
    assert not failures
    assert max(running) == 1  # each waited for the one before to give its blocks back
    assert list(tokens.values()) == [_alone(p, 8) for p in prompts]


def test_a_sequence_that_cannot_grow_ends_alone_with_a_clear_error():
    prompts = [[(5 * i + k) % 300 + 2 for i in range(4)] for k in range(2)]
    # Both start (one block each), but 6 blocks cannot hold both at 4 + 16 tokens.
    tokens, failures, running = _drive(_budgeted_engine(6), [_request(p, 16) for p in prompts])
    first, second = tokens
    assert max(running) == 2
    assert list(failures) == [second] and "KV cache is full" in failures[second]
    assert tokens[first] == _alone(prompts[0], 16)
    assert tokens[second] == _alone(prompts[1], 16)[: len(tokens[second])]


def test_a_prompt_larger_than_the_whole_budget_fails_at_once():
    tokens, failures, _ = _drive(_budgeted_engine(6), [_request(list(range(2, 42)), 4)])
    (message,) = failures.values()
    assert "needs more KV-cache memory" in message and not any(tokens.values())


def test_a_pass_at_a_long_context_hands_attention_positions_not_a_mask():
    """What a 64-token pass after 4,032 tokens gives attention grows with T + S, not T·S: the
    queries' positions (a full layer's keys are at their own positions) and a sliding layer's key
    positions (ring + T); the mask PyTorch's attention builds from them is the causal window's."""
    config = tiny_config(sliding_window=5)
    full, sliding = config.layer_types.index(FULL), config.layer_types.index(SLIDING)
    context, T = 4032, 64
    cache = KVCache(config, 1, capacity=context + T)
    cache.begin(slice(0, 1), context)
    cache.end()
    positions = cache.begin(slice(0, 1), T)
    heads, dim = config.num_key_value_heads, config.head_dim
    _, _, seen_full = cache.update(full, torch.zeros(1, heads, T, dim), torch.zeros(1, heads, T, dim))
    _, _, seen_sliding = cache.update(sliding, torch.zeros(1, heads, T, dim), torch.zeros(1, heads, T, dim))
    cache.end()
    assert torch.equal(seen_full.queries, positions) and seen_full.keys is None
    assert seen_sliding.keys.shape == (1, cache.ring + T) and seen_sliding.window == config.sliding_window
    query, key = positions[0, :, None], torch.arange(context + T)
    assert torch.equal(seen_full.mask(context + T)[0, 0], key <= query)
    window = (seen_sliding.keys[0] <= query) & (seen_sliding.keys[0] > query - config.sliding_window)
    assert torch.equal(seen_sliding.mask(cache.ring + T)[0, 0], window)
