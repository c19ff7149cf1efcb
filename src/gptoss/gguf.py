"""GGUF in and out: gpt-oss models as llama.cpp, LM Studio and Ollama read them, and back.

Files are read and written with the `gguf` package (llama.cpp's own); this module holds only the
mapping between our Hugging Face-layout tensors and llama.cpp's `gpt-oss` architecture:

- names: `model.layers.N.self_attn.q_proj.weight` ↔ `blk.N.attn_q.weight`, and so on (`_LAYER`);
- experts: our fused gate/up projection has interleaved columns (gate even, linear odd), llama.cpp
  keeps `ffn_gate_exps` and `ffn_up_exps` apart, each (E, I, H) with rows = outputs;
- MXFP4 (GGML type 39): the same 32-element blocks and e8m0 scale bytes as the HF packing, but a
  ggml block is 17 bytes (scale first) and puts elements 0-15 in the low nibbles and 16-31 in the
  high ones, where HF packs neighbours (2j low, 2j+1 high) into byte j. Both directions are
  lossless byte shuffles (`_hf_to_ggml_mxfp4`, `_ggml_to_hf_mxfp4`);
- the tokenizer: o200k_harmony as a GPT-2-style byte-level BPE (`tokenizer.ggml.model` "gpt2",
  pre-tokenizer "gpt-4o"), the harmony specials as control tokens, and a harmony chat template;
- a dense member is written as the one-expert MoE with a zero router that llama.cpp runs (softmax
  over a single logit is 1); a trimmed vocabulary is written as a vocabulary of its own rows only,
  so llama.cpp's ids are our row numbers and nothing outside them can be produced — exact, where
  padding the head to 201,088 rows could not be (a zero row scores 0, which can win).

Keys under `gptoss.` (ignored by llama.cpp) record what the gpt-oss keys cannot: a dense member and
a tied embedding, so that our own files load back as exactly the model that was saved.
"""

from __future__ import annotations

import functools
import logging
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import gguf
import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from gptoss.checkpoint import CheckpointError, empty_model, hf_state_dict, hf_tensor_map
from gptoss.config import FULL, MXFP4_BLOCK, SLIDING, ModelConfig
from gptoss.model import GptOss

ARCH = "gpt-oss"
Q = gguf.GGMLQuantizationType
# --outtype name → the GGML type of every weight matrix that is not an MXFP4 expert
OUTTYPES = {"bf16": Q.BF16, "f16": Q.F16, "f32": Q.F32, "q8_0": Q.Q8_0}
_FILE_TYPES = {
    Q.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    Q.F16: gguf.LlamaFileType.MOSTLY_F16,
    Q.F32: gguf.LlamaFileType.ALL_F32,
    Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
}
# llama.cpp hard-codes the clamped SwiGLU of the released models (llm_graph's SWIGLU_OAI_MOE).
_LLAMA_CPP_SWIGLU = (1.702, 7.0)

# HF name (after `model.layers.N.`) → GGUF name (after `blk.N.`), for tensors that keep their layout.
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.sinks": "attn_sinks.weight",
    "mlp.router.weight": "ffn_gate_inp.weight",
    "mlp.router.bias": "ffn_gate_inp.bias",
    "mlp.experts.down_proj_bias": "ffn_down_exps.bias",
}
_TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


class GGUFError(CheckpointError):
    """A GGUF file gptoss cannot read or a model it cannot write as GGUF; the message says why."""


# ---------------------------------------------------------------------- MXFP4 block layouts
def _hf_to_ggml_mxfp4(blocks: Tensor, scales: Tensor) -> np.ndarray:
    """HF blocks (..., G, 16) and scales (..., G) → ggml MXFP4 bytes (..., G·17)."""
    b = blocks.cpu().numpy()
    codes = np.stack((b & 0x0F, b >> 4), axis=-1).reshape(*b.shape[:-1], MXFP4_BLOCK)  # in order
    qs = codes[..., :16] | (codes[..., 16:] << 4)
    out = np.concatenate((scales.cpu().numpy()[..., None], qs), axis=-1)
    return out.reshape(*b.shape[:-2], -1)


def _ggml_to_hf_mxfp4(data: np.ndarray) -> tuple[Tensor, Tensor]:
    """ggml MXFP4 bytes (..., G·17) → HF blocks (..., G, 16) and scales (..., G)."""
    data = np.asarray(data).reshape(*data.shape[:-1], -1, 17)
    qs = data[..., 1:]
    codes = np.concatenate((qs & 0x0F, qs >> 4), axis=-1)  # elements 0..31 in order
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return torch.from_numpy(np.ascontiguousarray(blocks)), torch.from_numpy(
        np.ascontiguousarray(data[..., 0])
    )


# ---------------------------------------------------------------------- float encodings
def _encode(t: Tensor, qtype: Q) -> np.ndarray:
    """A float tensor as the bytes of GGML type `qtype` (rows = the last dimension)."""
    t = t.detach().cpu().contiguous()
    if qtype == Q.F32:
        array = t.float().numpy()
    elif qtype == Q.BF16:
        array = t.to(torch.bfloat16).view(torch.int16).numpy()
    elif qtype == Q.F16:
        array = t.to(torch.float16).numpy()
    else:
        array = gguf.quants.quantize(t.float().numpy(), qtype)
    return array.reshape(-1).view(np.uint8).reshape(*t.shape[:-1], -1)


def _decode(tensor: Any) -> Tensor:
    """A GGUF reader tensor (not MXFP4) as a torch tensor of its logical shape (outermost first)."""
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    qtype = tensor.tensor_type
    if qtype in (Q.F32, Q.F16):
        return torch.from_numpy(np.array(tensor.data)).reshape(shape)
    if qtype == Q.BF16:
        raw = np.array(tensor.data).reshape(-1).view(np.int16)
        return torch.from_numpy(raw).view(torch.bfloat16).reshape(shape)
    try:  # q8_0 and the other block formats the gguf package can decode
        values = gguf.quants.dequantize(np.array(tensor.data), qtype)
    except NotImplementedError:
        raise GGUFError(
            f"tensor {tensor.name} has GGML type {qtype.name}, which gptoss cannot read"
        ) from None
    return torch.from_numpy(values).reshape(shape)


# ---------------------------------------------------------------------- tokenizer
@functools.cache
def _byte_chars() -> tuple[str, ...]:
    """GPT-2's byte → printable character table, which byte-level BPE vocabularies (and llama.cpp's
    "gpt2" tokenizer) use to store token bytes as text: printable bytes stand for themselves, the
    rest map to 256 + n in order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return tuple(chars[b] for b in range(256))


class _Vocabulary(NamedTuple):
    tokens: list[str]  # id → token text (BPE tokens in GPT-2 byte characters, specials by name)
    special: set[int]


@functools.cache
def _o200k() -> _Vocabulary:
    from gptoss.tokenizer import N_RANKS, Tokenizer, get_tokenizer

    tokenizer, chars = get_tokenizer(), _byte_chars()
    tokens = ["".join(chars[b] for b in tokenizer.decode_single_token_bytes(i)) for i in range(N_RANKS)]
    names: dict[int, str] = {}
    # o200k_base's <|endofprompt|> and harmony's <|reserved_200018|> share an id: keep the former
    for name in sorted(tokenizer.special_tokens_set, key=lambda n: ("reserved" in n, n)):
        names.setdefault(tokenizer.encode_single_token(name), name)
    tokens += [names[i] for i in range(N_RANKS, Tokenizer.N_VOCAB)]
    return _Vocabulary(tokens, set(range(N_RANKS, Tokenizer.N_VOCAB)))


def _merges(tokens: list[str], ranks: dict[str, int]) -> list[str]:
    """The BPE merges that reproduce tiktoken's encoding of `ranks`, in priority order.

    tiktoken merges by the rank of the merged token; a merge list does the same if it holds, for
    each token, every split into two tokens, ordered by the merged token's rank (transformers'
    TikTokenConverter builds the same list; it is not a gptoss dependency, so we build it here)."""
    merges = []
    for token in tokens:
        splits = [
            (ranks[token[:i]], ranks[token[i:]], i)
            for i in range(1, len(token))
            if token[:i] in ranks and token[i:] in ranks
        ]
        merges += [f"{token[:i]} {token[i:]}" for _, _, i in sorted(splits)]
    return merges


# The harmony chat format for chat templates (Jinja, as llama.cpp's --jinja and LM Studio read it):
# the system header gpt-oss was trained with, system/developer messages as developer instructions,
# final answers and tool calls of earlier turns (their reasoning dropped, as harmony says), and the
# assistant header to complete. Tool definitions are not rendered.
CHAT_TEMPLATE = (
    "{{- '<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\\n"
    "Knowledge cutoff: 2024-06\\n\\nReasoning: ' ~ (reasoning_effort | default('medium')) ~ '\\n\\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>' -}}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' or m.role == 'developer' -%}"
    "{{- '<|start|>developer<|message|># Instructions\\n\\n' ~ m.content ~ '<|end|>' -}}"
    "{%- elif m.role == 'user' -%}"
    "{{- '<|start|>user<|message|>' ~ m.content ~ '<|end|>' -}}"
    "{%- elif m.role == 'assistant' -%}"
    "{%- if m.content -%}"
    "{{- '<|start|>assistant<|channel|>final<|message|>' ~ m.content ~ '<|end|>' -}}"
    "{%- endif -%}"
    "{%- for call in m.tool_calls or [] -%}"
    "{{- '<|start|>assistant<|channel|>commentary to=functions.' ~ call.function.name"
    " ~ ' <|constrain|>json<|message|>'"
    " ~ (call.function.arguments if call.function.arguments is string else call.function.arguments | tojson)"
    " ~ '<|call|>' -}}"
    "{%- endfor -%}"
    "{%- elif m.role == 'tool' -%}"
    "{{- '<|start|>functions.' ~ (m.name or 'tool') ~ ' to=assistant<|channel|>commentary<|message|>'"
    " ~ m.content ~ '<|end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start|>assistant' -}}{%- endif -%}"
)


def _add_tokenizer(writer: gguf.GGUFWriter, model: GptOss) -> None:
    from gptoss.tokenizer import Tokenizer

    vocab = _o200k()
    if model.config.vocab_size != Tokenizer.N_VOCAB:
        raise GGUFError(
            f"the model's vocabulary has {model.config.vocab_size} ids, o200k_harmony {Tokenizer.N_VOCAB}: "
            "only o200k_harmony models can be written as GGUF"
        )
    ids = model.model.token_ids.tolist() if model.config.vocab_rows is not None else range(Tokenizer.N_VOCAB)
    row_of = {token_id: row for row, token_id in enumerate(ids)}
    tokens = [vocab.tokens[i] for i in ids]
    bpe = {text: row for row, text in enumerate(tokens) if ids[row] not in vocab.special}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-4o")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if i in vocab.special else gguf.TokenType.NORMAL for i in ids]
    )
    writer.add_token_merges(_merges(list(bpe), bpe))
    for add, token_id in (
        (writer.add_bos_token_id, Tokenizer.STARTOFTEXT),
        (writer.add_eos_token_id, model.config.eos_token_id),
        (writer.add_pad_token_id, model.config.pad_token_id),
    ):
        if token_id in row_of:
            add(row_of[token_id])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


# ---------------------------------------------------------------------- writing
class _Planned(NamedTuple):
    name: str
    shape: tuple[int, ...]  # logical, outermost first
    qtype: Q
    data: Callable[[], np.ndarray]  # the bytes, made when written


def _plan(model: GptOss, outtype: Q) -> list[_Planned]:
    """Every GGUF tensor of `model`, in llama.cpp's layout; data is converted only when written."""
    config, state = model.config, hf_state_dict(model)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]  # llama.cpp needs `output`
    plan: list[_Planned] = []

    def add(name: str, tensor: Tensor, qtype: Q | None = None) -> None:
        if qtype is None:  # weight matrices in `outtype`; vectors, biases and routers in f32, as
            # llama.cpp's converter writes them (its expert-bias kernel takes f32 only)
            f32 = tensor.dim() < 2 or not name.endswith(".weight") or ".ffn_gate_inp." in name
            qtype = Q.F32 if f32 else outtype
            if qtype == Q.Q8_0 and tensor.shape[-1] % 32:
                qtype = Q.BF16
        plan.append(_Planned(name, tuple(tensor.shape), qtype, lambda: _encode(tensor, qtype)))

    def add_mxfp4(name: str, blocks: Tensor, scales: Tensor) -> None:
        shape = (*blocks.shape[:-2], blocks.shape[-2] * MXFP4_BLOCK)
        plan.append(_Planned(name, shape, Q.MXFP4, lambda: _hf_to_ggml_mxfp4(blocks, scales)))

    for hf_name, gguf_name in _TOP.items():
        add(gguf_name, state[hf_name])
    for i in range(config.num_hidden_layers):
        prefix, blk = f"model.layers.{i}.", f"blk.{i}."
        for hf_name, gguf_name in _LAYER.items():
            add(blk + gguf_name, state[prefix + hf_name])
        experts = prefix + "mlp.experts."
        bias = state[experts + "gate_up_proj_bias"]  # (E, 2I), gate even, linear odd
        add(blk + "ffn_gate_exps.bias", bias[..., 0::2])
        add(blk + "ffn_up_exps.bias", bias[..., 1::2])
        if experts + "gate_up_proj_blocks" in state:
            blocks, scales = state[experts + "gate_up_proj_blocks"], state[experts + "gate_up_proj_scales"]
            add_mxfp4(blk + "ffn_gate_exps.weight", blocks[:, 0::2], scales[:, 0::2])
            add_mxfp4(blk + "ffn_up_exps.weight", blocks[:, 1::2], scales[:, 1::2])
            add_mxfp4(
                blk + "ffn_down_exps.weight",
                state[experts + "down_proj_blocks"],
                state[experts + "down_proj_scales"],
            )
        else:
            gate_up = state[experts + "gate_up_proj"].transpose(-1, -2)  # (E, 2I, H)
            add(blk + "ffn_gate_exps.weight", gate_up[:, 0::2])
            add(blk + "ffn_up_exps.weight", gate_up[:, 1::2])
            add(blk + "ffn_down_exps.weight", state[experts + "down_proj"].transpose(-1, -2))
    return plan


def _check_exportable(config: ModelConfig) -> None:
    if (config.swiglu_alpha, config.swiglu_limit) != _LLAMA_CPP_SWIGLU:
        raise GGUFError(
            f"this model's SwiGLU uses alpha {config.swiglu_alpha} and limit {config.swiglu_limit}; "
            f"llama.cpp's gpt-oss runs only alpha {_LLAMA_CPP_SWIGLU[0]}, limit {_LLAMA_CPP_SWIGLU[1]}, "
            "so it would compute another model: keep the released values to export as GGUF"
        )


def _add_hparams(writer: gguf.GGUFWriter, config: ModelConfig, outtype: Q, packed: bool) -> None:
    writer.add_name(config.name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_MXFP4_MOE if packed else _FILE_TYPES[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_expert_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(config.rope_scaling_factor)
    writer.add_rope_scaling_orig_ctx_len(config.rope_original_max_position_embeddings)
    writer.add_rope_scaling_yarn_beta_fast(config.rope_beta_fast)
    writer.add_rope_scaling_yarn_beta_slow(config.rope_beta_slow)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_expert_count(config.num_local_experts if config.is_moe else 1)
    writer.add_expert_used_count(config.experts_per_token)
    writer.add_sliding_window(config.sliding_window)
    writer.add_sliding_window_pattern([t == SLIDING for t in config.layer_types])
    writer.add_bool("gptoss.dense", not config.is_moe)
    writer.add_bool("gptoss.tie_word_embeddings", config.tie_word_embeddings)


def save_gguf(model: GptOss, path: str | Path, outtype: str = "bf16", progress: bool = True) -> Path:
    """Write `model` as one GGUF file for llama.cpp (architecture `gpt-oss`).

    MXFP4 experts stay MXFP4 (byte for byte); other matrices are `outtype` (bf16, f16, f32 or q8_0),
    vectors f32. The file is written under a temporary name beside `path` and renamed when whole.
    """
    if outtype not in OUTTYPES:
        raise GGUFError(f"unknown GGUF outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    qtype, config = OUTTYPES[outtype], model.config
    _check_exportable(config)
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    plan = _plan(model, qtype)
    packed = any(p.qtype == Q.MXFP4 for p in plan)

    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # the writer logs its plan at INFO, naming the temporary file; our progress bar says enough
    gguf_log = logging.getLogger("gguf")
    level = gguf_log.level
    gguf_log.setLevel(logging.WARNING)
    writer = gguf.GGUFWriter(tmp, ARCH)
    try:
        _add_hparams(writer, config, qtype, packed)
        _add_tokenizer(writer, model)
        for p in plan:
            byte_shape = gguf.quant_shape_to_byte_shape(p.shape, p.qtype)
            writer.add_tensor_info(p.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), p.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(int(np.prod(gguf.quant_shape_to_byte_shape(p.shape, p.qtype))) for p in plan)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {path.name}", disable=not progress)
        with bar, torch.no_grad():
            for p in plan:
                data = p.data()
                writer.write_tensor_data(data)
                bar.update(data.nbytes)
        writer.flush()
        os.fsync(writer.fout[0].fileno())
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp's 0600 → the modes of an ordinary download
        os.replace(tmp, path)
    except BaseException as exc:
        writer.close()
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise GGUFError(f"writing {path} failed ({exc}); is the disk full? {path} is unchanged") from exc
        raise
    finally:
        gguf_log.setLevel(level)
    return path


# ---------------------------------------------------------------------- reading
class _Tensor(NamedTuple):
    """One tensor of a GGUF file (the fields of `gguf.ReaderTensor` that we use)."""

    name: str
    tensor_type: Q
    shape: np.ndarray  # ggml order: innermost dimension first
    data: np.ndarray  # a read-only memory map: elements for float types, bytes for block types


class _GGUFFile:
    """The keys and tensors of a GGUF file: header parsed with `struct`, tensor data memory-mapped.

    `gguf.GGUFReader` builds numpy views for every element of every array key, which takes about
    half a minute for o200k_harmony's 201,088 tokens and 446,189 merges; this reads the same
    layout (GGUF v2/v3, little-endian) in about a second."""

    _SCALARS = {
        gguf.GGUFValueType.UINT8: "<B", gguf.GGUFValueType.INT8: "<b", gguf.GGUFValueType.UINT16: "<H",
        gguf.GGUFValueType.INT16: "<h", gguf.GGUFValueType.UINT32: "<I", gguf.GGUFValueType.INT32: "<i",
        gguf.GGUFValueType.FLOAT32: "<f", gguf.GGUFValueType.BOOL: "<?", gguf.GGUFValueType.UINT64: "<Q",
        gguf.GGUFValueType.INT64: "<q", gguf.GGUFValueType.FLOAT64: "<d",
    }  # fmt: skip

    def __init__(self, path: Path) -> None:
        self.map = np.memmap(path, mode="r")
        self.buffer, self.offset = memoryview(self.map), 0
        magic, version = self._unpack("<II")
        if magic != gguf.GGUF_MAGIC or version not in (2, 3):
            raise ValueError(f"no GGUF v2/v3 header (magic {magic:#x}, version {version})")
        n_tensors, n_fields = self._unpack("<QQ")
        self.fields: dict[str, Any] = {}
        for _ in range(n_fields):
            key = self._string()
            self.fields[key] = self._value(gguf.GGUFValueType(self._unpack("<I")[0]))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            dims = self._unpack(f"<{n_dims}Q")
            qtype, offset = self._unpack("<IQ")
            infos.append((name, np.array(dims, dtype=np.int64), Q(qtype), offset))
        alignment = int(self.fields.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
        start = -(-self.offset // alignment) * alignment
        self.tensors = [
            self._tensor(name, dims, qtype, start + offset) for name, dims, qtype, offset in infos
        ]

    def _unpack(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from(fmt, self.buffer, self.offset)
        self.offset += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (length,) = self._unpack("<Q")
        end = self.offset + length
        if end > len(self.buffer):
            raise ValueError("a string runs past the end of the file")
        text = bytes(self.buffer[self.offset : end]).decode("utf-8")
        self.offset = end
        return text

    def _value(self, vtype: gguf.GGUFValueType) -> Any:
        if vtype == gguf.GGUFValueType.STRING:
            return self._string()
        if vtype != gguf.GGUFValueType.ARRAY:
            return self._unpack(self._SCALARS[vtype])[0]
        item, count = self._unpack("<IQ")
        item = gguf.GGUFValueType(item)
        if item in self._SCALARS and item != gguf.GGUFValueType.BOOL:
            dtype = np.dtype(self._SCALARS[item])
            values = np.frombuffer(self.buffer, dtype, count, self.offset)
            self.offset += values.nbytes
            return values.tolist()
        return [self._value(item) for _ in range(count)]

    def _tensor(self, name: str, dims: np.ndarray, qtype: Q, offset: int) -> _Tensor:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(dims)) * size // block
        if offset + nbytes > len(self.map):
            raise ValueError(f"tensor {name} runs past the end of the file")
        shape = tuple(int(d) for d in reversed(dims.tolist()))
        floats = {Q.F32: np.float32, Q.F16: np.float16}
        if qtype in floats:
            data = self.map[offset : offset + nbytes].view(floats[qtype]).reshape(shape)
        else:
            data = self.map[offset : offset + nbytes].reshape(gguf.quant_shape_to_byte_shape(shape, qtype))
        return _Tensor(name, qtype, dims, data)


def _open(path: Path) -> _GGUFFile:
    try:
        return _GGUFFile(path)
    except (OSError, ValueError, IndexError, KeyError, struct.error, UnicodeDecodeError) as exc:
        raise GGUFError(
            f"{path} is not a readable GGUF file ({exc}); it may be truncated or still downloading — "
            "re-copy it"
        ) from exc


def _field(reader: _GGUFFile, key: str, default: Any = None) -> Any:
    return reader.fields.get(key, default)


def _config_from(reader: _GGUFFile, path: Path, rows: int) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise GGUFError(
            f"{path} holds a {arch!r} model; gptoss loads only gpt-oss GGUFs (architecture {ARCH!r})"
        )

    def key(name: str, default: Any = None) -> Any:
        value = _field(reader, f"{ARCH}.{name}", default)
        if value is None:
            raise GGUFError(f"{path} lacks the key {ARCH}.{name}, which every gpt-oss GGUF has")
        return value

    def real(name: str, default: float) -> float:
        # GGUF stores float32: take the shortest decimal that rounds to it (1e-05, not 9.9999997e-06)
        return float(str(np.float32(key(name, default))))

    from gptoss.tokenizer import Tokenizer

    defaults, dense = ModelConfig(), bool(_field(reader, "gptoss.dense", False))
    layers = key("block_count")
    pattern = _field(reader, f"{ARCH}.attention.sliding_window_pattern")
    layer_types = (
        tuple(SLIDING if p else FULL for p in pattern)
        if isinstance(pattern, list) and len(pattern) == layers
        else None
    )
    hidden, heads = key("embedding_length"), key("attention.head_count")
    try:
        return ModelConfig(
            vocab_size=Tokenizer.N_VOCAB,
            vocab_rows=None if rows == Tokenizer.N_VOCAB else rows,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=key("attention.head_count_kv"),
            head_dim=key("attention.key_length", hidden // heads),
            intermediate_size=key(
                "expert_feed_forward_length", _field(reader, f"{ARCH}.feed_forward_length")
            ),
            num_local_experts=0 if dense else key("expert_count"),
            num_experts_per_tok=defaults.num_experts_per_tok if dense else key("expert_used_count"),
            sliding_window=key("attention.sliding_window"),
            layer_types=layer_types,
            max_position_embeddings=key("context_length"),
            rope_theta=real("rope.freq_base", defaults.rope_theta),
            rope_scaling_factor=real("rope.scaling.factor", defaults.rope_scaling_factor),
            rope_original_max_position_embeddings=key(
                "rope.scaling.original_context_length", defaults.rope_original_max_position_embeddings
            ),
            rope_beta_fast=real("rope.scaling.yarn_beta_fast", defaults.rope_beta_fast),
            rope_beta_slow=real("rope.scaling.yarn_beta_slow", defaults.rope_beta_slow),
            rms_norm_eps=real("attention.layer_norm_rms_epsilon", defaults.rms_norm_eps),
            tie_word_embeddings=bool(_field(reader, "gptoss.tie_word_embeddings", False)),
            name=str(_field(reader, "general.name", path.stem)),
        )
    except ValueError as exc:
        raise GGUFError(f"{path}: its hyper-parameters do not make a gpt-oss model: {exc}") from exc


def _token_ids(reader: _GGUFFile, path: Path) -> list[int]:
    """The o200k_harmony id of each of the file's tokens (its rows)."""
    model = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if model != "gpt2" or not isinstance(tokens, list):
        raise GGUFError(f"{path} has no byte-level BPE vocabulary (tokenizer.ggml.model {model!r})")
    vocab = _o200k()
    id_of = {text: i for i, text in enumerate(vocab.tokens)} | {"<|reserved_200018|>": 200018}
    unknown = [t for t in tokens if t not in id_of]
    if unknown:
        raise GGUFError(
            f"{path}'s vocabulary is not o200k_harmony ({len(unknown)} unknown tokens, e.g. {unknown[0]!r}); "
            "gptoss runs only gpt-oss's tokenizer"
        )
    ids = [id_of[t] for t in tokens]
    if ids != sorted(set(ids)):
        raise GGUFError(f"{path}'s tokens are not o200k_harmony ids in ascending order")
    return ids


def _hf_tensors(tensors: dict[str, Any], config: ModelConfig) -> Iterator[tuple[str, Tensor]]:
    """(HF name, HF-layout tensor) for every tensor the GGUF holds, one at a time."""

    def get(name: str) -> Any:
        if name not in tensors:
            raise GGUFError(f"the file lacks tensor {name}")
        return tensors[name]

    for hf_name, gguf_name in _TOP.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        yield hf_name, _decode(get(gguf_name))
    for i in range(config.num_hidden_layers):
        prefix, blk = f"model.layers.{i}.", f"blk.{i}."
        for hf_name, gguf_name in _LAYER.items():
            yield prefix + hf_name, _decode(get(blk + gguf_name))
        experts = prefix + "mlp.experts."
        gate_b, up_b = _decode(get(blk + "ffn_gate_exps.bias")), _decode(get(blk + "ffn_up_exps.bias"))
        yield experts + "gate_up_proj_bias", torch.stack((gate_b, up_b), dim=-1).flatten(-2)
        gate, up, down = (get(f"{blk}ffn_{p}_exps.weight") for p in ("gate", "up", "down"))
        if gate.tensor_type == Q.MXFP4:
            (gate_blocks, gate_scales), (up_blocks, up_scales) = (
                _ggml_to_hf_mxfp4(t.data) for t in (gate, up)
            )
            yield experts + "gate_up_proj_blocks", torch.stack((gate_blocks, up_blocks), dim=2).flatten(1, 2)
            yield experts + "gate_up_proj_scales", torch.stack((gate_scales, up_scales), dim=2).flatten(1, 2)
            down_blocks, down_scales = _ggml_to_hf_mxfp4(down.data)
            yield experts + "down_proj_blocks", down_blocks
            yield experts + "down_proj_scales", down_scales
        else:
            gate_up = torch.stack((_decode(gate), _decode(up)), dim=2).flatten(1, 2)  # (E, 2I, H)
            yield experts + "gate_up_proj", gate_up.transpose(-1, -2)
            yield experts + "down_proj", _decode(down).transpose(-1, -2)


def _expert_types(tensors: dict[str, Any]) -> set[Q]:
    return {t.tensor_type for name, t in tensors.items() if name.endswith("_exps.weight")}


def read_config(path: str | Path) -> ModelConfig:
    """The `ModelConfig` of a gpt-oss GGUF file, read from its keys without loading the tensors."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path} does not exist")
    reader = _open(path)
    rows = len(_field(reader, "tokenizer.ggml.tokens", []) or [])
    return _config_from(reader, path, rows)


def load_gguf(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    dequantize: bool = False,
) -> GptOss:
    """Load a gpt-oss GGUF (ours or llama.cpp's converter's) as a `GptOss`.

    MXFP4 experts stay packed unless `dequantize`; bf16/f16/f32/q8_0 tensors are converted to
    `dtype` (default: the embedding's type, bf16 for a quantized one).
    """
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path} does not exist")
    reader = _open(path)
    token_ids = _token_ids(reader, path) if _field(reader, "general.architecture") == ARCH else []
    config = _config_from(reader, path, len(token_ids))
    tensors = {t.name: t for t in reader.tensors}
    embed = tensors.get("token_embd.weight")
    if dtype is None:
        stored = {Q.F32: torch.float32, Q.F16: torch.float16}
        dtype = stored.get(embed.tensor_type, torch.bfloat16) if embed is not None else torch.bfloat16
    packed = Q.MXFP4 in _expert_types(tensors)
    if packed and not config.is_moe:
        raise GGUFError(f"{path}: MXFP4 weights in a dense model are not supported")

    model = empty_model(config, dtype, device, packed)

    expected = hf_tensor_map(model)
    filled: set[str] = set()
    try:
        with torch.no_grad():
            for name, stored in _hf_tensors(tensors, config):
                if name not in expected:
                    if not config.is_moe and name.endswith(("mlp.router.weight", "mlp.router.bias")):
                        continue  # a dense member's zero router over its single expert
                    raise GGUFError(f"tensor {name} has no place in this model")
                target, _, from_file = expected[name]
                value = from_file(stored)
                if tuple(value.shape) != tuple(target.shape):
                    raise GGUFError(
                        f"tensor {name} has shape {tuple(value.shape)}, but the file's hyper-parameters "
                        f"need {tuple(target.shape)}"
                    )
                target.copy_(value)
                filled.add(name)
            for name, entry in expected.items():
                if name.endswith("token_ids"):
                    entry.tensor.copy_(torch.tensor(token_ids))
                    filled.add(name)
    except (ValueError, IndexError) as exc:
        if isinstance(exc, GGUFError):
            raise GGUFError(f"{path}: {exc}") from None
        raise GGUFError(
            f"{path}: a tensor does not fit its stated type and shape ({exc}); the file may be damaged"
        ) from exc
    if missing := sorted(set(expected) - filled):
        raise GGUFError(f"{path} lacks tensors for {', '.join(missing[:8])}")

    if packed and dequantize:
        from gptoss.quant.mxfp4 import dequantize_experts

        dequantize_experts(model, dtype)
    return model.eval()


def is_gguf(path: str | Path) -> bool:
    """Whether `path` names a GGUF file (by its suffix, as llama.cpp's tools do)."""
    return Path(path).suffix.lower() == ".gguf"


# ---------------------------------------------------------------------- Ollama
# The same harmony rendering as CHAT_TEMPLATE, in the Go template language of Ollama's Modelfiles.
OLLAMA_TEMPLATE = """<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.
Knowledge cutoff: 2024-06

Reasoning: medium

# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>
{{- range .Messages }}
{{- if or (eq .Role "system") (eq .Role "developer") }}<|start|>developer<|message|># Instructions

{{ .Content }}<|end|>
{{- else if eq .Role "user" }}<|start|>user<|message|>{{ .Content }}<|end|>
{{- else if eq .Role "assistant" }}<|start|>assistant<|channel|>final<|message|>{{ .Content }}<|end|>
{{- end }}
{{- end }}<|start|>assistant"""
OLLAMA_STOPS = ("<|return|>", "<|call|>", "<|endoftext|>")


def write_modelfile(gguf_path: str | Path, directory: str | Path, config: ModelConfig) -> Path:
    """Write `directory/Modelfile` for `ollama create NAME -f Modelfile`: the GGUF, the harmony
    template, the stop tokens and gpt-oss's recommended sampling (temperature 1, top_p 1)."""
    directory, gguf_path = Path(directory).resolve(), Path(gguf_path).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    source = f"./{gguf_path.name}" if gguf_path.parent == directory else str(gguf_path)
    lines = [
        f"# {config.name}: ollama create NAME -f {directory / 'Modelfile'}",
        f"FROM {source}",
        f'TEMPLATE """{OLLAMA_TEMPLATE}"""',
        *(f'PARAMETER stop "{stop}"' for stop in OLLAMA_STOPS),
        "PARAMETER temperature 1",
        "PARAMETER top_p 1",
        f"PARAMETER num_ctx {min(config.max_position_embeddings, 8192)}",
    ]
    path = directory / "Modelfile"
    tmp = path.with_name(f".Modelfile.{os.getpid()}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def export(
    model: str | Path,
    out: str | Path | None,
    outtype: str = "bf16",
    ollama_dir: str | Path | None = None,
    progress: bool = True,
) -> list[Path]:
    """`gptoss export`: a checkpoint directory, GGUF or preset → one GGUF file (`out`, or
    `ollama_dir/NAME.gguf`), plus an Ollama Modelfile in `ollama_dir` when given. The files written."""
    from gptoss.checkpoint import load_model

    if out is None and ollama_dir is None:
        raise GGUFError("name the GGUF file to write (OUT.gguf), or --ollama DIR to write it there")
    if out is not None and not is_gguf(out):
        raise GGUFError(f"{out}: the output file's name should end in .gguf, as llama.cpp and Ollama expect")
    loaded = load_model(model)
    out = Path(out) if out is not None else Path(ollama_dir) / f"{loaded.config.name}.gguf"
    written = [save_gguf(loaded, out, outtype, progress=progress)]
    if ollama_dir is not None:
        written.append(write_modelfile(written[0], ollama_dir, loaded.config))
    return written
