"""A trimmed vocabulary inside the model: rows for some token ids, the whole id space outside.

`model.py` computes over embedding rows: a `GptOss` built for a config with `vocab_rows` reads row
numbers and scores rows, as transformers does with such a checkpoint. `trim_vocabulary` makes it
speak token ids, from outside, as the other module swaps do: the backbone maps each id to its row
(`model.token_ids`, ascending) before the embedding, and the head scatters the rows' logits into
the whole id space (−inf for ids without a row), so the tokenizer, the sampler and the server see
ordinary token ids. Choosing the ids and spelling text without a row in bytes is `gptoss.vocab`'s.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gptoss.model import Backbone, GptOss, KVCache


class TrimmedBackbone(Backbone):
    """The backbone's own modules, reading token ids through the row of each (`token_ids`)."""

    def __init__(self, backbone: Backbone, token_ids: Tensor) -> None:
        nn.Module.__init__(self)
        self.embed_tokens, self.layers = backbone.embed_tokens, backbone.layers
        self.norm, self.rotary_emb = backbone.norm, backbone.rotary_emb
        # The token id of each embedding row, ascending (checkpoint key `model.token_ids`).
        self.register_buffer("token_ids", token_ids)

    def token_rows(self, ids: Tensor) -> Tensor:
        """Embedding rows of token `ids`; a ValueError naming an id without a row."""
        rows = torch.searchsorted(self.token_ids, ids.contiguous()).clamp_(max=len(self.token_ids) - 1)
        missing = self.token_ids[rows] != ids
        if missing.any():
            raise ValueError(
                f"token id {int(ids[missing][0])} has no row in this model's trimmed vocabulary; "
                "spell such text with byte tokens (gptoss.vocab.fit_tokens) before feeding it"
            )
        return rows

    def forward(self, input_ids: Tensor, position_ids: Tensor, cache: KVCache | None = None) -> Tensor:
        return super().forward(self.token_rows(input_ids), position_ids, cache)


class TrimmedHead(nn.Module):
    """Output head of a trimmed vocabulary: logits over the rows it has, scattered into the whole
    id space (−inf for ids without a row)."""

    def __init__(self, weight: nn.Parameter, vocab_size: int, token_ids: Tensor) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = weight
        # The same ids as `model.token_ids`, kept here too so the head works on its own.
        self.register_buffer("token_ids", token_ids.clone())

    def forward(self, hidden: Tensor) -> Tensor:
        rows = hidden @ self.weight.T
        logits = rows.new_full((*rows.shape[:-1], self.vocab_size), float("-inf"))
        return logits.index_copy_(-1, self.token_ids, rows)


def trim_vocabulary(model: GptOss) -> GptOss:
    """Make a model of a trimmed-vocabulary config read and score token ids, in place; return it.

    The rows start as ids 0..rows-1: `set_vocabulary` (or loading a checkpoint) gives the real ids.
    A model with the whole vocabulary is returned unchanged.
    """
    config = model.config
    if config.vocab_rows is None:
        return model
    ids = torch.arange(config.embedding_rows, device=model.lm_head.weight.device)
    model.model = TrimmedBackbone(model.model, ids)
    model.lm_head = TrimmedHead(model.lm_head.weight, config.vocab_size, ids)
    return model


def token_rows(model: GptOss, ids: Tensor) -> Tensor:
    """Rows of the embedding and head for token `ids` (the ids themselves unless trimmed)."""
    backbone = model.model
    return backbone.token_rows(ids) if isinstance(backbone, TrimmedBackbone) else ids


@torch.no_grad()
def set_vocabulary(model: GptOss, token_ids: Tensor) -> None:
    """Give a trimmed-vocabulary model the token id of each of its rows (ascending, distinct)."""
    if not isinstance(model.model, TrimmedBackbone):
        raise ValueError("set_vocabulary needs a model built with config.vocab_rows (and trim_vocabulary)")
    ids = torch.as_tensor(token_ids, dtype=torch.int64)
    if ids.shape != model.model.token_ids.shape or bool((ids.diff() <= 0).any()):
        raise ValueError(f"token_ids must be {len(model.model.token_ids)} ascending distinct ids")
    if int(ids[0]) < 0 or int(ids[-1]) >= model.config.vocab_size:
        raise ValueError(f"token_ids must lie in 0..{model.config.vocab_size - 1}")
    model.model.token_ids.copy_(ids)
    model.lm_head.token_ids.copy_(ids)
