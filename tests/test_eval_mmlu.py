"""MMLU: the data layouts, the standard prompt, and scoring by log-likelihood."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import random_model, tiny_config
from gptoss.eval import LocalModel, Question, load_mmlu, run_mmlu
from gptoss.eval.mmlu import CONTINUATIONS, prompt
from gptoss.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
CSV_LAYOUT = FIXTURES / "mmlu"  # the original release: {dev,test}/{subject}_{split}.csv
HF_LAYOUT = FIXTURES / "mmlu_hf"  # JSONL as exported from the hub: question, subject, choices, answer


def real_vocab_model(seed: int = 0):
    """A tiny model with the real 201,088-token vocabulary, so that text tasks can run."""
    config = tiny_config(
        vocab_size=Tokenizer.N_VOCAB,
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=32,
        head_dim=16,
        sliding_window=8,
        eos_token_id=Tokenizer.RETURN,
        pad_token_id=Tokenizer.ENDOFTEXT,
    )
    return random_model(config, seed=seed)


@pytest.fixture(scope="module")
def local():
    return LocalModel(real_vocab_model(), batch_size=4)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def test_csv_jsonl_and_parquet_layouts_read_the_same_questions(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    from_csv = load_mmlu(CSV_LAYOUT)
    assert {split: len(qs) for split, qs in from_csv.items()} == {"dev": 10, "test": 7}
    assert load_mmlu(HF_LAYOUT) == from_csv
    # The hub's Parquet layout: one directory per subject, the split in the file name.
    for split in ("dev", "test"):
        records = [json.loads(line) for line in (HF_LAYOUT / f"{split}.jsonl").read_text().splitlines()]
        for subject in {r["subject"] for r in records}:
            rows = [
                {k: v for k, v in r.items() if k != "subject"} for r in records if r["subject"] == subject
            ]
            (tmp_path / subject).mkdir(exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), tmp_path / subject / f"{split}-00000-of-00001.parquet")
    from_parquet = load_mmlu(tmp_path)
    assert {s: sorted(qs, key=repr) for s, qs in from_parquet.items()} == {
        s: sorted(qs, key=repr) for s, qs in from_csv.items()
    }


def test_quoted_csv_fields_and_letter_answers():
    test = load_mmlu(CSV_LAYOUT)["test"]
    q = next(q for q in test if q.question.startswith("Which is the largest"))
    assert q == Question(
        "elementary_mathematics",
        "Which is the largest: 0.5, 0.05, 0.55 or 0.505?",
        ("0.5", "0.05", "0.505", "0.55"),
        3,
    )


def test_a_csv_header_row_is_skipped_and_bad_answers_are_reported(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "logic_test.csv").write_text("question,A,B,C,D,answer\nIs it?,yes,no,maybe,so,A\n")
    assert load_mmlu(tmp_path)["test"] == [Question("logic", "Is it?", ("yes", "no", "maybe", "so"), 0)]
    (tmp_path / "test" / "logic_test.csv").write_text("Is it?,yes,no,maybe,so,A\nWhy?,a,b,c,d,E\n")
    with pytest.raises(ValueError, match=r"logic_test.csv:2: answer 'E'"):
        load_mmlu(tmp_path)


# ---------------------------------------------------------------------------------------------
# The prompt
# ---------------------------------------------------------------------------------------------


def test_the_five_shot_prompt_is_the_standard_layout():
    data = load_mmlu(CSV_LAYOUT)
    shots = [q for q in data["dev"] if q.subject == "elementary_mathematics"]
    question = next(q for q in data["test"] if q.subject == "elementary_mathematics")
    expected = (
        "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
        "What is 2 + 3?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer: B\n\n"
        "What is 10 - 4?\nA. 6\nB. 7\nC. 5\nD. 14\nAnswer: A\n\n"
        "Which number is even: 3, 5, 8 or 9?\nA. 3\nB. 5\nC. 9\nD. 8\nAnswer: D\n\n"
        "What is 3 times 4?\nA. 7\nB. 1\nC. 12\nD. 34\nAnswer: C\n\n"
        "What is half of 18?\nA. 8\nB. 9\nC. 10\nD. 36\nAnswer: B\n\n"
        "What is 7 + 6?\nA. 12\nB. 13\nC. 14\nD. 15\nAnswer:"
    )
    assert prompt(question, shots) == expected
    assert prompt(question, []) == (
        "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
        "What is 7 + 6?\nA. 12\nB. 13\nC. 14\nD. 15\nAnswer:"
    )
    assert CONTINUATIONS == (" A", " B", " C", " D")


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


class ScriptedScorer:
    """An EvalModel whose log-likelihoods are scripted per question: the choice it likes best is
    the one whose text the script names, wherever that is among A-D."""

    name = "scripted"
    preferred_batch = 2

    def __init__(self, likes: dict[str, str]) -> None:
        self.likes = likes
        self.seen: list[tuple[str, tuple[str, ...]]] = []

    def multiple_choice(self, requests):
        out = []
        for context, choices in requests:
            self.seen.append((context, tuple(choices)))
            question = context.rsplit("\n\n", 1)[-1]
            liked = next(text for q, text in self.likes.items() if question.startswith(q))
            letter = next(line[0] for line in question.splitlines() if line[3:] == liked)
            out.append([-1.0 if " " + letter == c else -5.0 - i for i, c in enumerate(choices)])
        return out

    def generate(self, requests):
        raise NotImplementedError


def test_the_prediction_is_the_choice_with_the_highest_log_likelihood():
    likes = {
        "What is 7 + 6?": "13",  # right
        "What is 9 times 9?": "72",  # wrong
        "What is 100 divided by 4?": "25",  # right
        "Which is the largest": "0.55",  # right
        "Which planet is known": "Venus",  # wrong
        "How many planets": "8",  # right
        "What is the largest planet": "Saturn",  # wrong
    }
    model = ScriptedScorer(likes)
    result = run_mmlu(model, CSV_LAYOUT, shots=5, progress=False)
    assert result.metrics["accuracy"] == pytest.approx(4 / 7)
    assert result.breakdown["elementary_mathematics"]["accuracy"] == pytest.approx(3 / 4)
    assert result.breakdown["astronomy"]["accuracy"] == pytest.approx(1 / 3)
    assert result.metrics["accuracy_macro"] == pytest.approx((3 / 4 + 1 / 3) / 2)
    assert result.counts["questions"] == 7 and result.counts["correct"] == 4
    assert all(choices == (" A", " B", " C", " D") for _, choices in model.seen)
    assert all(context.count("Answer:") == 6 for context, _ in model.seen)
    venus = next(r for r in result.records if r["question"].startswith("Which planet is known"))
    assert (venus["prediction"], venus["answer"], venus["correct"]) == ("C", "B", False)


def test_local_scores_are_the_model_next_token_log_probabilities(local):
    question = load_mmlu(CSV_LAYOUT)["test"][0]
    text = prompt(question, [])
    [scores] = local.multiple_choice([(text, CONTINUATIONS)])
    tokens = local.encode(text)
    letters = [local.encode(c) for c in CONTINUATIONS]
    assert all(len(t) == 1 for t in letters)  # " A".." D" are single o200k tokens
    with torch.no_grad():
        logprobs = local.model(torch.tensor([tokens]))[0, -1].float().log_softmax(-1)
    assert scores == pytest.approx([logprobs[t[0]].item() for t in letters], abs=1e-4)


def scripted_gpt_oss(preference: dict[str, float]):
    """A real GptOss whose blocks add nothing, so the last hidden state is the normalised embedding
    of the last prompt token (":" of "Answer:"); the output head then gives each letter the logit
    that `preference` scripts and everything else a logit of about zero."""
    model = real_vocab_model(seed=1)
    tokenizer = LocalModel(model).tokenizer
    with torch.no_grad():
        for block in model.model.layers:
            block.self_attn.o_proj.weight.zero_()
            block.self_attn.o_proj.bias.zero_()
            block.mlp.experts.down_proj.zero_()
            block.mlp.experts.down_proj_bias.zero_()
        colon = tokenizer.encode_ordinary("Answer:")[-1]
        hidden = model.model.norm(model.model.embed_tokens.weight[colon])
        model.lm_head.weight.zero_()
        for letter, logit in preference.items():
            [token] = tokenizer.encode_ordinary(letter)
            model.lm_head.weight[token] = hidden * logit / hidden.pow(2).sum()
    return model


def test_mmlu_on_a_scripted_tiny_model_picks_its_favourite_letter():
    model = LocalModel(scripted_gpt_oss({" A": 1.0, " B": 2.0, " C": 4.0, " D": 3.0}), batch_size=4)
    result = run_mmlu(model, CSV_LAYOUT, shots=1, progress=False)
    assert {r["prediction"] for r in result.records} == {"C"}
    answers = [r["answer"] for r in result.records]
    assert result.metrics["accuracy"] == pytest.approx(answers.count("C") / len(answers))
    logprobs = result.records[0]["logprobs"]
    assert logprobs["C"] - logprobs["A"] == pytest.approx(3.0, abs=1e-3)
    assert logprobs["D"] - logprobs["B"] == pytest.approx(1.0, abs=1e-3)


def test_shots_are_dropped_when_the_prompt_does_not_fit(local):
    short = LocalModel(local.model, batch_size=4, max_length=120)
    result = run_mmlu(short, CSV_LAYOUT, shots=5, limit=1, progress=False)
    assert result.counts["fewer_shot_prompts"] == 2
    assert all(0 < r["shots"] < 5 for r in result.records)
    assert all(len(short.encode(prompt(q, []))) < 120 for q in load_mmlu(CSV_LAYOUT)["test"])
    full = run_mmlu(local, CSV_LAYOUT, shots=5, limit=1, progress=False)
    assert full.counts["fewer_shot_prompts"] == 0 and {r["shots"] for r in full.records} == {5}


def test_subjects_limits_and_missing_dev_questions(tmp_path):
    model = ScriptedScorer({"": "x"})  # never called below
    with pytest.raises(ValueError, match="subjects not in the data"):
        run_mmlu(model, CSV_LAYOUT, subjects=["virology"], progress=False)
    shutil.copytree(CSV_LAYOUT / "test", tmp_path / "test")
    with pytest.raises(ValueError, match="5-shot needs 5 dev questions"):
        run_mmlu(model, tmp_path, shots=5, progress=False)
    with pytest.raises(ValueError, match="no 'val' split"):
        run_mmlu(model, CSV_LAYOUT, split="val", progress=False)
