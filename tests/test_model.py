"""Fidelity: our model computes what transformers' GptOssForCausalLM computes, in both checkpoint
directions, on random weights in fp32."""

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import AutoModelForCausalLM, GptOssConfig, GptOssForCausalLM

from conftest import random_model, tiny_config
from gptoss import load_model, save_model
from gptoss.model import yarn_inv_freq

TOLERANCE = 1e-4

CONFIGS = {
    "moe": tiny_config(),
    "one-layer-mha": tiny_config(num_hidden_layers=1, num_key_value_heads=4),
    "deep-gqa4-top1": tiny_config(
        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, num_experts_per_tok=1
    ),
    "8-experts-top4-window3": tiny_config(num_local_experts=8, num_experts_per_tok=4, sliding_window=3),
    "mqa-all-experts": tiny_config(num_key_value_heads=1, num_experts_per_tok=4),
    "dense": tiny_config(num_local_experts=0),
    "tied": tiny_config(tie_word_embeddings=True),
}


def hf_from_dir(path) -> GptOssForCausalLM:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_we_save_transformers_loads_same_logits(name, tmp_path):
    config = CONFIGS[name]
    ours = random_model(config, seed=1)
    save_model(ours, tmp_path / "ckpt")
    theirs = hf_from_dir(tmp_path / "ckpt")
    ids = torch.randint(0, config.vocab_size, (3, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        delta = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert delta <= TOLERANCE


@pytest.mark.parametrize("name", ["moe", "8-experts-top4-window3", "tied"])
def test_transformers_saves_we_load_same_logits(name, tmp_path):
    config = CONFIGS[name]
    theirs = GptOssForCausalLM(GptOssConfig(**config.to_hf())).eval()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in theirs.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5 / param.shape[-1] ** 0.5)
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf", dtype=torch.float32)
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=generator)
    with torch.no_grad():
        delta = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert delta <= TOLERANCE


def test_sequence_longer_than_the_window_depends_on_sliding_and_full_layers():
    """A token beyond the window still reaches the output through the full-attention layer, but a
    model of only sliding layers forgets it: the window is really applied."""
    config = tiny_config(num_hidden_layers=1, sliding_window=4, layer_types=("sliding_attention",))
    model = random_model(config)
    ids = torch.randint(2, config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(3))
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % config.vocab_size
    with torch.no_grad():
        a, b = model(ids), model(changed)
    # position 4 sees 1..4 only (equal up to the order in which experts batch their tokens)
    assert torch.allclose(a[0, 4:], b[0, 4:], atol=1e-6, rtol=0)
    assert not torch.allclose(a[0, :4], b[0, :4], atol=1e-3)

    full = random_model(tiny_config(num_hidden_layers=1, layer_types=("full_attention",)))
    with torch.no_grad():
        assert not torch.allclose(full(ids)[0, 9], full(changed)[0, 9], atol=1e-3)


def test_causal_future_tokens_do_not_change_the_past():
    model = random_model(tiny_config())
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(model(ids)[:, :7], model(ids[:, :7]), atol=1e-5)


def test_moe_runs_only_the_chosen_experts(monkeypatch):
    config = tiny_config(num_local_experts=8, num_experts_per_tok=2)
    model = random_model(config)
    with GroupedGemms() as gemms, torch.no_grad():
        model(torch.tensor([[5]]))
    # one token: each layer runs exactly its k chosen experts, once each (gate_up and down, one row
    # for each chosen expert, none for the others)
    assert len(gemms.group_rows) == 2 * config.num_hidden_layers
    for rows in gemms.group_rows:
        assert sorted(rows) == [0] * (8 - config.num_experts_per_tok) + [1] * config.num_experts_per_tok


class GroupedGemms(TorchFunctionMode):
    """The rows each group of every F.grouped_mm call inside it takes."""

    def __init__(self) -> None:
        super().__init__()
        self.group_rows: list[list[int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "").endswith("grouped_mm"):  # (F.grouped_mm's aten op)
            ends = kwargs["offs"].tolist()
            self.group_rows.append([b - a for a, b in zip([0, *ends[:-1]], ends, strict=True)])
        return func(*args, **kwargs)


def test_yarn_frequencies_match_transformers():
    config = tiny_config(head_dim=64)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = GptOssConfig(**config.to_hf())
    theirs, their_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu")
    ours, our_factor = yarn_inv_freq(config)
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=0)
    assert our_factor == pytest.approx(their_factor) == pytest.approx(0.1 * torch.log(torch.tensor(32.0)) + 1)


def test_bf16_model_keeps_fp32_rotary_frequencies():
    model = random_model(tiny_config()).to(torch.bfloat16)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    with torch.no_grad():
        logits = model(torch.tensor([[3, 4, 5]]))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
