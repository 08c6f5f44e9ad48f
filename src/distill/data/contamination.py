"""N-gram overlap between training text and evaluation items (contamination checks, both directions)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from distill.data.minhash import concat_ngrams, hash_words
from distill.data.readers import check_suffix, json_records, read_text, text_blocks

DEFAULT_N = 13  # the GPT-3 paper's contamination n-gram
CHUNK = 2048  # texts hashed and looked up at once (small arrays stay in cache)


class NgramIndex:
    """Every word n-gram of a list of texts (items), to ask which items a new text shares an n-gram with.

    Items shorter than n words are indexed as one n-gram of all their words; such an item matches only a text
    that is exactly those words.
    """

    def __init__(self, grams: np.ndarray, items: np.ndarray, n: int, count: int):
        order = np.argsort(grams, kind="stable")
        self._grams, self._items = grams[order], items[order]
        self.n, self.count = n, count

    @classmethod
    def from_texts(cls, texts: Sequence[str], n: int = DEFAULT_N) -> "NgramIndex":
        """Index the n-grams (normalised words) of each text; item i is texts[i]."""
        if n < 1:
            raise ValueError(f"n-gram size must be at least 1, got {n}")
        grams, items = [np.zeros(0, dtype=np.uint64)], [np.zeros(0, dtype=np.int64)]
        for start in range(0, len(texts), CHUNK):
            chunk_grams, owner = concat_ngrams(*hash_words(texts[start:start + CHUNK]), n)
            grams.append(chunk_grams)
            items.append(owner + start)
        return cls(np.concatenate(grams), np.concatenate(items), n, len(texts))

    def __len__(self) -> int:
        return self.count

    def overlaps(self, text: str) -> list[int]:
        """Indices of the items sharing at least one n-gram with text (ascending)."""
        return self._overlaps_chunk([text])[0]

    def overlaps_many(self, texts: Sequence[str]) -> list[list[int]]:
        """overlaps() of each text, hashed and looked up in vectorised passes of CHUNK texts."""
        chunks = (self._overlaps_chunk(texts[start:start + CHUNK]) for start in range(0, len(texts), CHUNK))
        return [found for chunk in chunks for found in chunk]

    def _overlaps_chunk(self, texts: Sequence[str]) -> list[list[int]]:
        grams, owner = concat_ngrams(*hash_words(texts), self.n)
        found: list[list[int]] = [[] for _ in texts]
        if not len(grams) or not len(self._grams):
            return found
        hit = np.flatnonzero(self._hit(grams))
        owners = owner[hit]  # ascending: concat_ngrams keeps the texts in order
        bounds = np.flatnonzero(np.diff(owners)) + 1
        for group in np.split(hit, bounds) if len(hit) else []:
            found[int(owner[group[0]])] = self._matches(grams[group])
        return found

    def _hit(self, grams: np.ndarray) -> np.ndarray:
        at = np.searchsorted(self._grams, grams).clip(max=len(self._grams) - 1)
        return self._grams[at] == grams

    def _matches(self, grams: np.ndarray) -> list[int]:
        if not len(grams) or not len(self._grams):
            return []
        grams = np.unique(grams[self._hit(grams)])
        lo = np.searchsorted(self._grams, grams, side="left")
        hi = np.searchsorted(self._grams, grams, side="right")
        return sorted({item for a, b in zip(lo.tolist(), hi.tolist()) for item in self._items[a:b].tolist()})


def record_text(value: Any) -> str:
    """Every string inside a JSON value (any field, nested lists and objects), one per line."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return "\n".join(t for t in (record_text(v) for v in value) if t)
    return ""


def read_eval_texts(path: str | Path) -> list[str]:
    """The items of an eval file: one text per JSONL/JSON record (all its string fields), or per .txt paragraph."""
    path = Path(path)
    check_suffix(path)
    if path.suffix.lower() == ".txt":
        return [block for _, block in text_blocks(path, read_text(path))]
    return [record_text(record) for _, record in json_records(path)]


def load_eval_texts(paths: Iterable[str | Path]) -> dict[str, list[str]]:
    """{file name as given: its items} for each eval file."""
    return {str(p): read_eval_texts(p) for p in paths}
