"""Hugging Face-layout checkpoints: `config.json` plus one or many `*.safetensors` files.

Reading is lazy: the model is built on the meta device, then each tensor's bytes are read from its
file (plain reads at the offsets the safetensors header gives, no memory map) straight into the
parameter that owns it, so peak memory is the model itself: no file pages mapped into the process,
no temporary copy (a dtype or layout conversion goes through a bounded buffer). Writing goes to a
temporary directory beside the target that is renamed into place only once every file is complete.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file
from torch import Tensor

from gptoss.config import DEFAULT_MODEL, PRESETS, ModelConfig, get_config
from gptoss.model import MLP, GptOss
from gptoss.model_card import ModelCard, read_license_name, write_card
from gptoss.ops.pages import use_huge_pages
from gptoss.quant.mxfp4 import MXFP4Experts
from gptoss.trimmed_vocab import trim_vocabulary

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 2**30
MXFP4_QUANTIZATION_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as it is; the message names the problem."""


# ---------------------------------------------------------------------- key mapping
# A dense member is stored as the one-expert MoE transformers understands (see ModelConfig.to_hf):
# its HF tensors have a leading expert axis of 1 and the x @ W layout of experts, while `MLP` holds
# nn.Linear parameters. Every other tensor keeps its name and layout.
_DENSE_HF_NAMES = {
    "mlp.gate_up_proj.weight": "mlp.experts.gate_up_proj",
    "mlp.gate_up_proj.bias": "mlp.experts.gate_up_proj_bias",
    "mlp.down_proj.weight": "mlp.experts.down_proj",
    "mlp.down_proj.bias": "mlp.experts.down_proj_bias",
}
_DENSE_ROUTER_NAMES = ("mlp.router.weight", "mlp.router.bias")


def _dense_to_file(param: Tensor) -> Tensor:
    return (param.T if param.dim() == 2 else param)[None]


def _dense_from_file(stored: Tensor) -> Tensor:
    return stored[0].T if stored.dim() == 3 else stored[0]


def _same(t: Tensor) -> Tensor:
    return t


class _Entry(NamedTuple):
    tensor: Tensor  # the model's own parameter or buffer
    to_file: Callable[[Tensor], Tensor]
    from_file: Callable[[Tensor], Tensor]


def hf_tensor_map(model: GptOss) -> dict[str, _Entry]:
    """Checkpoint name → the model tensor stored under it, with the layout conversions both ways."""
    entries: dict[str, _Entry] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        layer, _, rest = name.partition(".mlp.")
        dense_name = _DENSE_HF_NAMES.get(f"mlp.{rest}")
        if dense_name and isinstance(model.get_submodule(f"{layer}.mlp"), MLP):
            entries[f"{layer}.{dense_name}"] = _Entry(tensor, _dense_to_file, _dense_from_file)
        else:
            entries[name] = _Entry(tensor, _same, _same)
    return entries


def hf_state_dict(model: GptOss) -> dict[str, Tensor]:
    """The model's tensors under their Hugging Face checkpoint names, in the HF layout."""
    state = {name: e.to_file(e.tensor.detach()) for name, e in hf_tensor_map(model).items()}
    if not model.config.is_moe:
        # A zero router over one expert: its softmax weight is exactly 1 whatever the input.
        hidden, device = model.config.hidden_size, model.lm_head.weight.device
        for i in range(model.config.num_hidden_layers):
            state[f"model.layers.{i}.mlp.router.weight"] = torch.zeros(1, hidden, device=device)
            state[f"model.layers.{i}.mlp.router.bias"] = torch.zeros(1, device=device)
    return state


# ---------------------------------------------------------------------- reading
def _shard_files(directory: Path) -> dict[str, Path]:
    """tensor name → file, from the index when there is one, else from every *.safetensors."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(
                f"{index} is not valid JSON ({exc}): it may be truncated — re-copy it"
            ) from None
        except (KeyError, TypeError):
            raise CheckpointError(
                f"{index} has no 'weight_map' object: re-copy it (it lists the file of every tensor)"
            ) from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(f, str) and Path(f).name == f for f in weight_map.values()
        ):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to file names in {directory}")
        files = {name: directory / fname for name, fname in weight_map.items()}
        for path in set(files.values()):
            if not path.is_file():
                raise CheckpointError(f"{index.name} lists {path.name}, which is missing from {directory}")
        return files
    paths = sorted(directory.glob("*.safetensors"))
    if not paths:
        raise CheckpointError(f"no *.safetensors files in {directory}")
    files: dict[str, Path] = {}
    for path in paths:
        for name in _read_header(path):
            files[name] = path
    return files


_SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
}  # fmt: skip
_READ_CHUNK = 64 * 2**20  # bytes per read call, and the bound on a conversion buffer


class _Stored(NamedTuple):
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of the first byte in the file
    nbytes: int


def _read_header(path: Path) -> dict[str, _Stored]:
    """Where each tensor of a safetensors file lies: an 8-byte little-endian header length, a JSON
    header of {name: {dtype, shape, data_offsets}}, then the data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 2 <= length <= size - 8:
                raise ValueError(f"a header of {length} bytes does not fit in {size} bytes")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError(f"its header is a JSON {type(header).__name__}, not an object")
        stored = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if entry["dtype"] not in _SAFETENSORS_DTYPES:
                raise CheckpointError(
                    f"{path}: tensor {name} has dtype {entry['dtype']}, which gptoss cannot load"
                )
            dtype, shape = _SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"])
            begin, end = entry["data_offsets"]
            if end - begin != math.prod(shape) * dtype.itemsize or not 0 <= begin <= end <= size - 8 - length:
                raise ValueError(f"tensor {name} lies outside the file")
            stored[name] = _Stored(dtype, shape, 8 + length + begin, end - begin)
        return stored
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc}); it may be truncated or still "
            "downloading — re-copy it"
        ) from exc


def _read_into(f: io.FileIO, offset: int, out: Tensor) -> None:
    """Fill the contiguous CPU tensor `out` with the bytes at `offset` of file `f`."""
    view = memoryview(out.view(-1).view(torch.uint8).numpy())
    f.seek(offset)
    done = 0
    while done < len(view):
        n = f.readinto(view[done : done + _READ_CHUNK])
        if not n:
            raise CheckpointError(f"{f.name} ends early: it is truncated — re-copy it")
        done += n


def _load_tensor(
    f: io.FileIO, stored: _Stored, target: Tensor, from_file: Callable[[Tensor], Tensor]
) -> None:
    """Read one stored tensor into `target` (shapes already checked)."""
    if (
        from_file is _same
        and stored.dtype == target.dtype
        and target.is_contiguous()
        and target.device.type == "cpu"
    ):
        _read_into(f, stored.offset, target)  # straight into the parameter
        return
    if from_file is not _same or not stored.shape:
        buffer = torch.empty(stored.shape, dtype=stored.dtype)  # a dense layer's transpose: small
        _read_into(f, stored.offset, buffer)
        target.copy_(from_file(buffer))
        return
    # another dtype or device: through a buffer of at most _READ_CHUNK bytes, rows at a time
    row_bytes = stored.nbytes // max(stored.shape[0], 1)
    step = max(1, _READ_CHUNK // max(row_bytes, 1))
    for row in range(0, stored.shape[0], step):
        buffer = torch.empty((min(step, stored.shape[0] - row), *stored.shape[1:]), dtype=stored.dtype)
        _read_into(f, stored.offset + row * row_bytes, buffer)
        target[row : row + len(buffer)].copy_(buffer)


def is_mxfp4_checkpoint(directory: str | Path) -> bool:
    return any(name.endswith("_blocks") for name in _shard_files(Path(directory)))


def _checkpoint_dtype(directory: Path) -> torch.dtype:
    hf = json.loads((directory / "config.json").read_text())
    name = hf.get("dtype") or hf.get("torch_dtype") or "bfloat16"
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(
            f"{directory / 'config.json'} gives dtype {name!r}; use a floating-point torch dtype "
            "such as 'bfloat16' or 'float32'"
        )
    return dtype


def empty_model(config: ModelConfig, dtype: torch.dtype, device: str | torch.device, packed: bool) -> GptOss:
    """A model of `config` whose weights are allocated on `device` but not filled (a loader fills
    them), with MXFP4-packed experts when `packed`."""
    with torch.device("meta"):
        model = trim_vocabulary(GptOss(config)).to(dtype)
        if packed:
            for block in model.model.layers:
                block.mlp.experts = MXFP4Experts(config).to(dtype)
    model = model.to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def load_checkpoint(
    directory: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    dequantize: bool = False,
) -> GptOss:
    """Load a Hugging Face-layout gpt-oss checkpoint.

    MXFP4 experts stay packed unless `dequantize` is set (then they become dense `dtype` tensors, as
    training needs). `dtype` defaults to the checkpoint's own (`config.json`'s `dtype`).
    """
    directory = Path(directory)
    config = ModelConfig.from_dir(directory)
    dtype = dtype or _checkpoint_dtype(directory)
    files = _shard_files(directory)
    packed = any(name.endswith("_blocks") for name in files)
    if packed and not config.is_moe:
        raise CheckpointError(f"{directory}: MXFP4 weights in a dense checkpoint are not supported")

    model = empty_model(config, dtype, device, packed)
    use_huge_pages([*model.parameters(), *model.buffers()])  # before the reads fill them: ops/pages.py

    expected = hf_tensor_map(model)
    ignorable = {n for n in files if not config.is_moe and n.endswith(_DENSE_ROUTER_NAMES)}
    missing = sorted(set(expected) - set(files))
    unexpected = sorted(set(files) - set(expected) - ignorable)
    if missing or unexpected:
        raise CheckpointError(
            f"{directory} does not match its config.json: "
            + (f"missing tensors {_names(missing)}; " if missing else "")
            + (f"unexpected tensors {_names(unexpected)}" if unexpected else "")
        )

    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    with torch.no_grad():
        for path, names in by_file.items():
            stored = _read_header(path)
            if absent := [name for name in names if name not in stored]:
                raise CheckpointError(
                    f"{path.name} does not hold {_names(absent)}, which its index lists there"
                )
            with open(path, "rb", buffering=0) as f:
                for name in sorted(names, key=lambda n: stored[n].offset):  # one sequential pass
                    target, _, from_file = expected[name]
                    shape = tuple(from_file(torch.empty(stored[name].shape, device="meta")).shape)
                    if shape != tuple(target.shape):
                        raise CheckpointError(
                            f"tensor {name} in {path.name} has shape {shape}, but the config needs "
                            f"{tuple(target.shape)}"
                        )
                    _load_tensor(f, stored[name], target, from_file)

    if config.vocab_rows is not None:
        _check_token_ids(model, files["model.token_ids"])
    if packed and dequantize:
        from gptoss.quant.mxfp4 import dequantize_experts

        dequantize_experts(model, dtype)
    return model.eval()


def _check_token_ids(model: GptOss, path: Path) -> None:
    """The rows' token ids of a trimmed vocabulary must be ascending ids of the id space, the same
    in the embedding and the head: anything else (a flipped byte) would index out of range later."""
    ids, head = model.model.token_ids, model.lm_head.token_ids
    space = model.config.vocab_size
    if not (
        bool((ids.diff() > 0).all()) and int(ids[0]) >= 0 and int(ids[-1]) < space and torch.equal(ids, head)
    ):
        raise CheckpointError(
            f"{path}: tensors model.token_ids and lm_head.token_ids must be the same ascending ids in "
            f"0..{space - 1}; the file is corrupted — re-copy it"
        )


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ---------------------------------------------------------------------- writing
def save_checkpoint(
    model: GptOss,
    directory: str | Path,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    card: ModelCard | None = None,
) -> Path:
    """Write `model` as a Hugging Face directory that `from_pretrained` loads, with a model card
    (README.md, from `card` or a generic one) and the family's license notice (LICENSE).

    Shards above `max_shard_bytes` (with `model.safetensors.index.json`). The directory appears
    complete or not at all: files go to a temporary sibling that replaces the target at the end.
    """
    directory = Path(directory).resolve()
    directory.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.contiguous().cpu() for name, t in hf_state_dict(model).items()}
    packed = any(name.endswith("_blocks") for name in tensors)

    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes

    hf_config = model.config.to_hf()
    hf_config["dtype"] = str(model.lm_head.weight.dtype).removeprefix("torch.")
    if packed:
        hf_config["quantization_config"] = MXFP4_QUANTIZATION_CONFIG

    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, fname))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        write_card(tmp, model.config, card)
        _set_usual_modes(tmp)
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _set_usual_modes(directory: Path) -> None:
    """mkdtemp makes the directory 0700 and safetensors writes 0600: give the checkpoint the modes
    of ordinary files under the process umask, so that other users can read it like any download."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _replace_dir(new: Path, target: Path) -> None:
    """Move the finished directory `new` to `target`, replacing an existing one only at the end."""
    for path in new.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    if not target.exists():
        new.rename(target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    target.rename(old)
    new.rename(target)
    shutil.rmtree(old)


# ---------------------------------------------------------------------- the public entry points
def bundled_model_dir() -> Path:
    """Where the demonstration model that ships inside the package lives."""
    return Path(__file__).parent / "models" / DEFAULT_MODEL


def resolve_model(path_or_preset: str | Path) -> str | Path:
    """A checkpoint directory, a preset name, or `gptoss-nano` → the bundled model's directory."""
    if str(path_or_preset) == DEFAULT_MODEL and not Path(path_or_preset).is_dir():
        return bundled_model_dir()
    return path_or_preset


def model_config(path_or_preset: str | Path) -> ModelConfig:
    """The config of a checkpoint directory, of a preset name, or of the bundled `gptoss-nano`."""
    path_or_preset = resolve_model(path_or_preset)
    if Path(path_or_preset).suffix.lower() == ".gguf":
        from gptoss.gguf import read_config

        return read_config(path_or_preset)
    if Path(path_or_preset).is_dir():
        return ModelConfig.from_dir(path_or_preset)
    if str(path_or_preset) in PRESETS:
        return get_config(str(path_or_preset))
    raise FileNotFoundError(
        f"{str(path_or_preset)!r} is neither a checkpoint directory nor a preset name; "
        f"presets: {', '.join(PRESETS)}; bundled: {DEFAULT_MODEL}"
    )


def checkpoint_facts(directory: str | Path) -> dict[str, str | int]:
    """How a checkpoint directory stores its weights: format and bytes on disk."""
    directory = Path(directory)
    files = set(_shard_files(directory).values())
    dtype = str(_checkpoint_dtype(directory)).removeprefix("torch.")
    packed = is_mxfp4_checkpoint(directory)
    return {
        "checkpoint_format": f"mxfp4 experts, {dtype} elsewhere" if packed else dtype,
        "checkpoint_files": len(files),
        "checkpoint_bytes": sum(f.stat().st_size for f in files),
        "license": read_license_name(directory) or "not stated (no model card)",
    }


def load_model(
    path_or_preset: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    dequantize: bool = False,
    seed: int = 0,
) -> GptOss:
    """A ready model from a checkpoint directory, or a preset name with random weights.

    Checkpoints keep their stored dtype unless `dtype` is given; presets default to float32.
    `gptoss-nano` names the bundled demonstration model; a `.gguf` file is read by `gptoss.gguf`.
    """
    path_or_preset = resolve_model(path_or_preset)
    if Path(path_or_preset).suffix.lower() == ".gguf":
        from gptoss.gguf import load_gguf

        return load_gguf(path_or_preset, device=device, dtype=dtype, dequantize=dequantize)
    config = model_config(path_or_preset)
    if Path(path_or_preset).is_dir():
        return load_checkpoint(path_or_preset, device=device, dtype=dtype, dequantize=dequantize)
    log.warning("%s: no weights given, using random initialisation (seed %d)", config.name, seed)
    with torch.device(device):
        model = trim_vocabulary(GptOss(config)).to(dtype or torch.float32)
    model.init_weights(torch.Generator(device=device).manual_seed(seed))
    return model.eval()


def save_model(
    model: GptOss,
    directory: str | Path,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    card: ModelCard | None = None,
    format: str = "safetensors",
    outtype: str = "bf16",
) -> Path:
    """Save `model` as a Hugging Face-layout checkpoint directory (see `save_checkpoint`), or with
    `format="gguf"` as one GGUF file at `directory` for llama.cpp (see `gptoss.gguf.save_gguf`;
    `outtype` is the type of its non-expert matrices)."""
    if format == "gguf":
        from gptoss.gguf import save_gguf

        return save_gguf(model, directory, outtype)
    if format != "safetensors":
        raise ValueError(f"unknown checkpoint format {format!r}; use 'safetensors' or 'gguf'")
    return save_checkpoint(model, directory, max_shard_bytes, card)
