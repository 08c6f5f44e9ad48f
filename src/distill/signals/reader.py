"""Reading a verified teacher cache for training: SparseTargets for a batch (wrapped by teacher_signal)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from distill.losses.sparse import SparseTargets
from distill.signals.cache import TopKCache, example_hash
from distill.signals.provenance import check_provenance


class TeacherCacheReader:
    """Sparse targets for micro-batches of the recipe's encoded training examples, from a verified cache."""

    def __init__(self, cache: TopKCache, hashes: Sequence[str], labels: Sequence[Sequence[int]]):
        self.cache, self.hashes, self.labels = cache, list(hashes), list(labels)
        cache.verify(self.hashes)

    @property
    def vocab_size(self) -> int:
        return self.cache.header.vocab_size

    def targets(self, indices: Sequence[int], device: torch.device | str = "cpu"):
        """The rows of these examples, concatenated in batch order (the order of the batch's trained labels)."""
        rows = [self.cache.rows(i, self.hashes[i], self.labels[i]) for i in indices]
        join = lambda name: torch.from_numpy(np.concatenate([getattr(r, name) for r in rows]))  # noqa: E731
        return SparseTargets(join("ids"), join("log_probs"), join("tail"), self.vocab_size).to(device)


def open_teacher_cache(
    path: Path, teacher: str, tokenizer, encoded: Sequence, teacher_files: str = "", aligned_to: str = ""
) -> TeacherCacheReader:
    """The cache at `path`, refused (one DistillError line) unless complete and made by this teacher on this data
    (`encoded`: the examples as the teacher read them; `aligned_to`: the student tokenizer's alignment_hash across
    tokenizers, else "")."""
    cache = TopKCache(Path(path))
    check_provenance(cache.header, Path(path), teacher, tokenizer, teacher_files, aligned_to)
    hashes = [example_hash(e.input_ids, e.labels) for e in encoded]
    return TeacherCacheReader(cache, hashes, [e.labels for e in encoded])
