"""o200k_harmony, provisioned offline: the rank file, special ids, round-trips, library agreement."""

import hashlib
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tiktoken_ext.openai_public
from hypothesis import given, settings
from hypothesis import strategies as st

from gptoss.tokenizer import (
    N_RANKS,
    RANK_FILE_NAME,
    RANK_FILE_SHA256,
    RankFileError,
    Tokenizer,
    cache_dir,
    ensure_rank_file,
    get_harmony_encoding,
    get_tokenizer,
    write_hf_tokenizer,
)

# The special tokens as DESIGN.md states them (independent of the constants in tokenizer.py).
SPECIALS = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|call|>": 200012,
}

SAMPLES = [
    "Hello, world! It's 3.14159 o'clock; we're done.",
    "naïve café déjà vu — “quotes” and ‘apostrophes’ … ½ ≠ 0.5",
    "日本語のテキストと中文文本，还有한국어 문장도 있습니다。",
    "Ελληνικά, русский язык, עברית, العربية مع التشكيل: مَرْحَبًا",
    "हिन्दी में लिखा गया वाक्य, তামিল: தமிழ், ไทย: ภาษาไทย",
    "emoji: 👩‍👩‍👧‍👦 🏳️‍🌈 👍🏽 🇯🇵 e\u0301 (combining acute) \u200b zero-width",
    "code:\n\tdef f(x):\n\t\treturn {'a': [1, 2, 3]}  # comment\r\n\n\n   trailing   ",
    "literal specials as text: <|start|>assistant<|message|>hi<|end|>",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 ∀x∈ℝ: x²≥0, and 🀄 beyond the BMP",
    "",
]


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    """Build the rank file into a fresh directory (0.5 s), so the tests see a first-use build."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTOSS_CACHE", str(tmp_path_factory.mktemp("gptoss-cache")))
        yield


def test_rank_file_is_built_verified_and_written_once(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTOSS_CACHE", str(tmp_path))
    path = ensure_rank_file()
    assert path == tmp_path / "encodings" / RANK_FILE_NAME
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == RANK_FILE_SHA256
    assert data.count(b"\n") == N_RANKS and data.endswith(b" 199997\n")
    assert sorted(os.listdir(path.parent)) == [RANK_FILE_NAME]  # no temp file left behind
    assert path.stat().st_mode & 0o777 == 0o644
    mtime = path.stat().st_mtime_ns
    assert ensure_rank_file() == path and path.stat().st_mtime_ns == mtime  # not rebuilt


def test_a_rank_file_with_another_hash_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTOSS_CACHE", str(tmp_path))
    path = ensure_rank_file()
    tampered = path.read_bytes().replace(b" 1000\n", b" 1001\n", 1)
    path.write_bytes(tampered)
    with pytest.raises(RankFileError, match=f"{RANK_FILE_SHA256}.*delete it"):
        ensure_rank_file()
    assert path.read_bytes() == tampered  # refused, not silently replaced


def test_cache_dir_follows_gptoss_cache_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("GPTOSS_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("GPTOSS_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "gptoss"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "gptoss"


def test_loads_with_no_network(tmp_path):
    """A fresh machine: empty cache, no tiktoken caches, every download pointed at a dead port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIKTOKEN", "DATA_GYM"))}
    dead = "http://127.0.0.1:9"
    env |= {"GPTOSS_CACHE": str(tmp_path / "cache"), "TIKTOKEN_RS_CACHE_DIR": str(tmp_path / "rs")}
    env |= {name: dead for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy")}
    code = (
        "from gptoss.tokenizer import get_tokenizer, get_harmony_encoding\n"
        "assert get_tokenizer().encode('hello world') == get_harmony_encoding().encode('hello world')\n"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    assert (tmp_path / "cache" / "encodings" / RANK_FILE_NAME).exists()


def test_vocabulary_size_and_special_ids():
    tok = get_tokenizer()
    assert tok.n_vocab == Tokenizer.N_VOCAB == 201_088
    for text, token in SPECIALS.items():
        assert tok.encode(text, allowed_special="all") == [token]
        assert tok.decode([token]) == text
        assert getattr(Tokenizer, text.strip("<|>").upper()) == token
    assert tok.decode([200_000, 201_087]) == "<|reserved_200000|><|reserved_201087|>"
    assert {200_002, 200_012, 199_999} == Tokenizer.STOP_TOKENS


def test_special_token_text_is_refused_unless_allowed():
    tok = get_tokenizer()
    with pytest.raises(ValueError, match="special token"):
        tok.encode("<|start|>user")
    as_text = tok.encode("<|start|>user", disallowed_special=())
    assert Tokenizer.START not in as_text and tok.decode(as_text) == "<|start|>user"
    assert tok.encode("<|start|>user", allowed_special={"<|start|>"})[0] == Tokenizer.START


def test_matches_tiktoken_own_definition_of_o200k_harmony(monkeypatch):
    """tiktoken's constructor would download the ranks; give it ours and compare the rest."""
    tok = get_tokenizer()
    monkeypatch.setattr(tiktoken_ext.openai_public, "load_tiktoken_bpe", lambda *a, **k: tok._mergeable_ranks)
    spec = tiktoken_ext.openai_public.o200k_harmony()
    assert tok._pat_str == spec["pat_str"]
    assert tok._special_tokens == spec["special_tokens"]
    assert tok.name == spec["name"]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_samples(text):
    tok = get_tokenizer()
    assert tok.decode(tok.encode(text, disallowed_special=())) == text


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(exclude_categories=["Cs"]), max_size=200))
def test_round_trip_any_unicode(text):
    tok = get_tokenizer()
    ids = tok.encode_ordinary(text)
    assert all(0 <= i < N_RANKS for i in ids)
    assert tok.decode(ids) == text


def test_encode_batch_matches_encode():
    tok = get_tokenizer()
    assert tok.encode_batch(SAMPLES, disallowed_special=()) == [
        tok.encode(t, disallowed_special=()) for t in SAMPLES
    ]
    assert tok.decode_batch(tok.encode_batch(SAMPLES, disallowed_special=())) == SAMPLES


def _large_text_sample() -> str:
    """About 2 MB of real text that ships with every machine: the standard library's sources."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [*SAMPLES], 0
    for path in sorted(stdlib.glob("*.py")):
        parts.append(path.read_text(encoding="utf-8", errors="replace"))
        size += len(parts[-1])
        if size > 2_000_000:
            break
    return "\n".join(parts)


def test_agrees_with_openai_harmony():
    tok, harmony = get_tokenizer(), get_harmony_encoding()
    text = _large_text_sample()
    assert len(text) > 1_000_000
    assert tok.encode_ordinary(text) == harmony.encode(text, disallowed_special=())
    every_rank = list(range(N_RANKS))
    # surrogateescape is lossless, so equal strings mean equal bytes
    assert harmony.decode(every_rank, errors="surrogateescape") == tok.decode(
        every_rank, errors="surrogateescape"
    )
    assert [harmony.decode([i]) for i in SPECIALS.values()] == list(SPECIALS)
    assert set(harmony.stop_tokens_for_assistant_actions()) <= Tokenizer.STOP_TOKENS


def test_hf_tokenizer_json_encodes_as_we_do(tmp_path):
    """tokenizer.json, read by Hugging Face `tokenizers`, gives our ids: text, specials, sampled ids."""
    from tokenizers import Tokenizer as HFTokenizer

    path = write_hf_tokenizer(tmp_path)
    assert path == tmp_path / "tokenizer.json" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    hf, tok = HFTokenizer.from_file(str(path)), get_tokenizer()
    assert hf.get_vocab_size() == Tokenizer.N_VOCAB
    text = _large_text_sample()[:300_000].replace("<|", "< |")  # specials are tested below
    assert hf.encode(text, add_special_tokens=False).ids == tok.encode_ordinary(text)
    for sample in SAMPLES:
        assert hf.encode(sample, add_special_tokens=False).ids == tok.encode(sample, allowed_special="all")
    for name, token in SPECIALS.items():
        assert hf.token_to_id(name) == token
    assert hf.token_to_id("<|reserved_201087|>") == 201_087 and hf.token_to_id("<|endofprompt|>") == 200_018
    every_id = list(range(0, Tokenizer.N_VOCAB, 97))
    assert hf.decode(every_id, skip_special_tokens=False) == tok.decode(every_id)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab Z\n\r\t/.,'s1 é中😀-")), max_size=400), st.integers(1, 40))
def test_encoding_in_pieces_equals_encoding_at_once(text, piece_chars):
    tokenizer = get_tokenizer()
    assert tokenizer.encode_ordinary_in_pieces(text, piece_chars) == tokenizer.encode_ordinary(text)
