"""The server under attack, live on 127.0.0.1: schemas that try to read files or call the network
(SSRF), and keys that try to reach each other's stored responses.

The SSRF tests run a real HTTP listener that must receive nothing, and a secret file whose content
must never appear in any answer, against the pre-fix behaviour of jsonschema's default retrieval.
"""

from __future__ import annotations

import http.server
import json
import sqlite3
import threading
import time

import httpx
import openai
import pytest
from referencing.exceptions import Unresolvable

from gptoss.cli import build_parser
from gptoss.server.jsonschema_safe import UnsafeSchemaError, check_schema
from gptoss.server.output import check_json_format
from gptoss.server.prompting import JsonFormat
from gptoss.server.store import ResponseStore, StoreError, owner_of
from test_server_support import MODEL, ScriptedRunner, harmony, live_server

SECRET = "SECRET-7f3a9c"


def answer(prompt: str) -> list[int]:
    """The "model" always answers {"city": 3}: a value an `enum` read from a file would reject,
    quoting the file's content back in the error."""
    return harmony('<|channel|>final<|message|>{"city": 3}<|return|>')


class Listener:
    """An HTTP server on 127.0.0.1 that records every request it gets (it must get none)."""

    def __init__(self) -> None:
        hits = self.hits = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                hits.append(self.path)
                body = json.dumps({"enum": [SECRET]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def listener():
    server = Listener()
    yield server
    server.close()


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("secret") / "secret.json"
    path.write_text(json.dumps({"enum": [SECRET]}))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with live_server(ScriptedRunner(answer), tmp_path_factory.mktemp("ssrf")) as live:
        yield live


def external_refs(secret_file, listener) -> list[str]:
    return [
        secret_file.as_uri(),
        f"{listener.url}/schema.json",
        f"{listener.url}/schema.json#/enum",
        f"//127.0.0.1:{listener.server.server_port}/x",
        "other.json",  # relative: would be joined with a base URI and fetched
    ]


def schema_with(ref: str) -> dict:
    return {"type": "object", "properties": {"city": {"$ref": ref}}, "required": ["city"]}


def raw_post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=30)


def test_external_refs_in_chat_response_format_are_refused_unfetched(server, listener, secret_file):
    for ref in external_refs(secret_file, listener):
        fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": schema_with(ref)}}
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "response_format": fmt}
        reply = raw_post(server, "/v1/chat/completions", body)
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert ref in error["message"] and "$defs" in error["message"]
        assert SECRET not in reply.text
    assert listener.hits == []


def test_external_refs_in_responses_text_format_and_tools_are_refused_unfetched(
    server, listener, secret_file
):
    for ref in external_refs(secret_file, listener):
        text = {"format": {"type": "json_schema", "name": "w", "schema": schema_with(ref)}}
        reply = raw_post(server, "/v1/responses", {"model": MODEL, "input": "hi", "text": text})
        assert reply.status_code == 400 and ref in reply.text and SECRET not in reply.text
        tool = {"type": "function", "function": {"name": "f", "parameters": schema_with(ref)}}
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [tool]}
        reply = raw_post(server, "/v1/chat/completions", body)
        assert reply.status_code == 400 and ref in reply.text and SECRET not in reply.text
    assert listener.hits == []


def test_streamed_request_with_an_external_ref_is_refused_before_any_event(server, listener, secret_file):
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": schema_with(secret_file.as_uri())}}
    with pytest.raises(openai.BadRequestError, match=r"\$ref"):
        server.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], response_format=fmt, stream=True
        )
    assert listener.hits == []


def test_refs_within_the_schema_still_work_and_validate(server):
    schema = {
        "type": "object",
        "properties": {"city": {"$ref": "#/$defs/city"}},
        "$defs": {"city": {"type": "string"}},
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}
    reply = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], response_format=fmt, max_tokens=8
    )
    assert reply.choices  # accepted: the reference resolves inside the schema
    # The grammar keeps a served answer valid, so the validator is shown on an answer directly.
    error = check_json_format(JsonFormat("w", schema), '{"city": 3}')
    assert error is not None and "3 is not of type 'string'" in error
    assert check_json_format(JsonFormat("w", schema), '{"city": "Oslo"}') is None
    missing = {"type": "object", "properties": {"city": {"$ref": "#/$defs/nowhere"}}}
    reply = raw_post(
        server,
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": missing}},
        },
    )
    assert reply.status_code == 400 and "#/$defs/nowhere" in reply.text


def test_answer_validation_never_retrieves_even_past_the_request_check(listener, secret_file):
    """Defence in depth: the validator that checks answers is built over a registry that retrieves
    nothing, so an external ref that slipped past request validation fails closed."""
    for ref in (secret_file.as_uri(), f"{listener.url}/schema.json"):
        with pytest.raises(Unresolvable):
            check_json_format(JsonFormat("w", schema_with(ref)), '{"city": 3}')
    assert listener.hits == []


def test_metaschema_refs_and_older_drafts_are_local():
    check_schema({"$ref": "https://json-schema.org/draft/2020-12/schema"})
    draft7 = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "definitions": {"x": {"type": "string"}},
        "properties": {"a": {"$ref": "#/definitions/x"}},
    }
    check_schema(draft7)
    with pytest.raises(UnsafeSchemaError, match="nested too deeply"):
        deep: dict = {}
        for _ in range(5000):
            deep = {"items": deep}
        check_schema(deep)


# ---------------------------------------------------------------------------------------------
# Stored responses: ownership, expiry, size cap
# ---------------------------------------------------------------------------------------------


def test_a_key_cannot_read_chain_or_delete_another_keys_responses(tmp_path):
    runner = ScriptedRunner(lambda prompt: harmony("<|channel|>final<|message|>Hi.<|return|>"))
    with live_server(runner, tmp_path, api_keys=("key-a", "key-b")) as live:
        alice, bob = live.client(api_key="key-a"), live.client(api_key="key-b")
        made = alice.responses.create(model=MODEL, input="remember 42")
        for attempt in (
            lambda: bob.responses.retrieve(made.id),
            lambda: bob.responses.input_items.list(made.id),
            lambda: bob.responses.create(model=MODEL, input="what?", previous_response_id=made.id),
            lambda: bob.responses.delete(made.id),
        ):
            with pytest.raises(openai.NotFoundError) as caught:
                attempt()
            assert "remember 42" not in str(caught.value.body)
        assert alice.responses.retrieve(made.id).id == made.id
        chained = alice.responses.create(model=MODEL, input="again", previous_response_id=made.id)
        assert alice.responses.input_items.list(chained.id).data[0].content[0].text == "remember 42"
        alice.responses.delete(made.id)
        with pytest.raises(openai.NotFoundError):
            alice.responses.retrieve(made.id)


def response(i: int, size: int = 10) -> dict:
    return {"id": f"resp_{i}", "output": [], "text": "x" * size}


def test_stored_responses_expire_after_the_ttl(tmp_path):
    store = ResponseStore(tmp_path / "r.sqlite3", ttl_seconds=0.3)
    store.put(response(1), [])
    assert store.get("resp_1") is not None
    time.sleep(0.4)
    assert store.get("resp_1") is None and store.conversation("resp_1") is None
    assert not store.delete("resp_1")
    store.put(response(2), [])  # purges the expired row from the file
    rows = sqlite3.connect(tmp_path / "r.sqlite3").execute("SELECT id FROM responses").fetchall()
    assert rows == [("resp_2",)]
    store.close()


def test_the_size_cap_drops_the_oldest_responses(tmp_path):
    one = len(json.dumps(response(0, 1000))) + len("[]")
    store = ResponseStore(tmp_path / "r.sqlite3", max_bytes=3 * one)
    for i in range(5):
        store.put(response(i, 1000), [])
    assert [store.get(f"resp_{i}") is not None for i in range(5)] == [False, False, True, True, True]
    store.close()


def test_an_older_store_file_is_migrated_and_a_damaged_one_named(tmp_path):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE responses (id TEXT PRIMARY KEY, created_at REAL, response TEXT, input_items TEXT)"
    )
    db.execute(
        "INSERT INTO responses VALUES ('resp_old', ?, ?, '[]')", (time.time(), json.dumps(response(0)))
    )
    db.commit()
    db.close()
    store = ResponseStore(path)
    assert store.get("resp_old") is not None  # no key: rows of the old file stay readable
    assert store.get("resp_old", owner_of("some-key")) is None  # with a key: they are nobody's
    store.close()
    damaged = tmp_path / "damaged.sqlite3"
    damaged.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="damaged.sqlite3.*--responses-db"):
        ResponseStore(damaged)


def test_serve_options_for_keys_and_the_store():
    args = build_parser().parse_args(
        ["serve", "--api-key", "a", "--api-key", "b", "--responses-ttl", "12h", "--responses-max-mb", "5"]
    )
    assert (args.api_key, args.responses_ttl, args.responses_max_mb) == (["a", "b"], 43200.0, 5)
    assert build_parser().parse_args(["serve"]).responses_ttl == 30 * 86400
    for bad in ("0", "-3d", "soon", "d"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--responses-ttl", bad])


def test_external_refs_through_the_anthropic_and_ollama_apis_are_refused_unfetched(
    server, listener, secret_file
):
    for ref in external_refs(secret_file, listener):
        anthropic = {
            "model": MODEL,
            "max_tokens": 8,
            "messages": [{"role": "user", "content": "hi"}],
            "output_config": {"format": {"type": "json_schema", "schema": schema_with(ref)}},
        }
        reply = raw_post(server, "/v1/messages", anthropic)
        assert reply.status_code == 400 and ref in reply.text and SECRET not in reply.text, reply.text
        ollama = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "format": schema_with(ref)}
        reply = raw_post(server, "/api/chat", ollama | {"stream": False})
        assert reply.status_code == 400 and ref in reply.text and SECRET not in reply.text, reply.text
    assert listener.hits == []
