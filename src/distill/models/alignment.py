"""Two tokenizations of one text side by side: each token's character span, the groups of tokens that end at the
same character offset on both sides, and the vocabulary entries whose strings both tokenizers share.

Spans come from a fast tokenizer's `offset_mapping` (character offsets into the text). A boundary lies after a
token when the next token starts at or after its end: byte-fallback pieces of one character (`<0xE4><0xBD><0xA0>`)
and byte-level BPE pieces that split a character all carry that character's span, so no boundary falls inside it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

from transformers import PreTrainedTokenizerBase

Span = tuple[int, int]

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SENTENCEPIECE_SPACE = "\u2581"


@dataclass(frozen=True)
class Group:
    """Tokens covering the same characters on both sides: indices into each side's token list."""

    student: tuple[int, ...]
    teacher: tuple[int, ...]


def has_offsets(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer gives character offsets (a fast, Rust-backed tokenizer)."""
    return bool(getattr(tokenizer, "is_fast", False))


def text_spans(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[Span]]:
    """(ids, character spans) of the text without added special tokens."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoded["input_ids"]), [tuple(span) for span in encoded["offset_mapping"]]


def spans_of_ids(
    tokenizer: PreTrainedTokenizerBase, text: str, ids: Sequence[int]
) -> list[Optional[Span]]:
    """The character span of each of `ids`, which tokenize `text` (or a prefix of it) plus special tokens.

    Special tokens that are not in the text (an added bos, an eos appended after an answer) get None; so does
    every token after the first one that does not match the text's own tokenization (ids cut into pieces).
    """
    text_ids, spans = text_spans(tokenizer, text)
    specials = set(tokenizer.all_special_ids)
    out: list[Optional[Span]] = []
    k = 0
    for i, token in enumerate(ids):
        if k < len(text_ids) and token == text_ids[k]:
            out.append(spans[k])
            k += 1
        elif token in specials:
            out.append(None)
        else:
            return out + [None] * (len(ids) - i)
    return out


def _boundaries(spans: Sequence[Optional[Span]]) -> dict[int, int]:
    """{character offset: index of the token a boundary follows} for the tokens that have spans."""
    located = [(i, span) for i, span in enumerate(spans) if span is not None and span[1] > span[0]]
    out = {}
    for (i, span), following in zip(located, [*located[1:], None]):
        if following is None or following[1][0] >= span[1]:
            out[span[1]] = i
    return out


def align_spans(student: Sequence[Optional[Span]], teacher: Sequence[Optional[Span]]) -> list[Group]:
    """The groups of tokens between consecutive character offsets where both sides have a token boundary.

    A group's tokens on either side cover the same characters, and both sides have read the same text before
    it, so the group's first prediction on each side is made from the same context. Tokens without a span
    (special tokens outside the text) belong to no group.
    """
    s_ends, t_ends = _boundaries(student), _boundaries(teacher)
    groups, s_next, t_next = [], 0, 0
    for offset in sorted(s_ends.keys() & t_ends.keys()):
        s_last, t_last = s_ends[offset], t_ends[offset]
        s_tokens = tuple(i for i in range(s_next, s_last + 1) if _has_text(student[i]))
        t_tokens = tuple(i for i in range(t_next, t_last + 1) if _has_text(teacher[i]))
        groups.append(Group(s_tokens, t_tokens))
        s_next, t_next = s_last + 1, t_last + 1
    return groups


def _has_text(span: Optional[Span]) -> bool:
    return span is not None and span[1] > span[0]


def token_bytes(tokenizer: PreTrainedTokenizerBase) -> dict[int, bytes]:
    """{id: the bytes the token stands for}: byte-level BPE pieces through GPT-2's byte table, SentencePiece
    pieces with `▁` as a space and `<0xNN>` as one byte; added tokens as their text."""
    vocab = tokenizer.get_vocab()
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    byte_level = _is_byte_level(tokenizer)
    table = {char: byte for byte, char in _gpt2_bytes_to_unicode().items()}
    out = {}
    for piece, i in vocab.items():
        if i in added:
            out[i] = added[i].encode()
        elif byte_level:
            out[i] = bytes(table[c] for c in piece) if all(c in table for c in piece) else piece.encode()
        else:
            match = _BYTE_PIECE.match(piece)
            out[i] = bytes([int(match.group(1), 16)]) if match else piece.replace(_SENTENCEPIECE_SPACE, " ").encode()
    return out


def shared_vocabulary(
    student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase
) -> tuple[list[int], list[int]]:
    """(student ids, teacher ids) of the tokens whose bytes both vocabularies hold, pair by pair, in student order."""
    teacher_ids: dict[bytes, int] = {}
    for i, piece in sorted(token_bytes(teacher).items()):
        teacher_ids.setdefault(piece, i)
    pairs, taken = [], set()
    for i, piece in sorted(token_bytes(student).items()):
        j = teacher_ids.get(piece)
        if j is not None and j not in taken:
            pairs.append((i, j))
            taken.add(j)
    return [i for i, _ in pairs], [j for _, j in pairs]


def _is_byte_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and "ByteLevel" in repr(decoder)


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to the printable character byte-level BPE writes for it."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars
