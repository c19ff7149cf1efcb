"""Token shards on disk and the deterministic batches a trainer draws from them.

`prepare_data` turns text files, directories, JSONL (a `text` field) and Parquet into uint32 token
shards (o200k_harmony has 201,088 ids, more than uint16 holds) plus a `manifest.json`. Documents are
separated by `<|endoftext|>`. Each document goes to the validation split when a hash of its source
and position falls under `val_fraction`, so the split does not depend on worker count or file order.

A shard is a 64-byte little-endian header followed by the tokens:

    magic b"GPTOSSTK" | version u32 | header bytes u32 | tokens u64 | vocab size u32 | eot id u32 | 0…

`Batches` picks the windows of step `s` from a generator seeded by `(seed, s)` alone, so a resumed
run (or one at another world size) sees exactly the batches the uninterrupted one would have seen.
"""

from __future__ import annotations

import collections
import concurrent.futures
import fnmatch
import hashlib
import json
import multiprocessing
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

MAGIC = b"GPTOSSTK"
VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQII")
TOKEN_DTYPE = np.dtype("<u4")
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
_BATCH_CHARS = 2**20  # text per task sent to a tokenizer worker
DEFAULT_SHARD_TOKENS = 2**27  # 512 MiB of uint32: big enough to keep file counts low, small to copy

Sampling = Literal["shuffled", "random"]


# ---------------------------------------------------------------------- shard files
def write_shard(path: str | Path, tokens: np.ndarray, vocab_size: int, eot_id: int) -> Path:
    """Write one shard atomically (temporary sibling, fsync, rename)."""
    path = Path(path)
    tokens = np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE)
    header = _HEADER.pack(MAGIC, VERSION, HEADER_BYTES, len(tokens), vocab_size, eot_id)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(header.ljust(HEADER_BYTES, b"\0"))
            f.write(tokens.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@dataclass(frozen=True)
class ShardHeader:
    tokens: int
    vocab_size: int
    eot_id: int


def read_shard_header(path: str | Path) -> ShardHeader:
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES or not raw.startswith(MAGIC):
        raise ValueError(f"{path} is not a gptoss token shard (bad magic); rebuild it with prepare-data")
    magic, version, header_bytes, n, vocab, eot = _HEADER.unpack_from(raw)
    if version != VERSION or header_bytes != HEADER_BYTES:
        raise ValueError(f"{path} has shard format version {version}; this gptoss reads version {VERSION}")
    expected = HEADER_BYTES + n * TOKEN_DTYPE.itemsize
    if path.stat().st_size != expected:
        raise ValueError(
            f"{path} is {path.stat().st_size} bytes but its header promises {expected}; it is truncated "
            "or still being copied"
        )
    return ShardHeader(n, vocab, eot)


def read_shard(path: str | Path) -> np.ndarray:
    """The tokens of one shard as a read-only memory map (uint32)."""
    header = read_shard_header(path)
    if header.tokens == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(header.tokens,))


# ---------------------------------------------------------------------- reading documents
TEXT_FIELD = "text"


def _is_hidden(path: Path) -> bool:
    return any(part.startswith(".") and part not in (".", "..") for part in path.parts)


def find_inputs(inputs: Sequence[str | Path], pattern: str | None = None) -> list[tuple[Path, str]]:
    """Expand files and directories (recursively, sorted, hidden entries skipped) into input files.

    Each comes with its name for the train/val split: the path below the directory given (with the
    directory's own name), or the file name, so the split does not depend on where the corpus lives.
    """
    files: list[tuple[Path, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for found in sorted(path.rglob("*")):
                relative = found.relative_to(path)
                wanted = pattern is None or fnmatch.fnmatch(found.name, pattern)
                if wanted and found.is_file() and not _is_hidden(relative):
                    files.append((found, f"{path.resolve().name}/{relative.as_posix()}"))
        elif path.is_file():
            files.append((path, path.name))
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    if not files:
        raise FileNotFoundError(
            f"no input files found in {', '.join(map(str, inputs))}"
            + (f" matching {pattern!r}" if pattern else "")
        )
    return files


@dataclass
class _Doc:
    key: str  # source file and position: decides the split
    text: str
    nbytes: int  # input bytes consumed, for the progress bar


def _read_documents(path: Path, key: str, text_field: str, skipped: collections.Counter) -> Iterator[_Doc]:
    name = path.name.lower()
    if name.endswith(".jsonl"):
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno} is not valid JSON: {exc}") from exc
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise ValueError(f"{path}:{lineno} has no string field {text_field!r}")
                yield _Doc(f"{key}:{lineno}", record[text_field], len(line))
    elif name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ImportError("reading Parquet needs pyarrow: pip install pyarrow") from exc
        parquet = pq.ParquetFile(path)
        if text_field not in parquet.schema_arrow.names:
            raise ValueError(f"{path} has no column {text_field!r} (columns: {parquet.schema_arrow.names})")
        rows = max(parquet.metadata.num_rows, 1)
        size = path.stat().st_size
        row = 0
        for batch in parquet.iter_batches(columns=[text_field]):
            for text in batch.column(0).to_pylist():
                row += 1
                if text is not None:
                    yield _Doc(f"{key}:{row}", text, 0)
            yield _Doc("", "", size * len(batch) // rows)  # progress only
    else:
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is None or "\0" in text:  # binary files (.pyc, images) met while walking a directory
            skipped["binary files"] += 1
            yield _Doc("", "", len(raw))  # progress only
            return
        yield _Doc(key, text, len(raw))


def _split_of(key: str, val_fraction: float) -> str:
    """'val' for a stable pseudo-random `val_fraction` of document keys, else 'train'."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "little") / 2**64 < val_fraction else "train"


def _encode_batch(texts: list[str]) -> list[np.ndarray]:
    """Tokenize documents, each followed by <|endoftext|> (runs in a worker process)."""
    from gptoss.tokenizer import Tokenizer, get_tokenizer

    tokenizer = get_tokenizer()
    # encode_ordinary: a literal "<|endoftext|>" inside a document is text, not a boundary.
    return [
        np.array([*ids, Tokenizer.ENDOFTEXT], dtype=TOKEN_DTYPE)
        for ids in tokenizer.encode_ordinary_batch(texts, num_threads=1)
    ]


class _ShardWriter:
    """Appends documents to `<split>_NNNNN.bin` shards of at most `shard_tokens` tokens each."""

    def __init__(self, out: Path, split: str, shard_tokens: int, vocab_size: int, eot_id: int) -> None:
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.vocab_size, self.eot_id = vocab_size, eot_id
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[dict] = []

    def add(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens)
        self.pending_tokens += len(tokens)
        while self.pending_tokens >= self.shard_tokens:
            buffer = np.concatenate(self.pending)
            self._flush(buffer[: self.shard_tokens])
            rest = buffer[self.shard_tokens :]
            self.pending, self.pending_tokens = ([rest] if len(rest) else []), len(rest)

    def close(self) -> dict:
        if self.pending_tokens:
            self._flush(np.concatenate(self.pending))
        return {
            "tokens": sum(s["tokens"] for s in self.shards),
            "documents": sum(s["documents"] for s in self.shards),
            "shards": self.shards,
        }

    def _flush(self, tokens: np.ndarray) -> None:
        name = f"{self.split}_{len(self.shards):05d}.bin"
        write_shard(self.out / name, tokens, self.vocab_size, self.eot_id)
        documents = int(np.count_nonzero(tokens == self.eot_id))
        self.shards.append({"file": name, "tokens": len(tokens), "documents": documents})


def prepare_data(
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    val_fraction: float = 0.005,
    workers: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    text_field: str = TEXT_FIELD,
    pattern: str | None = None,
    progress: bool = True,
) -> dict:
    """Tokenize `inputs` into train/val shards under `out`; return the manifest (also `manifest.json`).

    Plain files are one document each (non-UTF-8 and binary files are skipped); `.jsonl` lines and
    `.parquet` rows are one document each, read from `text_field`. `pattern` (a glob such as
    `*.py`) filters the files found inside directories. The output is identical for any `workers`.
    """
    from gptoss.tokenizer import Tokenizer

    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError("shard_tokens must be positive")
    files = find_inputs(inputs, pattern)
    out = Path(out)
    _start_dataset(out)
    workers = workers or os.cpu_count() or 1
    vocab, eot = Tokenizer.N_VOCAB, Tokenizer.ENDOFTEXT
    writers = {split: _ShardWriter(out, split, shard_tokens, vocab, eot) for split in SPLITS}
    skipped: collections.Counter = collections.Counter()

    def batches() -> Iterator[tuple[list[str], list[str], int]]:
        """(keys, texts, input bytes) in groups of about `_BATCH_CHARS` characters."""
        keys: list[str] = []
        texts: list[str] = []
        nbytes = size = 0
        for path, key in files:
            for doc in _read_documents(path, key, text_field, skipped):
                nbytes += doc.nbytes
                if doc.text:
                    keys.append(doc.key)
                    texts.append(doc.text)
                    size += len(doc.text)
                if size >= _BATCH_CHARS:
                    yield keys, texts, nbytes
                    keys, texts, nbytes, size = [], [], 0, 0
        yield keys, texts, nbytes

    total_bytes = sum(p.stat().st_size for p, _ in files)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress)

    written = 0

    def consume(keys: list[str], encoded: list[np.ndarray], nbytes: int) -> None:
        nonlocal written
        for key, tokens in zip(keys, encoded, strict=True):
            writers[_split_of(key, val_fraction)].add(tokens)
            written += len(tokens)
        bar.update(nbytes)
        bar.set_postfix(tokens=f"{written:,}", refresh=False)

    if workers == 1:
        for keys, texts, nbytes in batches():
            consume(keys, _encode_batch(texts), nbytes)
    else:
        # spawn, not fork: the parent may hold torch's and tiktoken's threads, which fork would copy
        # in an undefined state. At most 2 batches per worker in flight bounds memory on huge inputs;
        # results are consumed in submission order, so the output does not depend on timing.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            in_flight: collections.deque = collections.deque()
            for keys, texts, nbytes in batches():
                in_flight.append((keys, pool.submit(_encode_batch, texts), nbytes))
                if len(in_flight) >= 2 * workers:
                    keys, future, nbytes = in_flight.popleft()
                    consume(keys, future.result(), nbytes)
            while in_flight:
                keys, future, nbytes = in_flight.popleft()
                consume(keys, future.result(), nbytes)
    bar.close()

    return _write_manifest(
        out,
        writers,
        tokenizer="o200k_harmony",
        val_fraction=val_fraction,
        inputs={"files": len(files), "bytes": total_bytes, "skipped": dict(skipped)},
    )


def _start_dataset(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the directory is not a dataset until we finish
    for old in [*out.glob("train_*.bin"), *out.glob("val_*.bin")]:
        old.unlink()


def _write_manifest(out: Path, writers: dict[str, _ShardWriter], **facts: Any) -> dict:
    writer = writers["train"]
    manifest = {
        "format": "gptoss-tokens",
        "version": VERSION,
        "vocab_size": writer.vocab_size,
        "eot_id": writer.eot_id,
        "dtype": "uint32",
        **facts,
        "splits": {split: w.close() for split, w in writers.items()},
    }
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)  # written last: its presence means every shard is complete
    return manifest


def write_dataset(
    out: str | Path,
    splits: dict[str, np.ndarray],
    vocab_size: int,
    eot_id: int,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
) -> dict:
    """A dataset directory from token arrays already made (another tokenizer, synthetic data).

    `splits` maps "train" and optionally "val" to 1-D arrays of ids below `vocab_size`.
    """
    unknown = set(splits) - set(SPLITS)
    if unknown or "train" not in splits:
        raise ValueError(f"splits must be 'train' and optionally 'val', got {sorted(splits)}")
    out = Path(out)
    _start_dataset(out)
    writers = {split: _ShardWriter(out, split, shard_tokens, vocab_size, eot_id) for split in SPLITS}
    for split, tokens in splits.items():
        tokens = np.asarray(tokens)
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab_size):
            raise ValueError(f"{split} tokens must lie in [0, {vocab_size})")
        writers[split].add(tokens.astype(TOKEN_DTYPE))
    return _write_manifest(out, writers, tokenizer="external")


# ---------------------------------------------------------------------- reading a split
class TokenSplit:
    """The shards of one split as a single read-only token sequence (memory-mapped)."""

    def __init__(self, data_dir: str | Path, split: str = "train") -> None:
        self.data_dir = Path(data_dir)
        manifest_path = self.data_dir / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{manifest_path} not found: create the dataset with `gptoss prepare-data INPUT... "
                f"--out {self.data_dir}` (a directory without a manifest is incomplete)"
            )
        self.manifest = json.loads(manifest_path.read_text())
        if split not in self.manifest["splits"]:
            raise ValueError(f"{self.data_dir} has no split {split!r}")
        self.split = split
        self.shards = [
            read_shard(self.data_dir / s["file"]) for s in self.manifest["splits"][split]["shards"]
        ]
        for shard, entry in zip(self.shards, self.manifest["splits"][split]["shards"], strict=True):
            if len(shard) != entry["tokens"]:
                raise ValueError(
                    f"{entry['file']} holds {len(shard)} tokens, the manifest says {entry['tokens']}"
                )
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) across shard boundaries, as int64."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"window [{start}, {start + length}) outside {len(self)} tokens")
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        filled = 0
        while filled < length:
            local = start + filled - int(self.offsets[i])
            take = min(length - filled, len(self.shards[i]) - local)
            out[filled : filled + take] = self.shards[i][local : local + take]
            filled += take
            i += 1
        return out


class Batches:
    """Fixed-length training windows, a pure function of (seed, step, rank).

    Each step draws `batch_size` windows of `seq_len + 1` tokens (inputs and shifted targets):
    - "shuffled": the split cut into non-overlapping windows, visited in a fresh random order every
      epoch, so each token is trained on once per epoch (documents are packed back to back).
    - "random": window starts drawn uniformly, with replacement.
    Rank r of `world_size` takes the r-th contiguous slice of the step's windows, so the global
    batch does not depend on the world size.
    """

    def __init__(
        self, tokens: TokenSplit, seq_len: int, batch_size: int, seed: int, sampling: Sampling = "shuffled"
    ) -> None:
        if sampling not in ("shuffled", "random"):
            raise ValueError(f"sampling must be 'shuffled' or 'random', got {sampling!r}")
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"the {tokens.split} split of {tokens.data_dir} has {len(tokens)} tokens, fewer than one "
                f"window of seq_len + 1 = {seq_len + 1}"
            )
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.sampling = seed, sampling
        self.num_windows = (len(tokens) - 1) // seq_len
        self._epoch_order: tuple[int, np.ndarray] | None = None

    def starts(self, step: int) -> np.ndarray:
        """Start offsets of the `batch_size` windows of `step` (global, before splitting by rank)."""
        if self.sampling == "random":
            rng = np.random.default_rng([self.seed, step])
            return rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        index = step * self.batch_size + np.arange(self.batch_size)
        epochs, position = np.divmod(index, self.num_windows)
        out = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self._order(int(epoch))[position[mask]] * self.seq_len
        return out

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            self._epoch_order = (
                epoch,
                np.random.default_rng([self.seed, epoch]).permutation(self.num_windows),
            )
        return self._epoch_order[1]

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """(batch_size / world_size, seq_len + 1) int64 token windows of `rank` at `step`."""
        if self.batch_size % world_size:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by world size {world_size}")
        per_rank = self.batch_size // world_size
        starts = self.starts(step)[rank * per_rank : (rank + 1) * per_rank]
        return np.stack([self.tokens.read(int(s), self.seq_len + 1) for s in starts])


def validation_windows(tokens: TokenSplit, seq_len: int, count: int) -> np.ndarray:
    """The first `count` non-overlapping windows of a split (fewer if it is short): a fixed eval set."""
    count = min(count, max(len(tokens) - 1, 0) // seq_len)  # an empty split has no window
    return (
        np.stack([tokens.read(i * seq_len, seq_len + 1) for i in range(count)])
        if count
        else np.zeros((0, seq_len + 1), dtype=np.int64)
    )
