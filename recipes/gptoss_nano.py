"""Recipe of gptoss-nano, the demonstration model that ships inside the package.

    .venv/bin/python recipes/gptoss_nano.py --out runs/gptoss-nano     (58 minutes on 2 CPU cores)

1. Corpus: every `.py` file of the running Python's standard library (every machine with Python has
   it), split by file: about 2% of the files are held out for validation.
2. Vocabulary: the 12,288 o200k_harmony ids the training files use most, plus the 256 byte tokens
   and the harmony tokens (`gptoss.vocab`); everything else is spelled in bytes.
3. `gptoss train`: gpt-oss-nano's blocks (4 layers, 8 experts, top-2, hidden 256) with that trimmed,
   tied vocabulary, pretrained on the corpus.
4. `gptoss finetune`: full fine-tuning on harmony conversations made from the same files: the user
   asks for a documented function by signature and docstring summary, the assistant says in a line
   how it will answer (analysis channel) and answers with the source, its docstring cut to that
   summary (final channel); functions longer than MAX_ANSWER_CHARS are left out, and every second
   conversation follows the one before it in the same chat.
5. Held-out losses beside a unigram baseline, a model card, and the bf16 weights written to OUT/model
   (copy to src/gptoss/models/gptoss-nano to bundle them).
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import sysconfig
import textwrap
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gptoss.checkpoint import load_model, save_model
from gptoss.config import get_config
from gptoss.harmony import chat_messages_to_harmony, parse_completion, render_for_completion
from gptoss.inference import generate
from gptoss.model import GptOss
from gptoss.model_card import ModelCard
from gptoss.tokenizer import Tokenizer, get_tokenizer
from gptoss.train.data import TokenSplit, write_dataset
from gptoss.trimmed_vocab import set_vocabulary, trim_vocabulary
from gptoss.vocab import VocabularyFit, choose_vocabulary

VOCAB_ROWS = 12288
# Answers longer than this are left out of the conversations: a model this small learns to close a
# short function and end its turn, while long ones teach it to ramble on (and loop) instead.
MAX_ANSWER_CHARS = 600
VAL_EVERY = 50  # one file in this many (by a hash of its path) is held out
CONFIG = get_config("gpt-oss-nano").replace(
    name="gptoss-nano", vocab_rows=VOCAB_ROWS, tie_word_embeddings=True, max_position_embeddings=4096
)
PRETRAIN = {
    "steps": 1000,
    "seq_len": 512,
    "batch_size": 16,
    "micro_batch_size": 16,
    "lr": 2e-3,
    "warmup_steps": 100,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.1,
    "precision": "bf16",
    "eval_every": 250,
    "eval_windows": 64,
    "save_every": 500,
    "keep_last": 1,
    "device": "cpu",
    "seed": 0,
    "resume": True,  # running the recipe again continues an interrupted run
}
FINETUNE = {
    "lora_rank": 0,  # full fine-tuning: the model is small
    "epochs": 5.0,
    "seq_len": 768,
    "batch_size": 16,
    "micro_batch_size": 16,
    "lr": 3e-4,
    "warmup_steps": 20,
    "precision": "bf16",
    "eval_every": 100,
    "device": "cpu",
    "save_dtype": "fp32",
    "seed": 0,
}
SAMPLE_PROMPT = (
    "Write a Python function `is_palindrome(text)` to return True if text reads the same backwards."
)


# ---------------------------------------------------------------------- corpus
def stdlib_files() -> dict[str, list[Path]]:
    """The standard library's Python files, train and val, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    splits: dict[str, list[Path]] = {"train": [], "val": []}
    for path in files:
        held_out = zlib.crc32(str(path.relative_to(root)).encode()) % VAL_EVERY == 0
        splits["val" if held_out else "train"].append(path)
    return splits


def read_texts(paths: list[Path]) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths]


def pretraining_data(out: Path, splits: dict[str, list[Path]]) -> tuple[np.ndarray, dict[str, Any]]:
    """Tokenize the corpus, choose the vocabulary, and write the dataset; return the kept ids."""
    tokenizer = get_tokenizer()
    encoded = {s: tokenizer.encode_ordinary_batch(read_texts(p), num_threads=2) for s, p in splits.items()}
    counts = np.bincount(np.concatenate([np.asarray(d, dtype=np.int64) for d in encoded["train"]]))
    kept = choose_vocabulary(counts, VOCAB_ROWS)
    fit = VocabularyFit(kept)
    eot = np.array([Tokenizer.ENDOFTEXT])
    arrays = {s: np.concatenate([np.concatenate([fit(d), eot]) for d in docs]) for s, docs in encoded.items()}
    write_dataset(out, arrays, Tokenizer.N_VOCAB, Tokenizer.ENDOFTEXT)
    facts = {
        "files": {s: len(p) for s, p in splits.items()},
        "tokens_o200k": {s: sum(map(len, d)) for s, d in encoded.items()},
        "tokens_fitted": {s: len(a) for s, a in arrays.items()},
        "unigram_val_loss": unigram_loss(arrays["train"], arrays["val"]),
    }
    return kept, facts


def unigram_loss(train: np.ndarray, val: np.ndarray) -> float:
    """Cross-entropy (nats/token) of `val` under the add-one-smoothed token frequencies of `train`."""
    counts = np.bincount(train, minlength=Tokenizer.N_VOCAB).astype(np.float64)
    seen = np.unique(np.concatenate([train, val]))
    probs = (counts[seen] + 1) / (counts[seen] + 1).sum()
    logp = dict(zip(seen.tolist(), np.log(probs).tolist(), strict=True))
    return float(-np.mean([logp[t] for t in val.tolist()]))


# ---------------------------------------------------------------------- conversations
ASKS = (
    "Write a Python function `{sig}` to {what}",
    "Implement `{sig}` in Python: it should {what}",
    "I need a function `{sig}`. It should {what}",
    "Can you write `{sig}`? It must {what}",
)


_VERB_WORDS = """
    return create make get set convert read write parse compute check test find build remove add open
    close load save encode decode format split join copy move delete update generate print run call send
    start stop wait handle process validate normalize escape quote unquote resolve register search match
    replace strip apply yield extract construct initialize determine raise emit translate compile execute
    append insert clear reset flush fetch install list walk count compare sort filter map wrap pack unpack
    evaluate guess look lookup take put push pop release acquire accept connect bind listen shutdown
"""
VERBS = frozenset(_VERB_WORDS.split())


def _first_paragraph(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split())


def _summary(doc: str) -> str | None:
    """The docstring's first sentence when it says what the function does ("Return x." → "return x.")."""
    first = _first_paragraph(doc)
    words = first.split(" ", 1)
    verb = words[0].lower()
    for form in (verb, verb.removesuffix("es"), verb.removesuffix("s")):  # "Returns" → "return"
        if form in VERBS:
            verb = form
            break
    if not 10 <= len(first) <= 200 or len(words) < 2 or verb not in VERBS:
        return None
    return f"{verb} {words[1]}" + ("" if first.endswith(".") else ".")


def answer_source(source: str, node: ast.FunctionDef) -> str | None:
    """The function's source, dedented, its docstring cut to the one-line summary that the request
    quotes: what the model has to write is then mostly code. None when there is no body to write."""
    lines = (" " * node.col_offset + (ast.get_source_segment(source, node) or "")).splitlines()
    doc = node.body[0]
    first, last = doc.lineno - node.lineno, (doc.end_lineno or doc.lineno) - node.lineno
    if not (0 < first <= last < len(lines)) or len(node.body) < 2:
        return None
    indent = lines[first][: len(lines[first]) - len(lines[first].lstrip())]
    summary = _first_paragraph(ast.get_docstring(node) or "").replace('"', "'").rstrip("\\")
    lines[first : last + 1] = [f'{indent}"""{summary}"""']
    return textwrap.dedent("\n".join(lines))


def conversations(path: Path, module: str) -> list[dict[str, Any]]:
    """Chat examples from the public, documented functions and methods of one module."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []
    functions = [(None, n) for n in tree.body if isinstance(n, ast.FunctionDef)]
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and not n.name.startswith("_")):
        functions += [(cls.name, n) for n in cls.body if isinstance(n, ast.FunctionDef)]
    for owner, node in functions:
        if node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        what = _summary(doc) if doc else None
        code = answer_source(source, node) if what else None
        if code is None or len(code) > MAX_ANSWER_CHARS:
            continue
        name = f"{owner}.{node.name}" if owner else node.name
        sig = f"{name}({ast.unparse(node.args)})"
        ask = ASKS[zlib.crc32(f"{module}.{name}".encode()) % len(ASKS)]
        out.append(
            {
                "messages": [
                    {"role": "user", "content": ask.format(sig=sig, what=what)},
                    {
                        "role": "assistant",
                        "reasoning": "A short function in the standard library's style will do.",
                        "content": f"```python\n{code}\n```",
                    },
                ]
            }
        )
    return out


def with_history(chats: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every second conversation continues the one before it (a second request in the same chat),
    so that the model also answers after a finished turn, as in `gptoss chat`. The loss stays on
    the last turn; harmony drops the earlier turn's reasoning, as at inference."""
    return [
        {"messages": chats[i - 1]["messages"] + chat["messages"]} if i % 2 else chat
        for i, chat in enumerate(chats)
    ]


def sft_data(out: Path, splits: dict[str, list[Path]]) -> dict[str, int]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split, paths in splits.items():
        rows = []
        for path in paths:
            if "test" in path.relative_to(root).parts[:1] or path.name.startswith("test_"):
                continue
            module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            rows += with_history(conversations(path, module))
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        sizes[split] = len(rows)
    return sizes


# ---------------------------------------------------------------------- steps
def initial_model(out: Path, kept: np.ndarray) -> Path:
    model = trim_vocabulary(GptOss(CONFIG))
    model.init_weights(torch.Generator().manual_seed(0))
    set_vocabulary(model, torch.from_numpy(kept))
    return save_model(model, out)


def gptoss(*args: str) -> None:
    """Run a `gptoss` command in a child process, as a user would."""
    subprocess.run([sys.executable, "-m", "gptoss.cli", *args], check=True)


def toml(values: dict[str, Any]) -> str:
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


def last_metric(run: Path, key: str) -> float | None:
    values = [json.loads(line).get(key) for line in (run / "metrics.jsonl").read_text().splitlines()]
    values = [v for v in values if v is not None]
    return values[-1] if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/gptoss-nano"))
    parser.add_argument("--pretrain-steps", type=int, default=PRETRAIN["steps"])
    parser.add_argument("--finetune-steps", type=int, default=0, help="default: FINETUNE['epochs'] passes")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    facts: dict[str, Any] = {"python": sys.version.split()[0], "stdlib": sysconfig.get_paths()["stdlib"]}

    splits = stdlib_files()
    if not (out / "init").is_dir():
        kept, facts["corpus"] = pretraining_data(out / "data", splits)
        facts["sft_conversations"] = sft_data(out / "sft", splits)
        (out / "data_facts.json").write_text(json.dumps(facts, indent=2))
        initial_model(out / "init", kept)
    facts = json.loads((out / "data_facts.json").read_text())
    print(json.dumps(facts, indent=2))
    (out / "pretrain.toml").write_text(
        toml(
            PRETRAIN
            | {
                "steps": args.pretrain_steps,
                "data": str(out / "data"),
                "model": str(out / "init"),
                "out": str(out / "pretrain"),
            }
        )
    )
    gptoss("train", "--config", str(out / "pretrain.toml"))
    facts["pretrain_val_loss"] = last_metric(out / "pretrain", "val_loss")
    pretrained = latest_model(out / "pretrain")

    if not (out / "finetune" / "result.json").is_file():
        (out / "finetune.toml").write_text(
            toml(
                FINETUNE
                | {
                    "steps": args.finetune_steps,
                    "data": str(out / "sft" / "train.jsonl"),
                    "val_data": str(out / "sft" / "val.jsonl"),
                    "model": str(pretrained),
                    "out": str(out / "finetune"),
                }
            )
        )
        gptoss("finetune", "--config", str(out / "finetune.toml"))
    result = json.loads((out / "finetune" / "result.json").read_text())
    facts["finetune"] = {k: v for k, v in result.items() if isinstance(v, int | float | str)}

    model = load_model(result["output"], dtype=torch.float32)
    facts["val_loss"] = held_out_loss(model, out / "data")
    facts["sample"] = sample_answer(model)
    facts["held_out_answers"] = answer_check(model, out / "sft" / "val.jsonl")
    facts["minutes"] = (time.time() - start) / 60
    (out / "facts.json").write_text(json.dumps(facts, indent=2))
    model.config = model.config.replace(name=CONFIG.name)  # loading named it after its directory
    save_model(model.to(torch.bfloat16), out / "model", card=model_card(facts))
    print(json.dumps(facts, indent=2))
    print(f"wrote {out / 'model'}; bundle it with: cp {out / 'model'}/* src/gptoss/models/gptoss-nano/")


def latest_model(run: Path) -> Path:
    """The HF-layout model of a training run's newest checkpoint."""
    return sorted((run / "checkpoints").glob("step_*"))[-1] / "model"


def held_out_loss(model: GptOss, data: Path) -> float:
    """Mean cross-entropy (nats per token of the fitted stream) on the whole held-out split."""
    split = TokenSplit(data, "val")
    tokens = torch.from_numpy(np.asarray(split.read(0, len(split)), dtype=np.int64))
    seq = PRETRAIN["seq_len"]
    windows = tokens[: len(tokens) // (seq + 1) * (seq + 1)].view(-1, seq + 1)
    total = 0.0
    with torch.no_grad():
        for batch in windows.split(16):
            logits = model(batch[:, :-1])
            total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
    return total / windows[:, 1:].numel()


def sample_answer(model: GptOss) -> dict[str, str]:
    """A greedy answer to a request the data does not hold, as harmony messages."""
    prompt = render_for_completion(chat_messages_to_harmony([{"role": "user", "content": SAMPLE_PROMPT}]))
    tokens = generate(
        model, [prompt], max_new_tokens=400, temperature=0.0, stop_token_ids=Tokenizer.STOP_TOKENS
    )
    messages = parse_completion(tokens[0])
    return {"prompt": SAMPLE_PROMPT} | {m.channel or "none": m.content[0].text for m in messages}


def answer_check(model: GptOss, conversations: Path) -> dict[str, int]:
    """Greedy answers (400 tokens at most) to the held-out requests: how many end their turn with
    one final message that the harmony parser reads and that holds a `def`."""
    requests = [
        json.loads(line)["messages"][-2]["content"] for line in conversations.read_text().splitlines()
    ]
    prompts = [
        render_for_completion(chat_messages_to_harmony([{"role": "user", "content": r}])) for r in requests
    ]
    answers = generate(
        model, prompts, max_new_tokens=400, temperature=0.0, stop_token_ids=Tokenizer.STOP_TOKENS
    )
    ended = [a for a in answers if a[-1] == Tokenizer.RETURN]
    finals = [[m for m in parse_completion(a) if m.channel == "final"] for a in ended]
    with_code = sum(len(f) == 1 and "def " in f[0].content[0].text for f in finals)
    return {"requests": len(requests), "ended_turn": len(ended), "final_with_def": with_code}


def model_card(facts: dict[str, Any]) -> ModelCard:
    corpus = facts["corpus"]
    return ModelCard(
        description=(
            "**A demonstration model.** gptoss-nano is bundled with the gptoss package so that "
            "`gptoss chat`, `gptoss generate` and `gptoss serve` work the minute the package is "
            "installed, with no download. It writes Python that looks like the standard library's "
            "and answers in valid harmony, but it is about ten million parameters trained for well "
            "under an hour on two CPU cores: its code is rarely correct. Do not use it for anything "
            "but trying the tools."
        ),
        training_data=(
            f"The `.py` files of the Python {facts['python']} standard library "
            f"({corpus['files']['train']:,} files, {corpus['tokens_o200k']['train']:,} o200k tokens; "
            f"{corpus['files']['val']:,} files held out). Pretrained with `gptoss train` on the raw "
            f"source, then fully fine-tuned with `gptoss finetune` on "
            f"{facts['sft_conversations']['train']:,} harmony conversations made from its documented "
            "public functions and methods (request: signature and docstring summary; answer: the "
            f"source with its docstring cut to that summary, at most {MAX_ANSWER_CHARS} characters; "
            f"{facts['sft_conversations']['val']} held-out conversations come from the held-out "
            "files). Vocabulary: the 12,288 most used o200k_harmony ids of the training files plus the "
            "256 byte tokens and the harmony tokens; any other token is spelled in bytes. Recipe: "
            "`recipes/gptoss_nano.py` in the gptoss repository."
        ),
        evaluation={
            "held-out source, cross-entropy (nats/token)": f"{facts['val_loss']:.3f}",
            "held-out source, unigram baseline (nats/token)": f"{facts['corpus']['unigram_val_loss']:.3f}",
            "held-out conversations, answer cross-entropy (nats/token)": (
                f"{facts['finetune'].get('val_loss', float('nan')):.3f}"
            ),
            "held-out requests answered greedily: turn ended within 400 tokens / with one final "
            "`def` answer": (
                f"{facts['held_out_answers']['ended_turn']} / {facts['held_out_answers']['final_with_def']} "
                f"of {facts['held_out_answers']['requests']}"
            ),
            "recipe wall time (minutes, 2 CPU cores)": f"{facts['minutes']:.0f}",
        },
        notes=f"Greedy answer to a request outside the data:\n\n> {SAMPLE_PROMPT}\n\n"
        + "```\n"
        + facts["sample"].get("final", "(no final message)")
        + "\n```",
    )


if __name__ == "__main__":
    main()
