"""The bundled gptoss-nano: it ships inside the package, loads with no download, answers in valid
harmony with Python code (its domain), and serves through the official openai client."""

import os

import openai
import pytest
import torch
from openai_harmony import Role

from conftest import gptoss_serve
from gptoss import load_model
from gptoss.checkpoint import DEFAULT_MODEL, bundled_model_dir, checkpoint_facts
from gptoss.cli import main
from gptoss.harmony import MessageEnd, chat_messages_to_harmony, parse_completion, render_for_completion
from gptoss.inference import SamplingParams, generate
from gptoss.inference.chat import ChatSession
from gptoss.model_card import LICENSE_NAME
from gptoss.tokenizer import Tokenizer

# Requests for functions the standard library does not have (the training conversations ask for
# its own documented functions).
REQUESTS = [
    "Write a Python function `count_vowels(text)` to return the number of vowels in text.",
    "Write a Python function `is_palindrome(text)` to return True if text reads the same backwards.",
    "Write a Python function `slugify(text)` to return a URL-friendly form of text.",
    "Write a Python function `flatten(items)` to return a flat list of the items of nested lists.",
    "Write a Python function `word_count(text)` to return a dict of how often each word occurs in text.",
]
REQUEST = REQUESTS[0]


@pytest.fixture(scope="module")
def nano():
    torch.manual_seed(0)
    return load_model(DEFAULT_MODEL, dtype=torch.float32)


def test_bundled_model_ships_in_the_package_within_25_mb():
    directory = bundled_model_dir()
    weights = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    assert 0 < weights <= 25 * 2**20
    card = (directory / "README.md").read_text()
    assert "demonstration model" in card and "unigram baseline" in card
    assert checkpoint_facts(directory)["license"] == LICENSE_NAME
    assert (directory / "LICENSE").is_file()


def test_answers_are_harmony_with_a_final_python_answer(nano):
    """Greedy answers parse as harmony; most end their turn with one final message holding Python.
    (A model this small does not always end: the model card gives the rate over every held-out
    request; this checks it stays a majority.)"""
    assert nano.config.vocab_rows is not None  # the trimmed vocabulary described in the card
    prompts = [
        render_for_completion(chat_messages_to_harmony([{"role": "user", "content": r}])) for r in REQUESTS
    ]
    answers = generate(
        nano, prompts, max_new_tokens=400, temperature=0.0, stop_token_ids=Tokenizer.STOP_TOKENS
    )
    good = 0
    for tokens in answers:
        messages = parse_completion(tokens)  # raises on anything that is not harmony
        finals = [m for m in messages if m.channel == "final"]
        ended = tokens[-1] == Tokenizer.RETURN
        good += ended and len(finals) == 1 and "def " in finals[0].content[0].text
    assert good >= 3, f"only {good} of {len(REQUESTS)} answers ended with a final Python answer"


def test_chat_session_keeps_the_conversation(nano):
    chat = ChatSession(nano, params=SamplingParams(max_tokens=400, temperature=0.0))
    for request in REQUESTS[:2]:
        ends = [e for e in chat.send(request) if isinstance(e, MessageEnd)]
        assert ends[-1].message.channel == "final" and ends[-1].stop == "return"
        assert "def " in ends[-1].message.content[0].text
    users = [m for m in chat.messages if m.author.role == Role.USER]
    finals = [m for m in chat.messages if m.author.role == Role.ASSISTANT and m.channel == "final"]
    assert len(users) == len(finals) == 2  # the second answer came after the first, in one chat


def test_cli_generate_uses_the_bundled_model_by_default(capsys):
    assert main(["generate", REQUEST, "--temperature", "0", "--max-tokens", "400"]) == 0
    assert "def " in capsys.readouterr().out


def test_gptoss_serve_with_no_model_serves_the_bundled_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "GPTOSS_API_KEY"}
    args = ["--max-batch", "2", "--responses-db", str(tmp_path / "r.db")]
    with gptoss_serve(args, env, tmp_path / "serve.log") as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list()] == [DEFAULT_MODEL]
        reply = client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": REQUEST}],
            temperature=0,
            max_tokens=400,
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "stop"
        assert "def " in choice.message.content
