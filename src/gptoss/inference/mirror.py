"""One engine over several processes: rank 0 schedules, every rank runs the same model calls.

Under torchrun with tensor or expert parallelism every rank must run each forward pass together
with the others, or the collectives inside the model never meet. The engine (scheduling, sampling,
grammars, stops, the prefix cache's policy) runs on rank 0 alone; its `ModelRunner` is wrapped in a
`MirroredRunner`, which sends every call that changes the runner's state (method name and
arguments: token ids, sequence ids, flags) to the other ranks before running it. Those ranks
`follow`: they apply each call to their own identical `ModelRunner`, so their caches, rows and
prefix caches stay the same as rank 0's and their collectives line up with its. Logits are the same
on every rank, so sampling on rank 0 alone is exact.

The calls travel over a gloo process group of their own (CPU, small pickled tuples), apart from the
model's group (NCCL on GPUs): a follower waiting for the next call holds no GPU stream.

- Failures stay in step: after each call every rank reports whether it failed (and, for `reuse`,
  what it returned); rank 0 raises when any rank failed, so the engine ends the request as it would
  for a local failure and the release it then sends reaches every rank.
- Idle servers: a follower waits for the next call in a collective that times out with the group
  (30 minutes by default); while no call is sent rank 0 sends a heartbeat every `heartbeat` seconds.
- Shutdown: `close` sends a stop, and followers return. A follower ignores SIGTERM and SIGINT
  (torchrun forwards them to every rank): it stops when rank 0 says so, or when rank 0 is gone.

A call that fails on one rank only inside a forward pass (a GPU out of memory) leaves the others
waiting in the model's collectives: that is not recoverable, and the model group's timeout ends
the job.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from gptoss.inference.runner import ModelRunner
from gptoss.inference.scoring import PromptScores

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 60.0
_STOP, _BEAT = "stop", "beat"


def control_group(timeout_seconds: float | None = None) -> dist.ProcessGroup:
    """A gloo group over every rank for the calls (collective: every rank must call it)."""
    if timeout_seconds is None:
        return dist.new_group(backend="gloo")
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_seconds))


def agree(value: Any, group: dist.ProcessGroup) -> Any:
    """Rank 0's `value`, on every rank (budgets computed from free memory differ between ranks,
    and every rank's cache must take the same blocks)."""
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


# A call travels in one broadcast of this many bytes (a decode step's is a few hundred): one
# collective per call, where `broadcast_object_list` takes two (the size, then the bytes). A longer
# message (a long prompt's tokens) sends its rest in a second broadcast.
_FRAME = 1 << 12
_LENGTH = 8  # the frame starts with the message's length


def send_message(message: Any, group: dist.ProcessGroup) -> None:
    payload = pickle.dumps(message)
    frame = torch.zeros(_FRAME, dtype=torch.uint8)
    frame[:_LENGTH] = torch.tensor([len(payload)], dtype=torch.int64).view(torch.uint8)
    head, rest = payload[: _FRAME - _LENGTH], payload[_FRAME - _LENGTH :]
    frame[_LENGTH : _LENGTH + len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
    dist.broadcast(frame, src=0, group=group)
    if rest:
        dist.broadcast(torch.frombuffer(bytearray(rest), dtype=torch.uint8), src=0, group=group)


def receive_message(group: dist.ProcessGroup) -> Any:
    frame = torch.empty(_FRAME, dtype=torch.uint8)
    dist.broadcast(frame, src=0, group=group)
    length = int(frame[:_LENGTH].view(torch.int64))
    payload = frame[_LENGTH : _LENGTH + length].numpy().tobytes()
    if length > _FRAME - _LENGTH:
        rest = torch.empty(length - (_FRAME - _LENGTH), dtype=torch.uint8)
        dist.broadcast(rest, src=0, group=group)
        payload += rest.numpy().tobytes()
    return pickle.loads(payload)  # (from rank 0 of this job, as broadcast_object_list would)


def call_report(failed: bool, result: Any) -> Tensor:
    """What a rank tells rank 0 after a call: whether it failed, and the result where that is a
    count (`reuse`'s cached length, which follows from the prefix cache's state; -1 otherwise)."""
    return torch.tensor([int(failed), result if isinstance(result, int) else -1], dtype=torch.int64)


class MirroredRunner:
    """Rank 0's runner: a `ModelRunner` whose state-changing calls every other rank repeats.

    Queries (`admits`, `starved`, `verify_room`, `fit_prompt`) and attributes read the local runner.
    Marks (`mark`/`rewind`, which `Session` uses) hold tensors of one rank and are not offered.
    """

    def __init__(
        self, runner: ModelRunner, group: dist.ProcessGroup, heartbeat: float = HEARTBEAT_SECONDS
    ) -> None:
        self.runner = runner
        self.group = group
        self.ranks = dist.get_world_size(group)
        self.heartbeat = heartbeat
        self._lock = threading.Lock()  # one message at a time: the engine thread's or a heartbeat
        self._sent = time.monotonic()
        self._closed = threading.Event()
        self._beats = threading.Thread(target=self._beat, name="gptoss-heartbeat", daemon=True)
        self._beats.start()

    def __getattr__(self, name: str) -> Any:
        if name in ("mark", "rewind"):
            raise AttributeError(f"a runner mirrored over several processes offers no {name}()")
        return getattr(self.runner, name)

    # ------------------------------------------------------------------ mirrored calls
    def reuse(self, seq: int, prompt: Sequence[int]) -> int:
        return self._call("reuse", seq, list(prompt))

    def prefill(self, seq: int, tokens: Sequence[int], last: bool) -> None:
        self._call("prefill", seq, list(tokens), last)

    def decode(self, tokens: Mapping[int, int | None]) -> Mapping[int, Tensor]:
        return self._call("decode", dict(tokens))

    def verify(self, seq: int, tokens: Sequence[int]) -> Tensor:
        return self._call("verify", seq, list(tokens))

    def settle(self, seq: int, kept: int) -> None:
        self._call("settle", seq, kept)

    def release(self, seq: int) -> None:
        self._call("release", seq)

    def park(self, seq: int) -> None:
        self._call("park", seq)

    def reset(self) -> None:
        self._call("reset")

    def score(self, tokens: Sequence[int], top: int) -> PromptScores:
        return self._call("score", list(tokens), top)

    # the queries, named so that `isinstance(runner, Verifier)` holds
    def verify_room(self, seq: int) -> int:
        return self.runner.verify_room(seq)

    def _call(self, name: str, *args: Any) -> Any:
        with self._lock:
            if self._closed.is_set():
                raise RuntimeError("the other ranks have been told to stop")
            send_message((name, args), self.group)
            self._sent = time.monotonic()
            error: Exception | None = None
            try:
                result = getattr(self.runner, name)(*args)
            except Exception as exc:  # raised once the others have reported
                result, error = None, exc
            reports = [torch.empty(2, dtype=torch.int64) for _ in range(self.ranks)]
            dist.gather(call_report(error is not None, result), reports, dst=0, group=self.group)
        if error is not None:
            raise error
        mine = call_report(False, result)
        for rank, report in enumerate(reports[1:], start=1):
            if report[0]:
                raise RuntimeError(f"rank {rank} failed in {name} (its log says why)")
            if not torch.equal(report, mine):
                raise RuntimeError(
                    f"rank {rank} disagrees with rank 0 in {name}: {int(report[1])} != {result}"
                )
        return result

    # ------------------------------------------------------------------ idle and shutdown
    def _beat(self) -> None:
        while not self._closed.wait(self.heartbeat / 4):
            with self._lock:
                if not self._closed.is_set() and time.monotonic() - self._sent >= self.heartbeat:
                    send_message(_BEAT, self.group)
                    self._sent = time.monotonic()

    def close(self) -> None:
        """Tell the other ranks to stop (once; later calls raise)."""
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            send_message(_STOP, self.group)
        self._beats.join()


def follow(runner: ModelRunner, group: dist.ProcessGroup) -> None:
    """Apply rank 0's calls to `runner` until rank 0 sends the stop (a rank other than 0 runs this
    instead of a server). Raises RuntimeError if rank 0 goes away without it."""
    torch.set_grad_enabled(False)
    rank = dist.get_rank()
    signals: list[int] = []
    # torchrun forwards SIGTERM/SIGINT to every rank: rank 0 then shuts its server down and sends
    # the stop; exiting first would leave it waiting in a collective.
    previous = {
        sig: signal.signal(sig, lambda received, _: signals.append(received))
        for sig in (signal.SIGTERM, signal.SIGINT)
    }
    log.info("rank %d (pid %d): running rank 0's model calls", rank, os.getpid())
    try:
        while True:
            try:
                message = receive_message(group)
            except RuntimeError as exc:  # (gloo's errors subclass it) the connection to rank 0 broke
                if signals:  # we were told to stop too: rank 0 ended first
                    break
                raise RuntimeError(f"rank {rank}: lost rank 0 before it said stop ({exc})") from None
            if message == _STOP:
                break
            if message == _BEAT:
                continue
            name, args = message
            try:
                report = call_report(False, getattr(runner, name)(*args))
            except Exception:  # rank 0 raises in its engine, which then cleans up here too
                log.exception("rank %d: %s failed", rank, name)
                report = call_report(True, None)
            dist.gather(report, None, dst=0, group=group)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("rank %d: rank 0 stopped serving; exiting", rank)
