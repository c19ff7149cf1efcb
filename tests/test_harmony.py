"""Harmony: rendering against openai-harmony, chat conversion, and the never-raising parser."""

import json
import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    HarmonyError,
    Message,
    ReasoningEffort,
    RenderConversationConfig,
    Role,
    StreamableParser,
    SystemContent,
    ToolDescription,
)

from gptoss.harmony import (
    MessageEnd,
    ReasoningDelta,
    StreamParser,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    call_header,
    chat_messages_to_harmony,
    harmony_to_chat_messages,
    parse_completion,
    render_for_completion,
    render_for_training,
    system_message,
)
from gptoss.tokenizer import Tokenizer, get_harmony_encoding, get_tokenizer

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
        "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
    },
    "required": ["location"],
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_location", "description": "Gets the location of the user."},
    },
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Gets the current weather in the provided location.",
            "parameters": WEATHER_SCHEMA,
        },
    },
]
LIB_TOOLS = [
    ToolDescription.new("get_location", "Gets the location of the user."),
    ToolDescription.new(
        "get_current_weather", "Gets the current weather in the provided location.", parameters=WEATHER_SCHEMA
    ),
]


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTOSS_CACHE", str(tmp_path_factory.mktemp("gptoss-cache")))
        yield


# -- openai-harmony spelled out by hand: the expected side of the rendering tests -----------------


def lib_system(effort=ReasoningEffort.MEDIUM, date=None, cutoff="2024-06"):
    content = SystemContent.new().with_reasoning_effort(effort).with_knowledge_cutoff(cutoff)
    if date:
        content = content.with_conversation_start_date(date)
    return Message.from_role_and_content(Role.SYSTEM, content)


def lib_developer(instructions=None, tools=None):
    content = DeveloperContent.new()
    if instructions:
        content = content.with_instructions(instructions)
    if tools:
        content = content.with_function_tools(tools)
    return Message.from_role_and_content(Role.DEVELOPER, content)


def user(text):
    return Message.from_role_and_content(Role.USER, text)


def assistant(text, channel):
    return Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)


def call(name, arguments):
    message = assistant(arguments, "commentary").with_recipient(f"functions.{name}")
    return message.with_content_type("<|constrain|>json")


def result(name, text):
    message = Message.from_author_and_content(Author.new(Role.TOOL, f"functions.{name}"), text)
    return message.with_channel("commentary").with_recipient("assistant")


def chat_call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# Each case: chat messages, tools, keyword arguments, and the same conversation written directly
# against openai-harmony. Every case is one where openai-harmony's own reasoning-dropping rule
# agrees with the spec, so the library's default rendering is the reference.
RENDER_CASES = {
    "plain": ([{"role": "user", "content": "Hi"}], None, {}, [lib_system(), user("Hi")]),
    "low_effort_dates": (
        [{"role": "user", "content": "What day is it?"}],
        None,
        {"reasoning_effort": "low", "current_date": "2025-06-28", "knowledge_cutoff": "2024-01"},
        [lib_system(ReasoningEffort.LOW, "2025-06-28", "2024-01"), user("What day is it?")],
    ),
    "high_effort_instructions": (
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}],
        None,
        {"reasoning_effort": "HIGH"},
        [lib_system(ReasoningEffort.HIGH), lib_developer("Be terse."), user("2+2?")],
    ),
    "developer_role_and_text_parts": (
        [
            {
                "role": "developer",
                "content": [{"type": "text", "text": "Answer "}, {"type": "text", "text": "in French."}],
            },
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": [{"type": "text", "text": "Bonjour"}]},
        ],
        None,
        {},
        [lib_system(), lib_developer("Answer in French.\n\nBe kind."), user("Bonjour")],
    ),
    "tools_without_instructions": (
        [{"role": "user", "content": "Weather in SF?"}],
        TOOLS,
        {},
        [lib_system(), lib_developer(tools=LIB_TOOLS), user("Weather in SF?")],
    ),
    "tool_loop_in_progress_keeps_reasoning": (
        [
            {"role": "system", "content": "Use a friendly tone."},
            {"role": "user", "content": "Weather in SF?"},
            {
                "role": "assistant",
                "reasoning_content": "Need the weather tool.",
                "content": None,
                "tool_calls": [chat_call("c1", "get_current_weather", '{"location":"San Francisco"}')],
            },
            {"role": "tool", "tool_call_id": "c1", "content": '{"sunny": true, "temperature": 20}'},
        ],
        TOOLS,
        {},
        [
            lib_system(),
            lib_developer("Use a friendly tone.", LIB_TOOLS),
            user("Weather in SF?"),
            assistant("Need the weather tool.", "analysis"),
            call("get_current_weather", '{"location":"San Francisco"}'),
            result("get_current_weather", '{"sunny": true, "temperature": 20}'),
        ],
    ),
    "preamble_and_parallel_calls": (
        [
            {"role": "user", "content": "Weather here and in Paris?"},
            {
                "role": "assistant",
                "reasoning": "Two calls.",
                "content": "Checking both places.",
                "tool_calls": [
                    chat_call("a", "get_location", "{}"),
                    {
                        "id": "b",
                        "function": {"name": "get_current_weather", "arguments": {"location": "Paris"}},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "a", "content": "Berlin"},
            {"role": "tool", "tool_call_id": "b", "content": "rain"},
        ],
        TOOLS,
        {},
        [
            lib_system(),
            lib_developer(tools=LIB_TOOLS),
            user("Weather here and in Paris?"),
            assistant("Two calls.", "analysis"),
            assistant("Checking both places.", "commentary"),
            call("get_location", "{}"),
            call("get_current_weather", '{"location": "Paris"}'),
            result("get_location", "Berlin"),
            result("get_current_weather", "rain"),
        ],
    ),
    "finished_turn_drops_reasoning": (
        [
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "reasoning_content": "Simple arithmetic.", "content": "4."},
            {"role": "user", "content": "And 9 / 2?"},
        ],
        None,
        {},
        [
            lib_system(),
            user("What is 2 + 2?"),
            assistant("Simple arithmetic.", "analysis"),
            assistant("4.", "final"),
            user("And 9 / 2?"),
        ],
    ),
    "finished_tool_turn_drops_all_its_reasoning": (
        [
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "reasoning_content": "Call the tool.",
                "tool_calls": [chat_call("x", "get_location", "")],
            },
            {"role": "tool", "tool_call_id": "x", "content": "Oslo"},
            {"role": "assistant", "reasoning_content": "Got Oslo.", "content": "You are in Oslo."},
            {"role": "user", "content": "Thanks!"},
        ],
        TOOLS,
        {},
        [
            lib_system(),
            lib_developer(tools=LIB_TOOLS),
            user("Weather?"),
            assistant("Call the tool.", "analysis"),
            call("get_location", ""),
            result("get_location", "Oslo"),
            assistant("Got Oslo.", "analysis"),
            assistant("You are in Oslo.", "final"),
            user("Thanks!"),
        ],
    ),
}


@pytest.mark.parametrize("case", RENDER_CASES)
def test_rendering_is_token_identical_to_openai_harmony(case):
    chat, tools, kwargs, expected = RENDER_CASES[case]
    ours = render_for_completion(chat_messages_to_harmony(chat, tools, **kwargs))
    reference = get_harmony_encoding().render_conversation_for_completion(
        Conversation.from_messages(expected), Role.ASSISTANT
    )
    if not any(m.recipient for m in expected):
        assert ours == reference
    # openai-harmony puts a call's recipient before the channel; we render it where gpt-oss writes it.
    tok = get_tokenizer()
    written = re.sub(
        r"<\|start\|>assistant to=(\S+?)<\|channel\|>(\w+)",
        r"<|start|>assistant<|channel|>\2 to=\1",
        tok.decode(reference),
    )
    assert tok.decode(ours) == written
    assert ours[-2:] == [Tokenizer.START, *get_tokenizer().encode("assistant")]


def test_rendering_matches_the_harmony_spec_text():
    """The function-calling example of the harmony format guide, character for character."""
    tools = [
        *TOOLS,
        {
            "name": "get_multiple_weathers",
            "description": "Gets the current weather in the provided list of locations.",
            "parameters": {
                "type": "object",
                "properties": {
                    "locations": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": 'List of city and state, e.g. ["San Francisco, CA", "New York, NY"]',
                    },
                    "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
                },
                "required": ["locations"],
            },
        },
    ]
    chat = [
        {"role": "system", "content": "Use a friendly tone."},
        {"role": "user", "content": "What is the weather like in SF?"},
        {
            "role": "assistant",
            "reasoning_content": "Need to use function get_weather.",
            "tool_calls": [chat_call("1", "get_weather", '{"location":"San Francisco"}')],
        },
        {"role": "tool", "tool_call_id": "1", "content": '{"sunny": true, "temperature": 20}'},
    ]
    messages = chat_messages_to_harmony(chat, tools, reasoning_effort="high", current_date="2025-06-28")
    expected_prompt = (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        "Knowledge cutoff: 2024-06\nCurrent date: 2025-06-28\n\nReasoning: high\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message.\n"
        "Calls to these tools must go to the commentary channel: 'functions'.<|end|>"
        "<|start|>developer<|message|># Instructions\n\nUse a friendly tone.\n\n# Tools\n\n## functions\n\n"
        "namespace functions {\n\n// Gets the location of the user.\ntype get_location = () => any;\n\n"
        "// Gets the current weather in the provided location.\ntype get_current_weather = (_: {\n"
        "// The city and state, e.g. San Francisco, CA\nlocation: string,\n"
        'format?: "celsius" | "fahrenheit", // default: celsius\n}) => any;\n\n'
        "// Gets the current weather in the provided list of locations.\ntype get_multiple_weathers = (_: {\n"
        '// List of city and state, e.g. ["San Francisco, CA", "New York, NY"]\nlocations: string[],\n'
        'format?: "celsius" | "fahrenheit", // default: celsius\n}) => any;\n\n'
        "} // namespace functions<|end|><|start|>user<|message|>What is the weather like in SF?<|end|>"
    )
    text = get_tokenizer().decode(render_for_completion(messages))
    assert text.startswith(expected_prompt)
    assert text.endswith(
        "<|start|>assistant<|channel|>analysis<|message|>Need to use function get_weather.<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
        '{"location":"San Francisco"}<|call|>'
        "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"
        '{"sunny": true, "temperature": 20}<|end|><|start|>assistant'
    )


MULTI_TURN = [
    system_message(),
    user("q1"),
    assistant("think1", "analysis"),
    assistant("ans1", "final"),
    user("q2"),
    assistant("think2", "analysis"),
    assistant("ans2", "final"),
    user("q3"),
    assistant("think3", "analysis"),
    call("get_location", "{}"),
    result("get_location", "Oslo"),
]


def test_reasoning_of_every_finished_turn_is_dropped():
    text = get_tokenizer().decode(render_for_completion(MULTI_TURN))
    assert "think1" not in text and "think2" not in text  # turns that ended in a final answer
    assert "think3" in text  # the tool loop in progress continues from its reasoning
    assert all(f"ans{i}" in text for i in (1, 2))
    # Why we do not leave this to openai-harmony: its auto_drop_analysis keeps the reasoning of
    # every turn after the first final one (0.0.8). If this starts failing, the library was fixed.
    library = get_harmony_encoding().render_conversation_for_completion(
        Conversation.from_messages(MULTI_TURN[:8]), Role.ASSISTANT
    )
    assert "think2" in get_tokenizer().decode(library)


def _spans(mask):
    """(begin, end) of each run of True in the mask."""
    spans, begin = [], None
    for i, bit in enumerate([*mask, False]):
        if bit and begin is None:
            begin = i
        elif not bit and begin is not None:
            spans.append((begin, i))
            begin = None
    return spans


def test_training_mask_covers_exactly_what_the_model_generates():
    final_turn = [
        assistant("think4", "analysis"),
        call("get_current_weather", '{"location":"Oslo"}'),
        result("get_current_weather", "snow"),
        assistant("think5", "analysis"),
        assistant("Snow in Oslo.", "final"),
    ]
    messages = [*MULTI_TURN[:8], *final_turn]  # two finished turns, then a tool-using final turn
    tokens, mask = render_for_training(messages)
    tok = get_tokenizer()
    assert len(tokens) == len(mask)
    text = tok.decode(tokens)
    assert "think1" not in text and "think2" not in text and "think4" in text and "think5" in text
    assert tokens[-1] == Tokenizer.RETURN
    spans = _spans(mask)
    assert [tok.decode(tokens[b:e]) for b, e in spans] == [
        "<|channel|>analysis<|message|>think4<|end|><|start|>assistant<|channel|>commentary"
        ' to=functions.get_current_weather <|constrain|>json<|message|>{"location":"Oslo"}<|call|>',
        "<|channel|>analysis<|message|>think5<|end|><|start|>assistant<|channel|>final<|message|>"
        "Snow in Oslo.<|return|>",
    ]
    # Each learned span starts exactly where generation starts at inference time.
    assert tokens[: spans[0][0]] == render_for_completion(messages[:8])
    assert tokens[: spans[1][0]] == render_for_completion(messages[:11])
    assert parse_completion(tokens[spans[1][0] : spans[1][1]]) == final_turn[3:]


# -- parsing ---------------------------------------------------------------------------------------

COMPLETIONS = {
    "final_only": [assistant("2 + 2 = 4.", "final")],
    "reasoning_and_final": [
        assistant('User asks: "What is 2 + 2?" Simple.', "analysis"),
        assistant("4", "final"),
    ],
    "tool_call": [
        assistant("Need the weather.", "analysis"),
        call("get_current_weather", '{"location":"SF"}'),
    ],
    "preamble_and_calls": [
        assistant("Plan.", "analysis"),
        assistant("**Action plan**:\n1. Locate\n2. Forecast", "commentary"),
        call("get_location", "{}"),
    ],
    "unicode": [
        assistant("思考中… 🤔👍🏽", "analysis"),
        assistant("Ответ: ½ — 日本語 👩‍👩‍👧‍👦\n\n```py\nx = 1\n```", "final"),
    ],
    "special_token_text": [assistant("The token <|end|> ends a message; <|call|> too.", "final")],
    "empty_final": [assistant("", "analysis"), assistant("", "final")],
}


def _completion_tokens(messages):
    """Tokens the model would generate for these assistant messages after the prompt."""
    prompt = [system_message(), user("question")]
    conversation = Conversation.from_messages([*prompt, *messages])
    keep_all = RenderConversationConfig(auto_drop_analysis=False)
    full = get_harmony_encoding().render_conversation_for_training(conversation, keep_all)
    prefix = render_for_completion(prompt)
    assert full[: len(prefix)] == prefix
    return full[len(prefix) :]


@pytest.mark.parametrize("case", COMPLETIONS)
def test_parse_recovers_rendered_messages_like_openai_harmony(case):
    messages = COMPLETIONS[case]
    tokens = _completion_tokens(messages)
    parser = StreamParser()
    events = [e for t in tokens for e in parser.feed(t)] + parser.finish()
    parsed = [e.message for e in events if isinstance(e, MessageEnd)]
    assert parsed == messages
    assert parser.warnings == Counter()
    assert parse_completion(tokens) == messages
    reference = get_harmony_encoding().parse_messages_from_completion_tokens(tokens[:-1], Role.ASSISTANT)
    assert parsed == reference


def test_parse_a_whole_conversation():
    messages = [
        user("Weather?"),
        *COMPLETIONS["tool_call"],
        result("get_current_weather", "sunny"),
        assistant("Sunny.", "final"),
    ]
    keep_all = RenderConversationConfig(auto_drop_analysis=False)
    tokens = get_harmony_encoding().render_conversation(Conversation.from_messages(messages), keep_all)
    assert parse_completion(tokens, role=None) == messages


def test_stream_events():
    tokens = _completion_tokens(COMPLETIONS["preamble_and_calls"])
    parser = StreamParser()
    events = [e for t in tokens for e in parser.feed(t)] + parser.finish()
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == "Plan."
    assert (
        "".join(e.text for e in events if isinstance(e, TextDelta))
        == "**Action plan**:\n1. Locate\n2. Forecast"
    )
    assert [e for e in events if isinstance(e, ToolCallStart)] == [ToolCallStart("get_location")]
    assert "".join(e.arguments for e in events if isinstance(e, ToolCallDelta)) == "{}"
    assert [e.stop for e in events if isinstance(e, MessageEnd)] == ["end", "end", "call"]
    kinds = [type(e) for e in events]
    assert kinds.index(ToolCallStart) < kinds.index(ToolCallDelta)
    assert len([e for e in events if isinstance(e, TextDelta)]) > 1  # streamed, not buffered


def test_multibyte_characters_split_across_tokens_stream_cleanly():
    tokens = _completion_tokens([assistant("🎉👍🏽 日本語", "final")])
    parser = StreamParser()
    deltas = [e.text for t in tokens for e in parser.feed(t) if isinstance(e, TextDelta)]
    assert len(tokens) > len("🎉👍🏽 日本語") // 2  # some characters really span several tokens
    assert "".join(deltas) == "🎉👍🏽 日本語" and all("\ufffd" not in d for d in deltas)


def _summary(messages):
    return [(m.author.role.value, m.channel, m.recipient, m.content[0].text) for m in messages]


# Model output as text with specials -> messages recovered (role, channel, recipient, text) and warnings.
MALFORMED = {
    "no_channel": ("<|message|>hi<|return|>", [("assistant", None, None, "hi")], {"missing_channel": 1}),
    "stop_inside_header": (
        "<|channel|>analysis<|end|>",
        [("assistant", "analysis", None, "")],
        {"missing_message": 1},
    ),
    "no_message_token": (
        "<|channel|>final Hello there,\n  friend<|return|>",
        [("assistant", "final", None, "Hello there,\n  friend")],
        {"missing_message": 1},
    ),
    "doubled_start": (
        "<|channel|>analysis<|message|>a<|end|><|start|><|start|>assistant<|channel|>final<|message|>b<|return|>",
        [("assistant", "analysis", None, "a"), ("assistant", "final", None, "b")],
        {"repeated_start": 1},
    ),
    "text_between_messages": (
        "<|channel|>analysis<|message|>a<|end|>\n\n<|start|>assistant<|channel|>final<|message|>b<|return|>",
        [("assistant", "analysis", None, "a"), ("assistant", "final", None, "b")],
        {"missing_start": 1, "abandoned_header": 1},
    ),
    "missing_start": (
        "<|channel|>analysis<|message|>a<|end|>assistant<|channel|>final<|message|>b<|return|>",
        [("assistant", "analysis", None, "a"), ("assistant", "final", None, "b")],
        {"missing_start": 1},
    ),
    "missing_start_and_role": (
        "<|channel|>analysis<|message|>a<|end|><|channel|>final<|message|>b<|return|>",
        [("assistant", "analysis", None, "a"), ("assistant", "final", None, "b")],
        {"missing_start": 1},
    ),
    "missing_end": (
        "<|channel|>analysis<|message|>a<|start|>assistant<|channel|>final<|message|>b<|return|>",
        [("assistant", "analysis", None, "a"), ("assistant", "final", None, "b")],
        {"missing_end": 1},
    ),
    "missing_end_and_start": (
        "<|channel|>analysis<|message|>a<|channel|>final<|message|>b<|return|>",
        [("assistant", "analysis", None, "a"), ("assistant", "final", None, "b")],
        {"missing_end": 1},
    ),
    "unknown_role": (
        "<|channel|>analysis<|message|>a<|end|><|start|>bogus<|channel|>final<|message|>b<|return|>",
        [("assistant", "analysis", None, "a"), ("assistant", "final", None, "b")],
        {"unknown_role": 1},
    ),
    "unknown_channel_stays_hidden": (
        "<|channel|>thoughts<|message|>hmm<|end|>",
        [("assistant", "thoughts", None, "hmm")],
        {"unknown_channel": 1},
    ),
    "constrain_in_content": (
        "<|channel|>final<|message|>a<|constrain|>b<|return|>",
        [("assistant", "final", None, "ab")],
        {"stray_special": 1},
    ),
    "constrain_before_channel": (
        "<|constrain|>json<|channel|>commentary to=functions.f<|message|>{}<|call|>",
        [("assistant", "commentary", "functions.f", "{}")],
        {},
    ),
    "empty_constrain_and_channel": (
        "<|channel|><|constrain|> to=functions.f<|message|>{}<|call|>",
        [("assistant", None, "functions.f", "{}")],
        {"bad_header": 2},
    ),
    "reserved_and_stray_specials": (
        "<|reserved_200100|><|channel|>final<|message|>a<|reserved_201000|><|startoftext|>b<|message|><|return|><|end|>",
        [("assistant", "final", None, "ab")],
        {"stray_special": 5},
    ),
    "recipient_before_channel": (
        " to=functions.get_weather<|channel|>commentary json<|message|>{}<|call|>",
        [("assistant", "commentary", "functions.get_weather", "{}")],
        {},
    ),
    "hallucinated_tool_output": (
        "<|channel|>commentary to=functions.f<|message|>{}<|call|><|start|>functions.f to=assistant"
        "<|channel|>commentary<|message|>42<|end|>",
        [("assistant", "commentary", "functions.f", "{}"), ("tool", "commentary", "assistant", "42")],
        {},
    ),
    "truncated_content": (
        "<|channel|>final<|message|>The answer is",
        [("assistant", "final", None, "The answer is")],
        {"truncated": 1},
    ),
    "truncated_header": (
        "<|channel|>analysis<|message|>a<|end|><|start|>assistant<|channel|>fin",
        [("assistant", "analysis", None, "a")],
        {"truncated": 1},
    ),
    "eos_token": ("<|channel|>final<|message|>done<|endoftext|>", [("assistant", "final", None, "done")], {}),
    "empty": ("", [], {}),
    "only_a_stop": ("<|return|>", [], {"empty_message": 1}),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_output_is_recovered(case):
    text, expected, warnings = MALFORMED[case]
    parser = StreamParser()
    events = [e for t in get_tokenizer().encode(text, allowed_special="all") for e in parser.feed(t)]
    events += parser.finish()
    assert _summary([e.message for e in events if isinstance(e, MessageEnd)]) == expected
    assert parser.warnings == Counter(warnings)


def test_a_header_that_never_ends_is_streamed_as_content():
    parser = StreamParser()
    words = " ".join(f"word{i}" for i in range(100))
    tokens = get_tokenizer().encode(f"<|channel|>final {words}", allowed_special="all")
    text = "".join(e.text for t in tokens for e in parser.feed(t) if isinstance(e, TextDelta))
    assert text and words.startswith(text)  # content arrives before the stream ends
    text += "".join(e.text for e in parser.finish() if isinstance(e, TextDelta))
    assert text == words
    assert parser.warnings == Counter({"missing_message": 1, "truncated": 1})


def test_out_of_vocabulary_ids_are_skipped():
    parser = StreamParser()
    assert parser.feed(-1) == [] and parser.feed(Tokenizer.N_VOCAB) == []
    assert parser.warnings == Counter({"unknown_token": 2})


def _check_stream(tokens, role="assistant"):
    """Feed tokens; the parser must not raise, and the deltas must add up to the messages."""
    parser = StreamParser(role)
    events = [e for t in tokens for e in parser.feed(t)] + parser.finish()
    streamed = ""
    for event in events:
        if isinstance(event, ReasoningDelta | TextDelta):
            streamed += event.text
        elif isinstance(event, ToolCallDelta):
            streamed += event.arguments
        elif isinstance(event, MessageEnd):
            message = event.message
            if message.author.role == Role.ASSISTANT:
                assert streamed == message.content[0].text
            streamed = ""
    assert streamed == ""
    assert [e.message for e in events if isinstance(e, MessageEnd)] == parse_completion(tokens, role)


STRUCTURAL = [199998, 199999, 200002, 200003, 200005, 200006, 200007, 200008, 200012, 200018, 200100]


def _word_tokens():
    tok = get_tokenizer()
    words = [
        "assistant",
        "analysis",
        "final",
        "commentary",
        " to=functions.f",
        " json",
        "user",
        " ",
        "\n",
        "{}",
        "hi",
    ]
    return sorted({t for w in words for t in tok.encode(w)})


token_ids = st.one_of(
    st.sampled_from(STRUCTURAL),
    st.integers(0, Tokenizer.N_VOCAB - 1),
    st.integers(-3, Tokenizer.N_VOCAB + 3),
    st.deferred(lambda: st.sampled_from(_word_tokens())),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(token_ids, max_size=80), st.sampled_from(["assistant", None]))
def test_random_token_streams_never_raise(tokens, role):
    _check_stream(tokens, role)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(COMPLETIONS)), st.data())
def test_mutated_completions_never_raise(case, data):
    tokens = _completion_tokens(COMPLETIONS[case])
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["delete", "insert", "replace", "truncate"]))
        i = data.draw(st.integers(0, len(tokens)))
        if op == "insert":
            tokens.insert(i, data.draw(token_ids))
        elif op == "truncate":
            tokens = tokens[:i]
        elif i < len(tokens):
            if op == "delete":
                del tokens[i]
            else:
                tokens[i] = data.draw(token_ids)
    _check_stream(tokens)


def test_openai_harmony_parser_raises_where_ours_recovers():
    """The reason StreamParser is hand-written. If this fails, openai-harmony learned to recover."""
    tokens = get_tokenizer().encode(MALFORMED["unknown_role"][0], allowed_special="all")
    parser = StreamableParser(get_harmony_encoding(), Role.ASSISTANT, strict=False)
    with pytest.raises(HarmonyError, match="Unknown role"):
        for t in tokens:
            parser.process(t)


# -- chat conversion -------------------------------------------------------------------------------

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather here and in Paris?"},
    {
        "role": "assistant",
        "content": "Looking it up.",
        "reasoning_content": "Two lookups.",
        "tool_calls": [
            chat_call("id-a", "get_location", "{}"),
            chat_call("id-b", "get_current_weather", '{"location":"Paris"}'),
        ],
    },
    {"role": "tool", "tool_call_id": "id-a", "content": "Berlin"},
    {"role": "tool", "tool_call_id": "id-b", "content": "rain"},
    {"role": "assistant", "content": "Berlin; rain in Paris.", "reasoning_content": "Answer now."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You're welcome."},
]


def _normalize_ids(chat):
    """Replace tool call ids by their order of appearance, so conversations compare equal."""
    ids = {}
    text = json.dumps(chat)
    for message in chat:
        for c in message.get("tool_calls", []):
            ids.setdefault(c["id"], f"call-{len(ids)}")
    for old, new in ids.items():
        text = text.replace(json.dumps(old), json.dumps(new))
    return json.loads(text)


def test_chat_to_harmony_and_back():
    harmony = chat_messages_to_harmony(CHAT, TOOLS)
    back = harmony_to_chat_messages(harmony)
    assert _normalize_ids(back) == _normalize_ids(CHAT)
    assert chat_messages_to_harmony(back, TOOLS) == harmony
    ids = [c["id"] for c in back[2]["tool_calls"]]
    assert [m["tool_call_id"] for m in back[3:5]] == ids and ids[0] != ids[1]


def test_parsed_completion_to_chat_message():
    tokens = _completion_tokens(COMPLETIONS["tool_call"])
    [message] = harmony_to_chat_messages(parse_completion(tokens))
    assert message["reasoning_content"] == "Need the weather."
    assert message["content"] is None
    [tool_call] = message["tool_calls"]
    assert tool_call["function"] == {"name": "get_current_weather", "arguments": '{"location":"SF"}'}
    assert tool_call["type"] == "function" and tool_call["id"].startswith("call_")
    [final] = harmony_to_chat_messages(
        parse_completion(_completion_tokens(COMPLETIONS["reasoning_and_final"]))
    )
    assert final == {
        "role": "assistant",
        "content": "4",
        "reasoning_content": 'User asks: "What is 2 + 2?" Simple.',
    }


def test_a_tool_call_is_rendered_back_as_the_model_wrote_it():
    """The prompt after a tool call extends the previous prompt with the model's own tokens, so a
    tool loop's prompts share everything up to the call's result."""
    chat = [{"role": "user", "content": "Weather in SF?"}]
    prompt = render_for_completion(chat_messages_to_harmony(chat, TOOLS))
    tok = get_tokenizer()
    written = (
        [Tokenizer.CHANNEL, *tok.encode_ordinary("analysis"), Tokenizer.MESSAGE]
        + tok.encode_ordinary("Need the weather.")
        + [Tokenizer.END, Tokenizer.START, *tok.encode_ordinary("assistant")]
        + call_header("functions.get_current_weather")
        + tok.encode_ordinary('{"location":"SF"}')
        + [Tokenizer.CALL]
    )
    [message] = harmony_to_chat_messages(parse_completion(written))
    answer = {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "sunny"}
    follow = render_for_completion(chat_messages_to_harmony([*chat, message, answer], TOOLS))
    assert follow[: len(prompt) + len(written)] == prompt + written


def test_tool_result_may_name_its_function():
    messages = chat_messages_to_harmony([{"role": "tool", "name": "get_location", "content": "Oslo"}])
    assert messages[-1] == result("get_location", "Oslo")


@pytest.mark.parametrize(
    ("chat", "kwargs", "match"),
    [
        ([{"role": "wizard", "content": "hi"}], {}, "role"),
        ([{"role": "tool", "tool_call_id": "nope", "content": "x"}], {}, "no earlier tool call"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], {}, "text only"),
        ([{"role": "user", "content": 42}], {}, "string or a list"),
        ([{"role": "user", "content": "hi"}], {"reasoning_effort": "extreme"}, "reasoning_effort"),
        ([{"role": "user", "content": "hi"}], {"tools": [{"type": "function", "function": {}}]}, "no name"),
    ],
)
def test_invalid_chat_input_is_a_clear_value_error(chat, kwargs, match):
    with pytest.raises(ValueError, match=match):
        chat_messages_to_harmony(chat, **kwargs)
