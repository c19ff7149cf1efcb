"""The OpenAI-compatible server, live on 127.0.0.1, through the official `openai` client.

Two servers: one on a tiny real model (the production `ModelRunner`), one on a `ScriptedRunner`
whose "model" writes exact harmony token sequences, so that tool calls, reasoning and malformed
output go through the real parser, scheduler and HTTP layer end to end.
"""

from __future__ import annotations

import json
import os
import re

import httpx
import openai
import pytest

from conftest import gptoss_serve
from gptoss import save_model
from gptoss.harmony import chat_messages_to_harmony, render_for_completion
from test_server_support import MODEL, ScriptedRunner, harmony, live_server, model_server, tiny_server_model

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}

# What the scripted "model" writes, chosen by a keyword of the last user or tool message.
SCRIPTS = {
    "weather?": "<|channel|>analysis<|message|>The user wants the weather. I should call the tool.<|end|>"
    "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>"
    '{"city": "Paris"}<|call|>',
    "Sunny, 21C": "<|channel|>analysis<|message|>The tool says sunny.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>It is sunny in Paris.<|return|>",
    "think first": "<|channel|>analysis<|message|>Two plus two is four.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>4<|return|>",
    "preamble please": "<|channel|>commentary<|message|>Let me check.<|end|>"
    "<|start|>assistant to=functions.get_time<|channel|>commentary json<|message|>{}<|call|>",
    "stop words": "<|channel|>final<|message|>one two STOP three four<|return|>",
    "json valid": '<|channel|>final<|message|>{"city": "Paris", "temp": 21}<|return|>',
    "json invalid": '<|channel|>final<|message|>{"city": 3}<|return|>',
    # Malformed harmony, each of a kind a real model produces now and then.
    "malformed:no-message": "<|channel|>final Hello there<|return|>",
    "malformed:double-start": "<|channel|>final<|message|>Hel<|start|>"
    "<|start|>assistant<|channel|>final<|message|>lo<|return|>",
    "malformed:stray": "<|constrain|><|channel|>final<|message|>Hi<|constrain|><|reserved_200100|> you"
    "<|end|>",
    "malformed:unknown-role": "<|channel|>final<|message|>A<|end|>"
    "<|start|>wizard<|channel|>final<|message|>B<|return|>",
    "malformed:bare-text": "just text, no header at all<|return|>",
    "malformed:truncated-call": "<|start|>assistant to=functions.get_weather<|channel|>commentary json"
    '<|message|>{"ci',
    "malformed:eos-in-header": "<|channel|>analysis<|endoftext|>",
}


def script(prompt: str) -> list[int]:
    """The script whose key appears last in the prompt (the newest user or tool message)."""
    key = max(SCRIPTS, key=lambda k: (prompt.rfind(k), len(k)))
    return harmony(SCRIPTS[key] if key in prompt else "<|channel|>final<|message|>Hello!<|return|>")


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    runner = ScriptedRunner(script)
    with live_server(runner, tmp_path_factory.mktemp("scripted")) as server:
        server.runner = runner
        yield server


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    with model_server(tmp_path_factory.mktemp("real")) as server:
        yield server


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def collect_stream(stream):
    """Assemble chat chunks like a client would: content, reasoning, tool calls, finish, usage."""
    content, reasoning, calls, finish, usage = "", "", {}, None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            reasoning += getattr(delta, "reasoning_content", None) or ""
            assert getattr(delta, "reasoning", None) == getattr(delta, "reasoning_content", None)
            for call in delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = call.id or entry["id"]
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, reasoning, [calls[i] for i in sorted(calls)], finish, usage


# ---------------------------------------------------------------------------------------------
# The real model
# ---------------------------------------------------------------------------------------------


def test_chat_on_the_real_model_counts_tokens_and_streams_the_same_text(real):
    client = real.client()
    messages = [{"role": "system", "content": "Be brief."}, *user("Hello there")]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, seed=7)
    choice = reply.choices[0]
    expected_prompt = len(render_for_completion(chat_messages_to_harmony(messages)))
    assert reply.usage.prompt_tokens == expected_prompt
    assert 1 <= reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == expected_prompt + reply.usage.completion_tokens
    assert choice.finish_reason == ("length" if reply.usage.completion_tokens == 12 else "stop")
    assert reply.id.startswith("chatcmpl-") and reply.model == MODEL

    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=12,
        seed=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    content, reasoning, calls, finish, usage = collect_stream(stream)
    assert (content, reasoning) == (choice.message.content or "", choice.message.reasoning_content or "")
    assert finish == choice.finish_reason
    assert usage.completion_tokens == reply.usage.completion_tokens
    assert usage.prompt_tokens == expected_prompt


def test_seed_reproduces_and_n_gives_distinct_choices(real):
    client = real.client()
    args = dict(model=MODEL, messages=user("Tell me a story"), max_tokens=16, temperature=1.0)
    first = client.chat.completions.create(seed=3, **args)
    again = client.chat.completions.create(seed=3, **args)
    assert first.choices[0].message == again.choices[0].message
    many = client.chat.completions.create(seed=3, n=3, **args)
    texts = [c.message.content for c in many.choices]
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert texts[0] == first.choices[0].message.content  # choice i uses seed + i
    assert len(set(texts)) == 3
    assert 3 <= many.usage.completion_tokens <= 3 * 16
    assert many.usage.prompt_tokens == first.usage.prompt_tokens  # the prompt counts once


def test_logprobs_are_reported_for_content_tokens(real):
    client = real.client()
    reply = client.chat.completions.create(
        model=MODEL, messages=user("Hi"), max_tokens=80, seed=1, logprobs=True, top_logprobs=3, temperature=0
    )
    choice = reply.choices[0]
    entries = choice.logprobs.content
    if choice.message.content:
        assert entries, "content tokens must carry logprobs"
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)


def test_completions_raw_text_stream_and_echo(real):
    client = real.client()
    reply = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, seed=5, logprobs=2
    )
    choice = reply.choices[0]
    assert reply.usage.prompt_tokens == 5 and reply.usage.completion_tokens == len(choice.logprobs.tokens)
    assert "".join(choice.logprobs.tokens) == choice.text
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=8, seed=5, stream=True
        )
        if c.choices
    )
    assert streamed == choice.text
    echoed = client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=3, seed=5, echo=True)
    assert echoed.choices[0].text.startswith('"#$')  # ids 1, 2, 3 are '"', '#', '$'


def test_tool_choice_required_forces_a_call_on_the_real_model(real):
    client = real.client()
    tools = [WEATHER_TOOL, TIME_TOOL]
    reply = client.chat.completions.create(
        model=MODEL, messages=user("anything"), tools=tools, tool_choice="required", max_tokens=20, seed=2
    )
    message = reply.choices[0].message
    assert message.tool_calls and message.tool_calls[0].function.name in {"get_weather", "get_time"}
    assert reply.choices[0].finish_reason in ("tool_calls", "length")
    assert not message.content  # the header never leaks into content

    stream = client.chat.completions.create(
        model=MODEL,
        messages=user("anything"),
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=20,
        seed=2,
        stream=True,
    )
    _, _, calls, _, _ = collect_stream(stream)
    assert calls[0]["name"] == "get_time" and calls[0]["id"].startswith("call_")


def test_models_health_metrics_and_openapi(real):
    client = real.client()
    client.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=2)
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(f"{real.url}/health").json() == {"status": "ok"}
    spec = httpx.get(f"{real.url}/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/models"} <= set(spec["paths"])
    metrics = httpx.get(f"{real.url}/metrics").text
    assert 'gptoss_http_requests_total{route="/v1/chat/completions",status="200"}' in metrics
    assert "gptoss_completion_tokens_total" in metrics and "gptoss_sequences_running" in metrics
    ttft_count = re.search(r"gptoss_time_to_first_token_seconds_count (\S+)", metrics)
    assert float(ttft_count[1]) > 0


# ---------------------------------------------------------------------------------------------
# Bad input: the right 4xx, in OpenAI's error shape, and the server keeps serving
# ---------------------------------------------------------------------------------------------


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in response.text
    if param is not None:
        assert error["param"] == param
    return error


def test_bad_requests_get_4xx_in_openai_shape(real):
    url = f"{real.url}/v1/chat/completions"
    ok = {"model": MODEL, "messages": user("hi"), "max_tokens": 2}
    assert_error(
        httpx.post(
            url, content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"}
        ),
        400,
    )
    assert_error(httpx.post(url, json=ok | {"model": "gpt-4o"}), 404, "model")
    assert_error(httpx.post(url, json=ok | {"max_tokens": -5}), 400, "max_tokens")
    assert_error(httpx.post(url, json=ok | {"messages": []}), 400, "messages")
    assert_error(httpx.post(url, json=ok | {"messages": [{"role": "wizard", "content": "x"}]}), 400)
    assert_error(httpx.post(url, json=ok | {"temperature": 5}), 400, "temperature")
    bad_tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}
    error = assert_error(httpx.post(url, json=ok | {"tools": [bad_tool]}), 400)
    assert "JSON Schema" in error["message"] and error["param"].startswith("tools")
    error = assert_error(
        httpx.post(
            url,
            json=ok
            | {"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        ),
        400,
        "tool_choice",
    )
    assert_error(httpx.post(url, json=ok | {"tool_choice": "required"}), 400, "tool_choice")
    # tool message that answers nothing: harmony conversion refuses it
    assert_error(
        httpx.post(url, json=ok | {"messages": [{"role": "tool", "tool_call_id": "x", "content": "1"}]}), 400
    )
    # context: prompt + max_tokens above the 512-token context, and a prompt alone above it
    error = assert_error(httpx.post(url, json=ok | {"max_tokens": 500}), 400, "max_tokens")
    assert error["code"] == "context_length_exceeded" and "512" in error["message"]
    error = assert_error(
        httpx.post(url, json=ok | {"messages": user("word " * 600), "max_tokens": None}), 400
    )
    assert "512" in error["message"]
    json_header = {"content-type": "application/json"}
    assert_error(httpx.post(url, content=b"x" * (9 * 2**20), headers=json_header), 413)
    chunked = (b"x" * 2**20 for _ in range(9))  # no Content-Length: cut off as it streams in
    assert_error(httpx.post(url, content=chunked, headers=json_header), 413)
    assert_error(httpx.get(f"{real.url}/v1/nothing-here"), 404)
    assert_error(httpx.get(url), 405)
    assert_error(
        httpx.post(f"{real.url}/v1/completions", json={"model": MODEL, "prompt": [300000]}), 400, "prompt"
    )
    # ... and the server is fine
    assert httpx.post(url, json=ok).status_code == 200


def test_client_errors_map_to_openai_exceptions(real):
    client = real.client()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=user("hi"))
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=user("hi"), max_completion_tokens=10_000)
    assert info.value.code == "context_length_exceeded"


def test_api_key_guards_every_route_but_health(tmp_path):
    with model_server(tmp_path, api_keys=("s3cret",)) as server:
        assert httpx.get(f"{server.url}/health").status_code == 200
        for path in ("/v1/models", "/metrics", "/openapi.json", "/docs", "/v1/nothing"):
            assert_error(httpx.get(f"{server.url}{path}"), 401)
            assert_error(httpx.get(f"{server.url}{path}", headers={"Authorization": "Bearer wrong"}), 401)
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="wrong").models.list()
        assert server.client(api_key="s3cret").models.list().data[0].id == MODEL


# ---------------------------------------------------------------------------------------------
# Scripted output: tool calls, reasoning, malformed harmony
# ---------------------------------------------------------------------------------------------


def test_tool_call_is_parsed_and_reasoning_kept_apart(scripted):
    client = scripted.client()
    reply = client.chat.completions.create(
        model=MODEL, messages=user("What is the weather?"), tools=[WEATHER_TOOL]
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert (
        choice.message.reasoning_content
        == choice.message.reasoning
        == "The user wants the weather. I should call the tool."
    )
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert reply.usage.completion_tokens == len(harmony(SCRIPTS["weather?"]))
    assert reply.usage.completion_tokens_details.reasoning_tokens > 0
    assert "type get_weather" in scripted.runner.prompt_log[-1]  # the tool was shown to the model

    stream = client.chat.completions.create(
        model=MODEL, messages=user("What is the weather?"), tools=[WEATHER_TOOL], stream=True
    )
    content, reasoning, calls, finish, _ = collect_stream(stream)
    assert content == "" and reasoning == choice.message.reasoning_content and finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Paris"})]


@pytest.mark.parametrize("spelling", ["reasoning_content", "reasoning"])
def test_tool_result_round_trip_sends_reasoning_back(scripted, spelling):
    client = scripted.client()
    messages = user("What is the weather?")
    first = (
        client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL])
        .choices[0]
        .message
    )
    call = first.tool_calls[0]
    assistant = {
        "role": "assistant",
        "content": None,
        spelling: first.reasoning_content,
        "tool_calls": [call.model_dump()],
    }
    tool = {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21C"}
    reply = client.chat.completions.create(
        model=MODEL, messages=[*messages, assistant, tool], tools=[WEATHER_TOOL]
    )
    assert reply.choices[0].message.content == "It is sunny in Paris."
    assert reply.choices[0].finish_reason == "stop"
    prompt = scripted.runner.prompt_log[-1]
    # the chain the model sees: its reasoning, its call, and the result from the named tool
    assert "<|channel|>analysis<|message|>The user wants the weather." in prompt
    assert (
        '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
        in prompt
    )
    assert (
        "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>Sunny, 21C<|end|>"
        in prompt
    )


def test_reasoning_never_leaks_into_content_and_effort_reaches_the_prompt(scripted):
    client = scripted.client()
    reply = client.chat.completions.create(model=MODEL, messages=user("think first"), reasoning_effort="high")
    message = reply.choices[0].message
    assert (message.content, message.reasoning_content) == ("4", "Two plus two is four.")
    assert "Reasoning: high" in scripted.runner.prompt_log[-1]
    client.chat.completions.create(model=MODEL, messages=user("think first"), reasoning_effort="low")
    assert "Reasoning: low" in scripted.runner.prompt_log[-1]
    content, reasoning, _, _, _ = collect_stream(
        client.chat.completions.create(model=MODEL, messages=user("think first"), stream=True)
    )
    assert (content, reasoning) == ("4", "Two plus two is four.")


def test_preamble_is_content_and_the_call_follows(scripted):
    client = scripted.client()
    reply = client.chat.completions.create(model=MODEL, messages=user("preamble please"), tools=[TIME_TOOL])
    message = reply.choices[0].message
    assert message.content == "Let me check."
    assert (
        message.tool_calls[0].function.name == "get_time" and message.tool_calls[0].function.arguments == "{}"
    )


def test_tool_choice_none_hides_tools_and_drops_stray_calls(scripted):
    client = scripted.client()
    reply = client.chat.completions.create(
        model=MODEL, messages=user("What is the weather?"), tools=[WEATHER_TOOL], tool_choice="none"
    )
    choice = reply.choices[0]
    assert "get_weather" not in scripted.runner.prompt_log[-1]
    assert choice.message.tool_calls is None and choice.finish_reason == "stop"
    assert not choice.message.content  # the call's arguments do not leak into content


def test_named_tool_choice_is_forced_through_the_header(scripted):
    # the scripted model would answer in plain text; the constraint forces the get_time header
    client = scripted.client()
    reply = client.chat.completions.create(
        model=MODEL,
        messages=user("hello"),
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=30,
    )
    message = reply.choices[0].message
    assert message.tool_calls[0].function.name == "get_time"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_the_content(scripted, stream):
    client = scripted.client()
    args = dict(model=MODEL, messages=user("stop words"), stop=["STOP", "never"])
    if stream:
        content, _, _, finish, _ = collect_stream(client.chat.completions.create(stream=True, **args))
    else:
        choice = client.chat.completions.create(**args).choices[0]
        content, finish = choice.message.content, choice.finish_reason
    assert (content, finish) == ("one two ", "stop")


@pytest.mark.parametrize("key", [k for k in SCRIPTS if k.startswith("malformed")])
@pytest.mark.parametrize("stream", [False, True])
def test_malformed_harmony_gives_200_with_best_effort_content(scripted, key, stream):
    client = scripted.client()
    args = dict(model=MODEL, messages=user(key), tools=[WEATHER_TOOL])
    if stream:
        content, reasoning, calls, finish, _ = collect_stream(
            client.chat.completions.create(stream=True, **args)
        )
    else:
        message = client.chat.completions.create(**args).choices[0].message
        content, reasoning = message.content or "", message.reasoning_content or ""
        calls = [
            {"name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls or []
        ]
    expected = {
        "malformed:no-message": "Hello there",
        "malformed:double-start": "Hello",
        "malformed:stray": "Hi you",
        "malformed:unknown-role": "AB",
        "malformed:bare-text": "just text, no header at all",
        "malformed:truncated-call": "",
        "malformed:eos-in-header": "",
    }[key]
    assert content == expected
    assert "<|" not in content + reasoning
    if key == "malformed:truncated-call":
        assert calls == [
            {"name": "get_weather", "arguments": '{"ci'} | ({"id": calls[0].get("id")} if stream else {})
        ]


def test_response_format_is_enforced_and_checked(scripted):
    client = scripted.client()
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "temp": {"type": "number"}},
        "required": ["city"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}}
    good = client.chat.completions.create(model=MODEL, messages=user("json valid"), response_format=fmt)
    assert json.loads(good.choices[0].message.content)["city"] == "Paris"
    assert good.choices[0].model_extra["response_format_error"] is None
    assert "# Response Formats\n\n## weather" in scripted.runner.prompt_log[-1]
    # The script's `{"city": 3}` breaks the schema: the grammar refuses the 3, so this model (which
    # puts no weight on any other token) writes a string and runs out of tokens; the check after
    # the fact still reports the truncated answer.
    bad = client.chat.completions.create(
        model=MODEL, messages=user("json invalid"), response_format=fmt, max_tokens=40
    )
    assert (
        bad.choices[0].message.content.startswith('{"city": "') and bad.choices[0].finish_reason == "length"
    )
    assert "not valid JSON" in bad.choices[0].model_extra["response_format_error"]
    plain = client.chat.completions.create(
        model=MODEL, messages=user("hi"), response_format={"type": "json_object"}, max_tokens=40
    )
    assert plain.choices[0].message.content.startswith("{")  # the script's "Hello!" is refused
    bad_schema = {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": 12}}}
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=user("hi"), response_format=bad_schema)


def test_gptoss_serve_command_runs_the_real_server(tmp_path):
    """`gptoss serve CHECKPOINT` end to end in its own process: load, bind 127.0.0.1, answer."""
    checkpoint = save_model(tiny_server_model(), tmp_path / MODEL)
    args = [str(checkpoint), "--max-batch", "2", "--max-model-len", "256"]
    args += ["--responses-db", str(tmp_path / "r.db")]
    with gptoss_serve(args, os.environ | {"GPTOSS_API_KEY": "k3y"}, tmp_path / "serve.log") as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k3y", max_retries=0)
        reply = client.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=5)
        assert reply.usage.completion_tokens >= 1 and reply.model == MODEL
        again = client.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=5)
        assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens  # on by default
        assert client.models.retrieve(MODEL).model_extra["max_model_len"] == 256
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
