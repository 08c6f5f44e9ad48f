"""Training throughput on 2 processes (torchrun, DDP over gloo) vs 1, each process on 1 thread (CPU, fp32).

The workload is the quickstart's KD step: teacher SmolLM2-135M-Instruct (GGUF, dequantized to fp32, live in every
process), the quickstart's cut student (<run>/student_init), the run's filtered teacher data, global batch 8,
forward KL + 0.2 CE. Each side runs `--steps` steps from the same start in a fresh run directory; the first
logged window (`--log-every` steps: model loading, first-step allocations) is not counted. Throughput is the
trained tokens of all processes over rank 0's wall seconds, as metrics.jsonl logs it (tokens / tokens_per_s).

The two sides take the same optimizer steps (tests/test_distributed.py checks that within 1e-5), so the ratio is
the speed-up alone. On this 2-core machine, 2 processes x 1 thread use both cores as 1 process x 2 threads would;
the honest comparison for "does DDP scale" is therefore also printed: 1 process with 2 threads.
    python bench/bench_ddp.py --from-run runs/quickstart --steps 12
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def _recipe(run: Path, out: Path, steps: int, log_every: int, threads: int) -> dict:
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    return {
        "output_dir": str(out), "seed": 0,
        "teacher": {"model": saved["teacher"]["model"]},
        "student": {"model": str(run / "student_init")},
        "data": {"train": str(run / "teacher_data.filtered.jsonl"), "max_length": 256, "eval_fraction": 0.0},
        "method": {"kind": "kd", "divergence": "forward_kl", "alpha": 0.2},
        "train": {"steps": steps, "batch_size": 8, "lr": 2e-3, "warmup_steps": 2, "checkpoint_every": 10_000,
                  "log_every": log_every, "threads": threads, "report_to": []},
    }


def _run(recipe: dict, work: Path, name: str, processes: int) -> dict:
    """Train once; {tokens, seconds, tokens_per_s} over the logged windows after the first."""
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    distill = shutil.which("distill") or str(Path(sys.executable).with_name("distill"))
    command = [distill, "train", str(path), "--no-progress"]
    if processes > 1:
        torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
        command = [torchrun, "--nproc_per_node", str(processes), *command]
    env = {**os.environ, "OMP_NUM_THREADS": str(recipe["train"]["threads"])}
    subprocess.run(command, check=True, env=env, capture_output=True)
    rows = [json.loads(line) for line in (Path(recipe["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:]
    tokens = sum(r["tokens"] for r in timed)
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in timed)
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "losses": [round(r["loss"], 5) for r in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from-run", type=Path, required=True, help="a quickstart run directory")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--log-every", type=int, default=4)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, processes, threads in (("1 process x 1 thread", 1, 1), ("2 processes x 1 thread", 2, 1),
                                          ("1 process x 2 threads", 1, 2)):
            recipe = _recipe(args.from_run, work / f"run{len(results)}", args.steps, args.log_every, threads)
            results[name] = _run(recipe, work, f"r{len(results)}", processes)
            print(name, json.dumps(results[name]), flush=True)
    base = results["1 process x 1 thread"]["tokens_per_s"]
    for name, r in results.items():
        print(f"{name:26s} {r['tokens_per_s']:8.1f} tok/s  {r['tokens_per_s'] / base:5.2f}x")
    same = results["1 process x 1 thread"]["losses"] == results["2 processes x 1 thread"]["losses"]
    print("per-step losses of 1 and 2 processes equal to 5 decimals:", same)


if __name__ == "__main__":
    main()
