"""GGUF in and out (gptoss.gguf): round trips through the `gguf` package's own reader, the layouts
llama.cpp expects, refusals and damaged files, atomic writes, `gptoss export --ollama`."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import gguf
import numpy as np
import pytest
import torch

from conftest import random_model, tiny_config
from gptoss.checkpoint import load_model, save_model
from gptoss.cli import main
from gptoss.gguf import CHAT_TEMPLATE, OLLAMA_STOPS, GGUFError, read_config, save_gguf
from gptoss.quant.mxfp4 import quantize_experts, unpack
from gptoss.tokenizer import Tokenizer
from gptoss.trimmed_vocab import set_vocabulary
from gptoss.vocab import byte_token_ids, choose_vocabulary

Q = gguf.GGMLQuantizationType
O200K = dict(vocab_size=Tokenizer.N_VOCAB, eos_token_id=Tokenizer.RETURN, pad_token_id=Tokenizer.ENDOFTEXT)


def trimmed_model(seed: int = 0, **changes) -> torch.nn.Module:
    """A tiny model over 400 o200k_harmony ids (the bytes, harmony's tokens and the first others)."""
    config = tiny_config(**O200K, vocab_rows=400, **changes)
    model = random_model(config, seed=seed)
    set_vocabulary(model, torch.from_numpy(choose_vocabulary(np.ones(2000), 400)))
    return model


def mxfp4_model() -> torch.nn.Module:
    return quantize_experts(trimmed_model().to(torch.bfloat16))


def prompt(model: torch.nn.Module) -> torch.Tensor:
    ids = model.model.token_ids if model.config.vocab_rows is not None else torch.arange(Tokenizer.N_VOCAB)
    picks = torch.randint(0, len(ids), (2, 9), generator=torch.Generator().manual_seed(1))
    return ids[picks]


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name
    ids = prompt(a)
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


def tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def values(tensor) -> np.ndarray:
    """A reader tensor dequantized by the gguf package itself, in its logical shape."""
    return gguf.quants.dequantize(np.array(tensor.data), tensor.tensor_type)


# ---------------------------------------------------------------------- round trips
def test_mxfp4_experts_are_written_byte_for_byte_in_ggml_layout(tmp_path):
    model = mxfp4_model()
    path = save_gguf(model, tmp_path / "m.gguf", progress=False)
    stored = tensors(path)
    for i, block in enumerate(model.model.layers):
        experts = block.mlp.experts
        gate_up = unpack(
            experts.gate_up_proj_blocks, experts.gate_up_proj_scales, torch.float32
        )  # (E, H, 2I)
        down = unpack(experts.down_proj_blocks, experts.down_proj_scales, torch.float32)  # (E, I, H)
        for name, ours in (("gate", gate_up[..., 0::2]), ("up", gate_up[..., 1::2]), ("down", down)):
            tensor = stored[f"blk.{i}.ffn_{name}_exps.weight"]
            assert tensor.tensor_type == Q.MXFP4
            # ggml stores rows = outputs: (E, out, in)
            np.testing.assert_array_equal(values(tensor), ours.transpose(-1, -2).numpy())
        # the scale byte leads each 17-byte block and is the HF exponent unchanged
        raw = np.array(stored[f"blk.{i}.ffn_down_exps.weight"].data).reshape(-1, 17)
        np.testing.assert_array_equal(raw[:, 0], experts.down_proj_scales.numpy().reshape(-1))
        gate_bias = values(stored[f"blk.{i}.ffn_gate_exps.bias"])
        np.testing.assert_array_equal(
            gate_bias, experts.gate_up_proj_bias[..., 0::2].detach().float().numpy()
        )


def test_bf16_tensors_are_written_bit_for_bit_under_llama_cpp_names(tmp_path):
    model = trimmed_model().to(torch.bfloat16)
    stored = tensors(save_gguf(model, tmp_path / "m.gguf", progress=False))
    attn = model.model.layers[1].self_attn
    for name, ours in (
        ("token_embd.weight", model.model.embed_tokens.weight),
        ("output.weight", model.lm_head.weight),
        ("blk.1.attn_q.weight", attn.q_proj.weight),
        ("blk.1.attn_output.weight", attn.o_proj.weight),
    ):
        assert stored[name].tensor_type == Q.BF16, name
        np.testing.assert_array_equal(values(stored[name]), ours.detach().float().numpy(), err_msg=name)
    # vectors, biases and the router stay f32, as llama.cpp's converter writes them
    for name in ("blk.1.attn_sinks.weight", "blk.1.ffn_gate_inp.weight", "blk.1.ffn_up_exps.bias"):
        assert stored[name].tensor_type == Q.F32, name
    np.testing.assert_array_equal(
        values(stored["blk.1.attn_sinks.weight"]), attn.sinks.detach().float().numpy()
    )


def test_mxfp4_model_round_trips_exactly(tmp_path):
    model = mxfp4_model()
    loaded = load_model(save_gguf(model, tmp_path / "m.gguf", progress=False))
    assert_same_model(model, loaded)


def test_dense_member_round_trips_exactly_as_a_one_expert_moe(tmp_path):
    # num_experts_per_tok 4: a dense member has no use for it and reads back the default
    model = trimmed_model(num_local_experts=0, num_experts_per_tok=4).to(torch.bfloat16)
    path = save_model(model, tmp_path / "dense.gguf", format="gguf")
    reader = gguf.GGUFReader(path)
    assert reader.fields["gpt-oss.expert_count"].contents() == 1  # what llama.cpp runs
    assert not values(tensors(path)["blk.0.ffn_gate_inp.weight"]).any()  # a zero router: weight 1
    assert_same_model(model, load_model(path))


def test_full_vocabulary_f32_model_round_trips_exactly(tmp_path):
    model = random_model(tiny_config(**O200K, num_hidden_layers=2))
    path = save_gguf(model, tmp_path / "full.gguf", outtype="f32", progress=False)
    assert read_config(path).vocab_rows is None  # all 201,088 tokens (gguf's reader takes ~30 s on them)
    assert_same_model(model, load_model(path))


def test_trimmed_vocabulary_is_written_as_its_rows_and_comes_back(tmp_path):
    model = trimmed_model(tie_word_embeddings=True).to(torch.bfloat16)
    path = save_gguf(model, tmp_path / "t.gguf", progress=False)
    fields = gguf.GGUFReader(path).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 400
    ids = model.model.token_ids.tolist()
    assert tokens[ids.index(Tokenizer.START)] == "<|start|>"
    by_byte = byte_token_ids()  # byte tokens are stored as GPT-2's printable characters
    assert tokens[ids.index(by_byte[ord("A")])] == "A"
    assert tokens[ids.index(by_byte[ord("\n")])] == "\u010a"
    assert fields["tokenizer.ggml.eos_token_id"].contents() == ids.index(Tokenizer.RETURN)
    loaded = load_model(path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied again
    assert_same_model(model, loaded)


def test_a_loaded_gguf_exports_to_the_same_bytes(tmp_path):
    first = save_gguf(mxfp4_model(), tmp_path / "a.gguf", progress=False)
    second = save_gguf(load_model(first), tmp_path / "b.gguf", progress=False)
    assert first.read_bytes() == second.read_bytes()


def test_q8_0_matrices_load_dequantized(tmp_path):
    model = mxfp4_model()
    path = save_gguf(model, tmp_path / "q8.gguf", outtype="q8_0", progress=False)
    assert tensors(path)["blk.0.attn_q.weight"].tensor_type == Q.Q8_0
    loaded = load_model(path, dtype=torch.float32)
    expected = values(tensors(path)["blk.0.attn_q.weight"])
    np.testing.assert_array_equal(loaded.model.layers[0].self_attn.q_proj.weight.detach().numpy(), expected)
    torch.testing.assert_close(
        loaded.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight.float(),
        atol=2e-3, rtol=0.02,
    )  # fmt: skip


def test_hyperparameters_are_the_keys_llama_cpp_reads(tmp_path):
    model = mxfp4_model()
    path = save_gguf(model, tmp_path / "m.gguf", progress=False)
    fields = gguf.GGUFReader(path).fields

    def get(key):
        return fields[key].contents()

    c = model.config
    assert get("general.architecture") == "gpt-oss"
    assert get("general.file_type") == gguf.LlamaFileType.MOSTLY_MXFP4_MOE
    assert get("gpt-oss.block_count") == c.num_hidden_layers
    assert get("gpt-oss.expert_count") == c.num_local_experts
    assert get("gpt-oss.expert_used_count") == c.num_experts_per_tok
    assert get("gpt-oss.expert_feed_forward_length") == c.intermediate_size
    assert get("gpt-oss.attention.sliding_window") == c.sliding_window
    assert get("gpt-oss.attention.sliding_window_pattern") == [True, False, True]
    assert get("gpt-oss.rope.scaling.type") == "yarn"
    assert get("gpt-oss.rope.scaling.factor") == c.rope_scaling_factor
    assert get("gpt-oss.rope.scaling.original_context_length") == c.rope_original_max_position_embeddings
    assert get("tokenizer.ggml.model") == "gpt2"
    assert get("tokenizer.ggml.pre") == "gpt-4o"
    assert read_config(path) == c


# ---------------------------------------------------------------------- the chat template
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
    ],
    [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
        ]},
        {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "sunny"},
    ],
]  # fmt: skip


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_renders_what_our_harmony_renderer_does(messages):
    import jinja2

    from gptoss.harmony import chat_messages_to_harmony, render_for_completion
    from gptoss.tokenizer import get_tokenizer

    ours = get_tokenizer().decode(render_for_completion(chat_messages_to_harmony(messages)))
    rendered = (
        jinja2.Environment().from_string(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    )
    assert rendered == ours


# ---------------------------------------------------------------------- refusals and damaged files
def test_other_architecture_is_refused_by_name(tmp_path):
    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match="'llama' model; gptoss loads only gpt-oss"):
        load_model(path)


def test_truncated_file_is_reported(tmp_path):
    path = save_gguf(mxfp4_model(), tmp_path / "m.gguf", progress=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFError, match="truncated"):
        load_model(path)


def test_not_a_gguf_file_is_reported(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"not a model at all" * 10)
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        load_model(path)
    with pytest.raises(GGUFError, match="does not exist"):
        load_model(tmp_path / "missing.gguf")


def test_swiglu_llama_cpp_cannot_run_is_refused(tmp_path):
    model = trimmed_model(swiglu_limit=5.0)
    with pytest.raises(GGUFError, match="limit 5.0"):
        save_gguf(model, tmp_path / "m.gguf", progress=False)
    assert not list(tmp_path.iterdir())


def test_failed_write_leaves_the_old_file_and_no_partial_one(tmp_path):
    """A write that runs out of room (a file size limit here) keeps OUT.gguf as it was."""
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous export")
    script = textwrap.dedent(f"""
        import resource, signal, sys, torch
        sys.path.insert(0, {str(__file__.rsplit("/", 1)[0])!r})
        from test_gguf import mxfp4_model
        from gptoss.gguf import save_gguf
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get the EFBIG error, not the signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        save_gguf(mxfp4_model(), {str(out)!r}, progress=False)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode != 0 and "is the disk full?" in done.stderr, done.stderr[-2000:]
    assert out.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


# ---------------------------------------------------------------------- gptoss export
def test_export_command_writes_gguf_and_ollama_modelfile(tmp_path, capsys):
    checkpoint = tmp_path / "ckpt"
    model = mxfp4_model()
    save_model(model, checkpoint)
    ollama = tmp_path / "ollama"
    assert main(["export", str(checkpoint), "--ollama", str(ollama), "--quiet"]) == 0
    gguf_path = ollama / "ckpt.gguf"  # named after the checkpoint
    assert f"wrote {gguf_path}" in capsys.readouterr().out
    assert_same_model(model, load_model(gguf_path))

    modelfile = (ollama / "Modelfile").read_text()
    assert f"FROM ./{gguf_path.name}\n" in modelfile
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    for piece in ("<|start|>user<|message|>{{ .Content }}<|end|>", "range .Messages", "<|start|>assistant"):
        assert piece in template
    for stop in OLLAMA_STOPS:
        assert f'PARAMETER stop "{stop}"' in modelfile
    assert "PARAMETER temperature 1\n" in modelfile


def test_export_command_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["export", "gptoss-nano", str(tmp_path / "out.bin"), "--quiet"]) == 2
    assert "should end in .gguf" in capsys.readouterr().err
    assert main(["export", "gptoss-nano"]) == 2
    assert "--ollama DIR" in capsys.readouterr().err
