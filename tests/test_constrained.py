"""Constrained decoding, live on 127.0.0.1 with the official clients: JSON Schema answers and tool
arguments that validate every time on the bundled model and on a random-weight model, the
reasoning left free, vLLM/llama.cpp fields, and clear 400s for what cannot be compiled."""

from __future__ import annotations

import http.server
import json
import threading
from typing import Literal

import anthropic
import httpx
import jsonschema
import ollama
import openai
import pytest
import torch
from pydantic import BaseModel, Field

from gptoss import load_model
from gptoss.inference import Engine, ModelRunner, SamplingParams, SequenceRequest
from gptoss.inference.grammar import Body, GrammarConstraint, HarmonyGrammar, ToolArgs
from gptoss.inference.optimize import prepare_for_inference
from gptoss.server import ServerSettings, create_app
from gptoss.server.prompting import ToolChoice, build_prompt
from gptoss.tokenizer import Tokenizer, get_tokenizer
from gptoss.vocab import token_rows
from test_server import SCRIPTS
from test_server_support import MODEL, LiveServer, model_server

BUNDLED = "gptoss-nano"
# Nested objects, an array, enums, required fields, additionalProperties false; strings and arrays
# are bounded so that even a random-weight model, which never wants to close a string, finishes.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
# The same shape, smaller: for the bundled model (a slow decoder on CPU) and for the other APIs.
SMALL = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 2},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "role", "tags", "address"],
    "additionalProperties": False,
}
WEATHER_ARGS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_ARGS = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET"]}},
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_ARGS, "strict": True}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME_ARGS}},
]
ASK = [{"role": "user", "content": "Describe a person called Ada who lives in Paris."}]


def json_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    model = prepare_for_inference(load_model(BUNDLED))
    runner = ModelRunner(model, max_batch=8, context=2048)
    db = tmp_path_factory.mktemp("bundled") / "responses.sqlite3"
    with LiveServer(create_app(runner, ServerSettings(model_name=BUNDLED, responses_db=db))) as server:
        server.runner = runner
        yield server


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random-weight model with the whole vocabulary: it never ends its reasoning by itself (the
    budget ends it) and would never close a string (the schemas bound them)."""
    with model_server(tmp_path_factory.mktemp("tiny"), max_batch=8, context=1024) as server:
        yield server


# ---------------------------------------------------------------------- answers that validate
def test_json_schema_answers_validate_every_time_on_a_random_model(tiny):
    reply = tiny.client(timeout=300).chat.completions.create(
        model=MODEL, messages=ASK, response_format=json_format(PERSON), n=8, seed=1, max_tokens=240
    )
    for c in reply.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), PERSON)


def test_json_schema_answers_validate_on_the_bundled_model_and_reasoning_stays_free(bundled):
    """Eight seeds, streamed; the analysis channel holds text the answer's grammar refuses."""
    stream = bundled.client(timeout=300).chat.completions.create(
        model=BUNDLED,
        messages=ASK,
        response_format=json_format(SMALL),
        n=8,
        seed=1,
        max_tokens=240,
        stream=True,
    )
    content, reasoning, finish = [""] * 8, [""] * 8, [None] * 8
    for chunk in stream:
        for c in chunk.choices:
            content[c.index] += c.delta.content or ""
            reasoning[c.index] += (c.delta.model_extra or {}).get("reasoning") or ""
            finish[c.index] = c.finish_reason or finish[c.index]
    assert finish == ["stop"] * 8
    for text in content:
        jsonschema.validate(json.loads(text), SMALL)
    assert any(r.strip() for r in reasoning)
    for r in filter(str.strip, reasoning):
        assert not _final_grammar_accepts(r, SMALL)


def _final_grammar_accepts(text: str, schema: dict) -> bool:
    """Whether the final channel of `schema`'s grammar would let the model write `text`."""
    constraint = HarmonyGrammar(Body("json_schema", schema, "x")).constraint(64)
    tokens = get_tokenizer().encode("<|channel|>final<|message|>", allowed_special="all")
    for token in tokens + get_tokenizer().encode_ordinary(text):
        if not constraint.allowed()[token]:
            return False
        constraint.advance(token)
    return True


@pytest.mark.parametrize(
    ("model", "choice"),
    [
        ("tiny", "required"),
        ("tiny", {"type": "function", "function": {"name": "get_weather"}}),
        ("bundled", "required"),
    ],
)
def test_forced_tool_calls_arguments_validate_every_time(request, model, choice):
    server = request.getfixturevalue(model)
    reply = server.client(timeout=300).chat.completions.create(
        model=BUNDLED if model == "bundled" else MODEL,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=TOOLS,
        tool_choice=choice,
        n=8,
        seed=3,
        max_tokens=200,
    )
    names = set()
    for c in reply.choices:
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
        call = c.message.tool_calls[0].function
        names.add(call.name)
        jsonschema.validate(
            json.loads(call.arguments), WEATHER_ARGS if call.name == "get_weather" else TIME_ARGS
        )
    assert names <= ({"get_weather", "get_time"} if choice == "required" else {"get_weather"})


def test_other_apis_formats_validate(tiny):
    """Responses `text.format`, Anthropic `output_config.format`, Ollama `format`, each through its
    own official client."""
    response = tiny.client(timeout=300).responses.create(
        model=MODEL,
        input=ASK[0]["content"],
        text={"format": {"type": "json_schema", "name": "person", "schema": SMALL, "strict": True}},
        max_output_tokens=200,
        extra_body={"seed": 5},  # reproducible: an answer cut off by the budget would not parse
    )
    jsonschema.validate(json.loads(response.output_text), SMALL)
    claude = anthropic.Anthropic(base_url=tiny.url, api_key="unused", timeout=300)
    message = claude.messages.create(
        model=MODEL,
        max_tokens=200,
        messages=ASK,
        extra_body={"output_config": {"format": {"type": "json_schema", "schema": SMALL}}, "temperature": 0},
    )
    jsonschema.validate(json.loads("".join(b.text for b in message.content if b.type == "text")), SMALL)
    chat = ollama.Client(host=tiny.url, timeout=300).chat(
        model=MODEL, messages=ASK, format=SMALL, options={"num_predict": 200, "seed": 5}
    )
    jsonschema.validate(json.loads(chat.message.content), SMALL)


def test_greedy_output_is_unchanged_by_a_constraint_it_already_satisfies(bundled):
    """Where the unconstrained greedy answer satisfies a format, constraining to that format
    changes no text: the mask only removes what the model would not have written. (Tokens may
    differ where the grammar forces text: llguidance then allows only that text's canonical
    tokens, e.g. "nt" after "assista", which this trimmed model would spell in bytes.)"""
    runner = bundled.runner
    prompt = build_prompt(
        runner, [{"role": "user", "content": "Say hello."}], tools=[], tool_choice=ToolChoice("none"),
        reasoning_effort="low",
    )  # fmt: skip
    params = SamplingParams(max_tokens=40, temperature=0)

    def greedy(*bodies: Body | None) -> list[str]:
        engine = Engine(runner, prefill_budget=runner.context, default_stop_ids=Tokenizer.STOP_TOKENS)
        for i, body in enumerate(bodies):
            constraint = None if body is None else HarmonyGrammar(body, rows=runner.token_rows).constraint(80)
            engine.add(SequenceRequest(prompt.tokens, params, i, constraint))
        out: list[list[int]] = [[] for _ in bodies]
        while engine.has_work:
            for _, event in engine.step():
                out[event.index].append(event.token)
        return [get_tokenizer().decode(tokens) for tokens in out]

    def same(a: str, b: str) -> bool:  # equal up to where the shorter stopped (same token budget)
        return a.startswith(b) or b.startswith(a)

    free, anything = greedy(None, Body("regex", "(?s:.*)", "x"))
    assert same(anything, free)
    assert "<|channel|>final<|message|>" in free  # the answer began within the budget
    answer = free.split("<|channel|>final<|message|>")[-1].removesuffix("<|return|>")
    [held] = greedy(Body("choice", [answer, answer + " (not this)"], "x"))
    assert same(held, free) and answer in held


# ---------------------------------------------------------------------- vLLM / llama.cpp fields
@pytest.mark.parametrize(
    ("extra", "check"),
    [
        ({"guided_regex": "[0-9]{3}-[a-z]{2}"}, lambda t: len(t) == 6 and t[3] == "-" and t[:3].isdigit()),
        ({"guided_choice": ["yes", "no", "maybe"]}, lambda t: t in ("yes", "no", "maybe")),
        ({"grammar": 'root ::= "a" [0-9] "z"'}, lambda t: len(t) == 3 and t[0] == "a" and t[1].isdigit()),
        (
            {
                "guided_json": {
                    "type": "object",
                    "properties": {"ok": {"type": "boolean"}},
                    "required": ["ok"],
                    "additionalProperties": False,
                }
            },
            lambda t: isinstance(json.loads(t)["ok"], bool),
        ),  # fmt: skip
        ({"structured_outputs": {"choice": ["left", "right"]}}, lambda t: t in ("left", "right")),
    ],
)
def test_vllm_and_llama_cpp_fields_constrain_the_answer(tiny, extra, check):
    reply = tiny.client(timeout=300).chat.completions.create(
        model=MODEL, messages=ASK, n=4, seed=2, max_tokens=60, extra_body=extra
    )
    for c in reply.choices:
        assert c.finish_reason == "stop" and check(c.message.content), c.message.content


def test_raw_completions_follow_a_regex(tiny):
    reply = tiny.client().completions.create(
        model=MODEL,
        prompt="The code is",
        max_tokens=40,
        n=4,
        seed=1,
        extra_body={"guided_regex": "[A-Z]{2}[0-9]{2}"},
    )
    for c in reply.choices:
        assert len(c.text) == 4 and c.text[:2].isupper() and c.text[2:].isdigit(), c.text


# ---------------------------------------------------------------------- what cannot be compiled
def _error(server, body: dict) -> dict:
    response = httpx.post(
        f"{server.url}/v1/chat/completions", json={"model": MODEL, "messages": ASK} | body, timeout=60
    )
    assert response.status_code == 400, response.text
    return response.json()["error"]


def test_bad_formats_are_400s_that_name_the_part(tiny):
    lookahead = {"type": "string", "pattern": "(?=x)x"}  # llguidance has no lookarounds
    error = _error(
        tiny, {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": lookahead}}}
    )
    assert error["param"] == "response_format.json_schema.schema" and "cannot be compiled" in error["message"]
    strict_tool = {"type": "function", "function": {"name": "f", "parameters": lookahead, "strict": True}}
    error = _error(tiny, {"tools": [TOOLS[0], strict_tool], "tool_choice": "required"})
    assert error["param"] == "tools[1].function.parameters"
    error = _error(
        tiny,
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 12}}}},
    )
    assert "response_format" in error["param"] and "not a valid JSON Schema" in error["message"]
    assert _error(tiny, {"grammar": "root ::= (("})["param"] == "grammar"
    assert _error(tiny, {"guided_regex": "[a-"})["param"] == "guided_regex"
    assert _error(tiny, {"guided_choice": []})["param"] == "guided_choice"
    error = _error(tiny, {"guided_regex": "a", "guided_choice": ["b"]})
    assert "not several" in error["message"]
    error = _error(tiny, {"guided_regex": "a", "response_format": {"type": "json_object"}})
    assert error["param"] == "guided_regex"
    # A non-strict tool whose schema cannot be compiled is held to "any JSON object" instead (which a
    # random model never closes: the call is cut by max_tokens, but it is a call and begins an object).
    loose = {"type": "function", "function": {"name": "f", "parameters": lookahead}}
    reply = tiny.client().chat.completions.create(
        model=MODEL, messages=ASK, tools=[loose], tool_choice="required", max_tokens=30, seed=1
    )
    assert reply.choices[0].message.tool_calls[0].function.arguments.startswith("{")


def test_an_external_ref_is_never_fetched(tiny):
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"type": "string"}')

        def log_message(self, *args):
            pass

    with http.server.HTTPServer(("127.0.0.1", 0), Handler) as remote:
        threading.Thread(target=remote.serve_forever, daemon=True).start()
        schema = {
            "type": "object",
            "properties": {"a": {"$ref": f"http://127.0.0.1:{remote.server_port}/a.json"}},
        }
        error = _error(
            tiny, {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
        )
        remote.shutdown()
    assert error["param"] == "response_format.json_schema.schema"
    assert hits == []


# ---------------------------------------------------------------------- the grammar itself
@pytest.mark.parametrize("key", ["weather?", "Sunny, 21C", "think first", "preamble please", "json valid"])
def test_the_grammar_accepts_what_gpt_oss_writes(key):
    """The channel orders of the server tests' scripts, as gpt-oss writes them."""
    tools = (ToolArgs("get_weather", {"type": "object"}, "t"), ToolArgs("get_time", None, "t"))
    body = Body("json_schema", {"type": "object"}, "x") if key.startswith("json") else None
    constraint = HarmonyGrammar(body, tools).constraint(400)
    for token in get_tokenizer().encode(SCRIPTS[key], allowed_special="all"):
        assert constraint.allowed()[token]
        constraint.advance(token)
    assert constraint.is_accepting()


def test_the_reasoning_budget_makes_the_model_answer():
    """Past half of max_tokens the analysis must end; then only the answer's tokens are allowed."""
    constraint = HarmonyGrammar(Body("choice", ["ok"], "x")).constraint(20)
    tokens = get_tokenizer().encode("<|channel|>analysis<|message|>", allowed_special="all")
    tokens += get_tokenizer().encode_ordinary("la " * 30)
    for i, token in enumerate(tokens):
        allowed = constraint.allowed()
        if not allowed[token]:
            assert allowed.nonzero()[:, 0].tolist() == [Tokenizer.END] and i <= 2 + 10 + 2
            return
        constraint.advance(token)
    raise AssertionError("the analysis was never cut")


def test_a_trimmed_vocabulary_can_always_follow_the_grammar():
    """A random walk over the bundled model's own rows: every step leaves some token it has."""
    rows = token_rows(load_model(BUNDLED))
    has = torch.zeros(Tokenizer.N_VOCAB, dtype=torch.bool)
    has[list(rows)] = True
    tools = (ToolArgs("get_weather", WEATHER_ARGS, "t"),)
    grammar = HarmonyGrammar(Body("json_schema", PERSON, "x"), tools, rows=rows)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        constraint = grammar.constraint(60)
        for _ in range(400):
            allowed = constraint.allowed()
            assert not (allowed & ~has).any()
            choices = allowed.nonzero()[:, 0]
            token = int(choices[torch.randint(len(choices), (1,), generator=generator)])
            constraint.advance(token)
            if token in Tokenizer.STOP_TOKENS:
                break
        assert constraint.is_accepting()


def test_a_batch_s_masks_computed_together_equal_each_row_s_own():
    """`prepare_batch` (llguidance's threads) gives every row the mask its own matcher computes,
    walk after walk; a row whose matcher failed still fails alone."""
    grammar = HarmonyGrammar(Body("json_schema", PERSON, "x"), (ToolArgs("get_weather", WEATHER_ARGS, "t"),))
    text = grammar.grammar(80)
    together = [GrammarConstraint(text) for _ in range(4)]
    alone = [GrammarConstraint(text) for _ in range(4)]
    generator = torch.Generator().manual_seed(1)
    for _ in range(40):
        GrammarConstraint.prepare_batch(together)
        for a, b in zip(together, alone, strict=True):
            mask = a.allowed()
            assert torch.equal(mask, b.allowed())
            choices = mask.nonzero()[:, 0]
            token = int(choices[torch.randint(len(choices), (1,), generator=generator)])
            if token in Tokenizer.STOP_TOKENS:
                continue  # the walk is complete: stay at its end
            a.advance(token)
            b.advance(token)
    together[0].advance(Tokenizer.RETURN)  # refused mid-answer or after it: this matcher fails
    GrammarConstraint.prepare_batch(together)
    with pytest.raises(RuntimeError, match="grammar constraint failed"):
        together[0].allowed()
    assert all(torch.equal(a.allowed(), b.allowed()) for a, b in zip(together[1:], alone[1:], strict=True))


def test_a_refused_token_fails_the_sequence_clearly():
    constraint = GrammarConstraint(HarmonyGrammar(Body("choice", ["ok"], "x")).grammar(20))
    constraint.advance(Tokenizer.RETURN)
    with pytest.raises(RuntimeError, match="grammar constraint failed"):
        constraint.allowed()


# ---------------------------------------------------------------------- frameworks' structured output
class Address(BaseModel):
    city: str = Field(max_length=8)


class Person(BaseModel):  # SMALL as pydantic writes it ($defs and $ref included)
    name: str = Field(max_length=8)
    role: Literal["admin", "user", "guest"]
    tags: list[Literal["a", "b", "c"]] = Field(max_length=2)
    address: Address


def test_langchain_with_structured_output(tiny):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=MODEL,
        base_url=f"{tiny.url}/v1",
        api_key="unused",
        max_tokens=120,
        seed=4,
        timeout=300,
    )
    for method in ("json_schema", "function_calling"):
        person = llm.with_structured_output(Person, method=method, strict=True).invoke(ASK[0]["content"])
        assert isinstance(person, Person)


def test_agents_sdk_output_type(tiny):
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, set_tracing_disabled

    set_tracing_disabled(True)  # tracing would export to OpenAI's servers
    model = OpenAIChatCompletionsModel(
        model=MODEL,
        openai_client=openai.AsyncOpenAI(base_url=f"{tiny.url}/v1", api_key="unused", timeout=300),
    )
    agent = Agent(
        name="describer",
        instructions="Describe the person asked for.",
        model=model,
        model_settings=ModelSettings(max_tokens=120),
        output_type=Person,
    )
    result = Runner.run_sync(agent, ASK[0]["content"])
    assert isinstance(result.final_output, Person)
