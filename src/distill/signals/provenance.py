"""Fingerprints a cache header records, and the check that a cache belongs to a recipe's teacher and tokenizer."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from distill.errors import DistillError
from distill.models.compat import PROBE_TEXT
from distill.signals.cache import CacheHeader


def _hash(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """Vocabulary, special tokens and a probe encoding: what decides which id means what."""
    special = {name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    probe = list(tokenizer(PROBE_TEXT, add_special_tokens=True)["input_ids"])
    return _hash(json.dumps([sorted(tokenizer.get_vocab().items()), special, probe]))


def chat_template_hash(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    return _hash(json.dumps(template, sort_keys=True)) if template else "none"


def alignment_hash(student_tokenizer) -> str:
    """What a cross-tokenizer cache's rows are aligned to: the student's tokenizer and chat template, which render
    and split the text the teacher reads."""
    return _hash(tokenizer_hash(student_tokenizer) + chat_template_hash(student_tokenizer))


def files_fingerprint(files: list[Path]) -> str:
    """Name, size and modification time of each weight file: changes when a teacher is replaced at the same path."""
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(files)]
    return _hash(json.dumps(stats)) if stats else ""


def weights_hash(model: torch.nn.Module) -> str:
    """BLAKE2b of every parameter and buffer, in name order (format-independent: a GGUF and its HF copy agree)."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_provenance(
    header: CacheHeader, path: Path, teacher: str, tokenizer, teacher_files: str = "", aligned_to: str = ""
) -> None:
    """Refuse a cache made by another teacher (reference `teacher`), tokenizer or chat template, naming what differs.

    `teacher_files` (see `files_fingerprint`) catches a teacher whose weights were replaced at the same path;
    `aligned_to` (see `alignment_hash`, "" for one tokenizer) a cache aligned to another student's tokenizer.
    """
    found = {
        "teacher": (header.teacher, teacher),
        "tokenizer": (header.tokenizer, tokenizer_hash(tokenizer)),
        "chat template": (header.chat_template, chat_template_hash(tokenizer)),
    }
    for what, (cached, wanted) in found.items():
        if cached != wanted:
            raise DistillError(f"{path}: the cache was captured with a different {what} ({cached!r}, the recipe's "
                               f"is {wanted!r}); capture it again with `distill capture`")
    if header.aligned_to != aligned_to:
        if not header.aligned_to:
            what = "on the teacher's own tokenization, but the recipe's student has a tokenizer of its own"
        elif not aligned_to:
            what = "aligned to a student on another tokenizer, but the recipe's student uses the teacher's"
        else:
            what = "aligned to another student tokenizer or chat template than the recipe's student's"
        raise DistillError(f"{path}: the cache was captured {what}; capture it again with `distill capture`")
    if header.teacher_files and teacher_files and header.teacher_files != teacher_files:
        raise DistillError(f"{path}: the teacher's weight files changed since this cache was captured (same path, "
                           "other files); capture it again with `distill capture`")
    if header.k > header.vocab_size:
        raise DistillError(f"{path}: k = {header.k} is larger than the teacher's vocabulary ({header.vocab_size})")
