"""An ExecuTorch program of one student per quantization: size, its check against the student, its speed.

    /work/et-venv/bin/python bench/bench_executorch.py --model runs/quickstart/student   # a python with executorch

For each --quants entry, `distill export --format executorch` writes the program (with its .verify.json: mean KL,
top-1 agreement and greedy answers against the student in transformers), then `program_speed` times it in the
ExecuTorch runtime as `distill eval` does (median of 3 after a warm-up: --prompt-tokens prompt tokens fed one per
call, then --new-tokens greedy steps). One markdown table; the header line gives the load average to judge by.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer

from distill.cli import main
from distill.eval.metrics import speed_prompt_ids
from distill.export import verify_file
from distill.export.executorch import program_speed


def measure(model: Path, quant: str, out: Path, prompt: list[int], new_tokens: int) -> dict:
    """Export one program and time it: the table's row."""
    start = time.perf_counter()
    assert main(["export", str(model), "--format", "executorch", "--quant", quant, "--out", str(out)]) == 0
    export_s = time.perf_counter() - start
    pte = out / f"model-{quant}.pte"
    check = json.loads(verify_file(pte).read_text())
    return {"quant": quant, "export_s": export_s, "bytes": pte.stat().st_size, "check": check,
            **program_speed(pte, prompt, new_tokens)}


def row(result: dict) -> str:
    check, greedy = result["check"], result["check"]["greedy"]
    return (f"| {result['quant']} | {result['bytes'] / 1e6:.1f} MB | {check['mean_kl']:.2g} / "
            f"{check['top1_agreement']:.3f} / {greedy['same']} of {greedy['prompts']} | "
            f"{result['prefill_tokens_per_s']:.0f} | {result['decode_tokens_per_s']:.0f} | "
            f"{result['time_to_first_token_s']:.2f} s | {result['export_s']:.0f} s |")


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="an HF model directory (the student)")
    parser.add_argument("--quants", default="fp32,int8", help="comma-separated: fp32, int8, int4")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    prompt = speed_prompt_ids(AutoTokenizer.from_pretrained(args.model), args.prompt_tokens)
    with tempfile.TemporaryDirectory() as scratch:
        results = [measure(args.model, q, Path(scratch) / q, prompt, args.new_tokens) for q in args.quants.split(",")]
    print(f"{args.model}, {len(prompt)} prompt tokens + {args.new_tokens} new, load average "
          f"{os.getloadavg()[0]:.2f}, {os.cpu_count()} cores")
    print("| program | file | vs the student: mean KL / top-1 / greedy | prefill tok/s | decode tok/s "
          "| time to first token | export time |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for result in results:
        print(row(result))


if __name__ == "__main__":
    main_bench()
