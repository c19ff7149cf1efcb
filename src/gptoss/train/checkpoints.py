"""Training checkpoints: written atomically, resumable at any world size, the model readable by HF.

    RUN_DIR/checkpoints/step_00000100/
        model/            config.json + model.safetensors — `gptoss.load_model` and transformers read it
                          (skipped with `hf_model = false`; `export_hf_model` writes it afterwards)
        state/            torch.distributed.checkpoint: the model and optimizer, sharded as trained
        rng/rank_00000.pt every rank's RNG states
        trainer.json      step, tokens seen, scheduler, data position, the training config
        manifest.json     every other file's size and SHA-256, written last

Every rank writes into `.tmp-step_XXXXXXXX/`; once all are done rank 0 syncs it and renames it to
`step_XXXXXXXX`. A `step_*` directory therefore only ever exists complete: a run killed mid-write
leaves a `.tmp-*` directory that resuming ignores and the next save deletes. DCP records global
shapes, so a checkpoint written by N ranks loads on M (or on one process without FSDP).

Resuming checks a checkpoint against its manifest before loading anything, so a truncated,
deleted or bit-flipped file is found and named (`DamagedCheckpoint`) rather than loaded silently or
surfacing as a library error; the trainer then falls back to the newest intact checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from gptoss.checkpoint import save_model
from gptoss.config import ModelConfig
from gptoss.model import GptOss
from gptoss.train.parallelize import DistInfo
from gptoss.trimmed_vocab import trim_vocabulary

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class DamagedCheckpoint(ValueError):
    """A training checkpoint that cannot be trusted: the message names the file and the problem."""


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def _barrier(info: DistInfo) -> None:
    if info.sharded:
        dist.barrier()


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it "assumes" one process even when told so with `no_dist`; we mean it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):  # files before the directories holding them
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def full_model_copy(model: GptOss) -> GptOss:
    """An unsharded CPU copy of `model` (collective under FSDP: every rank must call it).

    Returns the copy on rank 0 and on an unsharded model; other ranks get the model itself back.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if dist.is_initialized() and dist.get_rank() != 0:
        return model
    with torch.device("meta"):
        copy = trim_vocabulary(GptOss(model.config))
    copy.load_state_dict(state, assign=True)
    if model.config.tie_word_embeddings:
        copy.lm_head.weight = copy.model.embed_tokens.weight
    return copy


def _training_state(model: GptOss, optimizer: torch.optim.Optimizer, trainable_only: bool) -> dict[str, Any]:
    """The model's and optimizer's state as DCP saves and loads it (sharded as trained)."""
    options = StateDictOptions(ignore_frozen_params=trainable_only)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    if trainable_only:  # buffers too (an MXFP4 base's packed experts) belong to the frozen base
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        model_state = {k: v for k, v in model_state.items() if k in trainable}
    return {"model": model_state, "optimizer": optim_state}


def save_training_checkpoint(
    run_dir: str | Path,
    step: int,
    model: GptOss,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    info: DistInfo,
    keep_last: int = 3,
    hf_model: bool = True,
    trainable_only: bool = False,
) -> Path:
    """Write checkpoint `step` of the run (collective: every rank calls it); return its directory.

    `trainable_only`: the model's state is its trainable parameters alone (a LoRA run's adapters,
    not the frozen base it starts from again when resuming)."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-{final.name}"
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by a run killed while saving
            shutil.rmtree(stale)
        tmp.mkdir()
    _barrier(info)

    state = _training_state(model, optimizer, trainable_only)
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=tmp / "state", no_dist=not info.sharded)
    if hf_model:
        copy = full_model_copy(model)
        if info.is_main:
            save_model(copy, tmp / "model")
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank_{info.rank:05d}.pt")
    if info.is_main:
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
    _barrier(info)

    if info.is_main:
        write_manifest(tmp)
        _fsync_tree(tmp)
        if final.exists():  # saving a step again after resuming from it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)  # make the rename itself durable
        finally:
            os.close(fd)
        for old in checkpoint_dirs(run_dir)[: -max(keep_last, 1)]:
            shutil.rmtree(old)
    _barrier(info)
    return final


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_all(paths: list[Path]) -> list[str]:
    """SHA-256 of many files at once: hashlib releases the GIL, and a sharded checkpoint has a
    file per rank, so threads hash at the disk's pace rather than one core's (~0.4 GB/s)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(_sha256, paths))


def write_manifest(directory: Path) -> None:
    """List every file of `directory` with its size and SHA-256 in `manifest.json`, atomically."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {
        p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": digest}
        for p, digest in zip(files, _sha256_all(files), strict=True)
    }
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"version": 1, "files": entries}, indent=1) + "\n")
    os.replace(tmp, directory / MANIFEST)


def verify_checkpoint(path: str | Path) -> str | None:
    """What is wrong with checkpoint `path` by its manifest, or None when every file matches.

    A checkpoint without a manifest (written before manifests existed) is not verified here;
    loading it still turns any damage into `DamagedCheckpoint`.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return None
    try:
        entries = json.loads(manifest_path.read_text())["files"]
        sizes = {name: int(entry["bytes"]) for name, entry in entries.items()}
        digests = {name: str(entry["sha256"]) for name, entry in entries.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{manifest_path} is unreadable ({type(exc).__name__}: {exc})"
    for name, size in sizes.items():  # sizes first: cheap, and they catch truncation
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != size:
            return f"{file} has {file.stat().st_size} bytes, the manifest says {size} (truncated?)"
    names = list(digests)
    for name, actual in zip(names, _sha256_all([path / n for n in names]), strict=True):
        if actual != digests[name]:
            return f"{path / name} does not match its SHA-256 in the manifest (the file is corrupted)"
    return None


def _verified(path: Path, info: DistInfo) -> None:
    """Raise `DamagedCheckpoint` unless `path` matches its manifest (checked once, on rank 0)."""
    verdict = [verify_checkpoint(path) if info.is_main else None]
    if info.sharded:
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise DamagedCheckpoint(verdict[0])


def _reason(exc: BaseException) -> str:
    """One line about what DCP hit (its `CheckpointException` wraps each rank's error with a
    traceback in its message)."""
    if isinstance(exc, CheckpointException) and exc.failures:
        exc = next(iter(exc.failures.values()))[0]
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def load_training_checkpoint(
    path: str | Path,
    model: GptOss,
    optimizer: torch.optim.Optimizer,
    info: DistInfo,
    trainable_only: bool = False,
) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG from checkpoint `path`; return `trainer.json`.

    Works at any world size: DCP reshards. A rank that did not exist when the checkpoint was written
    keeps its freshly seeded RNG (training itself draws no random numbers; batches come from the step).
    Raises `DamagedCheckpoint` naming the file when the checkpoint does not match its manifest or
    cannot be read (the model and optimizer may then be half-loaded: load another checkpoint).
    """
    path = Path(path)
    _verified(path, info)
    trainer_file = path / "trainer.json"
    try:
        trainer_state = json.loads(trainer_file.read_text())
    except (OSError, ValueError) as exc:
        raise DamagedCheckpoint(f"{trainer_file} cannot be read: {exc}") from exc
    if not isinstance(trainer_state, dict):
        raise DamagedCheckpoint(f"{trainer_file} does not hold a JSON object")
    state = _training_state(model, optimizer, trainable_only)
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=path / "state", no_dist=not info.sharded)
        set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=StateDictOptions(strict=not trainable_only),
        )
    except (Exception, CheckpointException) as exc:  # whatever DCP's readers hit: name the directory
        raise DamagedCheckpoint(f"{path / 'state'} cannot be loaded ({_reason(exc)})") from exc
    rng_file = path / "rng" / f"rank_{info.rank:05d}.pt"
    if rng_file.is_file():
        try:
            _set_rng_state(torch.load(rng_file, weights_only=False))
        except Exception as exc:  # torch.load: OSError, pickle errors, zip errors, ...
            raise DamagedCheckpoint(f"{rng_file} cannot be loaded ({type(exc).__name__}: {exc})") from exc
    return trainer_state


def export_hf_model(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the model of a training checkpoint as an HF-layout directory, in one process.

    For runs saved with `hf_model = false` (at scale, gathering the full model on rank 0 at every
    checkpoint is too costly): DCP reassembles the shards of any world size into one CPU model.
    """
    checkpoint = Path(checkpoint)
    if problem := verify_checkpoint(checkpoint):
        raise DamagedCheckpoint(problem)
    try:
        state = json.loads((checkpoint / "trainer.json").read_text())
    except (OSError, ValueError) as exc:
        raise DamagedCheckpoint(f"{checkpoint / 'trainer.json'} cannot be read: {exc}") from exc
    model = trim_vocabulary(GptOss(ModelConfig.from_hf(state["model_config"])))
    wanted = {"model": model.state_dict()}
    with _quiet_single_process():
        dcp.load(wanted, checkpoint_id=checkpoint / "state", no_dist=True)  # reads the model keys only
    model.load_state_dict(wanted["model"])
    return save_model(model, out)
