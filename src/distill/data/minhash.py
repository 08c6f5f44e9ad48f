"""Word n-gram hashing, MinHash signatures and LSH near-duplicate search, vectorised with numpy.

Every hash here is a fixed function of the text (no per-process salt, seeded permutations), so the same data
and settings always find the same duplicates.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

_WORD = re.compile(r"\w+")
# For ASCII text, \w is [A-Za-z0-9_]: every other byte becomes a space, and the words are what bytes.split() finds.
_SEPARATORS = bytes(c for c in range(128) if not (chr(c).isalnum() or c == ord("_")))
_ASCII_SEPARATORS = bytes.maketrans(_SEPARATORS, b" " * len(_SEPARATORS))
_P = np.uint64(0x100000001B3)  # FNV-64 prime: the base of the per-byte polynomial word hash
_P_INV = np.uint64(pow(0x100000001B3, -1, 2**64))  # its inverse mod 2^64 (every odd number has one)
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant (golden ratio): n-gram hashing and band keys
_MAX32 = np.uint32(0xFFFFFFFF)


def word_bytes(text: str) -> bytes:
    """A text's normalised words (lower-cased runs of letters, digits and `_`) as UTF-8, separated by spaces."""
    text = text.lower()
    if text.isascii():
        return text.encode("ascii").translate(_ASCII_SEPARATORS)
    return b" ".join(w.encode("utf-8") for w in _WORD.findall(text))


def words(text: str) -> list[bytes]:
    """A text's normalised words, one bytes object each."""
    return word_bytes(text).split()


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: spreads a polynomial hash's weak low bits over all 64."""
    z = z ^ (z >> np.uint64(30))
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def hash_words(texts: Sequence[str], block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of the normalised words of many texts (concatenated, in order) and each text's word count.

    A word's hash is splitmix64 of sum_k byte_k P^(len-1-k) mod 2^64. The words of `block` texts are hashed
    together, with no Python object per word (small blocks keep the arrays in cache: 2x faster than large ones).
    """
    parts = [_hash_block(texts[start:start + block]) for start in range(0, len(texts), block)]
    if not parts:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    return np.concatenate([h for h, _ in parts]), np.concatenate([n for _, n in parts])


def _hash_block(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """hash_words of one block: with G the running sum of byte_i P^-(i+1) over the joined text, the word at
    bytes [s, e) hashes to (G[e-1] - G[s-1]) P^e."""
    data = np.frombuffer(b"\n".join([word_bytes(t) for t in texts]), dtype=np.uint8)
    inside = (data > 32).view(np.int8)  # word bytes; a space separates words and a newline texts
    edges = np.diff(inside, prepend=np.int8(0), append=np.int8(0))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    running = np.cumsum(data * np.cumprod(np.full(len(data), _P_INV)))
    before = np.where(starts > 0, running[starts - 1], np.uint64(0))
    hashes = (running[ends - 1] - before) * np.cumprod(np.full(len(data), _P))[ends - 1]
    text_of = np.searchsorted(np.flatnonzero(data == ord("\n")), starts)
    return _splitmix64(hashes), np.bincount(text_of, minlength=len(texts)).astype(np.int64)


def concat_ngrams(flat: np.ndarray, lengths: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """N-gram hashes of many texts at once, from their concatenated word hashes and word counts:
    (the hashes, the index of the text each belongs to, ascending). A text shorter than n words is one
    n-gram of all its words; a text with no words has none."""
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    short = np.flatnonzero((lengths > 0) & (lengths < n))
    short_grams = np.zeros(len(short), dtype=np.uint64)
    grams = np.zeros(len(flat), dtype=np.uint64)
    for j in range(n):  # polynomial hash, wrapping mod 2^64: word order matters
        grams *= _MIX
        grams[:max(len(flat) - j, 0)] += flat[j:]
        done = lengths[short] == j + 1  # a short text's gram is complete after its last word
        short_grams[done] = grams[starts[short[done]]]
    full = np.arange(len(flat)) - starts[owner] + n <= lengths[owner]
    full[starts[short]] = True
    grams[starts[short]] = short_grams
    return grams[full], owner[full]


class MinHasher:
    """MinHash signatures of word-shingle sets: `num_perm` 32-bit hash functions, the minimum of each per text."""

    def __init__(self, num_perm: int = 128, shingle: int = 5, seed: int = 0):
        self.num_perm, self.shingle = num_perm, shingle
        rng = np.random.default_rng(seed)
        # Multiply-add-shift (Dietzfelbinger): ((a x + b) mod 2^64) >> 32 is a 2-independent family on 32-bit x.
        self._a = rng.integers(1, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)

    def signatures(self, texts: Sequence[str], chunk: int = 2048) -> np.ndarray:
        """[len(texts), num_perm] uint32 signatures; a text with no words gets all-max (it matches nothing)."""
        sig = np.full((len(texts), self.num_perm), _MAX32, dtype=np.uint32)
        for start in range(0, len(texts), chunk):  # chunks bound the temporary arrays
            grams, owner = concat_ngrams(*hash_words(texts[start:start + chunk]), self.shingle)
            self._fill(sig[start:start + chunk], grams >> np.uint64(32), owner)
        return sig

    def _fill(self, sig: np.ndarray, x: np.ndarray, owner: np.ndarray) -> None:
        """Each text's minimum of every hash function over its shingles x (grouped by owner, ascending)."""
        if not len(x):
            return
        firsts = np.flatnonzero(np.concatenate([[True], owner[1:] != owner[:-1]]))
        rows = owner[firsts]
        buf = np.empty_like(x)
        for k in range(self.num_perm):
            np.multiply(x, self._a[k], out=buf)
            buf += self._b[k]
            # >> 32 is monotone, so the minimum's top half is the minimum of the top halves: shift the minima only
            sig[rows, k] = np.minimum.reduceat(buf, firsts) >> np.uint64(32)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """The MinHash estimate of Jaccard similarity: the share of equal signature entries (row-wise)."""
    return (np.asarray(sig_a) == np.asarray(sig_b)).mean(axis=-1)


def lsh_bands(threshold: float, num_perm: int, recall: float = 0.99) -> tuple[int, int]:
    """(bands, rows): the most rows per band that still make a pair at `threshold` a candidate with prob >= recall.

    More rows per band means fewer unrelated candidate pairs to check; candidates are verified on the full
    signature afterwards, so the only cost of a low band threshold is time.
    """
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= recall:
            best = (bands, rows)
    return best


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """[N, bands] uint64: one hash of each band's `rows` signature entries."""
    keys = np.zeros((len(sig), bands), dtype=np.uint64)
    for r in range(rows):
        keys *= _MIX
        keys += sig[:, r:bands * rows:rows].astype(np.uint64)
    return keys


def candidate_pairs(keys: np.ndarray, window: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) with i < j for texts sharing a band key: each text is paired with the first text of its bucket
    and with the `window` texts just before it in the bucket (a bucket of thousands is not squared)."""
    n = len(keys)
    firsts, seconds = [], []
    positions = np.arange(n)
    for band in range(keys.shape[1]):
        order = np.argsort(keys[:, band], kind="stable")  # stable: inside a bucket, texts stay in input order
        sorted_keys = keys[order, band]
        new_bucket = np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]])
        head = np.maximum.accumulate(np.where(new_bucket, positions, 0))
        rank = positions - head  # place inside the bucket
        for d in range(1, min(window, int(rank.max(initial=0))) + 1):
            later = np.flatnonzero(rank >= d)
            firsts.append(order[later - d])
            seconds.append(order[later])
        deep = np.flatnonzero(rank > window)
        firsts.append(order[head[deep]])
        seconds.append(order[deep])
    if not firsts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    pair = np.unique(np.concatenate(firsts).astype(np.int64) * n + np.concatenate(seconds))
    return pair // n, pair % n


def near_duplicates(sig: np.ndarray, threshold: float, *, window: int = 32) -> dict[int, tuple[int, float]]:
    """Texts to drop, {j: (i, estimated Jaccard)}: j follows a kept text i whose signature agrees >= threshold.

    Texts are taken in order; one is dropped only for its similarity to a text that is kept, so each dropped
    text has a kept near-duplicate (the first of its cluster stays).
    """
    valid = (sig != _MAX32).any(axis=1)  # texts without words are never anyone's duplicate
    bands, rows = lsh_bands(threshold, sig.shape[1])
    first, second = candidate_pairs(band_keys(sig, bands, rows), window)
    keep = valid[first] & valid[second]
    first, second = first[keep], second[keep]
    sims = np.concatenate([estimated_jaccard(sig[first[s:s + 65536]], sig[second[s:s + 65536]])
                           for s in range(0, len(first), 65536)] or [np.zeros(0)])
    close = np.flatnonzero(sims >= threshold)
    close = close[np.lexsort((first[close], second[close]))]  # by j, then i: every i is settled before its j
    dropped: dict[int, tuple[int, float]] = {}
    for i, j, s in zip(first[close].tolist(), second[close].tolist(), sims[close].tolist()):
        if i not in dropped and j not in dropped:
            dropped[j] = (i, s)
    return dropped
