"""The micro-batches the trainer will see: their padded, real and trained token counts, from example lengths."""
from __future__ import annotations

from dataclasses import dataclass

from distill.data.tokenize import batch_indices
from distill.errors import DistillError

# Micro-batches whose shapes are sampled to estimate the padded length (the trainer's own batch order).
MAX_SAMPLED_BATCHES = 2000


@dataclass
class BatchStats:
    """Shapes of the trainer's micro-batches: means over the sampled batches, and the largest one."""

    batch_size: int
    padded_tokens: float  # B x padded length: positions the decoders run on
    real_tokens: float  # non-padding tokens (what the trainer's tokens_per_s counts)
    loss_rows: float  # positions with a label (the chunked loss skips the others)
    square_tokens: float  # B x padded length^2: what attention costs scale with
    max_padded_tokens: int
    max_seq_len: int
    examples: int  # training examples the trainer tokenises and keeps in memory
    example_tokens: float  # their mean length
    source: str

    @property
    def seq_len(self) -> float:
        """Mean padded length."""
        return self.padded_tokens / self.batch_size


def sample_batches(lengths: list[tuple[int, int]], examples: int, source: str, batch_size: int,
                   micro_batches: int, seed: int, processes: int = 1) -> BatchStats:
    """Shapes of the first `micro_batches` (at most MAX_SAMPLED_BATCHES) the trainer draws over examples of
    `lengths` (tokens, trained positions), in its own stateless batch order.

    With several processes each global micro-batch of `batch_size` rows is split into `processes` consecutive
    parts of batch_size / processes rows, one per rank, each padded to its own longest row: the stats are then
    those of one rank's micro-batches (means over every rank's parts, the largest of any).
    """
    if batch_size % processes:
        raise DistillError(f"train.batch_size={batch_size} does not divide across {processes} processes (each "
                           "takes an equal share of every micro-batch); make it a multiple of the process count")
    per_rank = batch_size // processes
    batches = min(micro_batches, MAX_SAMPLED_BATCHES)
    padded = real = rows = square = 0.0
    max_padded = max_len = 0
    for micro in range(batches):
        drawn = [lengths[i] for i in batch_indices(len(lengths), batch_size, seed, micro)]
        for picked in (drawn[r * per_rank:(r + 1) * per_rank] for r in range(processes)):
            width = max(n for n, _ in picked)
            padded += width * per_rank
            square += width * width * per_rank
            real += sum(n for n, _ in picked)
            rows += sum(v for _, v in picked)
            max_padded, max_len = max(max_padded, width * per_rank), max(max_len, width)
    parts = batches * processes
    return BatchStats(
        batch_size=per_rank, padded_tokens=padded / parts, real_tokens=real / parts,
        loss_rows=rows / parts, square_tokens=square / parts, max_padded_tokens=max_padded,
        max_seq_len=max_len, examples=examples, example_tokens=sum(n for n, _ in lengths) / len(lengths),
        source=f"{source}; {batches} micro-batches drawn in the trainer's order"
               + (f", each split over {processes} processes" if processes > 1 else ""),
    )
