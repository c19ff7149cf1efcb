"""The Responses API, live through the official client: items, streaming events, function calls,
previous_response_id chains stored in SQLite (across a restart), store=false, GET and DELETE."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from test_server_support import MODEL, ScriptedRunner, harmony, live_server, model_server

SCRIPTS = {
    "weather?": "<|channel|>analysis<|message|>Need the tool.<|end|>"
    "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>"
    '{"city": "Oslo"}<|call|>',
    "Rainy": "<|channel|>final<|message|>Take an umbrella.<|return|>",
    "think first": "<|channel|>analysis<|message|>Easy sum.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>4<|return|>",
    "and again": "<|channel|>final<|message|>Second answer.<|return|>",
    "cut me": "<|channel|>final<|message|>" + "word " * 50 + "<|return|>",
}
TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def script(prompt: str) -> list[int]:
    """The script whose key appears last in the prompt (the newest user or tool message)."""
    key = max(SCRIPTS, key=lambda k: (prompt.rfind(k), len(k)))
    return harmony(SCRIPTS[key] if key in prompt else "<|channel|>final<|message|>Hello!<|return|>")


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return tmp_path_factory.mktemp("responses") / "store.sqlite3"


@pytest.fixture(scope="module")
def scripted(db):
    runner = ScriptedRunner(script)
    with live_server(runner, db.parent, responses_db=db) as server:
        server.runner = runner
        yield server


def test_response_with_reasoning_and_text(scripted):
    client = scripted.client()
    response = client.responses.create(model=MODEL, input="think first", instructions="Answer tersely.")
    assert response.status == "completed" and response.id.startswith("resp_")
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == "Easy sum."
    assert message.type == "message" and message.content[0].text == "4"
    assert response.output_text == "4"
    assert response.usage.output_tokens == len(harmony(SCRIPTS["think first"]))
    assert response.usage.output_tokens_details.reasoning_tokens > 0
    assert response.usage.input_tokens > 0
    assert "<|start|>developer<|message|># Instructions\n\nAnswer tersely." in scripted.runner.prompt_log[-1]
    assert client.responses.retrieve(response.id).output_text == "4"


def test_streaming_events_follow_the_responses_vocabulary(scripted):
    client = scripted.client()
    events = list(client.responses.create(model=MODEL, input="think first", stream=True))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert types.index("response.reasoning_text.delta") < types.index("response.output_text.delta")
    for kind in ("output_item.added", "content_part.added", "content_part.done", "output_item.done"):
        assert types.count(f"response.{kind}") == 2
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "4" == events[-1].response.output_text
    assert client.responses.retrieve(events[-1].response.id).output_text == "4"  # streamed, then stored
    # the SDK's own accumulator reads our events into the same final response
    with client.responses.stream(model=MODEL, input="think first") as stream:
        final = stream.get_final_response()
    assert final.output_text == "4" and final.output[0].content[0].text == "Easy sum."


def test_function_call_then_output_through_previous_response_id(scripted):
    client = scripted.client()
    first = client.responses.create(model=MODEL, input="What is the weather?", tools=[TOOL])
    reasoning, call = first.output
    assert reasoning.type == "reasoning" and call.type == "function_call"
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Oslo"})
    second = client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Rainy, 8C"}],
        tools=[TOOL],
    )
    assert second.output_text == "Take an umbrella." and second.previous_response_id == first.id
    prompt = scripted.runner.prompt_log[-1]
    assert "<|message|>What is the weather?<|end|>" in prompt  # the stored chain came back
    assert (
        '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Oslo"}<|call|>'
        in prompt
    )
    assert (
        "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>Rainy, 8C<|end|>"
        in prompt
    )
    items = client.responses.input_items.list(second.id)
    assert [item.type for item in items.data][-1] == "function_call_output"

    stream = list(
        client.responses.create(model=MODEL, input="What is the weather?", tools=[TOOL], stream=True)
    )
    deltas = "".join(e.delta for e in stream if e.type == "response.function_call_arguments.delta")
    done = next(e for e in stream if e.type == "response.function_call_arguments.done")
    assert json.loads(deltas) == json.loads(done.arguments) == {"city": "Oslo"}


def test_store_false_get_delete_and_missing_ids(scripted):
    client = scripted.client()
    kept = client.responses.create(model=MODEL, input="hi")
    unstored = client.responses.create(model=MODEL, input="hi", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="and again", previous_response_id=unstored.id)
    assert client.responses.retrieve(kept.id).id == kept.id
    client.responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept.id)
    response = httpx.delete(f"{scripted.url}/v1/responses/{kept.id}")
    assert response.status_code == 404 and response.json()["error"]["param"] == "response_id"


def test_incomplete_when_max_output_tokens_runs_out(scripted):
    response = scripted.client().responses.create(model=MODEL, input="cut me", max_output_tokens=6)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 6


def test_bad_responses_requests(scripted):
    url = f"{scripted.url}/v1/responses"
    for body, param in [
        ({"model": MODEL, "input": [{"type": "input_image", "image_url": "x"}]}, "input.0.unknown.type"),
        (
            {
                "model": MODEL,
                "input": "hi",
                "tools": [{"type": "function", "name": "f", "parameters": {"type": 1}}],
            },
            None,
        ),
        ({"model": MODEL, "input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": "other", "input": "hi"}, "model"),
    ]:
        response = httpx.post(url, json=body)
        assert 400 <= response.status_code < 500, response.text
        if param:
            assert response.json()["error"]["param"] == param


def test_stored_chain_survives_a_restart(scripted, db, tmp_path):
    first = scripted.client().responses.create(model=MODEL, input="think first")
    with live_server(ScriptedRunner(script), tmp_path, responses_db=db) as server:  # a new process state
        client = server.client()
        assert client.responses.retrieve(first.id).output_text == "4"
        second = client.responses.create(model=MODEL, input="and again", previous_response_id=first.id)
        assert second.output_text == "Second answer."


def test_responses_on_the_real_model(tmp_path):
    with model_server(tmp_path) as server:
        response = server.client().responses.create(
            model=MODEL, input="Hello", max_output_tokens=10, reasoning={"effort": "low"}
        )
        assert response.status in ("completed", "incomplete")
        assert 1 <= response.usage.output_tokens <= 10


def test_reasoning_and_call_items_sent_back_by_the_client(scripted):
    """Stateless chaining (store=False): the client replays reasoning, call and output items."""
    client = scripted.client()
    first = client.responses.create(model=MODEL, input="What is the weather?", tools=[TOOL], store=False)
    items = [{"role": "user", "content": "What is the weather?"}]
    items += [item.model_dump(exclude_none=True) for item in first.output]
    items.append({"type": "function_call_output", "call_id": first.output[1].call_id, "output": "Rainy, 8C"})
    second = client.responses.create(model=MODEL, input=items, tools=[TOOL], store=False)
    assert second.output_text == "Take an umbrella."
    prompt = scripted.runner.prompt_log[-1]
    assert "<|channel|>analysis<|message|>Need the tool.<|end|>" in prompt  # reasoning of the open turn
    assert "Rainy, 8C" in prompt
