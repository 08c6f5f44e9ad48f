"""`distill filter` throughput on synthetic teacher records, every filter but the LLM judge on.

    OMP_NUM_THREADS=1 python bench/bench_filter.py              # 100k records of ~100 words (docs/filter.md)
    python bench/bench_filter.py --records 10000                  # a quick look

The records are random Zipf-distributed words (a 20k-word vocabulary) in sentences, ~100 words each, with planted
problems: 2% truncated, 1% garbled, 2% refusals, 2% loops, 3% exact duplicates (case and spacing changed),
5% near-duplicates (one word in ~100 changed), 10% with a GSM8K-style reference (a fifth of them wrong) and 0.5%
quoting an item of a 1,000-item eval set. The file is written, then filtered end to end by `filter_file`
(read, filters, atomic write of the kept records and the report); the table gives records/s per filter.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from distill.data.filters import filter_file, format_filter_report
from distill.recipe import FilterSpec


def _vocabulary(rng: np.random.Generator, size: int) -> np.ndarray:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return np.array(["".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(size)])


class Writer:
    """Random sentences over a Zipf vocabulary."""

    def __init__(self, rng: np.random.Generator, vocab: int = 20_000):
        self.rng, self.words = rng, _vocabulary(rng, vocab).tolist()
        weights = 1.0 / np.arange(1, vocab + 1)
        self.p = weights / weights.sum()
        self.stream: list[int] = []
        self.at = 0

    def _draw(self, n: int) -> list[str]:
        if self.at + n > len(self.stream):  # a million draws at a time: one rng.choice per text is slow
            self.stream, self.at = self.rng.choice(len(self.words), 1_000_000, p=self.p).tolist(), 0
        self.at += n
        return [self.words[i] for i in self.stream[self.at - n:self.at]]

    def text(self, n_words: int) -> str:
        chosen = self._draw(n_words)
        sentences, i = [], 0
        while i < len(chosen):
            step = int(self.rng.integers(8, 18))
            sentences.append(" ".join(chosen[i:i + step]).capitalize() + ".")
            i += step
        return " ".join(sentences)


def _one_word_changed(rng: np.random.Generator, text: str, writer: Writer) -> str:
    tokens = text.split()
    tokens[int(rng.integers(len(tokens)))] = writer.text(1).rstrip(".")
    return " ".join(tokens)


def make_records(n: int, seed: int = 0) -> tuple[list[dict], list[str]]:
    """n teacher records with planted problems, and the eval items some of them quote."""
    rng = np.random.default_rng(seed)
    writer = Writer(rng)
    eval_items = [writer.text(40) for _ in range(1000)]
    records = []
    kinds = rng.choice(
        ["ok", "truncated", "garbled", "refusal", "loop", "exact", "near", "reference", "contaminated"],
        size=n, p=[0.745, 0.02, 0.01, 0.02, 0.02, 0.03, 0.05, 0.10, 0.005],
    )
    for i, kind in enumerate(kinds.tolist()):
        prompt, response, reference, finish = writer.text(int(rng.integers(8, 30))), writer.text(100), None, "stop"
        tags = [kind]
        if kind == "truncated":
            finish = "length"
        elif kind == "garbled":
            response = "".join(rng.choice(list("#@%&*()[]{}<>|\\/^~"), 300).tolist())
        elif kind == "refusal":
            response = "I'm sorry, but I cannot help with that request. " + writer.text(20)
        elif kind == "loop":
            response = writer.text(30) + " " + " ".join([writer.text(6)] * 12)
        elif kind in ("exact", "near") and i > 0:
            source = records[int(rng.integers(i))]
            tags.append(source["id"])
            prompt = source["prompt"]
            response = (source["response"].upper().replace(" ", "  ") if kind == "exact"
                        else _one_word_changed(rng, source["response"], writer))
        elif kind == "reference":
            answer = int(rng.integers(1, 1000))
            given = answer if rng.random() < 0.8 else answer + 1
            response, reference = f"{response} The answer is {given:,}.", f"Some working.\n#### {answer}"
        elif kind == "contaminated":
            response = f"{response} {eval_items[int(rng.integers(len(eval_items)))]}"
        records.append({
            "id": f"r{i:07d}", "prompt_id": f"p{i:07d}", "sample": 0, "teacher": "synthetic", "prompt": prompt,
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
            "response": response, "finish_reason": finish, "new_tokens": len(response.split()),
            "prompt_tokens": len(prompt.split()), "tags": tags, "reference": reference, "status": "ok",
        })
    return records, eval_items


def _planted_caught(records: list[dict], kept: list[dict]) -> None:
    """Per planted kind (the record's tag): how many there were and how many the filters removed."""
    made = Counter(r["tags"][0] for r in records)
    left = Counter(r["tags"][0] for r in kept)
    print("\nplanted kind    records  removed")
    for kind, count in sorted(made.items()):
        print(f"{kind:<14}{count:>9}{count - left[kind]:>9}")
    kept_ids = {r["id"] for r in kept}
    missed = sum(1 for r in kept if r["tags"][0] in ("exact", "near") and r["tags"][1:] and r["tags"][1] in kept_ids)
    print(f"copies kept beside their kept source (missed duplicates): {missed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(f"load average before: {os.getloadavg()[0]:.1f} (2 cores)")
    start = time.perf_counter()
    records, eval_items = make_records(args.records, args.seed)
    print(f"generated {len(records)} records in {time.perf_counter() - start:.1f}s")
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "teacher_data.jsonl", Path(tmp) / "filtered.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in records))
        start = time.perf_counter()
        result = filter_file(src, out, FilterSpec(), eval_texts={"eval.jsonl": eval_items})
        wall = time.perf_counter() - start
        print(format_filter_report(result).split("\n  ")[0])
    print()
    print(f"{'filter':<14}{'records/s':>12}")
    for stat in result.filters:
        if stat.enabled and stat.seconds > 0:
            print(f"{stat.name:<14}{stat.records_in / stat.seconds:>12,.0f}")
    print(f"{'total':<14}{result.total_in / wall:>12,.0f}  ({wall:.1f}s for {result.total_in} records: read, "
          f"filter, write)")
    _planted_caught(records, result.kept)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (generation included); "
          f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
