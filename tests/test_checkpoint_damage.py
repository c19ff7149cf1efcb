"""`load_model` on damaged checkpoints and configs: each names the file and the problem, through
the library and through the `gptoss` command (an error line, exit status 2, no traceback)."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import random_model, tiny_config
from gptoss import load_model, save_model
from gptoss.checkpoint import INDEX_FILE, bundled_model_dir
from gptoss.cli import main


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("single") / "ckpt"
    save_model(random_model(tiny_config(), seed=3), path)
    return path


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sharded") / "ckpt"
    save_model(random_model(tiny_config(), seed=4), path, max_shard_bytes=60_000)
    return path


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def header_as_list(directory: Path) -> None:
    path = directory / "model.safetensors"
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    new = json.dumps(list(json.loads(data[8 : 8 + length]))).encode().ljust(length)
    path.write_bytes(data[:8] + new + data[8 + length :])


def flip_token_ids(directory: Path) -> None:
    """Flip the high bytes of one entry of `model.token_ids` (int64) in place."""
    path = directory / "model.safetensors"
    data = bytearray(path.read_bytes())
    length = struct.unpack("<Q", data[:8])[0]
    begin, _ = json.loads(data[8 : 8 + length])["model.token_ids"]["data_offsets"]
    at = 8 + length + begin + 8 * 100 + 5  # entry 100, byte 5
    data[at] ^= 0x7F
    path.write_bytes(bytes(data))


def config_without(key: str) -> Callable[[Path], None]:
    return lambda d: edit_json(d / "config.json", lambda c: {k: v for k, v in c.items() if k != key})


def config_with(key: str, value: object) -> Callable[[Path], None]:
    return lambda d: edit_json(d / "config.json", lambda c: c | {key: value})


# case -> (which checkpoint, damage, the file named, words of the problem)
CASES: dict[str, tuple[str, Callable[[Path], None], str, str]] = {
    "safetensors header is a JSON list": (
        "single",
        header_as_list,
        "model.safetensors",
        "header is a JSON list",
    ),
    "truncated index": (
        "sharded",
        lambda d: (d / INDEX_FILE).write_text((d / INDEX_FILE).read_text()[:200]),
        INDEX_FILE,
        "not valid JSON",
    ),
    "index without weight_map": (
        "sharded",
        lambda d: edit_json(d / INDEX_FILE, lambda i: {"metadata": i["metadata"]}),
        INDEX_FILE,
        "no 'weight_map'",
    ),
    "index pointing outside the directory": (
        "sharded",
        lambda d: edit_json(
            d / INDEX_FILE, lambda i: i | {"weight_map": dict.fromkeys(i["weight_map"], "../../etc/passwd")}
        ),
        INDEX_FILE,
        "file names in",
    ),
    "config.json is a list": (
        "single",
        lambda d: (d / "config.json").write_text("[1, 2]"),
        "config.json",
        "JSON list",
    ),
    "config.json truncated": (
        "single",
        lambda d: (d / "config.json").write_text((d / "config.json").read_text()[:50]),
        "config.json",
        "not valid JSON",
    ),
    "config.json lacks hidden_size": (
        "single",
        config_without("hidden_size"),
        "config.json",
        "'hidden_size'",
    ),
    "hidden_size is a string": ("single", config_with("hidden_size", "big"), "config.json", "not 'big'"),
    "head_dim is a float": (
        "single",
        config_with("head_dim", 16.5),
        "config.json",
        "head_dim must be a positive",
    ),
    "rope_scaling of the wrong type": (
        "single",
        config_with("rope_scaling", [1]),
        "config.json",
        "wrong type",
    ),
    "dtype that is not one": ("single", config_with("dtype", "int64"), "config.json", "dtype 'int64'"),
    "flipped bytes in token_ids": ("bundled", flip_token_ids, "model.safetensors", "token_ids"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_checkpoint_is_named_with_its_problem(case, single, sharded, tmp_path, capsys):
    which, damage, named, problem = CASES[case]
    source = {"single": single, "sharded": sharded, "bundled": bundled_model_dir()}[which]
    directory = tmp_path / "ckpt"
    shutil.copytree(source, directory)
    damage(directory)
    with pytest.raises(ValueError) as caught:
        load_model(directory)
    message = str(caught.value)
    assert named in message and problem in message, message
    # `info` reads the config and headers; `generate` loads the weights.
    command = (
        ["generate", str(directory), "hi", "--max-tokens", "1"]
        if which == "bundled"
        else ["info", str(directory)]
    )
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptoss: ") and named in err and "Traceback" not in err


def test_the_undamaged_copies_load(single, sharded, tmp_path):
    """The cases above fail because of their damage: the same copies load when left alone."""
    for i, source in enumerate((single, sharded, bundled_model_dir())):
        shutil.copytree(source, tmp_path / f"copy{i}")
        load_model(tmp_path / f"copy{i}")
