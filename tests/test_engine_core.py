"""The engine core under agent workloads, live on 127.0.0.1 with the official `openai` client and the
bundled model: forced tool calls work on its trimmed vocabulary, poison requests never touch the
streams beside them, the event loop stays free while heavy requests are served, and the API shapes
the SDKs expect."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gptoss import load_model
from gptoss.inference import ModelRunner, SamplingParams
from gptoss.inference.optimize import prepare_for_inference
from gptoss.inference.sampling import SampleError, Sampler
from gptoss.inference.stops import StopStrings
from gptoss.server import ServerSettings, create_app
from test_server_support import LiveServer

BUNDLED = "gptoss-nano"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    model = prepare_for_inference(load_model(BUNDLED))
    runner = ModelRunner(model, max_batch=8, context=2048)
    db = tmp_path_factory.mktemp("bundled") / "responses.sqlite3"
    app = create_app(
        runner, ServerSettings(model_name=BUNDLED, responses_db=db, api_keys=("s3cret",), max_queue=64)
    )
    with LiveServer(app) as server:
        yield server


def client(server: LiveServer) -> openai.OpenAI:
    return server.client(api_key="s3cret", timeout=120)


# ---------------------------------------------------------------------- forced tool calls
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
@pytest.mark.parametrize("stream", [False, True])
def test_chat_tool_choice_forces_a_call_on_the_bundled_model(bundled, choice, stream):
    kwargs = dict(
        model=BUNDLED, messages=ASK, tools=[WEATHER, TIME], tool_choice=choice, max_tokens=48, seed=3
    )
    if stream:
        calls: dict[int, dict] = {}
        finish = None
        for chunk in client(bundled).chat.completions.create(**kwargs, stream=True):
            for c in chunk.choices:
                finish = c.finish_reason or finish
                for call in c.delta.tool_calls or []:
                    entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
                    entry["name"] += call.function.name or ""
                    entry["arguments"] += call.function.arguments or ""
        names = [c["name"] for c in calls.values()]
    else:
        reply = client(bundled).chat.completions.create(**kwargs)
        calls = reply.choices[0].message.tool_calls or []
        names = [c.function.name for c in calls]
        assert [c.index for c in calls] == list(range(len(calls)))  # not null, as the SDK expects
    wanted = {"get_time"} if isinstance(choice, dict) else {"get_weather", "get_time"}
    assert names and names[0] in wanted


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "get_weather"}])
@pytest.mark.parametrize("stream", [False, True])
def test_responses_tool_choice_forces_a_call_on_the_bundled_model(bundled, choice, stream):
    tools = [{"type": "function", **t["function"]} for t in (WEATHER, TIME)]
    kwargs = dict(
        model=BUNDLED, input="Weather in Paris?", tools=tools, tool_choice=choice, max_output_tokens=48
    )
    if stream:
        events = list(client(bundled).responses.create(**kwargs, stream=True))
        response = events[-1].response  # response.completed, or .incomplete at max_output_tokens
    else:
        response = client(bundled).responses.create(**kwargs)
    calls = [item for item in response.output if item.type == "function_call"]
    wanted = {"get_weather"} if isinstance(choice, dict) else {"get_weather", "get_time"}
    assert calls and calls[0].name in wanted
    assert isinstance(response.created_at, float) and response.created_at == int(response.created_at)


# ---------------------------------------------------------------------- poison beside innocent streams
INNOCENT = [
    {"messages": [{"role": "user", "content": "Write a function that adds two numbers."}], "seed": 11},
    {"messages": [{"role": "user", "content": "Say hello."}], "temperature": 0},
    {"messages": [{"role": "user", "content": "Sort a list in Python."}], "seed": 12, "top_p": 0.9},
]

POISON = [
    {"seed": 2**64 + 5},
    {"seed": -(2**70)},
    {"temperature": 1e-40},
    {"temperature": 5e-324},
    {"top_p": 5e-324},
    {"top_p": 0},
    {"repetition_penalty": 1e-45},
    {"repetition_penalty": 1e300},
    {"min_p": 1.0, "temperature": 2.0},
    {"presence_penalty": 2.0, "frequency_penalty": -2.0, "logit_bias": {str(t): -100 for t in range(300)}},
    {"tools": [WEATHER], "tool_choice": "required", "logit_bias": {"200005": 100}},
    {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
    {"messages": [{"role": "user", "content": "\ud800x"}]},
    {"stop": ["\ud800"]},
    {"n": 16, "max_tokens": 2},
    {"logprobs": True, "top_logprobs": 20},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nope"}}}},
    {"max_tokens": 10**9},
    {"messages": [{"role": "user", "content": "hi " * 20000}]},
]


async def _stream_text(http: httpx.AsyncClient, body: dict) -> str:
    text = ""
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                for choice in chunk["choices"]:
                    text += choice["delta"].get("content") or ""
                    text += choice["delta"].get("reasoning_content") or ""
    return text


async def _poison(http: httpx.AsyncClient, body: dict) -> int:
    # a surrogate cannot be sent through httpx's json= (it encodes strictly): send the JSON text
    raw = json.dumps(body).encode()
    response = await http.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    await response.aread()
    return response.status_code


def test_poison_requests_never_touch_innocent_streams(bundled):
    base = {"model": BUNDLED, "max_tokens": 40, "stream": True}
    headers = {"Authorization": "Bearer s3cret"}

    async def run(with_poison: bool) -> tuple[list[str], list[int]]:
        async with httpx.AsyncClient(base_url=bundled.url, headers=headers, timeout=120) as http:
            innocents = [asyncio.create_task(_stream_text(http, base | body)) for body in INNOCENT]
            statuses = []
            if with_poison:
                poison = [{"model": BUNDLED, "messages": ASK, "max_tokens": 8} | p for p in POISON]
                statuses = await asyncio.gather(*(_poison(http, body) for body in poison))
            return await asyncio.gather(*innocents), statuses

    alone = [asyncio.run(run(False))[0][i] for i in range(len(INNOCENT))]
    together, statuses = asyncio.run(run(True))
    assert together == alone
    assert all(s in (200, 400) for s in statuses), dict(zip(map(str, POISON), statuses, strict=True))
    assert httpx.get(f"{bundled.url}/health").status_code == 200


# ---------------------------------------------------------------------- the event loop stays free
def test_health_answers_while_the_heaviest_requests_are_served(bundled):
    """Largest allowed stop strings with a prompt that fills the context, and a 7 MB prompt that must
    be tokenized before it is refused: /health keeps answering within a generous bound."""
    stops = [f"stop{i}" * 512 for i in range(16)]  # 16 × ~3 KB (the limit is 16 × 4096)
    heavy = [
        {"model": BUNDLED, "prompt": "word " * 1500, "max_tokens": 64, "stop": stops, "stream": True},
        {"model": BUNDLED, "messages": [{"role": "user", "content": "x y " * 1_700_000}], "max_tokens": 4},
    ]
    paths = ["/v1/completions", "/v1/chat/completions"]
    latencies: list[float] = []
    statuses: list[int] = []

    def send(path: str, body: dict) -> None:
        with httpx.Client(
            base_url=bundled.url, headers={"Authorization": "Bearer s3cret"}, timeout=300
        ) as http:
            statuses.append(http.post(path, json=body).status_code)

    threads = [threading.Thread(target=send, args=a) for a in zip(paths, heavy, strict=True)]
    for t in threads:
        t.start()
    with httpx.Client(base_url=bundled.url, timeout=30) as http:
        while any(t.is_alive() for t in threads):
            start = time.perf_counter()
            assert http.get("/health").status_code == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.02)
    for t in threads:
        t.join()
    assert sorted(statuses) == [200, 400]  # the 7 MB prompt exceeds the context: a clear 400
    print(f"/health: {len(latencies)} probes, max {max(latencies) * 1000:.0f} ms")
    assert len(latencies) >= 5 and max(latencies) < 1.0


# ---------------------------------------------------------------------- API shapes and doors
def test_api_shapes_the_sdks_expect(bundled):
    c = client(bundled)
    assert c.chat.completions.create(model=BUNDLED, messages=ASK, max_tokens=2, top_p=0).choices
    first = c.responses.create(model=BUNDLED, input="Hi", max_output_tokens=4)
    assert isinstance(first.created_at, float) and first.created_at == int(first.created_at)
    items = c.responses.input_items.list(first.id)
    assert items.data[0].content[0].type == "input_text" and items.data[0].content[0].text == "Hi"
    counted = c.responses.input_tokens.count(model=BUNDLED, input="Hi")
    assert counted.input_tokens > 3
    with pytest.raises(openai.BadRequestError, match="function tools only"):
        c.responses.create(model=BUNDLED, input="Hi", tools=[{"type": "web_search"}])
    with pytest.raises(openai.BadRequestError, match="smaller n"):
        c.completions.create(model=BUNDLED, prompt=["a"] * 64, n=16, max_tokens=1)
    surrogate = httpx.post(  # a lone surrogate in the JSON text: a 400 that names the messages
        f"{bundled.url}/v1/chat/completions",
        content=b'{"model": "gptoss-nano", "messages": [{"role": "user", "content": "\\ud800x"}]}',
        headers={"Authorization": "Bearer s3cret", "content-type": "application/json"},
    )
    assert surrogate.status_code == 400 and "messages" in surrogate.json()["error"]["message"]
    lower = httpx.get(f"{bundled.url}/v1/models", headers={"Authorization": "bearer s3cret"})
    assert lower.status_code == 200
    assert httpx.get(f"{bundled.url}/v1/models", headers={"Authorization": "Basic s3cret"}).status_code == 401


# ---------------------------------------------------------------------- engine pieces
def test_a_row_that_cannot_be_sampled_fails_alone():
    logits = torch.randn(3, 50)

    class AllowNothing:  # a constraint gone wrong: no token allowed
        def allowed(self) -> list[int]:
            return []

        def advance(self, token: int) -> None:
            pass

    allow_nothing = AllowNothing()
    params = [SamplingParams(seed=1), SamplingParams(seed=2), SamplingParams(temperature=0)]
    together = Sampler(params, [[1]] * 3, 50, constraints=[None, allow_nothing, None]).sample(logits)
    assert isinstance(together[1], SampleError)
    for r in (0, 2):
        alone = Sampler([params[r]], [[1]], 50).sample(logits[r : r + 1])[0]
        assert together[r] == alone


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="abc", max_size=40),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=5), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=6),
)
def test_stop_strings_find_the_first_stop_whatever_the_pieces(text, stops, cuts):
    matcher = StopStrings(stops)
    released, found = "", None
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    for a, b in zip(bounds, bounds[1:], strict=False):
        piece, found = matcher.push(text[a:b])
        released += piece
        if found:
            break
    ends = [(text.find(s) + len(s), s) for s in stops if s in text]
    if not ends:
        assert found is None and released + matcher.flush() == text
        return
    end = min(e for e, _ in ends)
    assert found is not None and text[:end].endswith(found)
    assert released == text[: end - len(found)]


@settings(max_examples=25, deadline=None)
@given(
    bodies=st.lists(
        st.text(alphabet="ab <|end|>\n\u00e9\U0001f600", min_size=0, max_size=3000), min_size=1, max_size=3
    ),
    roles=st.lists(st.sampled_from(["user", "assistant", "tool"]), min_size=3, max_size=3),
)
def test_long_bodies_render_apart_exactly_as_harmony_renders_them(bodies, roles):
    from gptoss import harmony

    messages = [{"role": "system", "content": "be brief"}]
    for body, role in zip(bodies, roles, strict=False):
        if role == "tool":
            messages.append(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                    ],
                }
            )
            messages.append({"role": "tool", "tool_call_id": "c", "content": body})
        else:
            messages.append({"role": role, "content": body})
    messages.append({"role": "user", "content": "go"})
    conversation = harmony.chat_messages_to_harmony(messages, [{"name": "f"}], reasoning_effort="low")
    spliced = harmony.render_for_completion(conversation)
    kept = harmony._drop_stale_reasoning(conversation, keep_last_turn=False)
    whole = harmony.get_harmony_encoding().render_conversation_for_completion(
        harmony.Conversation.from_messages(kept), harmony.Role.ASSISTANT, harmony._RENDER_ALL
    )
    assert spliced == harmony._calls_as_written(whole, kept)
