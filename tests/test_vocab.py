"""Trimmed vocabularies: a model with rows for some token ids computes what the full model computes
on those ids, saves and loads (transformers too), trains, and reads any text through byte tokens."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import random_model, tiny_config
from gptoss import GptOss, load_model, save_model
from gptoss.inference import generate
from gptoss.tokenizer import Tokenizer, get_tokenizer
from gptoss.train.loss import causal_lm_loss
from gptoss.trimmed_vocab import set_vocabulary, trim_vocabulary
from gptoss.vocab import HARMONY_TOKENS, VocabularyFit, byte_token_ids, choose_vocabulary, fit_tokens

# Byte tokens are ids 0..255 of o200k, so a 320-id tiny model can hold them all plus a few more.
KEPT = torch.tensor([*range(256), 260, 271, 300, 319])


def trimmed_pair(tie: bool = False) -> tuple[GptOss, GptOss]:
    """A full tiny model and its trimmed copy keeping the rows of `KEPT`."""
    full = random_model(tiny_config(tie_word_embeddings=tie), seed=3)
    trimmed = trim_vocabulary(GptOss(full.config.replace(vocab_rows=len(KEPT))))
    set_vocabulary(trimmed, KEPT)
    state = full.state_dict()
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][KEPT]
    state["lm_head.weight"] = state["lm_head.weight"][KEPT]
    state |= {"model.token_ids": KEPT, "lm_head.token_ids": KEPT}
    trimmed.load_state_dict(state)
    return full, trimmed.eval()


def kept_ids(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return KEPT[torch.randint(0, len(KEPT), shape, generator=torch.Generator().manual_seed(seed))]


@pytest.mark.parametrize("tie", [False, True])
def test_trimmed_model_scores_its_ids_like_the_full_model(tie):
    full, trimmed = trimmed_pair(tie)
    ids = kept_ids((2, 11))
    with torch.no_grad():
        want, got = full(ids), trimmed(ids)
    assert got.shape == want.shape  # logits over the whole id space
    assert torch.allclose(got[..., KEPT], want[..., KEPT], atol=1e-6)
    others = torch.ones(full.config.vocab_size, dtype=torch.bool)
    others[KEPT] = False
    assert torch.isneginf(got[..., others]).all()


def test_ids_without_a_row_are_refused_with_the_fix():
    _, trimmed = trimmed_pair()
    with pytest.raises(ValueError, match=r"290 has no row.*fit_tokens"):
        trimmed(torch.tensor([[1, 2, 290]]))


def test_set_vocabulary_checks_its_ids():
    _, trimmed = trimmed_pair()
    with pytest.raises(ValueError, match="ascending"):
        set_vocabulary(trimmed, KEPT.flip(0))
    with pytest.raises(ValueError, match="vocab_rows"):
        set_vocabulary(random_model(tiny_config()), KEPT)


def test_checkpoint_round_trip_and_transformers_reads_the_rows(tmp_path):
    _, trimmed = trimmed_pair()
    save_model(trimmed, tmp_path / "ckpt")
    hf_config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert hf_config["vocab_size"] == len(KEPT) and hf_config["gptoss_token_space"] == 320
    loaded = load_model(tmp_path / "ckpt", dtype=torch.float32)
    assert loaded.config.vocab_rows == len(KEPT) and loaded.config.vocab_size == 320
    ids = kept_ids((2, 9), seed=1)
    with torch.no_grad():
        ours = trimmed(ids)
        assert torch.equal(loaded(ids), ours)
        # transformers knows nothing of the id map: it reads row numbers and scores rows.
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
        rows = torch.searchsorted(KEPT, ids)
        assert (theirs(rows).logits - ours[..., KEPT]).abs().max() <= 1e-4


def test_fused_training_loss_maps_targets_to_rows():
    _, trimmed = trimmed_pair()
    ids = kept_ids((2, 12), seed=2)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        logits = trimmed(inputs)
        want = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    got = causal_lm_loss(trimmed, inputs, targets)
    assert torch.allclose(got, want, rtol=1e-5)
    assert torch.equal(trimmed(inputs), logits)  # the model itself still gives logits


def test_fit_spells_missing_tokens_in_bytes_and_keeps_the_text():
    tokenizer = get_tokenizer()
    text = "def parse(path):\n    return json.loads(Path(path).read_text())  # naïve ☃"
    tokens = tokenizer.encode(text)
    kept = choose_vocabulary(np.bincount(tokens[:4], minlength=Tokenizer.N_VOCAB), rows=300)
    fitted = VocabularyFit(kept)(tokens)
    assert len(fitted) > len(tokens)
    assert np.isin(fitted, kept).all()
    assert tokenizer.decode(fitted.tolist()) == text
    assert set(tokens[:4]) <= set(kept.tolist())


def test_choose_vocabulary_keeps_bytes_harmony_and_the_most_frequent():
    counts = np.zeros(Tokenizer.N_VOCAB)
    counts[[1000, 2000, 3000]] = [5, 9, 1]
    kept = choose_vocabulary(counts, rows=256 + len(HARMONY_TOKENS) + 2)
    assert set(byte_token_ids()) | set(HARMONY_TOKENS) | {1000, 2000} == set(kept.tolist())
    assert (np.diff(kept) > 0).all()
    with pytest.raises(ValueError, match="at least"):
        choose_vocabulary(counts, rows=100)


def test_generation_reads_any_prompt_and_writes_only_kept_ids():
    _, trimmed = trimmed_pair()
    prompt = [1, 2, 300, 290, 5]  # 290 has no row: it is respelled in bytes
    assert fit_tokens(trimmed, prompt) != prompt
    out = generate(trimmed, [prompt], max_new_tokens=12, temperature=1.0, seed=0)[0]
    assert len(out) and all(t in set(KEPT.tolist()) for t in out)
