"""The native kernels applied from outside (gptoss.inference.native): module swaps that keep the
model's parameters, names and state, and no reach into private fields or classes of live objects."""

import os

import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import random_model, tiny_config
from gptoss import ops
from gptoss.inference import native as native_modules

requires_native = pytest.mark.skipif(
    not ops.native_available() and not os.environ.get("GPTOSS_REQUIRE_NATIVE"),
    reason="native kernels not built (no C compiler); the PyTorch path is the one in use",
)


@requires_native
def test_native_linears_keep_parameters_and_state_dict():
    model = random_model(tiny_config()).to(torch.bfloat16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        before = model(ids[:, :1]).float()
        native_modules.use_native_kernels(model)
        after = model(ids[:, :1]).float()
    assert type(model.lm_head) is native_modules.NativeLinear
    assert state.keys() == model.state_dict().keys()
    # bf16 model: the native path accumulates in fp32 and rounds once, PyTorch rounds per op
    assert torch.allclose(before, after, atol=0.05, rtol=0.05)


@requires_native
def test_native_classes_replace_only_the_forward():
    model = native_modules.use_native_kernels(random_model(tiny_config()))
    block = model.model.layers[0]
    assert type(block.input_layernorm) is native_modules.NativeRMSNorm
    assert type(block.self_attn) is native_modules.NativeAttention
    assert type(block.mlp.router) is native_modules.NativeRouter
    # the same parameter objects (tying kept), only the class of their holder changed
    before = random_model(tiny_config(tie_word_embeddings=True))
    params = dict(before.named_parameters(remove_duplicate=False))
    after = native_modules.use_native_kernels(before)
    assert after is before
    assert all(p is params[name] for name, p in after.named_parameters(remove_duplicate=False))
    assert after.lm_head.weight is after.model.embed_tokens.weight


@requires_native
@pytest.mark.parametrize("head_dim", [16, 64])  # 64: the tiled bf16 kernel where the CPU has AVX-512 BF16
def test_prompt_chunks_attend_over_the_blocks_as_over_a_gathered_copy(monkeypatch, head_dim):
    """A prompt chunk of a full layer stores its keys and values in the cache's blocks and attends
    over them where they lie (`KVCache.prompt_view`): the same hidden states, bit for bit, as over
    the copy `update` gathers, across chunks that cross blocks and the sliding window."""
    from gptoss.inference.cache import KVCache
    from gptoss.inference.runner import forward_hidden

    config = tiny_config(head_dim=head_dim, num_hidden_layers=4)
    model = native_modules.use_native_kernels(random_model(config).to(torch.bfloat16))
    ids = torch.randint(0, config.vocab_size, (1, 75), generator=torch.Generator().manual_seed(1))

    def run() -> list[torch.Tensor]:
        cache = KVCache(config, 2, capacity=80, dtype=torch.bfloat16, block_size=8)
        cache.begin(slice(1, 2), 3)  # another row holds some blocks first
        cache.end()
        with torch.no_grad():
            return [
                forward_hidden(model, cache, ids[:, a:b], slice(0, 1))
                for a, b in ((0, 37), (37, 38), (38, 75))
            ]

    original, views = KVCache.prompt_view, []

    def counted(self: KVCache, layer_idx: int):
        views.append(original(self, layer_idx))
        return views[-1]

    monkeypatch.setattr(KVCache, "prompt_view", counted)
    paged = run()
    assert any(view is not None for view in views)  # the full layers' chunks took the blocks
    monkeypatch.setattr(KVCache, "prompt_view", lambda self, layer_idx: None)
    gathered = run()
    assert all(torch.equal(p, g) for p, g in zip(paged, gathered, strict=True))


class _LargestTensor(TorchFunctionMode):
    """The most elements of any tensor a torch function returns while the mode is on."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@requires_native
@pytest.mark.skipif(
    not ops.prompt_attention_in_place(torch.device("cpu"), torch.bfloat16),
    reason="PyTorch's attention serves prompts on this CPU (it builds its mask from the positions)",
)
def test_a_chunk_at_a_long_context_makes_nothing_of_its_tokens_times_its_keys():
    """A 64-token prompt chunk after 4,032 tokens through the native kernels: which keys each query
    sees goes to the kernels as positions, so nothing the pass makes (in the cache, the blocks or
    attention) holds T·S elements: a (T, S) mask built per pass and read by every full layer was
    64 MB a chunk at 128k."""
    from gptoss.inference.cache import KVCache
    from gptoss.inference.runner import forward_hidden

    config = tiny_config(head_dim=64, num_hidden_layers=2)  # a sliding and a full layer
    model = native_modules.use_native_kernels(random_model(config).to(torch.bfloat16))
    context, T = 4032, 64
    cache = KVCache(config, 1, capacity=context + T, dtype=torch.bfloat16)
    ids = torch.randint(0, config.vocab_size, (1, context + T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for start in range(0, context, 512):
            forward_hidden(model, cache, ids[:, start : min(start + 512, context)], slice(0, 1))
        with _LargestTensor() as largest:
            hidden = forward_hidden(model, cache, ids[:, context:], slice(0, 1))
    assert hidden.shape == (1, T, config.hidden_size) and torch.isfinite(hidden.float()).all()
    # (the largest left are the experts' activations of the chunk's T rows: T·S/8 here)
    assert largest.numel < T * (context + T) // 4, largest.numel
