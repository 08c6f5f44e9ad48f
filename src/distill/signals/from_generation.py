"""Teacher-cache rows from the log-probs a teacher kept while it wrote the training answers.

The generate stage can keep, beside each answer, the teacher's top-k log-probs at every token it wrote
(`<run>/teacher_data/topk/<record id>.npz`). A training example may reuse them only when they are exactly what
teacher forcing would compute: the example's context must be the tokens the teacher saw and wrote, and its
trained tokens (all but the last) must be the ones the teacher wrote. Anything else (another system prompt, a reasoning
instruction, an answer stripped or cut by a stop string, a re-tokenisation that differs) is teacher-forced.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from distill.data.teacher_records import load_topk, topk_path
from distill.signals.cache import next_tokens, trained_positions
from distill.signals.encoding import TopKRows

# cache.json's teacher_weights when rows come from generation: the weights were never loaded to be hashed.
FROM_GENERATION = "not hashed: log-probs kept at generation"


def kept_topk_files(data_dir: Optional[Path], encoded: list) -> dict[int, Path]:
    """Encoded training example index -> its answer's kept log-probs file (teacher data in `data_dir`), if any."""
    if data_dir is None:
        return {}
    found = {i: topk_path(data_dir, example.id) for i, example in enumerate(encoded) if example.id}
    return {i: file for i, file in found.items() if file.is_file()}


def kept_vocab_size(file: Path, tokenizer) -> int:
    """Rows of the teacher's head as the generating backend reported them, else the tokenizer's size."""
    return load_topk(file).vocab_size or len(tokenizer)


def reused_rows(file: Optional[Path], example, k: int) -> TopKRows | str | None:
    """The example's cache rows from its kept log-probs; a reason string when they do not fit; None without any."""
    if file is None:
        return None
    kept = load_topk(file)
    positions = trained_positions(example.labels)
    n = len(positions)
    if n == 0 or not np.array_equal(positions, np.arange(positions[0], positions[0] + n)):
        return "not one trained answer"
    context = np.asarray(example.input_ids[: positions[0] + 1])
    if kept.prompt_ids.size:
        if not np.array_equal(context, kept.prompt_ids):
            return "prompt tokens differ"
    elif len(context) != kept.prompt_tokens:
        return "prompt length differs"
    # Row j is the teacher's distribution after the answer's first j tokens: it fits while those tokens are the
    # ones the teacher wrote. The last trained token itself may differ (an end-of-turn token where the answer was
    # cut at max_new_tokens, or after trailing whitespace that was stripped).
    if n > len(kept.ids) or not np.array_equal(next_tokens(example.labels)[:n - 1], kept.token_ids[:n - 1]):
        return "answer tokens differ"
    if kept.ids.shape[1] < k:
        return f"fewer than {k} log-probs kept"
    return _top(kept.ids[:n], kept.log_probs[:n], kept.tail[:n], k)


def _top(ids: np.ndarray, log_probs: np.ndarray, tail: np.ndarray, k: int) -> TopKRows:
    """The best k of each row; the mass of the entries dropped joins the tail."""
    if log_probs.shape[1] > k:
        dropped = log_probs[:, k:].astype(np.float64)
        tail = np.logaddexp(tail.astype(np.float64), np.logaddexp.reduce(dropped, axis=1))
    return TopKRows(ids=ids[:, :k].astype(np.int64), log_probs=log_probs[:, :k].astype(np.float32),
                    tail=tail.astype(np.float32))
