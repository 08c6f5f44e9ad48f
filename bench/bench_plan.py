"""`distill plan` predictions against measured training runs: step time, tokens/s and peak memory (CPU, fp32).

For each configuration, two fresh subprocesses: one runs the planner (as `distill plan` does), one trains a
few real steps with distill.stages.train in a temporary run directory. Step time is the wall clock
between consecutive metrics.jsonl writes (log_every=1), skipping the first step (warm-up: optimizer state,
thread pools); the checkpoint at the last step comes after its write, so no timed step includes one.
The data are the first few hundred Alpaca records or TinyStories paragraphs (copied to a temporary file), so
the planner tokenises every example and sees exactly the trainer's batches.
Memory: the training-phase peak RSS (VmHWM, reset with /proc/self/clear_refs as the step loop starts, read at
the last step) and the whole process's ru_maxrss (model loading and the final save included).
    python bench/bench_plan.py                             # every configuration, torch's threads, wall clock
    python bench/bench_plan.py --threads 1 --cpu-time      # on a busy machine: one thread, CPU seconds
    python bench/bench_plan.py --only quickstart --steps 8 --show-plans
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
ALPACA = SHARED / "data" / "alpaca" / "alpaca_5000.json"
TINYSTORIES = SHARED / "data" / "tinystories" / "tinystories_val_part1.txt"
STORIES260K = SHARED / "models" / "stories260K"
EXAMPLES = 400  # per data file: at most distill.plan.MAX_ENCODED_EXAMPLES, so the planner encodes them all
DATA_DIR = Path(tempfile.gettempdir()) / "distill-bench-plan"

# name -> (what it is, base recipe file, --set overrides, files it needs). The base is the quickstart recipe as
# it stands; each configuration clears the student keys it does not use.
CONFIGS: dict[str, tuple[str, str, list[str], list[Path]]] = {
    "stories-scratch": (
        "stories260K -> new 4x128 student, KD, TinyStories text, batch 16 x <=256",
        "recipes/quickstart.yaml",
        [f"teacher.model={STORIES260K}", "teacher.gguf_file=null", "data.prompts=null", "data.train={tinystories}",
         "data.max_length=256", "student.from_teacher=null", "student.config.num_layers=4",
         "student.config.hidden_size=128", "student.config.num_heads=4", "student.config.num_kv_heads=2",
         "student.config.intermediate_size=352", "train.batch_size=16"],
        [STORIES260K, TINYSTORIES],
    ),
    "stories-sft": (
        "stories260K tokenizer -> preset micro (6x192), SFT (no teacher forward), TinyStories, batch 8 x <=512",
        "recipes/quickstart.yaml",
        [f"teacher.model={STORIES260K}", "teacher.gguf_file=null", "data.prompts=null", "data.train={tinystories}",
         "data.max_length=512", "student.config=null", "student.from_teacher=null", "student.preset=micro",
         "method.kind=sft", "train.batch_size=8"],
        [STORIES260K, TINYSTORIES],
    ),
    "quickstart": (
        "SmolLM2-135M -> the quickstart recipe's student (8x384), KD, Alpaca answers, batch 8 x <=256",
        "recipes/quickstart.yaml",
        ["data.prompts=null", "data.train={alpaca}"],
        [ALPACA],
    ),
    "preset-tiny-jsd": (
        "SmolLM2-135M -> preset tiny (8x256), JSD at T=2, Alpaca answers, batch 4 x <=512",
        "recipes/quickstart.yaml",
        ["data.prompts=null", "data.train={alpaca}", "student.config=null", "student.from_teacher=null",
         "student.preset=tiny", "data.max_length=512", "train.batch_size=4", "method.divergence=jsd",
         "method.temperature=2.0"],
        [ALPACA],
    ),
    "quickstart-lora": (
        "SmolLM2-135M -> the quickstart student with LoRA r=16, KD, Alpaca, batch 8 x <=256, grad_accum 2",
        "recipes/quickstart.yaml",
        ["data.prompts=null", "data.train={alpaca}", "train.lora.r=16", "train.grad_accum=2"],
        [ALPACA],
    ),
}


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _data_files() -> dict[str, str]:
    """The first EXAMPLES Alpaca records and TinyStories paragraphs, as files the recipes can name."""
    DATA_DIR.mkdir(exist_ok=True)
    alpaca, stories = DATA_DIR / "alpaca.json", DATA_DIR / "tinystories.txt"
    alpaca.write_text(json.dumps(json.loads(ALPACA.read_text())[:EXAMPLES]))
    paragraphs = [p for p in TINYSTORIES.read_text().split("\n\n") if p.strip()]
    stories.write_text("\n\n".join(paragraphs[:EXAMPLES]) + "\n")
    return {"alpaca": str(alpaca), "tinystories": str(stories)}


def _recipe(name: str, args: argparse.Namespace, run_dir: str):
    from distill.recipe import load_recipe

    _, base, overrides, _ = CONFIGS[name]
    files = _data_files()
    timing = [f"train.steps={args.steps}", "train.log_every=1", "train.checkpoint_every=100000",
              "train.warmup_steps=1", f"output_dir={run_dir}"]
    timing += [f"train.threads={args.threads}"] if args.threads else []
    return load_recipe(ROOT / base, [o.format(**files) for o in overrides] + timing)


def child_plan(name: str, args: argparse.Namespace) -> dict:
    """The planner's prediction for the configuration, as `distill plan` makes it."""
    import distill.plan.timing
    from distill.plan import format_plan, plan_recipe

    if args.cpu_time:  # the planner times with time.perf_counter: hand it this process's CPU clock instead
        distill.plan.timing.time = types.SimpleNamespace(perf_counter=time.process_time)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-plan-") as run_dir:
        plan = plan_recipe(_recipe(name, args, run_dir))
    return {"step_s": plan.step_seconds, "tokens_per_s": plan.tokens_per_s, "peak_bytes": plan.peak_bytes,
            "seq_len": plan.batch.seq_len, "batch": plan.batch.batch_size, "text": format_plan(plan),
            "plan_s": time.perf_counter() - start}


def child_train(name: str, args: argparse.Namespace) -> dict:
    """Train a few real steps; time each from metrics writes; peak RSS of the step loop and of the process."""
    from distill.stages import train
    from distill.training import loop

    clock = time.process_time if args.cpu_time else time.perf_counter
    stamps: list[tuple[float, float]] = []  # (wall, clock) at the loop's start and at each step's end
    peak = {}
    original_init, original_write = loop.MetricsLog.__init__, loop.MetricsLog.write

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        with open("/proc/self/clear_refs", "w") as f:  # VmHWM restarts from the current RSS: the loop's peak
            f.write("5")
        peak["before_loop"] = _status_bytes("VmRSS")
        stamps.append((time.perf_counter(), clock()))

    def write(self, record):
        original_write(self, record)
        stamps.append((time.perf_counter(), clock()))
        peak["loop"] = _status_bytes("VmHWM")

    loop.MetricsLog.__init__, loop.MetricsLog.write = init, write
    with tempfile.TemporaryDirectory(prefix="bench-plan-") as run_dir:
        train(_recipe(name, args, run_dir), progress=False)
        rates = [json.loads(line)["tokens_per_s"] for line in (Path(run_dir) / "metrics.jsonl").open()]
    walls = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
    durations = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]
    timed = durations[1:]  # the first step warms up
    tokens = [r * w for r, w in zip(rates[1:], walls[1:])]  # tokens_per_s is per wall-clock second
    return {"step_s": sum(timed) / len(timed), "tokens_per_s": sum(tokens) / sum(timed), "steps": durations,
            "loop_peak_bytes": peak["loop"], "before_loop_bytes": peak["before_loop"],
            "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _in_subprocess(mode: str, name: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--only", name, "--steps", str(args.steps)]
    cmd += (["--threads", str(args.threads)] if args.threads else []) + (["--cpu-time"] if args.cpu_time else [])
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{mode} {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def table(rows: list[tuple[str, dict, dict]]) -> str:
    lines = [
        "| config | batch x mean padded len | step s predicted | step s measured | ratio | tokens/s predicted "
        "| tokens/s measured | peak MiB predicted | peak MiB measured (loop) | ratio | ru_maxrss MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, plan, run in rows:
        lines.append(
            f"| {name} | {plan['batch']} x {plan['seq_len']:.0f} | {plan['step_s']:.2f} | {run['step_s']:.2f} "
            f"| {plan['step_s'] / run['step_s']:.2f} | {plan['tokens_per_s']:,.0f} | {run['tokens_per_s']:,.0f} "
            f"| {_mb(plan['peak_bytes'])} | {_mb(run['loop_peak_bytes'])} "
            f"| {plan['peak_bytes'] / run['loop_peak_bytes']:.2f} | {_mb(run['maxrss_bytes'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=6, help="training steps per measured run (the first is "
                                                             "not timed)")
    parser.add_argument("--threads", type=int, help="train.threads for both plan and run (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time plan and run in process CPU seconds (with --threads 1: barely moved by other load)")
    parser.add_argument("--show-plans", action="store_true", help="print each configuration's full plan")
    parser.add_argument("--child", choices=["plan", "train"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run = child_plan if args.child == "plan" else child_train
        print(json.dumps(run(args.only[0], args)))
        return
    import torch

    threads = args.threads or torch.get_num_threads()
    clock = "process CPU time" if args.cpu_time else "wall clock"
    print(f"torch {torch.__version__}, {threads} threads, {os.cpu_count()} CPUs; {args.steps} steps per run, first "
          f"not timed; {clock}; load average before: {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for name in args.only:
        what, _, _, needs = CONFIGS[name]
        missing = [str(p) for p in needs if not p.exists()]
        if missing:
            print(f"skip {name}: {', '.join(missing)} not found (../shared beside the checkout)")
            continue
        plan = _in_subprocess("plan", name, args)
        run = _in_subprocess("train", name, args)
        print(f"{name}: {what}; planned in {plan['plan_s']:.1f} s; measured steps "
              + " ".join(f"{s:.2f}" for s in run["steps"]) + f"; load average {os.getloadavg()[0]:.2f}", flush=True)
        if args.show_plans:
            print(plan["text"])
        rows.append((name, plan, run))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(table(rows))


if __name__ == "__main__":
    main()
