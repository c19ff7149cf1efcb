"""Continuous batching under the server: slots, 64 concurrent streams, admission, cancellation,
chunked prefill, and a model that fails mid-step."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import openai
import pytest
import torch

from conftest import random_model, tiny_config
from gptoss.inference import AsyncEngine, ModelRunner, SamplingParams, SequenceRequest
from gptoss.tokenizer import Tokenizer, get_tokenizer
from test_server_support import MODEL, ScriptedRunner, harmony, live_server, model_server

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: fastest on one thread


def test_model_runner_slots_equal_full_recomputation():
    """Sequences join (prefilled in a free row, moved to the end of the batch) and leave (the last
    row fills the hole) while others decode: every logit equals the uncached forward of the same
    tokens."""
    model = random_model(tiny_config(sliding_window=4), seed=3)
    runner = ModelRunner(model, max_batch=3, context=40, prefill_chunk=3)
    g = torch.Generator().manual_seed(0)
    seqs = {
        s: torch.randint(2, 320, (n,), generator=g).tolist() for s, n in [(10, 9), (11, 3), (12, 13), (13, 6)]
    }

    def expected(seq):
        with torch.no_grad():
            return model(torch.tensor([seqs[seq]]))[0, -1]

    joined = set()

    def join(seq):  # a prompt in two chunks, as the scheduler feeds it
        runner.prefill(seq, seqs[seq][:-2], last=False)
        runner.prefill(seq, seqs[seq][-2:], last=True)
        joined.add(seq)

    join(10)
    for step in range(12):
        if step == 1:
            join(11)
            join(12)
        if step == 4:
            runner.release(10)  # row 0 leaves: sequence 12 moves from the last row into it
            join(13)
        # the newcomers get their first logits, everyone else feeds a token (not in row order)
        new = {s: None if s in joined else 2 + (7 * s + step) % 300 for s in reversed(runner.running)}
        for s, t in new.items():
            if t is not None:
                seqs[s].append(t)
        joined.clear()
        logits = runner.decode(new)
        assert set(logits) == set(new)
        for s in new:
            torch.testing.assert_close(logits[s], expected(s), rtol=1e-4, atol=1e-4)


async def _chat(client: openai.AsyncOpenAI, i: int) -> tuple[str, str, str]:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": f"Question number {i}: " + "why? " * (i % 7)}],
        max_tokens=4 + i % 9,  # sequences leave the batch at different steps
        seed=1000 + i,
        temperature=1.0,
        stream=True,
    )
    content, reasoning, finish = "", "", None
    async for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            finish = choice.finish_reason or finish
    return content, reasoning, finish


def test_64_concurrent_streams_match_their_solo_runs(tmp_path):
    with model_server(tmp_path, max_batch=64, context=256) as server:

        async def run(concurrent: bool) -> list:
            async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as client:
                if concurrent:
                    return await asyncio.gather(*(_chat(client, i) for i in range(64)))
                return [await _chat(client, i) for i in range(64)]

        alone = asyncio.run(run(concurrent=False))
        together = asyncio.run(run(concurrent=True))
        assert together == alone
        assert all(finish in ("stop", "length") for _, _, finish in together)
        assert len({c + r for c, r, _ in alone}) > 32  # independent outputs, not one repeated
        metrics = httpx.get(f"{server.url}/metrics").text
        # the decode batch really held many sequences at once
        under_32 = float(re.search(r'gptoss_decode_batch_size_bucket\{le="32.0"\} (\S+)', metrics)[1])
        total = float(re.search(r"gptoss_decode_batch_size_count (\S+)", metrics)[1])
        assert total > under_32, "no decode step ran more than 32 sequences together"


def test_full_queue_gets_429_with_retry_after_and_server_recovers(tmp_path):
    runner = ScriptedRunner(
        lambda prompt: harmony("<|channel|>final<|message|>" + "la " * 40 + "<|return|>"),
        max_batch=1,
        step_seconds=0.02,
    )
    with live_server(runner, tmp_path, max_queue=1) as server:
        client = server.client()
        args = dict(model=MODEL, messages=[{"role": "user", "content": "sing"}], stream=True)
        running = client.chat.completions.create(**args)
        chunks = iter(running)
        while not next(chunks).choices[0].delta.content:
            pass  # a token arrived: it holds the only slot
        waiting = client.chat.completions.create(**args)  # it fills the queue
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(**args)
        assert info.value.response.headers["retry-after"] == "1"
        assert info.value.body["code"] == "rate_limit_exceeded"
        assert "".join(c.choices[0].delta.content or "" for c in waiting if c.choices).startswith("la la")
        running.close()
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "again"}])
        assert reply.choices[0].message.content.startswith("la la")


def _wait_until(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_disconnected_clients_are_cancelled_and_free_their_slots(tmp_path):
    endless = harmony("<|channel|>final<|message|>" + "word " * 2000)
    runner = ScriptedRunner(lambda prompt: endless, max_batch=2, step_seconds=0.01)
    with live_server(runner, tmp_path) as server:
        client = server.client()
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "go"}], stream=True, max_tokens=3000
        )
        for _, _ in zip(range(3), stream, strict=False):
            pass
        assert len(runner.active) == 1
        stream.close()
        _wait_until(lambda: not runner.active)
        # a non-streaming client that gives up is noticed too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{server.url}/v1/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 3000},
                timeout=0.5,
            )
        _wait_until(lambda: not runner.active)


def test_prefill_is_chunked_so_running_streams_keep_decoding():
    calls = []

    class Recording(ScriptedRunner):
        def prefill(self, seq, tokens, last):
            calls.append(("prefill", seq, len(tokens)))
            return super().prefill(seq, tokens, last)

        def decode(self, tokens):
            calls.append(("decode", tuple(tokens)))
            return super().decode(tokens)

    runner = Recording(
        lambda prompt: harmony("<|channel|>final<|message|>" + "a " * 30 + "<|return|>"), step_seconds=0.01
    )
    engine = AsyncEngine(runner, prefill_budget=16)

    def request(n):
        params = SamplingParams(max_tokens=20, temperature=0, stop_token_ids=sorted(Tokenizer.STOP_TOKENS))
        return [SequenceRequest(list(range(1000, 1000 + n)), params)]

    async def main():
        engine.start()
        try:
            short = engine.submit(request(5))
            events = []
            async for event in short:
                events.append(event)
                if len(events) == 3:
                    long = engine.submit(request(100))  # arrives while `short` decodes
            long_events = [e async for e in long]
            return events, long_events
        finally:
            engine.stop()

    short_events, long_events = asyncio.run(main())
    assert len(short_events) == 20 and short_events[-1].finish_reason == "length"
    assert len(long_events) == 20
    long_id = max(c[1] for c in calls if c[0] == "prefill")
    chunks = [i for i, c in enumerate(calls) if c[0] == "prefill" and c[1] == long_id]
    assert [calls[i][2] for i in chunks] == [16] * 6 + [4]  # 100 tokens in budget-sized chunks
    # between two chunks of the long prompt, the short stream decoded a token
    assert all(any(c[0] == "decode" for c in calls[a:b]) for a, b in zip(chunks, chunks[1:], strict=False))


def test_a_failing_model_step_gives_500_and_the_server_keeps_serving(tmp_path):
    class Flaky(ScriptedRunner):
        def prefill(self, seq, tokens, last):
            if "kaboom" in get_tokenizer().decode(tokens):
                raise RuntimeError("simulated failure in prefill")
            return super().prefill(seq, tokens, last)

        def decode(self, tokens):
            if any("boom" in self.prompt_log[-1] for _ in tokens):
                raise RuntimeError("simulated device error")
            return super().decode(tokens)

    runner = Flaky(lambda prompt: harmony("<|channel|>final<|message|>fine thanks<|return|>"))
    with live_server(runner, tmp_path) as server:
        client = server.client()
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "boom"}])
        assert "simulated" not in str(info.value.body) and info.value.body["code"] == "engine_error"
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "boom"}], stream=True
        )
        assert next(iter(stream)).choices[0].delta.role == "assistant"
        with pytest.raises(openai.APIError):  # the headers were sent: an error event ends the stream
            list(stream)
        with pytest.raises(openai.InternalServerError):  # a prompt that fails its own prefill fails alone
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "kaboom"}])
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}])
        assert reply.choices[0].message.content == "fine thanks"
        assert not runner.active
