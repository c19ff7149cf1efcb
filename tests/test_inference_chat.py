"""Harmony chat sessions (history kept in the KV cache) and the `gptoss generate` / `gptoss chat`
commands."""

import subprocess
import sys

import pytest
import torch
from openai_harmony import Message, Role

from conftest import random_model, tiny_config
from gptoss.cli import main
from gptoss.harmony import render_for_completion
from gptoss.inference import ContextFullError, SamplingParams
from gptoss.inference.chat import ChatSession, assistant_prefix, harmony_prompt, render_messages
from gptoss.tokenizer import Tokenizer, get_tokenizer


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(vocab_size=Tokenizer.N_VOCAB), seed=31)


def user(text):
    return Message.from_role_and_content(Role.USER, text)


def assistant(text, channel):
    return Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)


def last_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0, -1]


def test_a_final_answer_drops_its_reasoning_without_prefilling_the_history_again(model):
    chat = ChatSession(model, "low", "Be brief.", capacity=512)
    question, thought, answer = (
        user("What is 2+2?"),
        assistant("Add them.", "analysis"),
        assistant("4", "final"),
    )
    # What the model would write after <|start|>assistant; the session drops the stop token.
    completion = render_messages([thought, answer])[len(assistant_prefix()) : -1]
    mark = chat._begin_turn(question)
    chat.session.append(completion)
    chat.session.feed()
    before = chat.session.prefilled
    chat._end_turn(mark, [thought, answer], stopped=True)

    follow_up = user("And 3+3?")
    expected = render_for_completion([*chat.messages, follow_up])  # harmony drops the stale reasoning
    chat.session.append(render_messages([follow_up]) + assistant_prefix())
    chat.session.feed()
    assert chat.session.tokens == expected
    assert "Add them" not in get_tokenizer().decode(chat.session.tokens)
    assert chat.session.prefilled - before == len(render_messages([answer, follow_up])) + len(
        assistant_prefix()
    )
    torch.testing.assert_close(chat.session.next_logits(), last_logits(model, expected), atol=1e-4, rtol=0)


def test_turns_stream_and_keep_the_history_in_the_cache(model):
    chat = ChatSession(model, "medium", capacity=1024, params=SamplingParams(max_tokens=6, seed=0))
    events = list(chat.send("Hello"))
    assert chat.session.prefilled == len(harmony_prompt("Hello", "medium"))
    assert all(e.__class__.__module__ == "gptoss.harmony" for e in events)
    history = chat.num_tokens
    list(chat.send("Again"))
    # the second turn prefilled: the cut-off reply's last token, its <|end|>, the message, the prefix
    new = 2 + len(render_messages([user("Again")])) + len(assistant_prefix())
    assert chat.session.prefilled == len(harmony_prompt("Hello", "medium")) + new
    assert chat.num_tokens == history + new + 5  # plus the 6 sampled tokens, the last one queued
    assert chat.session.tokens[: len(harmony_prompt("Hello"))] == harmony_prompt("Hello")

    chat.set_reasoning_effort("high")  # the system message changes: one full prefill, then as before
    assert chat.session.pending == render_for_completion(chat.messages)[: -len(assistant_prefix())]
    list(chat.send("Once more"))
    chat.reset()
    assert chat.session.pending == render_messages(chat.messages) and len(chat.messages) == 1
    with pytest.raises(ValueError, match="reasoning_effort"):
        chat.set_reasoning_effort("extreme")


def test_generate_command_streams_a_raw_completion_reproducibly(capsys):
    args = ["generate", "gpt-oss-nano", "Once upon a time", "--raw", "--max-tokens", "6", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.strip()
    assert main([*args[:-1], "4"]) == 0
    assert capsys.readouterr().out != first


def test_generate_command_in_harmony_format_runs_and_reports_bad_arguments(capsys):
    assert main(["generate", "gpt-oss-nano", "Hi", "--max-tokens", "4", "--temperature", "0", "--int8"]) == 0
    assert main(["generate", "gpt-oss-nano", "Hi", "--top-p", "1.5"]) == 2
    assert "top_p must lie in [0, 1]" in capsys.readouterr().err


def test_chat_command_drives_a_conversation_from_stdin():
    script = "Hello\n/effort low\n/effort extreme\nHello\n/show\n/bogus\n/reset\nHello\n/exit\n"
    run = subprocess.run(
        [sys.executable, "-m", "gptoss.cli", "chat", "gpt-oss-nano", "--max-tokens", "5", "--seed", "1"],
        input=script,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "random initialisation" in run.stderr
    assert "reasoning effort: low" in out and "must be one of" in out
    assert "unknown command /bogus" in out and "conversation reset" in out
    counts = [line.split(" / ")[0] for line in out.splitlines() if " / 32,768 tokens" in line]
    # turn 2 adds to the history of turn 1; after /reset the same question starts from scratch again
    first, second, third = (int(c.replace(",", "")) for c in counts)
    assert second > first and third < second


def test_a_full_context_is_reported_and_reset_recovers(model):
    header = len(render_messages(ChatSession(model, capacity=512).messages))
    chat = ChatSession(model, capacity=header + 4, params=SamplingParams(max_tokens=2, seed=0))
    with pytest.raises(ContextFullError):
        list(chat.send("This message is longer than the room left"))
    chat.reset()
    assert chat.num_tokens == header
