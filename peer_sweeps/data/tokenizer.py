"""Tokenizers: a byte-level BPE trained offline on the training split, or GPT-2's vocabulary.

Both are `tokenizers.Tokenizer` objects saved as JSON next to the token arrays and identified by a short
SHA-256 of that file. Both are byte level, so every token decodes to an exact byte string; `token_bytes`
gives its length (0 for the end-of-text token), which turns nats per token into bits per byte.
"""

from __future__ import annotations

import base64
import hashlib
import tarfile
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers.pre_tokenizers import ByteLevel

EOT = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257


def train_bpe(documents: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2's pre-tokenizer regex, no prefix space) with `vocab_size` entries, the
    256 byte symbols and the end-of-text token included."""
    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size must be at least 258 (256 bytes + end-of-text + one merge), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


def gpt2_tokenizer(whisper_sdist: Path, member: str) -> Tokenizer:
    """GPT-2's tokenizer rebuilt from `gpt2.tiktoken` (token bytes and merge ranks) in the
    openai-whisper sdist: the BPE merges are recovered from the ranks, as tiktoken's own docs do."""
    with tarfile.open(whisper_sdist) as t:
        lines = t.extractfile(member).read().decode("ascii").splitlines()
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in lines if line)}
    byte_to_char = _bytes_to_unicode()
    to_str = lambda b: "".join(byte_to_char[x] for x in b)  # noqa: E731
    vocab = {to_str(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            left, right = _split_by_ranks(ranks, tok, rank)
            merges.append((to_str(left), to_str(right)))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOT])
    assert tokenizer.token_to_id(EOT) == GPT2_VOCAB_SIZE - 1
    return tokenizer


def _split_by_ranks(ranks: dict[bytes, int], token: bytes, max_rank: int) -> tuple[bytes, bytes]:
    """Run BPE on `token` with merges of rank below `max_rank`: the two parts left are the merge that
    made `token`."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[1]):
                best = (i, rank)
        assert best is not None, f"token {token!r} cannot be built from lower-ranked merges"
        i = best[0]
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return parts[0], parts[1]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the byte-level alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def token_bytes(tokenizer: Tokenizer) -> np.ndarray:
    """int32 array: the number of UTF-8 bytes each token id decodes to; special tokens count 0."""
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    out = np.zeros(tokenizer.get_vocab_size(), dtype=np.int32)
    for piece, idx in tokenizer.get_vocab().items():
        out[idx] = 0 if piece in special else len(piece)  # one byte-level character per byte
    return out


def file_hash(path: Path) -> str:
    """Short identifier of a saved tokenizer: the first 12 hex digits of its file's SHA-256."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
