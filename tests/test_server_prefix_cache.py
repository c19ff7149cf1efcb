"""Live: a tool-using conversation's every turn starts from the cache of the turn before it.

The model is forced to call the tool (tool_choice) and each turn's prompt extends the one before it
(the call is re-rendered as the model writes it): every turn reuses at least the whole previous
prompt, and the tokens generated after it where the re-rendering repeats them.
"""

from __future__ import annotations

import httpx
import pytest

from gptoss.inference import ModelRunner
from gptoss.inference.prefix_cache import PrefixCache
from gptoss.server.prompting import ToolChoice, build_prompt
from test_server_support import MODEL, live_server, tiny_server_model

TURNS = 10
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    runner = ModelRunner(
        tiny_server_model(), max_batch=4, context=2048, prefill_chunk=64, prefix_cache=PrefixCache(1 << 28)
    )
    with live_server(runner, tmp_path_factory.mktemp("db")) as live:
        yield live, runner


def common(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def prompt_tokens(runner: ModelRunner, messages: list[dict]) -> list[int]:
    return build_prompt(
        runner, messages, tools=[WEATHER], tool_choice=ToolChoice("required"), reasoning_effort=None
    ).tokens


def test_chat_tool_loop_reuses_each_turn(server):
    live, runner = server
    client = live.client()
    tool = {"type": "function", "function": WEATHER}
    messages: list[dict] = [
        {"role": "system", "content": "You answer questions about the weather. " * 20},
        {"role": "user", "content": "What is the weather in Oslo, then Paris, then Rome?"},
    ]
    seen: list[int] | None = None  # the last prompt
    generated = 0  # tokens generated after it
    for turn in range(TURNS):
        prompt = prompt_tokens(runner, messages)
        reply = client.chat.completions.create(
            model=MODEL,
            messages=messages,
            tools=[tool],
            tool_choice="required",
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
        [call] = reply.choices[0].message.tool_calls
        cached = reply.usage.prompt_tokens_details.cached_tokens
        assert reply.usage.prompt_tokens == len(prompt)
        if seen is not None:
            assert common(prompt, seen) == len(seen), turn  # the prompts extend each other
            # The shared prefix is at most the last prompt and the tokens generated after it.
            assert cached >= len(seen) and cached >= 0.9 * (len(seen) + generated), turn
        seen, generated = prompt, reply.usage.completion_tokens
        messages += [
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": f"Sunny, {turn + 15} C"},
        ]
    metrics = httpx.get(f"{live.url}/metrics").text
    assert "gptoss_prefix_cache_hits_total" in metrics and "gptoss_prefix_cache_bytes" in metrics


def test_responses_tool_loop_with_previous_response_id_reuses_each_turn(server):
    live, runner = server
    client = live.client()
    tool = {"type": "function", **WEATHER}
    instructions = "You answer questions about the weather. " * 20
    response, previous, generated = None, 0, 0
    before = runner.prefix_cache.stats.hit_tokens
    for turn in range(TURNS):
        if response is None:
            items: object = "What is the weather in Oslo, then Paris, then Rome?"
        else:
            [call] = [o for o in response.output if o.type == "function_call"]
            items = [{"type": "function_call_output", "call_id": call.call_id, "output": f"{turn} C"}]
        response = client.responses.create(
            model=MODEL,
            input=items,
            instructions=instructions,
            tools=[tool],
            tool_choice="required",
            max_output_tokens=MAX_TOKENS,
            temperature=0,
            previous_response_id=None if response is None else response.id,
        )
        cached = response.usage.input_tokens_details.cached_tokens
        if turn:
            # At least the previous prompt, and 90% of it and the tokens generated after it.
            assert cached >= previous and cached >= 0.9 * (previous + generated), turn
        previous, generated = response.usage.input_tokens, response.usage.output_tokens
    assert runner.prefix_cache.stats.hit_tokens > before


def test_completions_repeat_a_prompt_from_the_cache(server):
    live, _ = server
    client = live.client()
    prompt = "The lighthouse keeper counted the ships. " * 12
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens
    # The whole prompt (its last hidden state included) comes back: the same answer, no prefill.
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens
    assert again.choices[0].text == first.choices[0].text
