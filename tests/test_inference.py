"""The engine: cached decoding equals recomputation, batching, chunked prefill, sessions, and parity
of greedy generation with transformers."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from conftest import random_model, tiny_config
from gptoss import get_config, save_model
from gptoss.config import FULL, SLIDING
from gptoss.inference import (
    ContextFullError,
    KVCache,
    SamplingParams,
    Session,
    generate,
    generate_stream,
)
from gptoss.inference.runner import ATTENTION_SCORE_BUDGET, forward_hidden, prefill_chunk_length

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: fastest on one thread

CONFIGS = {
    "moe-window5": tiny_config(),
    "dense": tiny_config(num_local_experts=0),
    "window3-top4": tiny_config(num_local_experts=8, num_experts_per_tok=4, sliding_window=3),
    "all-sliding-mqa": tiny_config(num_key_value_heads=1, layer_types=(SLIDING,) * 3),
    "all-full": tiny_config(layer_types=(FULL,) * 3),
}


def prompts_of(lengths, vocab=320, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def greedy_without_cache(model, prompt, steps):
    """The reference: recompute the whole sequence for every new token."""
    seq, out = list(prompt), []
    for _ in range(steps):
        with torch.no_grad():
            token = int(model(torch.tensor([seq]))[0, -1].argmax())
        out.append(token)
        seq.append(token)
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_greedy_equals_recomputation(name):
    """Batch of 3 prompts of different lengths, 16 new tokens each: crosses the sliding window
    many times, with prefill chunks shorter and longer than the window."""
    model = random_model(CONFIGS[name], seed=1)
    prompts = prompts_of([9, 1, 14])
    expected = [greedy_without_cache(model, p, 16) for p in prompts]
    for chunk in (2, 4, 512):
        ours = generate(model, prompts, 16, temperature=0, stop_token_ids=[], prefill_chunk=chunk)
        assert ours == expected, f"prefill_chunk={chunk}"


def test_cached_hidden_states_match_full_forward_at_every_position():
    """Stronger than equal argmaxes: hidden states through the cache equal the uncached forward
    (rows of different lengths in one batch, chunks that straddle the window)."""
    config = tiny_config(sliding_window=4)
    model = random_model(config, seed=2)
    lengths = [11, 6]
    prompts = prompts_of(lengths, seed=3)
    cache = KVCache(config, 2, capacity=16)
    ours = [[], []]
    with torch.no_grad():
        for row, prompt in enumerate(prompts):  # prefill in uneven chunks, one row at a time
            for a, b in ((0, 3), (3, 9), (9, len(prompt))):
                if a < len(prompt):
                    ids = torch.tensor([prompt[a:b]])
                    ours[row].append(forward_hidden(model, cache, ids, slice(row, row + 1))[0])
        for step in range(4):  # then batched decode: the rows sit at different positions
            new = torch.tensor([[7 + step], [300 - step]])
            hidden = forward_hidden(model, cache, new, slice(0, 2))
            for row in range(2):
                prompts[row].append(int(new[row, 0]))
                ours[row].append(hidden[row])
        for row in range(2):
            full = model.model(torch.tensor([prompts[row]]), torch.arange(len(prompts[row]))[None])[0]
            torch.testing.assert_close(torch.cat(ours[row]), full, atol=2e-5, rtol=0)
    assert cache.lengths == [15, 10]


@settings(max_examples=10, deadline=None)
@given(
    window=st.integers(1, 6),
    lengths=st.lists(st.integers(1, 14), min_size=1, max_size=3),
    chunk=st.integers(1, 9),
    steps=st.integers(1, 5),
)
def test_any_chunking_and_batch_matches_the_uncached_forward(window, lengths, chunk, steps):
    """Property: whatever the window, prompt lengths and chunk size, every hidden state computed
    through the cache equals the uncached forward of the same sequence."""
    config = tiny_config(sliding_window=window, num_hidden_layers=2)
    model = random_model(config, seed=window)
    prompts = prompts_of(lengths, seed=sum(lengths) + chunk)
    cache = KVCache(config, len(prompts), capacity=max(lengths) + steps)
    seqs = [list(p) for p in prompts]
    ours = [[] for _ in prompts]
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            for a in range(0, len(prompt), chunk):
                ids = torch.tensor([prompt[a : a + chunk]])
                ours[row].append(forward_hidden(model, cache, ids, slice(row, row + 1))[0])
        for step in range(steps):
            new = [[(31 * step + 7 * row) % 318 + 2] for row in range(len(prompts))]
            hidden = forward_hidden(model, cache, torch.tensor(new), slice(0, len(prompts)))
            for row in range(len(prompts)):
                seqs[row].append(new[row][0])
                ours[row].append(hidden[row])
        for row, seq in enumerate(seqs):
            full = model.model(torch.tensor([seq]), torch.arange(len(seq))[None])[0]
            torch.testing.assert_close(torch.cat(ours[row]), full, atol=2e-5, rtol=0)


def test_greedy_equals_transformers_generate(tmp_path):
    config = tiny_config(sliding_window=4)
    model = random_model(config, seed=4)
    save_model(model, tmp_path / "ckpt")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    prompts = prompts_of([5, 12, 2], seed=5)
    ours = generate(model, prompts, 20, temperature=0, prefill_chunk=3)
    for prompt, tokens in zip(prompts, ours, strict=True):
        out = theirs.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id,
        )
        assert out[0, len(prompt) :].tolist() == tokens


def test_cache_memory_follows_the_tokens_held_and_sliding_layers_keep_only_the_window():
    """A row costs its rings until it holds tokens; a full context costs what the config says."""
    config = get_config("gpt-oss-20b")
    context = config.max_position_embeddings
    cache = KVCache(config, 2, capacity=context, dtype=torch.bfloat16, device="meta")
    ring_row = config.num_sliding_layers * 2 * config.kv_dim * 2 * config.sliding_window
    assert cache.nbytes == 2 * ring_row
    assert {tuple(k.shape) for pair in cache.rings.values() for k in pair} == {(2, 8, 128, 64)}
    cache.write_full(0, 0, torch.empty(12, 2, 8, context, 64, dtype=torch.bfloat16, device="meta"))
    assert cache.nbytes == config.kv_cache_bytes(context, 2) + ring_row
    naive = config.kv_cache_bytes_per_token(2) * context
    assert 0.49 < (cache.nbytes - ring_row) / naive < 0.51
    cache.clear_row(0)
    assert cache.nbytes == 2 * ring_row


def test_decode_view_names_what_update_writes_and_returns_for_one_token_steps():
    """A one-token pass over any rows at any lengths: the blocks, slots and positions that `update` writes
    and attends over; a pass of several tokens gets None."""
    config = tiny_config(sliding_window=3)
    kinds = list(config.layer_types)
    full, sliding = kinds.index(FULL), kinds.index(SLIDING)
    cache = KVCache(config, 3, capacity=16, block_size=4)
    heads, dim = config.num_key_value_heads, config.head_dim
    cache.begin(slice(0, 2), 5)
    assert cache.decode_view(full) is None
    cache.end()
    cache.begin(slice(2, 3), 2)
    cache.end()
    for rows in ([0, 1, 2], [0, 1, 2], [1, 2], [0, 1, 2], [2], [0, 1, 2]):  # lengths apart, blocks crossed
        cache.begin(slice(rows[0], rows[-1] + 1), 1)
        lengths = [cache.lengths[r] for r in rows]
        for layer in (full, sliding):
            view = cache.decode_view(layer)
            new = torch.randn(len(rows), heads, 1, dim)
            got_k, got_v, got_visible = cache.update(layer, new, new + 1)
            assert got_k.shape[2] == view.attended and got_visible is view.visible
            for i, (row, length) in enumerate(zip(rows, lengths, strict=True)):
                slot = int(view.slots[i])
                if layer == full:
                    assert slot == length
                    block = cache.pool.blocks[cache.tables[row][slot // 4]]
                    assert int(view.keys[i, slot // 4]) == block[cache.full_index[full], 0].data_ptr()
                    assert int(view.values[i, slot // 4]) == block[cache.full_index[full], 1].data_ptr()
                    assert torch.equal(block[cache.full_index[full], 0, :, slot % 4], new[i, :, 0])
                else:
                    assert slot == length % cache.ring
                    ring_k, ring_v = cache.rings[sliding]
                    assert int(view.keys[i, 0]) == ring_k[row].data_ptr()
                    assert int(view.values[i, 0]) == ring_v[row].data_ptr()
                    assert torch.equal(ring_v[row, :, slot], new[i, :, 0] + 1)
        cache.end()


def test_long_prompt_past_the_original_context_prefills_in_bounded_chunks():
    """nano beyond YaRN's original 4096 positions: a chunked prefill equals one uncached pass."""
    model = random_model(get_config("gpt-oss-nano").replace(vocab_size=512), seed=6)
    prompt = prompts_of([4600], vocab=512, seed=7)[0]
    cache = KVCache(model.config, 1, capacity=len(prompt))
    hidden = []
    with torch.no_grad():
        for start in range(0, len(prompt), 1024):
            ids = torch.tensor([prompt[start : start + 1024]])
            hidden.append(forward_hidden(model, cache, ids, slice(0, 1))[0, -8:])
        full = model.model(torch.tensor([prompt]), torch.arange(len(prompt))[None])[0]
    ends = [min(s + 1024, len(prompt)) for s in range(0, len(prompt), 1024)]
    expected = torch.cat([full[e - 8 : e] for e in ends])
    torch.testing.assert_close(torch.cat(hidden), expected, atol=1e-4, rtol=0)


def test_prefill_chunks_shrink_at_long_contexts_to_bound_attention_memory():
    model = GptOss20bShape()
    assert prefill_chunk_length(model, 0, 5000, 512) == 512
    assert prefill_chunk_length(model, 0, 100, 512) == 100
    deep = prefill_chunk_length(model, 130_000, 1000, 512)
    assert 1 <= deep < 16
    assert 3 * 4 * 64 * deep * (130_000 + 512) <= ATTENTION_SCORE_BUDGET


class GptOss20bShape:
    """prefill_chunk_length reads only the config; no need for 20 billion weights."""

    config = get_config("gpt-oss-20b")


def test_the_cache_reaches_the_full_context_and_refuses_more():
    config = get_config("gpt-oss-nano").replace(vocab_size=512)
    model = random_model(config, seed=8)
    context = config.max_position_embeddings
    cache = KVCache(config, 1, capacity=context)
    cache.lengths[0] = context - 1  # the slots before hold zeros: we only check the last position
    with torch.no_grad():
        hidden = forward_hidden(model, cache, torch.tensor([[3]]), slice(0, 1))
    assert torch.isfinite(hidden).all() and cache.lengths == [context]
    with pytest.raises(ContextFullError):
        forward_hidden(model, cache, torch.tensor([[3]]), slice(0, 1))
    with pytest.raises(ValueError, match="capacity"):
        KVCache(config, 1, capacity=context + 1)


def test_each_sequence_finishes_on_its_own_stop():
    model = random_model(tiny_config(), seed=9)
    prompts = prompts_of([4, 7, 3], seed=10)
    free = generate(model, prompts, 12, temperature=0, stop_token_ids=[])
    stop_for_row0 = free[0][3]
    params = [
        SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_for_row0]),
        SamplingParams(max_tokens=5, temperature=0, stop_token_ids=[]),
        SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[]),
    ]
    events = list(generate_stream(model, prompts, params))
    by_row = {i: [e for e in events if e.index == i] for i in range(3)}
    assert [e.token for e in by_row[0]] == free[0][: free[0].index(stop_for_row0) + 1]
    assert by_row[0][-1].finish_reason == "stop" and by_row[0][-1].stop == stop_for_row0
    assert [e.token for e in by_row[1]] == free[1][:5] and by_row[1][-1].finish_reason == "length"
    assert [e.token for e in by_row[2]] == free[2]  # unaffected by the others leaving the batch
    for row in by_row.values():  # only a sequence's last event carries a finish reason
        assert all(e.finish_reason is None for e in row[:-1])


def test_stream_yields_tokens_as_they_are_produced():
    model = random_model(tiny_config(), seed=11)
    stream = generate_stream(model, prompts_of([5]), SamplingParams(max_tokens=50, temperature=0))
    first = next(stream)
    assert first.index == 0 and first.finish_reason is None
    stream.close()  # the caller may stop early; nothing else is computed


def test_prompt_errors_are_clear():
    model = random_model(tiny_config())
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], 3)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [[5, 320]], 3)
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        list(generate_stream(model, [[5]], [SamplingParams(), SamplingParams()]))


# ---------------------------------------------------------------------- sessions
def test_session_keeps_history_in_the_cache_between_turns():
    model = random_model(tiny_config(), seed=12)
    first, second = prompts_of([6, 4], seed=13)
    session = Session(model, capacity=64)
    greedy = SamplingParams(max_tokens=7, temperature=0, stop_token_ids=[])
    session.append(first)
    reply1 = [e.token for e in session.stream(greedy)]
    session.append(second)
    reply2 = [e.token for e in session.stream(greedy)]

    assert reply1 == greedy_without_cache(model, first, 7)
    history = first + reply1 + second
    assert reply2 == greedy_without_cache(model, history, 7)
    # the second turn prefilled only its own tokens (and the unfed last reply token)
    assert session.prefilled == len(first) + 1 + len(second)
    assert session.tokens + session.pending == history + reply2


def test_session_drops_a_final_stop_token_and_rewinds_to_a_mark():
    model = random_model(tiny_config(), seed=14)
    prompt, extra = prompts_of([5, 3], seed=15)
    free = greedy_without_cache(model, prompt, 6)
    session = Session(model, capacity=64)
    session.append(prompt)
    session.feed()
    mark = session.mark()
    out = [
        e.token
        for e in session.stream(SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[free[3]]))
    ]
    assert out == free[:4]
    assert session.tokens == prompt + free[:3] and session.pending == []  # the stop token is not kept

    session.rewind(mark)
    session.append(extra)
    again = [e.token for e in session.stream(SamplingParams(max_tokens=5, temperature=0, stop_token_ids=[]))]
    assert again == greedy_without_cache(model, prompt + extra, 5)


def test_session_survives_a_consumer_that_stops_early():
    model = random_model(tiny_config(), seed=16)
    prompt = prompts_of([4], seed=17)[0]
    session = Session(model, capacity=64)
    session.append(prompt)
    stream = session.stream(SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[]))
    taken = [next(stream).token for _ in range(3)]
    stream.close()
    assert session.tokens + session.pending == prompt + taken
    more = [e.token for e in session.stream(SamplingParams(max_tokens=4, temperature=0, stop_token_ids=[]))]
    assert taken + more == greedy_without_cache(model, prompt, 7)


def test_session_refuses_to_outgrow_its_capacity():
    session = Session(random_model(tiny_config()), capacity=8)
    session.append(list(range(2, 8)))
    with pytest.raises(ContextFullError, match="more than the 8"):
        session.append([2, 3, 4])
