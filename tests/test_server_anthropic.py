"""Anthropic's Messages API on a live server, through the official `anthropic` SDK: create, stream,
thinking, tools, stop sequences, count_tokens, x-api-key, and Anthropic's error shape."""

from __future__ import annotations

import anthropic
import httpx
import pytest

from test_server_support import MODEL, ScriptedRunner, harmony, live_server, model_server

SCRIPTS = {
    "think first": "<|channel|>analysis<|message|>Two plus two is four.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>4<|return|>",
    "weather?": "<|channel|>analysis<|message|>I should call the tool.<|end|>"
    "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>"
    '{"city": "Paris"}<|call|>',
    "Sunny, 21C": "<|channel|>analysis<|message|>The tool says sunny.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>It is sunny in Paris.<|return|>",
    "stop words": "<|channel|>final<|message|>one two STOP three four<|return|>",
}
WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
KEY = "sk-test-anthropic"


def script(prompt: str) -> list[int]:
    key = max(SCRIPTS, key=lambda k: prompt.rfind(k))
    return harmony(SCRIPTS[key] if key in prompt else "<|channel|>final<|message|>Hello!<|return|>")


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    runner = ScriptedRunner(script)
    with live_server(runner, tmp_path_factory.mktemp("anthropic"), api_keys=(KEY,)) as server:
        server.runner = runner
        yield server


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    with model_server(tmp_path_factory.mktemp("anthropic-real")) as server:
        yield server


def client(server, api_key: str = KEY, **kwargs) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=api_key, max_retries=0, **kwargs)


def blocks(message) -> list[dict]:
    """The content blocks as plain data (the stream helper returns its own block classes)."""
    fields = ("type", "text", "thinking", "name", "input")
    return [{k: getattr(b, k) for k in fields if hasattr(b, k)} for b in message.content]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_create_and_stream_agree_on_the_real_model(real):
    c = client(real)
    # temperature is no longer a parameter of the SDK's create(); older clients still send it
    greedy = {"temperature": 0}
    args = dict(
        model=MODEL, max_tokens=12, system="Be brief.", messages=user("Hello there"), extra_body=greedy
    )
    message = c.messages.create(**args)
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert 1 <= message.usage.output_tokens <= 12
    counted = c.messages.count_tokens(model=MODEL, system="Be brief.", messages=user("Hello there"))
    assert message.usage.input_tokens == counted.input_tokens > 10

    with c.messages.stream(**args) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == "".join(b.text for b in message.content if b.type == "text")
    assert blocks(final) == blocks(message) and final.stop_reason == message.stop_reason
    assert final.usage.output_tokens == message.usage.output_tokens


def test_thinking_is_shown_only_when_enabled(scripted):
    c = client(scripted)
    thinking = {"type": "enabled", "budget_tokens": 2048}
    message = c.messages.create(model=MODEL, max_tokens=200, messages=user("think first"), thinking=thinking)
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "Two plus two is four." and message.content[1].text == "4"
    assert "Reasoning: low" in scripted.runner.prompt_log[-1]  # a 2048-token budget is low effort
    message = c.messages.create(
        model=MODEL,
        max_tokens=200,
        messages=user("think first"),
        thinking={"type": "enabled", "budget_tokens": 20000},
    )
    assert "Reasoning: high" in scripted.runner.prompt_log[-1]

    plain = c.messages.create(model=MODEL, max_tokens=200, messages=user("think first"))
    assert [b.type for b in plain.content] == ["text"] and plain.content[0].text == "4"
    assert "Reasoning: low" in scripted.runner.prompt_log[-1]
    omitted = {"type": "adaptive", "display": "omitted"}
    hidden = c.messages.create(
        model=MODEL,
        max_tokens=200,
        messages=user("think first"),
        thinking=omitted,
        output_config={"effort": "max"},
    )
    assert [b.type for b in hidden.content] == ["text"]
    assert "Reasoning: high" in scripted.runner.prompt_log[-1]

    with c.messages.stream(model=MODEL, max_tokens=200, messages=user("think first"), thinking=thinking) as s:
        kinds = [event.type for event in s]
        final = s.get_final_message()
    assert blocks(final) == blocks(message)
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "thinking" in kinds and "text" in kinds  # the SDK's derived delta events


def test_tool_use_round_trip_streamed_and_not(scripted):
    c = client(scripted)
    messages = user("What is the weather? weather?")
    first = c.messages.create(model=MODEL, max_tokens=200, messages=messages, tools=[WEATHER])
    assert first.stop_reason == "tool_use"
    [call] = [b for b in first.content if b.type == "tool_use"]
    assert call.name == "get_weather" and call.input == {"city": "Paris"}
    assert "get_weather" in scripted.runner.prompt_log[-1]  # the tool was shown to the model

    with c.messages.stream(model=MODEL, max_tokens=200, messages=messages, tools=[WEATHER]) as s:
        streamed = s.get_final_message()
    [streamed_call] = [b for b in streamed.content if b.type == "tool_use"]
    assert (streamed_call.name, streamed_call.input, streamed.stop_reason) == (
        "get_weather",
        call.input,
        "tool_use",
    )

    result = {"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 21C"}
    follow = messages + [
        {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {"role": "user", "content": [result]},
    ]
    second = c.messages.create(model=MODEL, max_tokens=200, messages=follow, tools=[WEATHER])
    assert second.content[0].text == "It is sunny in Paris." and second.stop_reason == "end_turn"
    prompt = scripted.runner.prompt_log[-1]
    call_header = "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
    assert call_header + '<|message|>{"city": "Paris"}<|call|>' in prompt
    assert "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>Sunny, 21C" in prompt


def test_stop_sequences(scripted):
    c = client(scripted)
    message = c.messages.create(
        model=MODEL, max_tokens=200, messages=user("stop words"), stop_sequences=["STOP"]
    )
    assert message.content[0].text == "one two "
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "STOP")
    with c.messages.stream(
        model=MODEL, max_tokens=200, messages=user("stop words"), stop_sequences=["STOP"]
    ) as s:
        assert "".join(s.text_stream) == "one two "
        assert s.get_final_message().stop_sequence == "STOP"


def test_keys_by_x_api_key_or_bearer(scripted):
    assert client(scripted).messages.create(model=MODEL, max_tokens=20, messages=user("hi")).content
    bearer = client(scripted, api_key=None, auth_token=KEY)  # Authorization: Bearer
    assert bearer.messages.create(model=MODEL, max_tokens=20, messages=user("hi")).content
    with pytest.raises(anthropic.AuthenticationError) as caught:
        client(scripted, api_key="wrong").messages.create(model=MODEL, max_tokens=20, messages=user("hi"))
    assert (
        caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == "authentication_error"
    )
    lower = httpx.post(
        f"{scripted.url}/v1/messages/count_tokens",
        headers={"authorization": f"bearer {KEY}"},
        json={"model": MODEL, "messages": user("hi")},
    )
    assert lower.status_code == 200 and lower.json()["input_tokens"] > 0


@pytest.mark.parametrize(
    ("body", "status", "kind", "words"),
    [
        ({"model": MODEL, "messages": user("hi")}, 400, "invalid_request_error", "max_tokens"),
        ({"model": "claude-x", "max_tokens": 5, "messages": user("hi")}, 404, "not_found_error", "claude-x"),
        (
            {"model": MODEL, "max_tokens": 5, "messages": [{"role": "robot", "content": "x"}]},
            400,
            None,
            "role",
        ),
        ({"model": MODEL, "max_tokens": 0, "messages": user("hi")}, 400, None, "max_tokens"),
        ({"model": MODEL, "max_tokens": 5, "messages": []}, 400, None, "messages"),
        (
            {"model": MODEL, "max_tokens": 5, "temperature": 1.5, "messages": user("hi")},
            400,
            None,
            "temperature",
        ),
        (
            {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image"}]}]},
            400,
            None,
            "image",
        ),
        (
            {
                "model": MODEL,
                "max_tokens": 5,
                "messages": user("hi") + [{"role": "assistant", "content": "Sure"}],
            },
            400,
            None,
            "assistant",
        ),
        (
            {
                "model": MODEL,
                "max_tokens": 5,
                "messages": user("hi"),
                "tools": [WEATHER],
                "tool_choice": {"type": "tool"},
            },
            400,
            None,
            "name",
        ),
        (
            {
                "model": MODEL,
                "max_tokens": 5,
                "messages": user("hi"),
                "tools": [WEATHER],
                "tool_choice": {"type": "tool", "name": "nope"},
            },
            400,
            None,
            "nope",
        ),
        (
            {
                "model": MODEL,
                "max_tokens": 5,
                "messages": user("hi"),
                "thinking": {"type": "enabled", "budget_tokens": 10},
            },
            400,
            None,
            "budget_tokens",
        ),
        ({"model": MODEL, "max_tokens": 10**6, "messages": user("hi")}, 400, None, "context"),
    ],
)
def test_bad_requests_get_anthropic_errors(scripted, body, status, kind, words):
    reply = httpx.post(f"{scripted.url}/v1/messages", headers={"x-api-key": KEY}, json=body)
    assert reply.status_code == status
    data = reply.json()
    assert data["type"] == "error" and set(data["error"]) == {"type", "message"}
    assert data["error"]["type"] == (kind or "invalid_request_error")
    assert words in data["error"]["message"]


BAD_TOOL = [{"name": "f", "input_schema": {"type": 3}}]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"model": MODEL}, "messages"),
        ({"model": MODEL, "messages": user("hi"), "tools": BAD_TOOL}, "JSON Schema"),
        ({"model": "other", "messages": user("hi")}, "other"),
    ],
)
def test_count_tokens_refuses_bad_input(scripted, body, words):
    reply = httpx.post(f"{scripted.url}/v1/messages/count_tokens", headers={"x-api-key": KEY}, json=body)
    assert 400 <= reply.status_code < 500 and reply.json()["type"] == "error"
    assert words in reply.json()["error"]["message"]


def test_sdk_errors_carry_the_message(scripted):
    with pytest.raises(anthropic.NotFoundError, match="claude-x"):
        client(scripted).messages.create(model="claude-x", max_tokens=5, messages=user("hi"))
    garbage = httpx.post(
        f"{scripted.url}/v1/messages",
        headers={"x-api-key": KEY, "content-type": "application/json"},
        content=b"{",
    )
    assert garbage.status_code == 400 and garbage.json()["error"]["type"] == "invalid_request_error"
