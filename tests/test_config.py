import json

import pytest
import torch

from gptoss import PRESETS, GptOss, ModelConfig, get_config
from gptoss.config import FULL, SLIDING

# The released gpt-oss-20b config.json, key for key (transformers 4.55 era: rope_scaling + rope_theta).
RELEASED_20B_CONFIG = {
    "architectures": ["GptOssForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 200002,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072,
    "model_type": "gpt_oss",
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "output_router_logits": False,
    "pad_token_id": 199999,
    "quantization_config": {
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
        "quant_method": "mxfp4",
    },
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "transformers_version": "4.55.0.dev0",
    "use_cache": True,
    "vocab_size": 201088,
}


def test_released_shapes_match_the_published_counts():
    small, large = get_config("gpt-oss-20b"), get_config("gpt-oss-120b")
    assert round(small.total_params() / 1e9, 2) == 20.91
    assert round(small.active_params() / 1e9, 2) == 3.61
    assert round(large.total_params() / 1e9, 2) == 116.83
    assert round(large.active_params() / 1e9, 2) == 5.13
    # exact figures, so that a change in any term shows up
    assert small.total_params() == 20_914_757_184
    assert small.active_params() == 3_608_307_264
    assert large.total_params() == 116_829_156_672
    assert large.active_params() == 5_132_849_472


def test_our_members_meet_their_targets():
    dense, flagship, nano = get_config("gpt-oss-15b"), get_config("gpt-oss-90b"), get_config("gpt-oss-nano")
    assert not dense.is_moe and abs(dense.total_params() / 15e9 - 1) <= 0.03
    assert flagship.is_moe and abs(flagship.total_params() / 90e9 - 1) <= 0.03
    assert 15e9 <= flagship.active_params() <= 20e9
    non_embedding = nano.total_params() - 2 * nano.embedding_params()
    assert 1e6 <= non_embedding <= 10e6
    for config in (dense, flagship, nano):  # the released attention design
        alternating = tuple(SLIDING if i % 2 == 0 else FULL for i in range(config.num_hidden_layers))
        assert config.layer_types == alternating
        assert config.sliding_window == 128 and config.max_position_embeddings == 131072
        assert config.rope_scaling_factor == 32 and config.num_key_value_heads < config.num_attention_heads


@pytest.mark.parametrize("name", list(PRESETS))
def test_meta_instantiation_agrees_with_the_arithmetic(name):
    config = get_config(name)
    with torch.device("meta"):
        model = GptOss(config)
    params = dict(model.named_parameters())
    assert sum(p.numel() for p in params.values()) == config.total_params()

    # Active: all but the embedding table, experts scaled to the k chosen per token; the output head
    # counts even when tied.
    active = 0
    for pname, p in params.items():
        if pname == "model.embed_tokens.weight":
            continue
        if ".mlp.experts." in pname:
            active += p.numel() * config.num_experts_per_tok // config.num_local_experts
        else:
            active += p.numel()
    if config.tie_word_embeddings:
        active += config.vocab_size * config.hidden_size
    assert active == config.active_params()

    expert_elems = sum(p.numel() for n, p in params.items() if n.endswith(("gate_up_proj", "down_proj")))
    assert expert_elems == config.expert_weight_elements()


def test_weight_memory_and_kv_cache_arithmetic():
    config = get_config("gpt-oss-20b")
    assert config.weight_bytes(2) == 2 * config.total_params()
    packed = config.weight_bytes(2, mxfp4_experts=True)
    experts = config.expert_weight_elements()
    assert packed == 2 * (config.total_params() - experts) + experts // 32 * 17
    assert 12.5 < packed / 2**30 < 13.0  # the released MXFP4 20b checkpoint is ~12.8 GiB

    per_token = config.kv_cache_bytes_per_token(2)
    assert per_token == 24 * 2 * 8 * 64 * 2
    # Window-aware: 12 full layers hold every token, 12 sliding layers only 128 of them.
    full_context = config.kv_cache_bytes(131072, 2)
    assert full_context == (12 * 131072 + 12 * 128) * 2 * 8 * 64 * 2
    assert 0.49 < full_context / (per_token * 131072) < 0.51
    assert config.kv_cache_bytes(100, 2) == per_token * 100  # below the window nothing is saved


def test_flops_grow_with_context_only_in_full_layers():
    config = get_config("gpt-oss-20b")
    first = config.flops_per_token(1)
    assert 2 * 3.5e9 < first < 2 * 3.7e9
    # Past the window, each extra position costs QK^T + AV in the 12 full layers only.
    step = config.flops_per_token(1001) - config.flops_per_token(1000)
    assert step == 4 * config.q_dim * 12


def test_hf_config_round_trip_for_every_preset():
    for config in PRESETS.values():
        hf = json.loads(json.dumps(config.to_hf()))  # through JSON, as config.json is
        assert hf["model_type"] == "gpt_oss"
        assert ModelConfig.from_hf(hf, name=config.name) == config


def test_reads_the_released_config_json():
    assert ModelConfig.from_hf(RELEASED_20B_CONFIG) == get_config("gpt-oss-20b")


def test_reads_the_current_transformers_rope_layout():
    hf = get_config("gpt-oss-120b").to_hf()
    rope = hf.pop("rope_scaling") | {"rope_theta": hf.pop("rope_theta")}
    hf["rope_parameters"] = rope
    assert ModelConfig.from_hf(hf) == get_config("gpt-oss-120b")


def test_layer_pattern_alternates_starting_with_a_sliding_layer():
    config = get_config("gpt-oss-20b")
    assert config.layer_types[:4] == (SLIDING, FULL, SLIDING, FULL)
    assert config.num_sliding_layers == 12


def test_bad_configs_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="model_type 'llama'"):
        ModelConfig.from_hf(RELEASED_20B_CONFIG | {"model_type": "llama"})
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        ModelConfig(num_attention_heads=6, num_key_value_heads=4)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        ModelConfig(num_local_experts=2, num_experts_per_tok=3)
    with pytest.raises(ValueError, match="layer_types has 2 entries"):
        ModelConfig(num_hidden_layers=3, layer_types=(SLIDING, FULL))
    with pytest.raises(KeyError, match="known presets"):
        get_config("gpt-oss-7b")


def test_replace_rederives_the_layer_pattern_for_a_new_depth():
    deeper = get_config("gpt-oss-nano").replace(num_hidden_layers=5)
    assert deeper.layer_types == (SLIDING, FULL, SLIDING, FULL, SLIDING)
    custom = deeper.replace(num_hidden_layers=2, layer_types=(FULL, FULL))
    assert custom.layer_types == (FULL, FULL)
