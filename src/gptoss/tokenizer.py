"""The o200k_harmony tokenizer, provisioned without any network access.

tiktoken and openai-harmony both want to download ``o200k_base.tiktoken`` (the BPE ranks) on first
use, which fails on air-gapped machines. The same ranks ship inside the PyPI package
``quicktok-v1``, so we rebuild the file from it once, check it against the SHA-256 that tiktoken
and openai-harmony themselves pin, and point both libraries at our copy:

- tiktoken: we build the ``Encoding`` ourselves from the verified ranks (its registry would fetch).
- openai-harmony: it reads ``$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken`` and re-checks the hash.

The file lives in ``$GPTOSS_CACHE``, else ``$XDG_CACHE_HOME/gptoss``, else ``~/.cache/gptoss``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import re
import tempfile
from pathlib import Path

import quicktok
import tiktoken
from openai_harmony import HarmonyEncoding, HarmonyEncodingName, load_harmony_encoding

RANK_FILE_NAME = "o200k_base.tiktoken"  # the name openai-harmony looks for (public_encodings.rs)
RANK_FILE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
N_RANKS = 199_998  # ids 0..199997 are BPE ranks; the specials start right after

# Copied from tiktoken_ext.openai_public.o200k_base (tiktoken 0.9+), which cannot be called offline
# because it fetches the ranks itself; a test checks this against tiktoken's own definition.
_O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)


class RankFileError(RuntimeError):
    """The cached rank file is not the o200k_base vocabulary (or it could not be rebuilt)."""


class Tokenizer(tiktoken.Encoding):
    """tiktoken's ``Encoding`` for o200k_harmony, with the harmony special ids by name.

    The ids are class attributes so that code which only needs them (stop tokens, the parser)
    does not have to build the vocabulary.
    """

    STARTOFTEXT = 199_998
    ENDOFTEXT = 199_999
    RETURN = 200_002
    CONSTRAIN = 200_003
    CHANNEL = 200_005
    START = 200_006
    END = 200_007
    MESSAGE = 200_008
    CALL = 200_012
    ENDOFPROMPT = 200_018  # inherited from o200k_base; harmony calls the same id <|reserved_200018|>
    N_VOCAB = 201_088
    # A completion ends on <|return|> (answer done) or <|call|> (tool call); <|endoftext|> is the
    # checkpoint's generic EOS. <|end|> only closes one message, so generation goes on after it.
    STOP_TOKENS = frozenset({RETURN, CALL, ENDOFTEXT})

    def encode_ordinary_in_pieces(self, text: str, piece_chars: int = 1 << 15) -> list[int]:
        """`encode_ordinary(text)`, a piece of ~`piece_chars` at a time, so that a long text never
        holds the GIL for long (tiktoken keeps it while it encodes: ~0.3 s per MB).

        Pieces end where the o200k pre-tokenizer always ends a word: after a newline that a
        non-space character other than "/" follows, or between a letter and a space that a letter
        follows; so the tokens are exactly those of the whole text."""
        if len(text) <= piece_chars:
            return self.encode_ordinary(text)
        tokens: list[int] = []
        start = 0
        while start < len(text):
            end = _piece_end(text, start + piece_chars)
            tokens += self.encode_ordinary(text[start:end])
            start = end
        return tokens


_PIECE_BREAK = re.compile(r"(?<=\n)(?=[^\s/])|(?<=[A-Za-z])(?= [A-Za-z])")


def _piece_end(text: str, target: int) -> int:
    """The first word boundary (see `Tokenizer.encode_ordinary_in_pieces`) at or after `target`."""
    if target >= len(text):
        return len(text)
    found = _PIECE_BREAK.search(text, target)
    return found.start() if found else len(text)


def _special_tokens() -> dict[str, int]:
    named = {
        "<|startoftext|>": Tokenizer.STARTOFTEXT,
        "<|endoftext|>": Tokenizer.ENDOFTEXT,
        "<|return|>": Tokenizer.RETURN,
        "<|constrain|>": Tokenizer.CONSTRAIN,
        "<|channel|>": Tokenizer.CHANNEL,
        "<|start|>": Tokenizer.START,
        "<|end|>": Tokenizer.END,
        "<|message|>": Tokenizer.MESSAGE,
        "<|call|>": Tokenizer.CALL,
        "<|endofprompt|>": Tokenizer.ENDOFPROMPT,
    }
    taken = set(named.values()) - {Tokenizer.ENDOFPROMPT}
    reserved = {
        f"<|reserved_{i}|>": i for i in range(Tokenizer.ENDOFTEXT + 1, Tokenizer.N_VOCAB) if i not in taken
    }
    return named | reserved


def cache_dir() -> Path:
    """Where gptoss keeps generated files: ``$GPTOSS_CACHE``, else the XDG cache convention."""
    if env := os.environ.get("GPTOSS_CACHE"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "gptoss"


def _build_rank_file_bytes() -> bytes:
    """The o200k_base rank file, reconstructed from the vocabulary that quicktok-v1 ships."""
    enc = quicktok.get_encoding("o200k_base")
    return b"".join(base64.b64encode(enc.decode_single_token_bytes(i)) + b" %d\n" % i for i in range(N_RANKS))


def _check_hash(data: bytes, source: str) -> None:
    digest = hashlib.sha256(data).hexdigest()
    if digest != RANK_FILE_SHA256:
        raise RankFileError(
            f"{source} has SHA-256 {digest}, but the o200k_base ranks have {RANK_FILE_SHA256}. "
            "Refusing to use it. If it is the cached file, delete it and gptoss rebuilds it "
            "from the quicktok-v1 package; if the rebuild itself fails, reinstall quicktok-v1."
        )


def _verified_rank_bytes() -> tuple[Path, bytes]:
    path = cache_dir() / "encodings" / RANK_FILE_NAME
    if path.exists():
        data = path.read_bytes()
        _check_hash(data, str(path))
        return path, data
    data = _build_rank_file_bytes()
    _check_hash(data, f"the rank file rebuilt from quicktok-v1 {quicktok.__version__}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Temp file in the same directory + rename: concurrent processes (torchrun ranks, dataloader
    # workers) may race here, and a reader must never see a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{RANK_FILE_NAME}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared between users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path, data


def ensure_rank_file() -> Path:
    """Return the path of a verified ``o200k_base.tiktoken``, building it on first use.

    Raises RankFileError if an existing file's hash differs: we never silently replace a file that
    someone (or a broken disk) changed, since a wrong vocabulary produces plausible garbage.
    """
    return _verified_rank_bytes()[0]


@functools.cache
def get_tokenizer() -> Tokenizer:
    """The o200k_harmony tokenizer (201,088 ids), built offline from the verified rank file."""
    _, data = _verified_rank_bytes()
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in data.splitlines())}
    return Tokenizer(
        name="o200k_harmony",
        pat_str=_O200K_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=_special_tokens(),
    )


def write_hf_tokenizer(directory: str | Path) -> Path:
    """Write ``tokenizer.json``, this vocabulary for Hugging Face ``tokenizers``, into directory.

    Consumers of Hugging Face checkpoints read it: transformers' ``AutoTokenizer``, vLLM, llama.cpp's
    converter. The same BPE ranks, split pattern and special ids as `get_tokenizer` (a test compares
    the two on text and special tokens). The file is written under a temporary name and renamed
    when whole. Needs ``transformers`` (its tiktoken converter), which gptoss does not depend on.
    """
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(vocab_file=str(ensure_rank_file()), pattern=_O200K_PATTERN)
    hf = converter.converted()
    names: dict[int, str] = {}
    for name, token_id in _special_tokens().items():
        names.setdefault(token_id, name)  # 200018 has two names; the first is o200k_base's
    # added tokens take the next free ids in order, so the specials must follow the ranks gaplessly
    if sorted(names) != list(range(hf.get_vocab_size(), Tokenizer.N_VOCAB)):
        raise RuntimeError(f"the special ids do not follow the {hf.get_vocab_size()} converted ranks")
    hf.add_special_tokens([AddedToken(names[i], special=True, normalized=False) for i in sorted(names)])
    path = Path(directory) / "tokenizer.json"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tokenizer.", suffix=".json.tmp")
    os.close(fd)
    try:
        hf.save(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@functools.cache
def get_harmony_encoding() -> HarmonyEncoding:
    """openai-harmony's gpt-oss encoding, loaded from the verified rank file instead of the network."""
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(ensure_rank_file().parent)
    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
