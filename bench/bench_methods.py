"""SFT vs off-policy KD (live, cached) vs on-policy distillation at equal compute, on held-out prompts.

From a finished quickstart run (its filtered teacher answers and its pruned student as built), every method trains
the same student on the same examples for the same CPU budget: `--budget-steps` steps of live KD, converted to each
method's own step count from a short calibration run (process CPU seconds per step, so other load on the machine
does not bias one method). Then each student answers the held-out prompts greedily and is compared with the teacher:
    python bench/bench_methods.py --from-run runs/quickstart --out /tmp/bench_methods        # ~30-40 min, 2 cores
    python bench/bench_methods.py --from-run runs/quickstart --budget-steps 10 --methods kd on_policy   # a smoke run
Metrics on the held-out split (prompts never trained on): top-1 agreement and KL(teacher || student) on the
teacher's answers; KL on the student's own greedy answers (where exposure bias shows); ROUGE-L vs the teacher's
answers; loop share and distinct-2 of the answers; EOS share (answers that end before the token limit).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from distill.data.layouts import Example
from distill.data.tokenize import collate, padding_id
from distill.eval.metrics import agreement, repetition, rouge_l
from distill.models import load_model, load_tokenizer
from distill.recipe import Recipe, load_recipe, recipe_from_dict
from distill.stages import capture, train
from distill.stages.data import encode, recipe_examples
from distill.stages.facts import load_teacher
from distill.stages.training import setup
from distill.teachers.local import generate_texts
from distill.training.loop import accumulate_gradients

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "sft": {"kind": "sft"},
    "kd": {},  # the quickstart's method: forward KL, alpha 0.2, live teacher
    "kd_cache": {"cache": True},
    "on_policy": {"kind": "on_policy", "lmbda": 1.0, "divergence": "reverse_kl", "alpha": 0.0},
    "mixed": {"kind": "on_policy", "lmbda": 0.5, "divergence": "reverse_kl"},
    "sampled_token": {"kind": "on_policy", "lmbda": 1.0, "estimator": "sampled_token", "alpha": 0.0},
    "kd_then_on_policy": {"then": "on_policy"},  # half the budget KD, then half on-policy from that student
}
CALIBRATION_STEPS = 3


ON_POLICY_LR: dict = {}  # --on-policy-lr: train.lr for the on-policy methods (default: the recipe's)


def method_recipe(base: dict, name: str, out: Path, steps: int, student: Path) -> Recipe:
    """The quickstart recipe trained as `name` from `student` for `steps` steps, in out/name."""
    spec = dict(METHODS.get(name, {}))
    spec.pop("then", None)
    cache = spec.pop("cache", False)
    data = dict(base)
    data["output_dir"] = str(out / name)
    data["student"] = {"model": str(student)}
    # A method that names its kind leaves the divergence to that kind's default unless it names one too.
    inherited = {k: v for k, v in base["method"].items() if not (k == "divergence" and "kind" in spec)}
    data["method"] = {**inherited, **spec, "sampling": {"max_new_tokens": base["generate"]["max_new_tokens"], "temperature": 1.0}}
    data["train"] = {**base["train"], "steps": steps, "checkpoint_every": max(steps, 1)}
    if spec.get("kind") == "on_policy":
        data["train"].update(ON_POLICY_LR)
    data["teacher"] = {**base["teacher"], **({"cache": str(out / "teacher_cache")} if cache else {})}
    data.pop("filter", None)
    return recipe_from_dict(data, base_dir=ROOT / "recipes")


def seconds_per_step(recipe: Recipe) -> float:
    """Process CPU seconds per optimizer step of the recipe: the mean of CALIBRATION_STEPS steps after one warm-up
    step, timed around the loop's body alone (no checkpoint, held-out evaluation or save, which a 3-step run_loop
    would count as if every step paid for them)."""
    calibration = recipe_from_dict({**recipe.model_dump(mode="json"), "output_dir": str(recipe.run_dir) + "_cal",
                                    "train": {**recipe.train.model_dump(mode="json"),
                                              "steps": CALIBRATION_STEPS + 1}},
                                   base_dir=recipe.base_dir)
    shutil.rmtree(calibration.run_dir, ignore_errors=True)
    calibration.run_dir.mkdir(parents=True)
    seconds = timed_steps(*setup(calibration, None))
    shutil.rmtree(calibration.run_dir, ignore_errors=True)
    return seconds


def timed_steps(training, start: int) -> float:
    """Process CPU seconds per step over CALIBRATION_STEPS of run_loop's body (gradients, optimizer, schedule),
    after one warm-up step; a set-up Training with CALIBRATION_STEPS + 1 steps to take."""
    for step in range(start, start + CALIBRATION_STEPS + 1):
        if step == start + 1:
            began = time.process_time()
        accumulate_gradients(training, step)
        training.optimizer.step()
        training.scheduler.step()
        training.optimizer.zero_grad(set_to_none=True)
    return (time.process_time() - began) / CALIBRATION_STEPS


def timed_train(recipe: Recipe) -> dict:
    """Train (fresh) and return the CPU and wall seconds it took."""
    shutil.rmtree(recipe.run_dir, ignore_errors=True)
    recipe.run_dir.mkdir(parents=True)
    cpu, wall = time.process_time(), time.perf_counter()
    train(recipe, progress=False)
    return {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall}


def timed_capture(recipe: Recipe) -> float:
    """Capture the recipe's teacher cache once (kept for later runs); the CPU seconds it took."""
    cpu = time.process_time()
    if not recipe.path(recipe.teacher.cache).exists():
        capture(recipe, progress=False)
    return time.process_time() - cpu


def held_out_scores(student_dir: Path, teacher, tokenizer, held_out: list[Example], teacher_answers: list,
                    recipe: Recipe) -> dict:
    """The student's greedy answers to the held-out prompts against the teacher's."""
    student = load_model(str(student_dir), None, dtype=torch.float32, device=torch.device("cpu"))
    prompts = [e.messages[:-1] for e in held_out]
    answers = generate_texts(student, tokenizer, prompts, max_new_tokens=recipe.generate.max_new_tokens)
    pad = padding_id(tokenizer)
    vocab = student.config.vocab_size
    on_teacher = agreement(student, teacher, _batches(recipe, held_out, tokenizer, pad), vocab)
    own = [Example(id=f"own-{i}", messages=[*p, {"role": "assistant", "content": a.text}])
           for i, (p, a) in enumerate(zip(prompts, answers))]
    on_own = agreement(student, teacher, _batches(recipe, own, tokenizer, pad), vocab)
    texts = [a.text for a in answers]
    return {
        "top1_agreement": on_teacher["top1_agreement"], "kl_to_teacher": on_teacher["kl_to_teacher"],
        "kl_on_own_answers": on_own["kl_to_teacher"],
        "rougeL_teacher": sum(rouge_l(a, t.text) for a, t in zip(texts, teacher_answers)) / len(texts),
        **repetition(texts),
        "eos_share": sum(a.finish_reason == "stop" for a in answers) / len(answers),
        "sample": texts[0],
    }


def _batches(recipe: Recipe, examples: list[Example], tokenizer, pad: int, size: int = 8):
    encoded = encode(recipe, examples, tokenizer)
    for start in range(0, len(encoded), size):
        yield collate(encoded[start:start + size], pad)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-run", type=Path, required=True, help="a finished quickstart run directory")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "quickstart.yaml")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_methods"))
    parser.add_argument("--budget-steps", type=int, default=120, help="the budget, in steps of live KD")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is a fair measure)")
    parser.add_argument("--on-policy-lr", type=float, help="train.lr of the on-policy methods (default: the recipe's)")
    args = parser.parse_args()
    if args.on_policy_lr:
        ON_POLICY_LR["lr"] = args.on_policy_lr
    torch.set_num_threads(args.threads)
    run = args.from_run.resolve()
    base = load_recipe(args.recipe).model_dump(mode="json")
    base["data"] = {**base["data"], "prompts": None, "train": str(run / "teacher_data.filtered.jsonl")}
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(run / "student_init", args.out / "student_init", dirs_exist_ok=True)
    init = args.out / "student_init"

    kd = method_recipe(base, "kd", args.out, args.budget_steps, init)
    budget_file = args.out / "budget.json"
    if not budget_file.is_file():
        budget_file.write_text(json.dumps({"cpu_s": seconds_per_step(kd) * args.budget_steps}))
    budget = json.loads(budget_file.read_text())["cpu_s"]
    print(f"budget: {budget:.0f} CPU s ({args.budget_steps} KD steps)", file=sys.stderr)
    trained_file = args.out / "trained.json"  # per-method training results: a re-run skips what is done
    results = json.loads(trained_file.read_text()) if trained_file.is_file() else {}
    for name in args.methods:
        if name in results and Path(results[name]["student"], "config.json").is_file():
            continue
        extra = {}
        if name == "kd_cache":  # the cache is written once and reused by every later run: timed on its own
            extra["capture_cpu_s"] = timed_capture(method_recipe(base, name, args.out, 1, init))
        per_step = seconds_per_step(method_recipe(base, name.replace("kd_then_on_policy", "kd"), args.out, 1, init))
        if name == "kd_then_on_policy":
            half = max(1, round(budget / 2 / per_step))
            first = method_recipe(base, "kd", args.out / "kd_half", half, init)
            timing = timed_train(first)
            then = method_recipe(base, "on_policy", args.out / "then", 1, first.run_dir / "student")
            then_steps = max(1, round(budget / 2 / seconds_per_step(then)))
            second = method_recipe(base, "on_policy", args.out / "then", then_steps, first.run_dir / "student")
            more = timed_train(second)
            timing = {k: timing[k] + more[k] for k in timing}
            steps, student_dir = f"{half}+{then_steps}", second.run_dir / "student"
        else:
            steps = max(1, round(budget / per_step))
            recipe = method_recipe(base, name, args.out, steps, init)
            timing = timed_train(recipe)
            student_dir = recipe.run_dir / "student"
        results[name] = {"steps": steps, "cpu_s_per_step": per_step, **timing, **extra, "student": str(student_dir)}
        trained_file.write_text(json.dumps(results, indent=2))
        print(f"{name}: {steps} steps, {timing['cpu_s']:.0f} CPU s", file=sys.stderr)

    examples, held_out = recipe_examples(kd)
    tokenizer = load_tokenizer(str(init), None)
    teacher = load_teacher(kd)
    prompts = [e.messages[:-1] for e in held_out]
    teacher_answers = generate_texts(teacher, tokenizer, prompts, max_new_tokens=kd.generate.max_new_tokens)
    results["teacher"] = {**repetition([a.text for a in teacher_answers]),
                          "eos_share": sum(a.finish_reason == "stop" for a in teacher_answers) / len(held_out)}
    for name in args.methods:
        results[name].update(held_out_scores(Path(results[name]["student"]), teacher, tokenizer, held_out,
                                             teacher_answers, kd))
    results["meta"] = {"budget_cpu_s": budget, "budget_kd_steps": args.budget_steps, "held_out": len(held_out),
                       "train_examples": len(examples), "threads": args.threads}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results, args.methods))
    return 0


TABLE_KEYS = ["steps", "cpu_s", "top1_agreement", "kl_to_teacher", "kl_on_own_answers", "rougeL_teacher",
              "loop_share", "distinct_2", "eos_share"]


def table(results: dict, rows: list[str], keys: list[str] = TABLE_KEYS, label: str = "method") -> str:
    """The results of `rows` (then the teacher's) as a markdown table of `keys`."""
    lines = [f"| {label} | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for name in [*rows, "teacher"]:
        lines.append(f"| {name} | " + " | ".join(_fmt(results[name].get(k)) for k in keys) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.3f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    sys.exit(main())
