"""Checking weight files before they are loaded: a truncated or foreign file is one line naming it, not a traceback.

Only headers are read (a few kilobytes for safetensors, the metadata for GGUF), and the file's size is compared
with the tensor data the header promises, so a cut-short download is reported as truncated.
"""
from __future__ import annotations

import json
import mmap
import struct
from contextlib import nullcontext
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGUFValueType

from distill.errors import DistillError

SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors format's own limit on the JSON header
GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
GGUF_DEFAULT_ALIGNMENT = 32
_GGUF_SCALARS = {  # value type -> struct format (little-endian)
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


class _Truncated(Exception):
    """The file ended inside its header."""


class _Foreign(Exception):
    """The header is not what the format says it should be."""


# ---------------------------------------------------------------- safetensors


def check_safetensors(path: str | Path) -> None:
    """Raise a one-line DistillError unless path is a whole safetensors file (header parsed, data all there)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise DistillError(f"{path}: truncated ({size} bytes; not even a safetensors header)")
        header_len = int.from_bytes(prefix, "little")
        first = f.read(1)
        if header_len > SAFETENSORS_MAX_HEADER or first != b"{":
            raise DistillError(f"{path}: not a safetensors file")
        if 8 + header_len > size:
            raise DistillError(f"{path}: truncated ({size} bytes; its header alone promises {8 + header_len})")
        raw = first + f.read(header_len - 1)
    try:
        header = json.loads(raw)
        ends = [int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise DistillError(f"{path}: not a safetensors file (its header is not a tensor index)") from None
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        raise DistillError(f"{path}: truncated ({size} bytes; its header promises {expected})")


# ---------------------------------------------------------------- GGUF


def check_gguf(path: str | Path) -> None:
    """Raise a one-line DistillError unless path is a whole GGUF file (metadata parsed, tensor data all there)."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else nullcontext(b"") \
                as data:
            expected = _gguf_expected_size(_HeaderReader(data))
    except _Truncated:
        raise DistillError(f"{path}: truncated ({size} bytes; the file ends inside its GGUF header)") from None
    except _Foreign as err:
        raise DistillError(f"{path}: not a GGUF file{f' ({err})' if str(err) else ''}") from None
    if size < expected:
        raise DistillError(f"{path}: truncated ({size} bytes; its GGUF header promises {expected})")


def _gguf_expected_size(reader: "_HeaderReader") -> int:
    """The size in bytes the header says the file has: where its last tensor's data ends."""
    if bytes(reader.data[:4]) != GGUF_MAGIC[:len(reader.data)]:  # a file too short for the magic may still be one
        raise _Foreign()
    reader.bytes(4)
    version = reader.scalar("<I")
    if version not in GGUF_VERSIONS:
        raise _Foreign(f"unsupported version {version}")
    n_tensors, n_fields = reader.scalar("<Q"), reader.scalar("<Q")
    alignment = GGUF_DEFAULT_ALIGNMENT
    for _ in range(n_fields):
        key = reader.string()
        value = reader.value(reader.scalar("<I"))
        if key == "general.alignment" and isinstance(value, int) and value > 0:
            alignment = value
    data_end = 0
    for _ in range(n_tensors):
        reader.string()  # the tensor's name
        dims = [reader.scalar("<Q") for _ in range(reader.scalar("<I"))]
        ggml_type, offset = reader.scalar("<I"), reader.scalar("<Q")
        data_end = max(data_end, offset + _tensor_bytes(ggml_type, dims))
    start = reader.pos
    data_start = start + (-start % alignment)
    return data_start + data_end if n_tensors else start


def _tensor_bytes(ggml_type: int, dims: list[int]) -> int:
    try:
        block, block_bytes = GGML_QUANT_SIZES[ggml_type]
    except KeyError:
        raise _Foreign(f"unknown tensor type {ggml_type}") from None
    count = 1
    for dim in dims:
        count *= dim
    return count // block * block_bytes


class _HeaderReader:
    """Reads GGUF header values from a mapped file, raising _Truncated where the file ends too soon."""

    def __init__(self, data: bytes | mmap.mmap):
        self.data, self.pos = data, 0

    def bytes(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise _Truncated()
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def scalar(self, fmt: str) -> int | float | bool:
        return struct.unpack(fmt, self.bytes(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.bytes(self.scalar("<Q")).decode("utf-8", errors="replace")

    def value(self, value_type: int) -> object:
        """One metadata value; arrays are stepped over, not read (a vocabulary holds ~100k strings)."""
        if value_type in _GGUF_SCALARS:
            return self.scalar(_GGUF_SCALARS[value_type])
        if value_type == GGUFValueType.STRING:
            return self.string()
        if value_type != GGUFValueType.ARRAY:
            raise _Foreign(f"unknown metadata type {value_type}")
        item_type, count = self.scalar("<I"), self.scalar("<Q")
        if item_type in _GGUF_SCALARS:
            self.bytes(count * struct.calcsize(_GGUF_SCALARS[item_type]))
        elif item_type == GGUFValueType.STRING:
            self._skip_strings(count)
        else:
            for _ in range(count):
                self.value(item_type)
        return None

    def _skip_strings(self, count: int) -> None:
        data, pos, end = self.data, self.pos, len(self.data)
        for _ in range(count):
            if pos + 8 > end:
                raise _Truncated()
            pos += 8 + struct.unpack_from("<Q", data, pos)[0]
        if pos > end:
            raise _Truncated()
        self.pos = pos


# ---------------------------------------------------------------- model directories


def check_model_dir(path: str | Path) -> None:
    """Raise a one-line DistillError unless path is an HF model directory whose safetensors are whole."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise DistillError(f"{path}: not a model directory (no config.json)")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in path.glob("pytorch_model*.bin"))
        if pickled:
            raise DistillError(f"{path}: has only {pickled[0]}: distill loads safetensors only "
                               "(convert it with transformers' save_pretrained(..., safe_serialization=True))")
        raise DistillError(f"{path}: no model.safetensors (the directory holds no weights)")
    for file in weights:
        check_safetensors(file)
