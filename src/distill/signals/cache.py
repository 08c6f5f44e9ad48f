"""The top-k teacher cache on disk: a directory with a provenance header and checksummed shards.

    <cache>/cache.json          provenance + encoding (written first; a resumed capture must match it)
    <cache>/shard_00000.bin     examples [0, S), shard_00001.bin [S, 2S), ... (each written atomically)

A shard file is: MAGIC, a 4-byte little-endian length, the compressed JSON index, the shard's compressed id
table, the blobs, and a 32-byte BLAKE2b digest of everything before it. A blob holds consecutive examples, enough
for BLOB_ENTRIES entries (positions x k): the compressor learns its statistics afresh in each blob, and one
example at k = 8 is too little to learn from. The index gives each example's position count, the offset, size
and CRC-32 of the blob that holds it (shared by that blob's examples), and the hash of the token ids and labels
it was captured on, so training can prove the pairing.
"""
from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from distill.errors import DistillError
from distill.runtime import SHARED_IDLE_S, atomic_write_bytes, atomic_write_json, remove_stale_temporaries
from distill.signals.encoding import ENCODING_VERSION, Codec, IdTable, TopKRows, compress, decompress

HEADER = "cache.json"
FORMAT = "distill-topk-cache"
MAGIC = b"DTKC" + bytes([ENCODING_VERSION])
BLOB_ENTRIES = 4096
_DIGEST = 32
_TABLES_KEPT = 64
IGNORE = -100


def example_hash(input_ids: Sequence[int], labels: Sequence[int]) -> str:
    """16 hex chars identifying an example's token ids and which of them are trained."""
    h = hashlib.blake2b(digest_size=8)
    h.update(np.asarray(input_ids, dtype="<i4").tobytes())
    h.update(np.asarray(labels, dtype="<i4").tobytes())
    return h.hexdigest()


def trained_positions(labels: Sequence[int]) -> np.ndarray:
    """Positions i whose next token is trained (labels[i + 1] != -100): the rows a cache holds for an example."""
    return np.nonzero(np.asarray(labels[1:]) != IGNORE)[0]


def next_tokens(labels: Sequence[int]) -> np.ndarray:
    """The token each cached row predicts (its label), in row order: the codec stores ids relative to it."""
    following = np.asarray(labels[1:], dtype=np.int64)
    return following[following != IGNORE]


def blob_groups(positions: Sequence[int], k: int) -> list[range]:
    """Consecutive examples, each group closed once it holds BLOB_ENTRIES entries (the last may hold fewer)."""
    groups, start, entries = [], 0, 0
    for i, n in enumerate(positions):
        entries += n * k
        if entries >= BLOB_ENTRIES or i == len(positions) - 1:
            groups.append(range(start, i + 1))
            start, entries = i + 1, 0
    return groups


def dataset_hash(hashes: Sequence[str]) -> str:
    return hashlib.blake2b("\n".join(hashes).encode(), digest_size=16).hexdigest()


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.bin"


@dataclass
class CacheHeader:
    """Provenance and encoding of a cache (the JSON in cache.json)."""

    teacher: str  # the recipe's teacher reference (+ gguf file)
    teacher_weights: str  # BLAKE2b of the teacher's state dict
    tokenizer: str  # hash of vocab, special tokens and a probe encoding
    chat_template: str  # hash of the chat template ("none" without one)
    vocab_size: int  # rows of the teacher's output head: log-softmax runs over all of them
    k: int
    step: Optional[float]  # quantization step of log-probs (nats); None = exact float32
    compressor: str
    dataset: str  # hash of every example's hash, in order
    n_examples: int
    shard_examples: int
    temperature: float = 1.0  # log-probs are stored at T = 1; the loss re-applies the recipe's temperature
    teacher_files: str = ""  # size and mtime of the teacher's weight files at capture ("" when not local)
    # Across tokenizers: a hash of the student's tokenizer and template whose rendering the teacher read ("": the
    # teacher's own tokenization of the student's examples, one tokenizer on both sides)
    aligned_to: str = ""
    encoding_version: int = ENCODING_VERSION
    format: str = FORMAT

    @property
    def codec(self) -> Codec:
        return Codec(self.vocab_size, self.k, self.step, self.compressor)  # type: ignore[arg-type]

    @property
    def n_shards(self) -> int:
        return -(-self.n_examples // self.shard_examples)

    def shard_range(self, shard: int) -> range:
        start = shard * self.shard_examples
        return range(start, min(start + self.shard_examples, self.n_examples))

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


def read_header(path: Path) -> CacheHeader:
    """The header of the cache at `path`; one clear error when it is missing, unreadable or another format."""
    file = Path(path) / HEADER
    if not file.is_file():
        raise DistillError(f"{path}: no teacher cache here ({HEADER} missing); run `distill capture` first")
    try:
        data = json.loads(file.read_text())
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("no distill-topk-cache format marker")
        if data.get("encoding_version") != ENCODING_VERSION:
            raise DistillError(f"{file}: encoding version {data.get('encoding_version')} is not supported "
                               f"(this distill reads version {ENCODING_VERSION}); capture the cache again")
        if data.get("compressor") != "lzma2":
            raise ValueError(f"unknown compressor {data.get('compressor')!r}")
        return CacheHeader(**data)
    except (ValueError, TypeError) as err:
        raise DistillError(f"{file}: not a distill teacher-cache header ({err})") from None


class TopKCacheWriter:
    """Writes a cache shard by shard; a shard is on disk whole or not at all, so a killed capture resumes.

    `add(index, example_hash, rows, labels)` takes examples in index order (from capture, or later from
    generation) and writes each shard as soon as its last example arrives. Of several processes writing one
    cache's shards, only the `owner` writes the header and clears temporaries; the others check the header.
    """

    def __init__(self, path: Path, header: CacheHeader, owner: bool = True):
        self.path, self.header, self.codec = Path(path), header, header.codec
        self._check_or_write_header(owner)
        if owner:  # shards a killed capture was writing; teacher.cache may be shared, so one still changing is kept
            remove_stale_temporaries(self.path, idle_s=SHARED_IDLE_S)
        self._pending: list[tuple[int, str, TopKRows, np.ndarray]] = []

    def _check_or_write_header(self, write: bool) -> None:
        file = self.path / HEADER
        if file.is_file():
            existing = read_header(self.path).to_json()
            for key, value in self.header.to_json().items():
                if key in existing and existing[key] != value:  # a key a newer distill added is not a change
                    raise DistillError(
                        f"{self.path}: this cache was captured with a different {key} "
                        f"({existing.get(key)!r}, now {value!r}); delete it or set another teacher.cache"
                    )
            return
        if write:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(file, self.header.to_json())

    def complete_shards(self, shards: Optional[Sequence[int]] = None) -> set[int]:
        """Of `shards` (default: all), those already on disk and intact (a damaged one is captured again)."""
        done = set()
        for shard in range(self.header.n_shards) if shards is None else shards:
            try:
                _read_shard_index(self.path / shard_name(shard), self.header, shard)
                done.add(shard)
            except DistillError:
                continue
        return done

    def add(self, index: int, example_hash: str, rows: TopKRows, labels: Sequence[int]) -> None:
        """Queue one example's rows (`labels`: the example's, -100 where untrained); writes its shard once the
        shard's last example is in."""
        shard = index // self.header.shard_examples
        expected = self.header.shard_range(shard).start + len(self._pending)
        if index != expected:
            raise ValueError(f"examples must be added in order: got {index}, expected {expected}")
        tokens = next_tokens(labels)
        if len(tokens) != len(rows):
            raise ValueError(f"example {index}: {len(rows)} rows but {len(tokens)} trained labels")
        self._pending.append((index, example_hash, rows, tokens))
        if index == self.header.shard_range(shard).stop - 1:
            self._write_shard(shard)

    def _write_shard(self, shard: int) -> None:
        _, hashes, rows, tokens = zip(*self._pending)
        table = IdTable.of([r.ids[r.ids != t[:, None]] for r, t in zip(rows, tokens)])  # labels need no rank
        groups = blob_groups([len(r) for r in rows], self.header.k)
        blobs = [table.to_bytes()] + [self.codec.encode(rows[g.start:g.stop], table, tokens[g.start:g.stop])
                                      for g in groups]
        offsets = np.cumsum([0] + [len(b) for b in blobs[:-1]]).tolist()
        blob_of = [b for b, g in enumerate(groups, start=1) for _ in g]  # per example, its blob in `blobs`
        index = {
            "shard": shard, "first": self._pending[0][0], "count": len(self._pending),
            "hashes": list(hashes), "positions": [len(r) for r in rows],
            "id_table": [offsets[0], len(blobs[0]), zlib.crc32(blobs[0])],
            "offsets": [offsets[b] for b in blob_of], "sizes": [len(blobs[b]) for b in blob_of],
            "crc32": [zlib.crc32(blobs[b]) for b in blob_of],
        }
        body = MAGIC + _index_bytes(index) + b"".join(blobs)
        atomic_write_bytes(self.path / shard_name(shard), body + hashlib.blake2b(body, digest_size=_DIGEST).digest())
        self._pending = []


def _index_bytes(index: dict) -> bytes:
    packed = compress(json.dumps(index, separators=(",", ":")).encode())
    return struct.pack("<I", len(packed)) + packed


def _read_shard_index(file: Path, header: CacheHeader, shard: int, check_digest: bool = True) -> dict:
    """The JSON index of a shard file after checking its digest and that it covers the header's range."""
    if not file.is_file():
        raise DistillError(f"{file}: shard missing (the capture did not finish); run `distill capture` again")
    data = file.read_bytes()
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if data[:4] == MAGIC[:4] and data[4:5] != MAGIC[4:]:
        raise DistillError(f"{file}: a shard of encoding version {data[4]} (this distill reads version "
                           f"{MAGIC[4]}); capture the cache again")
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4 + _DIGEST:
        raise DistillError(f"{file}: not a distill cache shard (bad magic or truncated)")
    if check_digest and hashlib.blake2b(body, digest_size=_DIGEST).digest() != digest:
        raise DistillError(f"{file}: checksum mismatch (corrupted or truncated shard); capture it again")
    (length,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        index = json.loads(decompress(data[start:start + length]))
    except ValueError:
        raise DistillError(f"{file}: unreadable shard index") from None
    expected = header.shard_range(shard)
    if index.get("first") != expected.start or index.get("count") != len(expected):
        raise DistillError(f"{file}: holds examples {index.get('first')}+{index.get('count')}, "
                           f"expected {expected.start}+{len(expected)}")
    index["payload_start"] = start + length
    return index


def _blob_members(entry: dict, slot: int) -> range:
    """The slots of the examples that share `slot`'s blob (consecutive, with the same offset)."""
    offsets = entry["offsets"]
    first = last = slot
    while first > 0 and offsets[first - 1] == offsets[slot]:
        first -= 1
    while last + 1 < len(offsets) and offsets[last + 1] == offsets[slot]:
        last += 1
    return range(first, last + 1)


class TopKCache:
    """Read-only view of a complete cache, verified against the examples it is paired with."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.header = read_header(self.path)
        self.codec = self.header.codec
        self._indexes: dict[int, dict] = {}
        self._tables: dict[int, IdTable] = {}  # the most recently used shards' id tables

    def verify(self, hashes: Sequence[str]) -> None:
        """Check every shard (present, digest, range) and that each holds these examples' token ids."""
        h = self.header
        if len(hashes) != h.n_examples:
            raise DistillError(f"{self.path}: the cache holds {h.n_examples} examples but the recipe's training "
                               f"data has {len(hashes)}; capture again for this data")
        for shard in range(h.n_shards):
            file = self.path / shard_name(shard)
            index = _read_shard_index(file, h, shard)
            span = h.shard_range(shard)
            for offset, (stored, wanted) in enumerate(zip(index["hashes"], hashes[span.start:span.stop])):
                if stored != wanted:
                    raise DistillError(f"{file}: example {span.start + offset}'s token ids differ from the "
                                       "training batch's (different data, tokenizer, template or max_length)")
            self._indexes[shard] = index

    def rows(self, index: int, example_hash: str, labels: Sequence[int]) -> TopKRows:
        """One example's rows (`labels`: the example's, as captured); refuses a blob whose CRC or token hash
        does not match."""
        shard, slot = divmod(index, self.header.shard_examples)
        file = self.path / shard_name(shard)
        entry = self._indexes.get(shard)
        if entry is None:
            entry = self._indexes[shard] = _read_shard_index(file, self.header, shard)
        if entry["hashes"][slot] != example_hash:
            raise DistillError(f"{file}: example {index}'s token ids differ from the training batch's")
        try:
            blob = self._read(file, entry, entry["offsets"][slot], entry["sizes"][slot], entry["crc32"][slot],
                              f"example {index}")
            members = _blob_members(entry, slot)
            return self.codec.decode(blob, [entry["positions"][m] for m in members], self._table(shard, file, entry),
                                     next_tokens(labels), member=slot - members.start)
        except ValueError as err:
            raise DistillError(f"{file}: example {index} cannot be decoded ({err})") from None

    def _table(self, shard: int, file: Path, entry: dict) -> IdTable:
        if shard not in self._tables:
            if len(self._tables) >= _TABLES_KEPT:  # bounded: memory stays flat in the number of shards
                self._tables.pop(next(iter(self._tables)))
            self._tables[shard] = IdTable.from_bytes(self._read(file, entry, *entry["id_table"], "the id table"))
        return self._tables[shard]

    @staticmethod
    def _read(file: Path, entry: dict, offset: int, size: int, crc: int, what: str) -> bytes:
        with file.open("rb") as f:
            f.seek(entry["payload_start"] + offset)
            blob = f.read(size)
        if zlib.crc32(blob) != crc:
            raise DistillError(f"{file}: {what} is corrupted (CRC mismatch); capture the cache again")
        return blob

    def total_bytes(self) -> int:
        """Bytes of all shard files (the header is not counted)."""
        return sum((self.path / shard_name(s)).stat().st_size for s in range(self.header.n_shards))
