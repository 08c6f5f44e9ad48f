"""Pruned vs random-init students of SmolLM2-135M-Instruct (the quickstart teacher), before and after a short KD budget.

Each variant is the quickstart recipe with another `student:` section, trained for the same number of KD steps on
the same teacher answers; perplexity on held-out teacher answers, top-1 agreement and KL to the teacher are
measured on the student right after it is built (student_init) and after training:
    python bench/bench_prune.py                        # all variants, 40 KD steps each (~40 min on 2 cores)
    python bench/bench_prune.py --steps 20 --variants both random_both
The teacher answers the quickstart prompts once (in <out>/teacher_data/); every variant reuses them.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"

# Every student is at most 25% of the teacher's 134.5M parameters.
VARIANTS = {
    "depth": {"from_teacher": {"layers": 1}},
    "random_depth": {"config": {"num_layers": 1, "hidden_size": 576, "num_heads": 9, "num_kv_heads": 3,
                                "intermediate_size": 1536}, "init_embeddings": "random"},
    "width": {"from_teacher": {"hidden_size": 256, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 640}},
    "random_width": {"config": {"num_layers": 30, "hidden_size": 256, "num_heads": 4, "num_kv_heads": 2,
                                "intermediate_size": 640}, "init_embeddings": "random"},
    "both": {"from_teacher": {"layers": 8, "hidden_size": 384, "num_heads": 6, "num_kv_heads": 2,
                              "intermediate_size": 1024}},
    "both_uniform": {"from_teacher": {"layers": 8, "layer_selection": "uniform", "hidden_size": 384,
                                      "num_heads": 6, "num_kv_heads": 2, "intermediate_size": 1024}},
    "random_both": {"config": {"num_layers": 8, "hidden_size": 384, "num_heads": 6, "num_kv_heads": 2,
                               "intermediate_size": 1024}, "init_embeddings": "random"},
    "projected_both": {"config": {"num_layers": 8, "hidden_size": 384, "num_heads": 6, "num_kv_heads": 2,
                                  "intermediate_size": 1024}, "init_embeddings": "project"},
}


def _recipe(out: Path, name: str, student: dict, steps: int):
    from distill.recipe import load_recipe

    overrides = [f"output_dir={out / name}", f"train.steps={steps}", f"train.checkpoint_every={steps}",
                 f"student={json.dumps(student)}"]
    return load_recipe(QUICKSTART, overrides)


def _measure(model, teacher, batches, shared_vocab: int) -> dict:
    from distill.eval.metrics import agreement, perplexity

    agree = agreement(model, teacher, batches(), shared_vocab)
    return {"perplexity": perplexity(model, batches())["perplexity"], "top1_agreement": agree["top1_agreement"],
            "kl_to_teacher": agree["kl_to_teacher"]}


def _held_out(recipe, tokenizer):
    from distill.stages.data import recipe_examples
    from distill.data.tokenize import collate, encode_all, padding_id

    _, held_out = recipe_examples(recipe)
    encoded = encode_all(held_out, tokenizer, recipe.data.max_length, recipe.data.system_prompt)
    pad = padding_id(tokenizer)
    return lambda: (collate(encoded[i:i + 8], pad) for i in range(0, len(encoded), 8))


def run_variant(out: Path, name: str, steps: int) -> dict:
    """Build, measure, train and measure one variant; returns its row."""
    from distill.models import count_params, load_model
    from distill.stages.facts import load_teacher, run_files, teacher_tokenizer
    from distill.stages import prepare_run_dir
    from distill.stages import train

    recipe = _recipe(out, name, VARIANTS[name], steps)
    prepare_run_dir(recipe, restart=True)
    shutil.copytree(out / "teacher_data", recipe.run_dir / "teacher_data", dirs_exist_ok=True)
    tokenizer = teacher_tokenizer(recipe)
    teacher = load_teacher(recipe)
    batches = _held_out(recipe, tokenizer)
    shared_vocab = teacher.config.vocab_size
    started = time.perf_counter()
    result = train(recipe, progress=False)
    seconds = time.perf_counter() - started
    before = load_model(str(run_files(recipe).student_init))
    after = load_model(str(result.student_dir))
    row = {"variant": name, "params": count_params(after), "share": count_params(after) / count_params(teacher),
           "before": _measure(before, teacher, batches, shared_vocab),
           "after": _measure(after, teacher, batches, shared_vocab), "train_seconds": round(seconds, 1),
           "teacher": _measure(teacher, teacher, batches, shared_vocab) if name == "depth" else None}
    pruning = run_files(recipe).student_init / "pruning.json"
    if pruning.is_file():
        report = json.loads(pruning.read_text())
        row["keep_layers"] = report["keep_layers"]
    return row


def _generate(out: Path) -> None:
    """The teacher answers the quickstart prompts once; every variant trains on the same answers."""
    from distill.stages import generate, prepare_run_dir

    if (out / "teacher_data").is_dir():
        return
    recipe = _recipe(out, "generate", VARIANTS["both"], 1)
    prepare_run_dir(recipe)
    generate(recipe, progress=False)
    shutil.copytree(recipe.run_dir / "teacher_data", out / "teacher_data")


def _fmt(row: dict) -> str:
    b, a = row["before"], row["after"]
    return (f"| {row['variant']} | {row['params'] / 1e6:.1f}M ({100 * row['share']:.1f}%) | {b['perplexity']:.1f} | "
            f"{b['top1_agreement']:.3f} | {a['perplexity']:.2f} | {a['top1_agreement']:.3f} | "
            f"{a['kl_to_teacher']:.3f} | {row.get('keep_layers', '')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/distill-bench-prune"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    args.out.mkdir(parents=True, exist_ok=True)
    _generate(args.out)
    rows = []
    for name in args.variants:
        row = run_variant(args.out, name, args.steps)
        rows.append(row)
        with (args.out / "results.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(_fmt(row), flush=True)
    print(f"\nKD budget: {args.steps} steps x batch 8 on the quickstart teacher answers")
    print("| variant | params (% of teacher) | ppl before | top-1 before | ppl after | top-1 after | KL after | "
          "kept layers |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(_fmt(row))
        if row["teacher"]:
            teacher = row["teacher"]
            print(f"| teacher | 134.5M (100%) | {teacher['perplexity']:.2f} | 1.000 | | | | |")


if __name__ == "__main__":
    main()
