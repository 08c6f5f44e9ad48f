"""`distill capture` on 1 process vs N processes under torchrun (stories260K teacher, CPU fp32, 1 thread each).

    nice python bench/bench_capture_ranks.py                      # the numbers in docs/benchmarks.md
    python bench/bench_capture_ranks.py --examples 600 --repeats 1   # a quick look

Each repeat runs the two in turn on the same training set, into fresh caches, and reads the capture's own log line:
positions captured, the whole command's seconds (loading and hashing the teacher, tokenising, capturing) and the
capture loop's (the slowest rank's, on N processes). The caches are checked to be byte-identical.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TEACHER = SHARED / "models" / "stories260K"
TEXT = SHARED / "data" / "tinystories" / "tinystories_val_part1.txt"
LOG = re.compile(r"capture: \d+ new shard\(s\), \d+ already there, (\d+) positions, "
                 r"([\d.]+) s \(([\d.]+) s capturing\)")


def _capture(recipe: Path, processes: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] \
        if processes > 1 else [sys.executable]
    began = time.perf_counter()
    done = subprocess.run([*head, "-m", "distill.cli", "capture", str(recipe), "--no-progress"], env=env,
                          capture_output=True, text=True, check=True)
    wall = time.perf_counter() - began
    positions, seconds, loop = LOG.search(done.stderr).groups()
    return {"positions": int(positions), "wall_s": wall, "stage_s": float(seconds), "loop_s": float(loop)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=3000)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "train.txt").write_text("\n\n".join(TEXT.read_text().split("\n\n")[:args.examples]))
        rows = []
        for repeat in range(args.repeats):
            for processes in (1, args.processes):
                name = f"r{repeat}-p{processes}"
                recipe = tmp / f"{name}.yaml"
                recipe.write_text(yaml.safe_dump({
                    "output_dir": name, "teacher": {"model": str(TEACHER), "cache": f"{name}-cache",
                                                    "cache_k": args.k},
                    "student": {"preset": "micro"},
                    "data": {"train": "train.txt", "max_length": args.max_length, "eval_fraction": 0.0},
                    "train": {"batch_size": 8},
                }))
                row = {"processes": processes, **_capture(recipe, processes)}
                rows.append(row)
                print(f"{processes} process(es): {row['positions']} positions, loop {row['loop_s']:.1f} s "
                      f"({row['positions'] / row['loop_s']:,.0f} tok/s), stage {row['stage_s']:.1f} s, command "
                      f"{row['wall_s']:.1f} s", flush=True)
            caches = [sorted((tmp / f"r{repeat}-p{p}-cache").iterdir()) for p in (1, args.processes)]
            same = all(a.name == b.name and a.read_bytes() == b.read_bytes() for a, b in zip(*caches))
            print(f"repeat {repeat}: caches byte-identical: {same and len(caches[0]) == len(caches[1])}")
        for what in ("loop_s", "stage_s", "wall_s"):
            one = sum(r[what] for r in rows if r["processes"] == 1)
            many = sum(r[what] for r in rows if r["processes"] > 1)
            print(f"{what}: {args.processes} processes vs 1 = {one / many:.2f}x the tokens/s")


if __name__ == "__main__":
    main()
