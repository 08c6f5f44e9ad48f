"""KD, then DPO on teacher-vs-student pairs, vs KD alone for the same extra CPU budget, on held-out prompts.

From a finished quickstart run (its KD student `<run>/student`, its filtered teacher answers), each arm trains the
KD student further for the same CPU budget: `--budget-steps` steps of live KD in process CPU seconds (one torch
thread; a 3-step calibration run converts it into each arm's step count, as bench/bench_methods.py does):
    kd_more          the quickstart's KD (forward KL, alpha 0.2, live teacher, lr 2e-3, WSD) continued for the budget
    dpo              teacher_vs_student pairs built by the product's pairs stage (chosen: the teacher's answer,
                     rejected: the KD student's greedy answer, reference log-probs stored), then DPO (sigmoid,
                     beta 0.1, sft_weight 0.1, lr 1e-4, cosine; as recipes/kd_then_dpo.yaml) for what the pair
                     building left of the budget (building the pairs counts against it; the budget here is the
                     CPU kd_more really spent, when it ran first)
    dpo_equal_steps  the same DPO for as many steps as kd_more took (pairs reused; their CPU counted again)
    start            the KD student with no extra training (the reference row)
    python bench/bench_kd_then_dpo.py --from-run runs/quickstart --out /tmp/bench_kd_then_dpo     # ~30 min, 2 cores
    python bench/bench_kd_then_dpo.py --from-run runs/quickstart --budget-steps 3 --max-held-out 4  # a smoke run
Metrics on the held-out split (prompts never trained on), bench_methods' (top-1 agreement and KL to the teacher on
its answers, KL on the student's own greedy answers, ROUGE-L vs the teacher's answers, loop share and distinct-2,
EOS share), plus reward accuracy and mean reward margin on held-out teacher-vs-student pairs (the teacher's answer
vs the KD student's greedy answer, reference = the KD student) from distill.stages.held_out_pairs, as
`distill eval` computes them for a dpo run. The run directory given is only read: what the arms need is copied.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from distill.eval.metrics import repetition
from distill.models import load_model
from distill.recipe import Recipe, load_recipe, recipe_from_dict
from distill.stages import train
from distill.stages.chain import build_preference_data
from distill.stages.data import recipe_examples
from distill.stages.facts import load_teacher, run_files
from distill.stages.held_out_pairs import held_out_pairs, pair_rewards
from distill.stages.pairs import reference_student
from distill.stages.training import setup
from distill.teachers.local import generate_texts

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_methods  # the sibling benchmark: its KD recipe, calibration, training and held-out metrics

ROOT = Path(__file__).resolve().parents[1]
ARMS = ["start", "kd_more", "dpo", "dpo_equal_steps"]
DPO = {"kind": "dpo", "loss": "sigmoid", "beta": 0.1, "sft_weight": 0.1}  # recipes/kd_then_dpo.yaml's dpo stage
TEACHER_DATA = ("teacher_data", "teacher_data.filtered.jsonl")  # what a dpo recipe over the quickstart's data reads


def dpo_recipe(base: dict, run_dir: Path, steps: int, student: Path, lr: float) -> Recipe:
    """A user's dpo recipe after the quickstart: its data and filter, pairs teacher_vs_student from `student`."""
    data = {**base, "output_dir": str(run_dir), "student": {"model": str(student)}, "method": dict(DPO),
            "pairs": {"source": "teacher_vs_student", "batch_size": 8}}
    data["train"] = {**base["train"], "steps": steps, "lr": lr, "warmup_steps": 2, "schedule": "cosine",
                     "checkpoint_every": max(steps, 1)}
    return recipe_from_dict(data, base_dir=ROOT / "recipes")


def seed_run_dir(run_dir: Path, source: Path, pairs_from: Path | None = None) -> None:
    """A fresh run directory holding the quickstart's teacher data (and built pairs to reuse)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    shutil.copytree(source / TEACHER_DATA[0], run_dir / TEACHER_DATA[0])
    shutil.copy2(source / TEACHER_DATA[1], run_dir / TEACHER_DATA[1])
    if pairs_from is not None:
        shutil.copytree(pairs_from, run_dir / pairs_from.name)


def build_pairs_timed(recipe: Recipe, source: Path) -> dict:
    """The product's pairs stage (`distill pairs`) on a fresh run directory; its CPU and wall seconds and counts."""
    seed_run_dir(recipe.run_dir, source)
    cpu, wall = time.process_time(), time.perf_counter()
    stats = build_preference_data(recipe, progress=False)
    return {"pairs_cpu_s": time.process_time() - cpu, "pairs_wall_s": time.perf_counter() - wall,
            "pairs_built": stats.totals.get("ok", 0), "pairs_dropped": stats.planned - stats.totals.get("ok", 0)}


def dpo_seconds_per_step(base: dict, run_dir: Path, student: Path, lr: float) -> float:
    """Process CPU seconds per DPO step (setup excluded), from a short run on a copy of run_dir's built pairs."""
    calibration = dpo_recipe(base, Path(f"{run_dir}_cal"), bench_methods.CALIBRATION_STEPS + 1, student, lr)
    seed_run_dir(calibration.run_dir, run_dir, run_dir / run_files(calibration).pairs.name)
    training, start = setup(calibration, None)
    seconds = bench_methods.timed_steps(training, start)  # the loop's body alone, as every arm is calibrated
    if training.metrics is not None:
        training.metrics.close()
    shutil.rmtree(calibration.run_dir, ignore_errors=True)
    return seconds


def train_dpo(recipe: Recipe) -> dict:
    """Train (fresh: the run directory's pairs and teacher data kept) and return the CPU and wall seconds."""
    files = run_files(recipe)
    for path in (files.checkpoints, files.student, files.metrics):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    cpu, wall = time.process_time(), time.perf_counter()
    train(recipe, progress=False)
    return {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall}


def run_dpo_arm(base: dict, out: Path, source: Path, student: Path, budget: float, lr: float) -> dict:
    """Pairs, then DPO for what they left of the budget (no training when they used it all)."""
    probe = dpo_recipe(base, out / "dpo", 1, student, lr)
    pairs = build_pairs_timed(probe, source)
    per_step = dpo_seconds_per_step(base, probe.run_dir, student, lr)
    steps = round((budget - pairs["pairs_cpu_s"]) / per_step)
    if steps < 1:
        return {"steps": 0, "cpu_s_per_step": per_step, **pairs, "cpu_s": pairs["pairs_cpu_s"],
                "wall_s": pairs["pairs_wall_s"], "student": str(student)}
    recipe = dpo_recipe(base, out / "dpo", steps, student, lr)
    timing = train_dpo(recipe)
    return {"steps": steps, "cpu_s_per_step": per_step, **pairs, "cpu_s": timing["cpu_s"] + pairs["pairs_cpu_s"],
            "wall_s": timing["wall_s"] + pairs["pairs_wall_s"], "student": str(run_files(recipe).student)}


def run_dpo_equal_steps(base: dict, out: Path, steps: int, student: Path, lr: float, dpo: dict) -> dict:
    """DPO for `steps` steps on the dpo arm's pairs (copied, their building's CPU counted as the dpo arm's)."""
    recipe = dpo_recipe(base, out / "dpo_equal_steps", steps, student, lr)
    seed_run_dir(recipe.run_dir, out / "dpo", run_files(dpo_recipe(base, out / "dpo", 1, student, lr)).pairs)
    timing = train_dpo(recipe)
    return {"steps": steps, "cpu_s": timing["cpu_s"] + dpo["pairs_cpu_s"], "wall_s": timing["wall_s"] +
            dpo["pairs_wall_s"], "pairs_cpu_s": dpo["pairs_cpu_s"], "student": str(run_files(recipe).student)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-run", type=Path, required=True, help="a finished quickstart run directory (read only)")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "quickstart.yaml")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_kd_then_dpo"))
    parser.add_argument("--budget-steps", type=int, default=60, help="the extra budget, in steps of live KD")
    parser.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    parser.add_argument("--dpo-lr", type=float, default=1e-4, help="train.lr of the DPO arms")
    parser.add_argument("--max-held-out", type=int, help="measure on the first N held-out prompts only (smoke runs)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is a fair measure)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    run, out = args.from_run.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(run / "student", out / "student", dirs_exist_ok=True)
    start_student = out / "student"
    base = load_recipe(args.recipe).model_dump(mode="json")
    base["train"] = {**base["train"], "eval_every": 0}  # no held-out evaluation inside any arm's training
    kd_base = {**base, "data": {**base["data"], "prompts": None, "train": str(run / TEACHER_DATA[1])}}

    budget_file = out / "budget.json"
    if not budget_file.is_file():
        kd_step = bench_methods.seconds_per_step(bench_methods.method_recipe(kd_base, "kd_more", out, 1, start_student))
        budget_file.write_text(json.dumps({"cpu_s": kd_step * args.budget_steps, "kd_cpu_s_per_step": kd_step}))
    budget_info = json.loads(budget_file.read_text())
    budget = budget_info["cpu_s"]
    print(f"budget: {budget:.0f} CPU s ({args.budget_steps} KD steps)", file=sys.stderr)
    trained_file = out / "trained.json"  # per-arm training results: a re-run skips what is done
    results = json.loads(trained_file.read_text()) if trained_file.is_file() else {}
    for name in args.arms:
        if name in results and Path(results[name]["student"], "config.json").is_file():
            continue
        if name == "start":
            results[name] = {"steps": 0, "cpu_s": 0.0, "wall_s": 0.0, "student": str(start_student)}
        elif name == "kd_more":
            steps = max(1, round(budget / budget_info["kd_cpu_s_per_step"]))
            recipe = bench_methods.method_recipe(kd_base, "kd_more", out, steps, start_student)
            results[name] = {"steps": steps, "cpu_s_per_step": budget_info["kd_cpu_s_per_step"],
                             **bench_methods.timed_train(recipe), "student": str(recipe.run_dir / "student")}
        elif name == "dpo":  # the CPU kd_more really spent (calibration misjudges a step by up to ~25%)
            spent = results["kd_more"]["cpu_s"] if "kd_more" in results else budget
            results[name] = {**run_dpo_arm(base, out, run, start_student, spent, args.dpo_lr), "budget_cpu_s": spent}
        elif "kd_more" in results and "dpo" in results:  # dpo_equal_steps: after the two it mirrors
            results[name] = run_dpo_equal_steps(base, out, results["kd_more"]["steps"], start_student, args.dpo_lr,
                                                results["dpo"])
        else:
            print(f"{name}: needs the kd_more and dpo arms first; skipped", file=sys.stderr)
            continue
        trained_file.write_text(json.dumps(results, indent=2))
        print(f"{name}: {results[name]['steps']} steps, {results[name]['cpu_s']:.0f} CPU s", file=sys.stderr)
    arms = [a for a in args.arms if a in results]
    results.update(measure(base, out, run, start_student, args.dpo_lr, arms, results, args.max_held_out))
    results["meta"] = {**results["meta"], "budget_cpu_s": budget, "budget_kd_steps": args.budget_steps,
                       "threads": args.threads, "dpo_lr": args.dpo_lr, "load_before": load_before,
                       "load_after": os.getloadavg()}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    keys = ["steps", "cpu_s", "wall_s", *bench_methods.TABLE_KEYS[2:], "reward_accuracy", "reward_margin"]
    print(bench_methods.table(results, arms, keys, label="arm"))
    return 0


def measure(base: dict, out: Path, source: Path, start_student: Path, lr: float, arms: list[str], results: dict,
            max_held_out: int | None) -> dict:
    """Every arm's held-out scores (bench_methods' and the held-out pairs' reward accuracy); the teacher's row."""
    full = dpo_recipe(base, out / "measure", 1, start_student, lr)
    seed_run_dir(full.run_dir, source)
    examples, _ = recipe_examples(full)  # the arms' training split
    data = base
    if max_held_out:  # the split's lowest-hash held-out examples: a subset of the full held-out split
        cap = min(max_held_out, base["data"]["max_eval_examples"])
        data = {**base, "data": {**base["data"], "max_eval_examples": cap}}
    recipe = dpo_recipe(data, out / "measure", 1, start_student, lr)
    _, held_out = recipe_examples(recipe)
    tokenizer, reference = reference_student(recipe)  # the KD student: every arm's start, the pairs' reference
    pairs = held_out_pairs(recipe, reference, tokenizer)  # the held-out teacher answers vs the KD student's greedy ones
    teacher = load_teacher(recipe)
    prompts = [e.messages[:-1] for e in held_out]
    teacher_answers = generate_texts(teacher, tokenizer, prompts, max_new_tokens=recipe.generate.max_new_tokens)
    scores = {"teacher": {**repetition([a.text for a in teacher_answers]),
                          "eos_share": sum(a.finish_reason == "stop" for a in teacher_answers) / len(held_out)}}
    for name in arms:
        student_dir = Path(results[name]["student"])
        row = bench_methods.held_out_scores(student_dir, teacher, tokenizer, held_out, teacher_answers, recipe)
        policy = load_model(str(student_dir), None, dtype=torch.float32, device=torch.device("cpu"))
        rewards = pair_rewards(recipe, policy, reference, tokenizer, pairs) or {}
        scores[name] = {**results[name], **row, "held_out_pairs": rewards.get("pairs"),
                        "reward_accuracy": rewards.get("reward_accuracy"),
                        "reward_margin": rewards.get("reward_margin")}
    scores["meta"] = {"held_out": len(held_out), "held_out_pairs": len(pairs), "train_examples": len(examples)}
    return scores


if __name__ == "__main__":
    sys.exit(main())
