"""The bundled gptoss-nano: it ships inside the package, loads with no download, answers in valid
harmony with Python code (its domain), and serves through the official openai client."""

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch

from gptoss import load_model
from gptoss.checkpoint import DEFAULT_MODEL, bundled_model_dir, checkpoint_facts
from gptoss.cli import main
from gptoss.harmony import chat_messages_to_harmony, parse_completion, render_for_completion
from gptoss.inference import generate
from gptoss.model_card import LICENSE_NAME
from gptoss.tokenizer import Tokenizer

# Not one of the training conversations (those come from the standard library's own functions).
REQUEST = "Write a Python function `count_vowels(text)` to return the number of vowels in text."


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


def test_chat_answer_is_harmony_with_a_final_python_answer(nano):
    assert nano.config.vocab_rows is not None  # the trimmed vocabulary described in the card
    prompt = render_for_completion(chat_messages_to_harmony([{"role": "user", "content": REQUEST}]))
    tokens = generate(
        nano, [prompt], max_new_tokens=400, temperature=0.0, stop_token_ids=Tokenizer.STOP_TOKENS
    )[0]
    assert tokens[-1] == Tokenizer.RETURN  # it finished its turn on its own
    messages = parse_completion(tokens)
    finals = [m for m in messages if m.channel == "final"]
    assert len(finals) == 1
    assert "def " in finals[0].content[0].text  # on-domain: it answers with Python


def test_cli_generate_uses_the_bundled_model_by_default(capsys):
    assert main(["generate", REQUEST, "--temperature", "0", "--max-tokens", "400"]) == 0
    assert "def " in capsys.readouterr().out


def test_gptoss_serve_with_no_model_serves_the_bundled_one(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "gptoss.cli", "serve", "--port", str(port), "--max-batch", "2"]
    command += ["--responses-db", str(tmp_path / "r.db")]
    env = {k: v for k, v in os.environ.items() if k != "GPTOSS_API_KEY"}
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "gptoss serve did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
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
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
