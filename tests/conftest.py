"""Shared fixtures: tiny configs that run in milliseconds and exercise every code path."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from gptoss import GptOss, ModelConfig, ops
from gptoss.trimmed_vocab import trim_vocabulary


def tiny_config(**changes) -> ModelConfig:
    """A few layers, hidden 64, a sliding window of 5 so that short sequences cross it.

    The vocabulary is small, so the special ids move inside it (transformers checks them).
    """
    base = dict(
        vocab_size=320,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=5,
        eos_token_id=1,
        pad_token_id=0,
        name="tiny",
    )
    return ModelConfig(**(base | changes))


def random_model(config: ModelConfig, seed: int = 0, spread: float = 0.5) -> GptOss:
    """A model with random weights everywhere, biases, sinks and norms included, so that no term of
    the math can be dropped without the logits changing."""
    generator = torch.Generator().manual_seed(seed)
    model = trim_vocabulary(GptOss(config))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * spread / param.shape[-1] ** 0.5)
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(1.0)
            if name.endswith("sinks"):
                param.copy_(torch.randn(param.shape, generator=generator))
    return model.eval()


@pytest.fixture
def tiny() -> ModelConfig:
    return tiny_config()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_health(server: subprocess.Popen, port: int, log: Path, timeout: float = 120) -> None:
    """Return once the server process answers GET /health on `port`; fail with the end of its
    output (`log`) if it exits or `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        assert server.poll() is None, log.read_text()[-3000:]
        waited = f"the server did not answer /health in {timeout} s\n"
        assert time.monotonic() < deadline, waited + log.read_text()[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)


@contextlib.contextmanager
def gptoss_serve(args: list[str], env: dict[str, str], log: Path) -> Iterator[int]:
    """`gptoss serve ARGS` in its own process on a free 127.0.0.1 port, its output into `log`:
    yields the port once /health answers, then stops the server with Ctrl-C (SIGINT)."""
    port = free_port()
    command = [sys.executable, "-m", "gptoss.cli", "serve", *args, "--port", str(port)]
    with log.open("w") as out:
        server = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_health(server, port, log)
        yield port
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """PyTorch and the native kernels on one thread for a whole test module
    (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny models run fastest so (on a busy
    machine, several times faster: each op's threads wait for one another), training tests compare
    results bitwise, and no result depends on the thread count (tests that vary it set it)."""
    before = torch.get_num_threads()
    ops.set_num_threads(1)
    yield
    ops.set_num_threads(before)
