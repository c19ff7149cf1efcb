"""Ollama's API on a live server, through the official `ollama` Python client: chat, generate,
streams, think, tools, format, options, tags/show/ps/version, and Ollama's error shape."""

from __future__ import annotations

import json

import httpx
import ollama
import pytest

from test_server_support import MODEL, ScriptedRunner, harmony, live_server, model_server

SCRIPTS = {
    "think first": "<|channel|>analysis<|message|>Two plus two is four.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>4<|return|>",
    "weather?": "<|channel|>analysis<|message|>I should call the tool.<|end|>"
    "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>"
    '{"city": "Paris"}<|call|>',
    "Sunny, 21C": "<|channel|>final<|message|>It is sunny in Paris.<|return|>",
    "json please": '<|channel|>final<|message|>{"city": "Paris"}<|return|>',
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def script(prompt: str) -> list[int]:
    key = max(SCRIPTS, key=lambda k: prompt.rfind(k))
    return harmony(SCRIPTS[key] if key in prompt else "<|channel|>final<|message|>Hello!<|return|>")


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    runner = ScriptedRunner(script)
    with live_server(runner, tmp_path_factory.mktemp("ollama")) as server:
        server.runner = runner
        server.ollama = ollama.Client(host=server.url)
        yield server


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    with model_server(tmp_path_factory.mktemp("ollama-real")) as server:
        server.ollama = ollama.Client(host=server.url)
        yield server


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_chat_and_its_stream_agree_on_the_real_model(real):
    options = {"temperature": 0, "num_predict": 10}
    reply = real.ollama.chat(model=MODEL, messages=user("Hello there"), options=options)
    assert reply.done and reply.done_reason in ("stop", "length") and reply.model == MODEL
    assert 1 <= reply.eval_count <= 10 and reply.prompt_eval_count > 10
    parts = list(real.ollama.chat(model=MODEL, messages=user("Hello there"), options=options, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == reply.message.content
    assert "".join(p.message.thinking or "" for p in parts) == (reply.message.thinking or "")
    assert parts[-1].eval_count == reply.eval_count and parts[-1].done_reason == reply.done_reason


def test_num_predict_bounds_the_answer(real):
    reply = real.ollama.generate(model=MODEL, prompt="Tell me a story", options={"num_predict": 3, "seed": 1})
    assert reply.eval_count == 3 and reply.done_reason == "length"


def test_think_levels_and_thinking_in_and_out(scripted):
    c = scripted.ollama
    reply = c.chat(model=MODEL, messages=user("think first"), think=True)
    assert (reply.message.thinking, reply.message.content) == ("Two plus two is four.", "4")
    assert "Reasoning: medium" in scripted.runner.prompt_log[-1]
    reply = c.chat(model=MODEL, messages=user("think first"), think="high")
    assert (
        reply.message.thinking == "Two plus two is four."
        and "Reasoning: high" in scripted.runner.prompt_log[-1]
    )
    reply = c.chat(model=MODEL, messages=user("think first"), think=False)
    assert reply.message.thinking is None and reply.message.content == "4"
    assert "Reasoning: low" in scripted.runner.prompt_log[-1]

    parts = list(c.chat(model=MODEL, messages=user("think first"), think=True, stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == "Two plus two is four."
    assert "".join(p.message.content for p in parts) == "4"


def test_generate_streams_the_final_answer_and_thinking(scripted):
    c = scripted.ollama
    reply = c.generate(model=MODEL, prompt="think first", system="You add numbers.", think=True)
    assert (reply.response, reply.thinking, reply.done_reason) == ("4", "Two plus two is four.", "stop")
    assert "You add numbers." in scripted.runner.prompt_log[-1]
    parts = list(c.generate(model=MODEL, prompt="think first", stream=True))
    assert "".join(p.response for p in parts) == "4" and parts[-1].done
    raw = httpx.post(scripted.url + "/api/generate", json={"model": MODEL, "prompt": "think first"})
    assert raw.headers["content-type"] == "application/x-ndjson"  # Ollama streams by default
    lines = [json.loads(line) for line in raw.text.splitlines()]
    assert "".join(line["response"] for line in lines) == "4" and lines[-1]["done"]
    loaded = c.generate(model=MODEL, prompt="")
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""


def test_tool_calls_and_tool_results(scripted):
    c = scripted.ollama
    messages = user("What is the weather? weather?")
    reply = c.chat(model=MODEL, messages=messages, tools=[WEATHER])
    [call] = reply.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    parts = list(c.chat(model=MODEL, messages=messages, tools=[WEATHER], stream=True))
    streamed = [call for p in parts for call in p.message.tool_calls or []]
    assert [(t.function.name, t.function.arguments) for t in streamed] == [("get_weather", {"city": "Paris"})]

    follow = messages + [reply.message, {"role": "tool", "content": "Sunny, 21C", "tool_name": "get_weather"}]
    answer = c.chat(model=MODEL, messages=follow, tools=[WEATHER])
    assert answer.message.content == "It is sunny in Paris."
    prompt = scripted.runner.prompt_log[-1]
    assert "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>Sunny, 21C" in prompt
    assert '<|constrain|>json<|message|>{"city": "Paris"}<|call|>' in prompt


def test_format_schema_reaches_the_prompt(scripted):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    reply = scripted.ollama.chat(model=MODEL, messages=user("json please"), format=schema)
    assert json.loads(reply.message.content) == {"city": "Paris"}
    assert (
        "# Response Formats" in scripted.runner.prompt_log[-1] and '"city"' in scripted.runner.prompt_log[-1]
    )


def test_model_listing_routes(scripted, real):
    [model] = real.ollama.list().models
    assert model.model == MODEL and model.size > 0 and model.details.family == "gptoss"
    shown = real.ollama.show(MODEL)
    assert "tools" in shown.capabilities and shown.modelinfo["gptoss.context_length"] == 512
    [running] = real.ollama.ps().models
    assert running.model == MODEL and running.context_length == 512
    assert httpx.get(f"{real.url}/api/version").json()["version"]
    assert scripted.ollama.chat(model=MODEL + ":latest", messages=user("hi")).message.content == "Hello!"


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        ("/api/chat", {"model": "llama3", "messages": user("hi")}, 404, "llama3"),
        ("/api/chat", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
        ("/api/chat", {"model": MODEL, "messages": user("hi"), "think": "extreme"}, 400, "think"),
        (
            "/api/chat",
            {"model": MODEL, "messages": user("hi"), "options": {"temperature": 9}},
            400,
            "temperature",
        ),
        (
            "/api/chat",
            {"model": MODEL, "messages": user("hi"), "options": {"num_predict": 0}},
            400,
            "num_predict",
        ),
        ("/api/chat", {"model": MODEL, "messages": user("hi"), "format": {"type": 12}}, 400, "format"),
        ("/api/chat", {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, 400, "tool_name"),
        (
            "/api/chat",
            {"model": MODEL, "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]},
            400,
            "images",
        ),
        (
            "/api/chat",
            {"model": MODEL, "messages": user("hi"), "options": {"num_predict": 10**6}},
            400,
            "context",
        ),
        ("/api/chat", {"messages": user("hi")}, 400, "model"),
        ("/api/generate", {"model": MODEL, "prompt": "hi", "raw": True}, 400, "/v1/completions"),
        ("/api/generate", {"model": MODEL, "prompt": "hi", "suffix": "end"}, 400, "suffix"),
        ("/api/generate", {"model": MODEL, "prompt": 3}, 400, "prompt"),
        ("/api/show", {"model": "llama3"}, 404, "llama3"),
        ("/api/show", {}, 400, "model"),
    ],
)
def test_bad_requests_get_ollama_errors(scripted, path, body, status, words):
    reply = httpx.post(scripted.url + path, json=body)
    assert reply.status_code == status
    assert list(reply.json()) == ["error"] and words in reply.json()["error"]


def test_bodies_are_json_whatever_their_content_type(scripted):
    """Ollama's own examples post with `curl -d`, which sends a form content type."""
    body = json.dumps({"model": MODEL, "messages": user("think first"), "stream": False})
    for kind in (None, "application/x-www-form-urlencoded", "text/plain"):
        headers = {"content-type": kind} if kind else {}
        reply = httpx.post(scripted.url + "/api/chat", content=body, headers=headers)
        assert reply.status_code == 200 and reply.json()["message"]["content"] == "4"


def test_the_client_raises_response_error(scripted):
    with pytest.raises(ollama.ResponseError) as caught:
        scripted.ollama.chat(model="llama3", messages=user("hi"))
    assert caught.value.status_code == 404 and "llama3" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        list(scripted.ollama.chat(model=MODEL, messages=user("hi"), think="extreme", stream=True))
    assert caught.value.status_code == 400
    garbage = httpx.post(
        scripted.url + "/api/chat", content=b"{", headers={"content-type": "application/json"}
    )
    assert garbage.status_code == 400 and "JSON" in garbage.json()["error"]


def test_a_key_is_asked_for_in_ollama_shape(tmp_path):
    with live_server(ScriptedRunner(script), tmp_path, api_keys=("k3y",)) as server:
        refused = httpx.post(server.url + "/api/chat", json={"model": MODEL, "messages": user("hi")})
        assert refused.status_code == 401 and "API key" in refused.json()["error"]
        with pytest.raises(ollama.ResponseError) as caught:
            ollama.Client(host=server.url).list()
        assert caught.value.status_code == 401
        keyed = ollama.Client(host=server.url, headers={"Authorization": "Bearer k3y"})
        assert keyed.chat(model=MODEL, messages=user("hi")).message.content == "Hello!"
