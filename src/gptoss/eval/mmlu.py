"""MMLU-style multiple choice, scored the standard way (Hendrycks et al.): the question after k
worked examples of its subject from the dev split, then the log-likelihood of " A", " B", " C",
" D" after "Answer:"; the prediction is the most likely letter.

Data is read from a local path in any of the common layouts (nothing is downloaded):
- the original release: `{dev,val,test}/{subject}_{split}.csv`, rows `question,A,B,C,D,answer`
  without a header;
- JSONL or Parquet as on the Hugging Face hub (`cais/mmlu`): `question`, `choices` (four
  strings) and `answer` (0-3 or a letter), with a `subject` field or the subject as the parent
  directory; the split is named in the file name (`test.jsonl`, `dev-00000-of-00001.parquet`)
  or by the parent directory. Separate `A`..`D` fields work too.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from gptoss.eval.models import EvalModel
from gptoss.eval.results import EvalResult

LETTERS = ("A", "B", "C", "D")
CONTINUATIONS = tuple(f" {letter}" for letter in LETTERS)
SPLITS = {"dev": "dev", "val": "val", "validation": "val", "test": "test"}
_SPLIT_IN_NAME = re.compile(r"(?:^|[_\-.])(dev|val|validation|test)(?=$|[_\-.])")
_SUFFIXES = (".csv", ".jsonl", ".parquet")


@dataclass(frozen=True)
class Question:
    subject: str  # with underscores, as in the file names: "high_school_physics"
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices


# ---------------------------------------------------------------------- prompt
def format_subject(subject: str) -> str:
    return subject.replace("_", " ")


def format_example(q: Question, with_answer: bool) -> str:
    """'{question}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer:' (+ ' {letter}\\n\\n' for a shot)."""
    lines = [q.question] + [f"{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices, strict=False)]
    text = "\n".join(lines) + "\nAnswer:"
    return text + f" {LETTERS[q.answer]}\n\n" if with_answer else text


def prompt(q: Question, shots: Sequence[Question]) -> str:
    """The standard prompt: a header naming the subject, the shots with answers, the question."""
    header = (
        f"The following are multiple choice questions (with answers) about {format_subject(q.subject)}.\n\n"
    )
    return header + "".join(format_example(s, True) for s in shots) + format_example(q, False)


# ---------------------------------------------------------------------- data
def _split_of(path: Path, root: Path) -> str | None:
    """The split a file's name says, else the nearest directory name that says one."""
    for part in [path.stem, *reversed(path.relative_to(root).parts[:-1])]:
        found = _SPLIT_IN_NAME.findall(part.lower())
        if found:
            return SPLITS[found[-1]]
    return None


def _answer_index(value: Any, where: str) -> int:
    if isinstance(value, str) and value.strip().upper() in LETTERS:
        return LETTERS.index(value.strip().upper())
    if isinstance(value, int | float) and int(value) == value and 0 <= int(value) < len(LETTERS):
        return int(value)
    if isinstance(value, str) and value.strip().isdigit() and int(value) < len(LETTERS):
        return int(value)
    raise ValueError(f"{where}: answer {value!r} is neither 0-3 nor A-D")


def _csv_questions(path: Path) -> Iterator[Question]:
    subject = path.stem
    for split in SPLITS:
        subject = re.sub(rf"_{split}$", "", subject)
    with open(path, newline="", encoding="utf-8") as f:
        for number, row in enumerate(csv.reader(f), start=1):
            if len(row) != 6:
                raise ValueError(
                    f"{path}:{number}: expected 6 columns (question,A,B,C,D,answer), got {len(row)}"
                )
            if number == 1 and row[5].strip().upper() not in LETTERS:
                continue  # a header row
            yield Question(subject, row[0], tuple(row[1:5]), _answer_index(row[5], f"{path}:{number}"))


def _record_question(record: dict[str, Any], default_subject: str, where: str) -> Question:
    if "choices" in record:
        choices = tuple(str(c) for c in record["choices"])
    elif all(letter in record for letter in LETTERS):
        choices = tuple(str(record[letter]) for letter in LETTERS)
    else:
        raise ValueError(f"{where}: no `choices` list and no A/B/C/D fields (fields: {sorted(record)})")
    if len(choices) != len(LETTERS):
        raise ValueError(f"{where}: {len(choices)} choices; MMLU questions have 4")
    subject = record.get("subject") or default_subject
    return Question(str(subject), str(record["question"]), choices, _answer_index(record["answer"], where))


def _records(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ImportError("reading Parquet needs pyarrow: pip install pyarrow") from exc
        for number, record in enumerate(pq.read_table(path).to_pylist()):
            yield record, f"{path} row {number}"
        return
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                yield json.loads(line), f"{path}:{number}"


def _file_questions(path: Path) -> Iterator[Question]:
    if path.suffix == ".csv":
        yield from _csv_questions(path)
        return
    parent = path.parent.name
    default_subject = "all" if parent in SPLITS or parent in ("", "all", "data") else parent
    for record, where in _records(path):
        yield _record_question(record, default_subject, where)


def load_mmlu(path: str | Path) -> dict[str, list[Question]]:
    """Questions by split ("dev", "val", "test") from a file or a directory tree.

    A file given directly counts as "test" if its name names no split; in a directory, such files
    are skipped (auxiliary_train, ...). Files are read in sorted path order and questions keep their
    file order, so "the first k dev questions" is well defined.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist; point --data at an MMLU directory or file")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in _SUFFIXES)
    by_split: dict[str, list[Question]] = defaultdict(list)
    for file in files:
        if file.name.startswith("."):
            continue
        split = _split_of(file, root if root.is_dir() else file.parent) or (
            "test" if root.is_file() else None
        )
        if split is None:
            continue  # e.g. auxiliary_train: not part of the benchmark
        by_split[split].extend(_file_questions(file))
    if not by_split:
        raise ValueError(f"no MMLU files ({', '.join(_SUFFIXES)}) with a dev/val/test split found in {root}")
    return dict(by_split)


# ---------------------------------------------------------------------- evaluation
def run_mmlu(
    model: EvalModel,
    data: str | Path | dict[str, list[Question]],
    *,
    shots: int = 5,
    split: str = "test",
    subjects: Sequence[str] | None = None,
    limit: int | None = None,
    max_length: int | None = None,
    progress: bool = True,
) -> EvalResult:
    """Accuracy on `split`, micro-averaged (over questions) and macro-averaged (over subjects).

    Shots are the first `shots` dev questions of the question's subject. When `max_length` (or
    the model's own `max_length`) is known and a prompt would not fit, shots are dropped one by
    one, as the original evaluation does. `limit` keeps the first questions of each subject.
    """
    questions_by_split = load_mmlu(data) if not isinstance(data, dict) else data
    if split not in questions_by_split:
        raise ValueError(f"no {split!r} split in the data (found {sorted(questions_by_split)})")
    dev: dict[str, list[Question]] = defaultdict(list)
    for q in questions_by_split.get("dev", []):
        dev[q.subject].append(q)
    by_subject: dict[str, list[Question]] = defaultdict(list)
    for q in questions_by_split[split]:
        if subjects is None or q.subject in subjects:
            by_subject[q.subject].append(q)
    if subjects is not None and (missing := set(subjects) - set(by_subject)):
        raise ValueError(f"subjects not in the data: {sorted(missing)}")
    if not by_subject:
        raise ValueError(f"the {split!r} split is empty")
    questions = [q for subject in sorted(by_subject) for q in by_subject[subject][:limit]]
    for subject in by_subject:
        if len(dev[subject]) < shots:
            raise ValueError(
                f"{shots}-shot needs {shots} dev questions of {subject}; the data has {len(dev[subject])}"
            )

    max_length = max_length or getattr(model, "max_length", None)
    count = getattr(model, "encode", None) if max_length else None
    prompts, used_shots = [], []
    for q in questions:
        k = shots
        text = prompt(q, dev[q.subject][:k])
        while count is not None and k > 0 and len(count(text)) + 1 > max_length:
            k -= 1
            text = prompt(q, dev[q.subject][:k])
        prompts.append(text)
        used_shots.append(k)

    scores: list[list[float]] = []
    step = max(1, model.preferred_batch)
    with tqdm(total=len(questions), desc="mmlu", unit="question", disable=not progress) as bar:
        for start in range(0, len(questions), step):
            batch = prompts[start : start + step]
            scores += model.multiple_choice([(p, CONTINUATIONS) for p in batch])
            bar.update(len(batch))

    predictions = [max(range(len(s)), key=s.__getitem__) for s in scores]
    correct: dict[str, list[bool]] = defaultdict(list)
    for q, predicted in zip(questions, predictions, strict=True):
        correct[q.subject].append(predicted == q.answer)
    per_subject = {s: sum(c) / len(c) for s, c in sorted(correct.items())}
    total = sum(sum(c) for c in correct.values())
    return EvalResult(
        task="mmlu",
        model=model.name,
        metrics={
            "accuracy": total / len(questions),
            "accuracy_macro": sum(per_subject.values()) / len(per_subject),
        },
        counts={
            "questions": len(questions),
            "correct": total,
            "subjects": len(per_subject),
            "fewer_shot_prompts": sum(k < shots for k in used_shots),
            # endpoint scoring: none of the letters was among the server's top log-probabilities
            "unscored": sum(all(math.isinf(x) for x in s) for s in scores),
        },
        breakdown={s: {"accuracy": acc, "questions": len(correct[s])} for s, acc in per_subject.items()},
        config={"shots": shots, "split": split, "limit": limit, "breakdown": "subject"},
        records=[
            {
                "subject": q.subject,
                "question": q.question,
                "answer": LETTERS[q.answer],
                "prediction": LETTERS[p],
                "correct": p == q.answer,
                "logprobs": {
                    letter: x if math.isfinite(x) else None for letter, x in zip(LETTERS, s, strict=True)
                },
                "shots": k,
            }
            for q, s, p, k in zip(questions, scores, predictions, used_shots, strict=True)
        ],
    )
