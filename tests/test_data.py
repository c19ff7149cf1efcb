"""Token shards, `prepare_data` and the deterministic batch loader (gptoss.train.data)."""

import json
import shutil

import numpy as np
import pytest

import gptoss.train.data
from gptoss.tokenizer import Tokenizer, get_tokenizer
from gptoss.train.data import (
    HEADER_BYTES,
    MANIFEST,
    Batches,
    TokenSplit,
    prepare_data,
    read_shard,
    read_shard_header,
    validation_windows,
    write_dataset,
    write_shard,
)

EOT = Tokenizer.ENDOFTEXT


def test_shard_round_trip_keeps_ids_above_uint16(tmp_path):
    tokens = np.array([0, 65535, 65536, 199999, 201087], dtype=np.uint32)
    path = write_shard(tmp_path / "a.bin", tokens, vocab_size=201088, eot_id=EOT)
    assert path.stat().st_size == HEADER_BYTES + 4 * len(tokens)
    assert read_shard(path).tolist() == tokens.tolist()
    header = read_shard_header(path)
    assert (header.tokens, header.vocab_size, header.eot_id) == (5, 201088, EOT)
    assert not list(tmp_path.glob(".*tmp*"))


def test_damaged_shards_are_refused(tmp_path):
    path = write_shard(tmp_path / "a.bin", np.arange(10), vocab_size=320, eot_id=1)
    data = path.read_bytes()
    (tmp_path / "short.bin").write_bytes(data[:-4])
    with pytest.raises(ValueError, match="truncated"):
        read_shard(tmp_path / "short.bin")
    (tmp_path / "magic.bin").write_bytes(b"NOTTOKEN" + data[8:])
    with pytest.raises(ValueError, match="not a gptoss token shard"):
        read_shard(tmp_path / "magic.bin")
    (tmp_path / "version.bin").write_bytes(data[:8] + (99).to_bytes(4, "little") + data[12:])
    with pytest.raises(ValueError, match="version 99"):
        read_shard(tmp_path / "version.bin")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A directory with plain text, a binary file, JSONL and Parquet inputs."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "docs").mkdir()
    (root / "docs" / "a.txt").write_text("The first document.\nIt has two lines.")
    (root / "docs" / "b.md").write_text("Second one mentions <|endoftext|> literally.")
    (root / "docs" / "image.bin").write_bytes(bytes(range(256)))
    (root / "docs" / ".hidden.txt").write_text("never read")
    records = [{"text": f"json record number {i} " * (i + 1), "id": i} for i in range(40)]
    (root / "records.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pyarrow.table({"text": [f"parquet row {i}" for i in range(30)], "n": list(range(30))})
    pq.write_table(table, root / "rows.parquet", row_group_size=7)
    return root


def _documents(data_dir) -> list[str]:
    """Every document of both splits, decoded, in file order."""
    tokenizer = get_tokenizer()
    docs = []
    for split in ("train", "val"):
        tokens = TokenSplit(data_dir, split).read(0, len(TokenSplit(data_dir, split))).tolist()
        while tokens:
            end = tokens.index(EOT)
            docs.append(tokenizer.decode(tokens[:end]))
            tokens = tokens[end + 1 :]
    return docs


def test_prepare_data_reads_text_jsonl_and_parquet(corpus, tmp_path):
    manifest = prepare_data([corpus], tmp_path / "data", val_fraction=0.2, workers=1, progress=False)
    docs = _documents(tmp_path / "data")
    expected = (
        ["The first document.\nIt has two lines.", "Second one mentions <|endoftext|> literally."]
        + [f"json record number {i} " * (i + 1) for i in range(40)]
        + [f"parquet row {i}" for i in range(30)]
    )
    assert sorted(docs) == sorted(expected)  # the split reorders, nothing is lost or added
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert train["documents"] + val["documents"] == len(expected)
    assert 0 < val["documents"] < train["documents"]
    assert manifest["inputs"]["skipped"] == {"binary files": 1}
    assert manifest["vocab_size"] == 201088 and manifest["eot_id"] == EOT
    assert json.loads((tmp_path / "data" / MANIFEST).read_text()) == manifest
    # A literal "<|endoftext|>" in a document is text: it must not split the document.
    assert (
        sum(t == EOT for t in TokenSplit(tmp_path / "data", "train").read(0, train["tokens"]))
        == train["documents"]
    )


def test_prepare_data_is_the_same_for_any_worker_count_and_shard_size(corpus, tmp_path, monkeypatch):
    one = prepare_data([corpus], tmp_path / "one", val_fraction=0.2, workers=1, progress=False)
    monkeypatch.setattr(gptoss.train.data, "_BATCH_CHARS", 200)  # many tasks, finishing out of order
    two = prepare_data(
        [corpus], tmp_path / "two", val_fraction=0.2, workers=2, shard_tokens=97, progress=False
    )
    moved = shutil.copytree(corpus, tmp_path / "elsewhere" / corpus.name)  # the split ignores location
    three = prepare_data([moved], tmp_path / "three", val_fraction=0.2, workers=1, progress=False)
    assert len(two["splits"]["train"]["shards"]) > 3
    for split in ("train", "val"):
        a, b = TokenSplit(tmp_path / "one", split), TokenSplit(tmp_path / "two", split)
        assert one["splits"][split]["tokens"] == two["splits"][split]["tokens"]
        assert np.array_equal(a.read(0, len(a)), b.read(0, len(b)))  # reads across shard boundaries
        assert three["splits"][split] == one["splits"][split]


def test_prepare_data_filters_and_errors(corpus, tmp_path):
    manifest = prepare_data([corpus / "docs"], tmp_path / "md", pattern="*.md", workers=1, progress=False)
    assert manifest["inputs"]["files"] == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 has no string field 'text'"):
        prepare_data([bad], tmp_path / "bad", workers=1, progress=False)
    with pytest.raises(FileNotFoundError):
        prepare_data([tmp_path / "missing"], tmp_path / "x", workers=1, progress=False)
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        TokenSplit(tmp_path / "bad")  # a failed run leaves no manifest, so no half dataset is read


@pytest.fixture
def split(tmp_path):
    write_dataset(
        tmp_path / "d",
        {"train": np.arange(1000) % 300, "val": np.arange(50)},
        vocab_size=320,
        eot_id=1,
        shard_tokens=128,
    )
    return TokenSplit(tmp_path / "d", "train")


def test_batches_depend_only_on_seed_and_step(split):
    a = Batches(split, seq_len=16, batch_size=8, seed=3)
    b = Batches(split, seq_len=16, batch_size=8, seed=3)
    assert np.array_equal(a.batch(5), b.batch(5))  # a fresh loader (a resumed run) sees the same batch
    assert not np.array_equal(a.batch(5), a.batch(6))
    assert not np.array_equal(a.batch(5), Batches(split, 16, 8, seed=4).batch(5))
    # Windows are contiguous stretches of the stream (inputs and the targets shifted by one).
    window = a.batch(0)[0]
    assert np.array_equal(window, split.read(int(a.starts(0)[0]), 17))


def test_ranks_split_the_global_batch(split):
    batches = Batches(split, seq_len=16, batch_size=8, seed=0)
    whole = batches.batch(2)
    parts = [batches.batch(2, rank=r, world_size=4) for r in range(4)]
    assert np.array_equal(np.concatenate(parts), whole)
    with pytest.raises(ValueError, match="not divisible"):
        batches.batch(0, rank=0, world_size=3)


def test_shuffled_sampling_visits_every_window_once_per_epoch(split):
    batches = Batches(split, seq_len=16, batch_size=4, seed=0, sampling="shuffled")
    per_epoch = batches.num_windows  # 62 windows of 16 (+1) in 1000 tokens
    steps = np.concatenate([batches.starts(s) for s in range(2 * per_epoch // 4 + 1)])
    first, second = steps[:per_epoch], steps[per_epoch : 2 * per_epoch]
    assert sorted(first) == sorted(second) == list(range(0, per_epoch * 16, 16))
    assert not np.array_equal(first, second)  # each epoch has its own order


def test_random_sampling_stays_inside_the_split(split):
    batches = Batches(split, seq_len=16, batch_size=64, seed=0, sampling="random")
    starts = np.concatenate([batches.starts(s) for s in range(20)])
    assert starts.min() >= 0 and starts.max() <= len(split) - 17
    assert len(set(starts.tolist())) > 500  # not stuck on a few offsets


def test_validation_windows_are_fixed(split, tmp_path):
    val = TokenSplit(tmp_path / "d", "val")
    windows = validation_windows(val, seq_len=16, count=10)
    assert windows.shape == (3, 17)  # only 3 whole windows fit in 50 tokens
    assert windows[1].tolist() == list(range(16, 33))
    with pytest.raises(ValueError, match="fewer than one window"):
        Batches(val, seq_len=64, batch_size=1, seed=0)
