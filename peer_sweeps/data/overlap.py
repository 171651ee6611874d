"""Deduplication, the split by document, and the check that evaluation text is never trained on.

Overlap is measured on word n-grams (default 13 words, lower-cased `\\w+` runs, as in GPT-3's
contamination study): an evaluation document that shares any n-gram with the training text, or is an
exact duplicate of a training document, is dropped.
"""

from __future__ import annotations

import hashlib
import re
from itertools import chain

import numpy as np
import pandas as pd

_WORD = re.compile(r"\w+")
_MULTIPLIERS = np.random.default_rng(20240707).integers(1, 2**63, size=64, dtype=np.uint64) | np.uint64(1)


def fingerprint(doc: str) -> str:
    """Identity of a document up to whitespace and case."""
    return hashlib.sha256(" ".join(doc.lower().split()).encode()).hexdigest()


def dedupe(docs: list[str], seen: set[str] | None = None) -> tuple[list[str], int]:
    """Keep the first copy of each document (and none already in `seen`, which is updated).
    Returns (kept, number dropped)."""
    seen = set() if seen is None else seen
    kept = []
    for doc in docs:
        key = fingerprint(doc)
        if key not in seen:
            seen.add(key)
            kept.append(doc)
    return kept, len(docs) - len(kept)


def split_by_document(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(train, held_out): the documents with the smallest content hashes are held out.

    `ceil(fraction * len(docs))` documents, at least one when there are two or more; deterministic and
    independent of document order. Each kept list is in the original order.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    n_held = min(len(docs) - 1, max(1, int(np.ceil(fraction * len(docs))))) if len(docs) > 1 else 0
    order = sorted(range(len(docs)), key=lambda i: fingerprint(docs[i]))
    held = set(order[:n_held])
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


class NgramIndex:
    """Hashes of every word n-gram of a body of text; `overlaps(doc)` says whether a document shares one.

    Words are numbered with one pandas hash-table pass over the whole text (fast in C); a word the
    training text lacks gets -1, and no n-gram containing one can match.
    """

    def __init__(self, docs: list[str], n: int = 13):
        if not 1 <= n <= len(_MULTIPLIERS):
            raise ValueError(f"n-gram length must be in [1, {len(_MULTIPLIERS)}], got {n}")
        self.n = n
        words = [_WORD.findall(d.lower()) for d in docs]
        codes, uniques = pd.factorize(np.array(list(chain.from_iterable(words)), dtype=object))
        self.vocabulary = pd.Index(uniques)
        bounds = np.cumsum([len(w) for w in words])[:-1]
        grams = [self._hash(c) for c in np.split(codes.astype(np.int64), bounds)]
        self.hashes = np.unique(np.concatenate(grams)) if grams else np.zeros(0, np.uint64)

    def overlaps(self, doc: str) -> bool:
        words = _WORD.findall(doc.lower())
        if len(words) < self.n or len(self.hashes) == 0:
            return False
        grams = self._hash(self.vocabulary.get_indexer(np.array(words, dtype=object)).astype(np.int64))
        pos = np.searchsorted(self.hashes, grams).clip(max=len(self.hashes) - 1)
        return bool((self.hashes[pos] == grams).any())

    def _hash(self, codes: np.ndarray) -> np.ndarray:
        """uint64 hash of each n-gram without an unknown word: sum over positions of (word code + 1)
        times a random odd multiplier per position."""
        m = len(codes) - self.n + 1
        if m <= 0:
            return np.zeros(0, np.uint64)
        known = np.convolve(codes < 0, np.ones(self.n, dtype=np.int64), mode="valid") == 0
        ids = (codes + 1).astype(np.uint64)
        h = np.zeros(m, np.uint64)
        for k in range(self.n):
            h += ids[k:k + m] * _MULTIPLIERS[k]
        return h[known]


def drop_overlapping(docs: list[str], index: NgramIndex) -> tuple[list[str], int]:
    """(the documents that share no n-gram with the index, number dropped)."""
    kept = [d for d in docs if not index.overlaps(d)]
    return kept, len(docs) - len(kept)
