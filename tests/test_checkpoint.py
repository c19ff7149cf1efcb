import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import random_model, tiny_config
from gptoss import load_model, save_model
from gptoss.checkpoint import INDEX_FILE, CheckpointError, hf_state_dict


@pytest.fixture
def saved(tmp_path):
    model = random_model(tiny_config(), seed=7)
    save_model(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def logits(model, seed=0):
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids)


def test_round_trip_is_exact(saved):
    model, path = saved
    assert sorted(os.listdir(path)) == ["LICENSE", "README.md", "config.json", "model.safetensors"]
    assert torch.equal(logits(load_model(path)), logits(model))


def test_sharded_checkpoint_has_an_index_and_loads_everywhere(tmp_path):
    model = random_model(tiny_config(), seed=8)
    save_model(model, tmp_path / "sharded", max_shard_bytes=60_000)
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and INDEX_FILE in files
    index = json.loads((tmp_path / "sharded" / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(hf_state_dict(model))
    assert torch.equal(logits(load_model(tmp_path / "sharded")), logits(model))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.float32).eval()
    ids = torch.randint(0, 320, (1, 6))
    with torch.no_grad():
        assert (theirs(ids).logits - model(ids)).abs().max() <= 1e-4


def test_bf16_checkpoint_loads_in_its_stored_dtype(tmp_path):
    model = random_model(tiny_config()).to(torch.bfloat16)
    save_model(model, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = load_model(tmp_path / "bf16")
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(logits(loaded), logits(model))


def test_overwrite_replaces_the_directory_whole(saved):
    _, path = saved
    (path / "stale.txt").write_text("left over")
    other = random_model(tiny_config(), seed=9)
    save_model(other, path)
    assert not (path / "stale.txt").exists()
    assert torch.equal(logits(load_model(path)), logits(other))
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]  # no temporary directories remain


def test_failed_write_leaves_the_old_checkpoint_untouched(saved, monkeypatch):
    model, path = saved
    before = (path / "model.safetensors").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("gptoss.checkpoint.save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_model(random_model(tiny_config(), seed=10), path)
    assert (path / "model.safetensors").read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]


def test_missing_config_is_named(saved):
    _, path = saved
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(path)


def test_unknown_model_type_is_refused(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"model_type": "mixtral"}))
    with pytest.raises(ValueError, match="model_type 'mixtral'"):
        load_model(path)


def _rewrite_weights(path, change):
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(saved):
    _, path = saved
    _rewrite_weights(path, lambda t: t.pop("model.layers.1.self_attn.sinks"))
    with pytest.raises(CheckpointError, match=r"missing tensors model\.layers\.1\.self_attn\.sinks"):
        load_model(path)


def test_extra_tensor_is_named(saved):
    _, path = saved
    _rewrite_weights(path, lambda t: t.update({"model.layers.9.mlp.bogus": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors model\.layers\.9\.mlp\.bogus"):
        load_model(path)


def test_misshaped_tensor_is_named(saved):
    _, path = saved
    _rewrite_weights(path, lambda t: t.update({"model.norm.weight": torch.ones(63)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight .* shape \(63,\).* needs \(64,\)"):
        load_model(path)


def test_truncated_file_is_reported(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(path)


def test_index_naming_a_missing_shard_is_reported(tmp_path):
    save_model(random_model(tiny_config()), tmp_path / "s", max_shard_bytes=60_000)
    next((tmp_path / "s").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-.* which is missing"):
        load_model(tmp_path / "s")


def test_unknown_name_is_neither_path_nor_preset():
    with pytest.raises(FileNotFoundError, match="neither a checkpoint directory nor a preset"):
        load_model("no/such/model")


def test_preset_loads_random_weights_and_says_so(caplog):
    model = load_model("gpt-oss-nano", dtype=torch.bfloat16)
    assert "random initialisation" in caplog.text
    assert model.config.name == "gpt-oss-nano"
    assert sum(p.numel() for p in model.parameters()) == model.config.total_params()
    assert model.lm_head.weight.dtype == torch.bfloat16
    again = load_model("gpt-oss-nano", dtype=torch.bfloat16)
    assert torch.equal(model.model.layers[0].mlp.router.weight, again.model.layers[0].mlp.router.weight)


@pytest.mark.parametrize("experts", [4, 0], ids=["moe", "dense"])
def test_loading_in_another_dtype_reads_through_a_small_buffer(tmp_path, monkeypatch, experts):
    # Tensors are read straight into their parameters; a dtype change (or a dense layer's transpose)
    # goes through a buffer of at most _READ_CHUNK bytes: a few rows here, so many reads per tensor.
    from gptoss import checkpoint

    model = random_model(tiny_config(num_local_experts=experts), seed=3).to(torch.bfloat16)
    save_model(model, tmp_path / "bf16")
    monkeypatch.setattr(checkpoint, "_READ_CHUNK", 300)
    loaded = load_model(tmp_path / "bf16", dtype=torch.float32)
    assert loaded.lm_head.weight.dtype == torch.float32
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.to(torch.float32)), name
