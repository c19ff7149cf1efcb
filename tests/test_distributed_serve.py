"""`gptoss serve --tp 2` / `--ep 2` under torchrun against one process: the same answers.

Rank 0 serves HTTP and runs the engine; rank 1 repeats its model calls (`gptoss.inference.mirror`).
The bundled gptoss-nano in fp32 answers concurrent greedy streams, a prompt that the prefix cache
then serves, and prompt scoring (echo + logprobs) as a one-process server of the same model does.
Stopping torchrun (SIGTERM as a process manager sends it, SIGINT as Ctrl-C does) ends every rank.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
import torch
from openai import OpenAI

from conftest import free_port, wait_for_health
from gptoss import load_model
from gptoss.cli import main
from gptoss.inference import ModelRunner, PrefixCache
from gptoss.inference.optimize import prepare_for_inference
from gptoss.server import ServerSettings, create_app
from test_server_support import LiveServer

MODEL = "gptoss-nano"
QUESTIONS = [
    "Write a function that reverses a string.",
    "How do I read a text file line by line?",
    "Sort a list of dictionaries by one key.",
    "Return the largest value of a list.",
]
COMPLETION = "def fibonacci(n):\n    "
SCORED = "import os\nimport sys\n\ndef main():\n    return 0\n"


def answers(client: OpenAI) -> dict:
    """Every request's output: four concurrent greedy chat streams, then a completion sent twice
    (the second one starts from the prefix cache), then the scores of a prompt."""

    def chat(question: str) -> tuple[str, str, str | None]:
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": question}],
            max_tokens=24,
            temperature=0,
            stream=True,
        )
        content, reasoning, finish = "", "", None
        for chunk in stream:
            for choice in chunk.choices:
                content += choice.delta.content or ""
                reasoning += getattr(choice.delta, "reasoning_content", None) or ""
                finish = choice.finish_reason or finish
        return content, reasoning, finish

    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        chats = list(pool.map(chat, QUESTIONS))
    completions = [
        client.completions.create(model=MODEL, prompt=COMPLETION, max_tokens=16, temperature=0)
        for _ in range(2)
    ]
    scored = client.completions.create(model=MODEL, prompt=SCORED, max_tokens=0, echo=True, logprobs=1)
    return {
        "chats": chats,
        "completions": [c.choices[0].text for c in completions],
        "cached": [c.usage.prompt_tokens_details.cached_tokens for c in completions],
        "scores": scored.choices[0].logprobs.token_logprobs[1:],
    }


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    """What a one-process server of the same model answers (as `gptoss serve` builds it)."""
    model = prepare_for_inference(load_model(MODEL, dtype=torch.float32))
    runner = ModelRunner(model, max_batch=4, context=512, prefix_cache=PrefixCache(2**28))
    settings = ServerSettings(model_name=MODEL, responses_db=tmp_path_factory.mktemp("one") / "r.db")
    with LiveServer(create_app(runner, settings)) as server:
        return answers(server.client())


CASES = {  # the layout, and the signal that stops torchrun
    "tp2": (["--tp", "2"], signal.SIGTERM),
    "ep2": (["--ep", "2", "--speculative", "suffix"], signal.SIGINT),
}


@pytest.mark.parametrize(("layout", "stop"), CASES.values(), ids=CASES.keys())
def test_serve_under_torchrun_answers_as_one_process(layout, stop, request, tmp_path):
    port, log = free_port(), tmp_path / "torchrun.log"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "gptoss.cli", "serve", MODEL, "--dtype", "float32", "--port", str(port)]
    command += ["--max-batch", "4", "--max-model-len", "512", "--responses-db", str(tmp_path / "r.db")]
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # two ranks share the cores
    with log.open("w") as out:
        server = subprocess.Popen([*command, *layout], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        one_process = request.getfixturevalue("one_process")  # (while the ranks load)
        wait_for_health(server, port, log)
        ranks = psutil.Process(server.pid).children(recursive=True)
        got = answers(OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0))
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        server.send_signal(stop)  # torchrun passes it to every rank
        server.wait(timeout=60)
    # torchrun waits for its ranks: none is left, and the follower ended on rank 0's word.
    gone, alive = psutil.wait_procs(ranks, timeout=10)
    text = log.read_text()
    assert not alive, text[-3000:]
    assert "rank 1: rank 0 stopped serving; exiting" in text and "Application shutdown complete" in text
    assert "failed" not in text and "lost rank 0" not in text, text[-3000:]

    assert all(finish is not None and content + reasoning for content, reasoning, finish in got["chats"])
    assert got["chats"] == one_process["chats"]
    assert got["completions"] == one_process["completions"] and got["completions"][0]
    assert got["cached"][1] > 0  # the second request started from the prefix cache on every rank
    assert got["scores"] == pytest.approx(one_process["scores"], abs=1e-4)
    if "--speculative" in layout:  # verify passes (the repeated completion's) ran on both ranks
        passes = next(line for line in metrics.splitlines() if line.startswith("gptoss_speculative_verify"))
        assert float(passes.split()[-1]) > 0


def test_serve_refuses_layouts_the_launch_cannot_provide(capsys, monkeypatch):
    # Each refusal names the fix and comes before any model is loaded.
    assert main(["serve", MODEL, "--tp", "2"]) == 2
    assert "--tp 2 must equal the number of processes (1) or be 1" in capsys.readouterr().err
    assert main(["serve", MODEL, "--ep", "2", "--int8"]) == 2
    assert "--int8 does not combine with --tp/--ep" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: two servers would share the port
    assert main(["serve", MODEL]) == 2
    assert "pass --tp 2 and/or --ep 2, or run gptoss serve without torchrun" in capsys.readouterr().err
