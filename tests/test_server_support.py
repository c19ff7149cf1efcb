"""Shared pieces of the server tests: a live uvicorn server on 127.0.0.1, a tiny real model, and a
`ScriptedRunner` that makes the "model" write exact token sequences.

The scripted runner replaces only the model (it is a `gptoss.server.Runner`, the seam the app
factory takes); the scheduler, sampler, harmony parser and HTTP layer under test are the real ones.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import torch
import uvicorn
from openai import OpenAI

from conftest import random_model, tiny_config
from gptoss.inference import ModelRunner
from gptoss.server import ServerSettings, create_app
from gptoss.tokenizer import Tokenizer, get_tokenizer

MODEL = "tiny-oss"


def tiny_server_model(seed: int = 0):
    """A real gpt-oss model small enough for CPU tests, with the real 201,088-token vocabulary
    (the server speaks o200k_harmony). The output head is scaled up so that sampling is peaked:
    near-uniform distributions would turn float noise between batch sizes into different draws."""
    config = tiny_config(
        vocab_size=Tokenizer.N_VOCAB,
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=32,
        head_dim=16,
        sliding_window=8,
        eos_token_id=Tokenizer.RETURN,
        pad_token_id=Tokenizer.ENDOFTEXT,
    )
    model = random_model(config, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(12.0)
    return model


def harmony(text: str) -> list[int]:
    """Token ids of text written in harmony (special tokens spelled out)."""
    return get_tokenizer().encode(text, allowed_special="all")


class ScriptedRunner:
    """A `Runner` whose output is scripted: `script(prompt_text)` gives the tokens to generate.

    Each step returns logits that put (all but) all probability on the next scripted token, so
    every sampling setting yields the script; after it, the runner writes <|return|>.
    `step_seconds` slows decoding down, to hold sequences in flight for queue and cancel tests.
    """

    vocab_size = Tokenizer.N_VOCAB
    token_rows = None

    def __init__(
        self,
        script: Callable[[str], Sequence[int]],
        max_batch: int = 8,
        context: int = 4096,
        step_seconds: float = 0.0,
    ) -> None:
        self.script = script
        self.max_batch = max_batch
        self.context = context
        self.step_seconds = step_seconds
        self.prompts: dict[int, list[int]] = {}
        self.outputs: dict[int, list[int]] = {}
        self.active: set[int] = set()  # sequences holding a slot
        self.prompt_log: list[str] = []  # every prompt, as text

    def fit_prompt(self, tokens: Sequence[int]) -> list[int]:
        return list(tokens)

    def admits(self, tokens: int) -> bool:
        return True  # scripted logits hold no memory

    def starved(self, seqs: Sequence[int]) -> list[int]:
        return []

    def reuse(self, seq: int, prompt: Sequence[int]) -> int:
        return 0  # no prefix cache: every prompt is prefilled whole

    def _next(self, seq: int) -> torch.Tensor:
        out = self.outputs[seq]
        token = out.pop(0) if out else Tokenizer.RETURN
        logits = torch.full((self.vocab_size,), -1e4)
        logits[token] = 0.0
        return logits

    def prefill(self, seq: int, tokens: Sequence[int], last: bool) -> None:
        self.active.add(seq)
        self.prompts.setdefault(seq, []).extend(tokens)
        if last:
            text = get_tokenizer().decode(self.prompts[seq])
            self.prompt_log.append(text)
            self.outputs[seq] = list(self.script(text))

    def decode(self, tokens: Mapping[int, int | None]) -> dict[int, torch.Tensor]:
        if self.step_seconds:
            time.sleep(self.step_seconds)
        return {seq: self._next(seq) for seq in tokens}

    def release(self, seq: int) -> None:
        self.active.discard(seq)
        self.prompts.pop(seq, None)
        self.outputs.pop(seq, None)

    def reset(self) -> None:
        self.active.clear()


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 at a free port, in a thread of this process."""

    def __init__(self, app) -> None:
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, api_key: str = "unused", **kwargs) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **kwargs)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def live_server(runner, tmp_path, **settings) -> LiveServer:
    settings.setdefault("responses_db", tmp_path / "responses.sqlite3")
    return LiveServer(create_app(runner, ServerSettings(model_name=MODEL, **settings)))


def model_server(tmp_path, max_batch: int = 8, context: int = 512, **settings) -> LiveServer:
    runner = ModelRunner(tiny_server_model(), max_batch=max_batch, context=context, prefill_chunk=64)
    return live_server(runner, tmp_path, **settings)
