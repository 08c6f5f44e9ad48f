"""The `distill` command: a thin layer over distill.stages; user errors print one line and exit 2."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from distill.errors import DistillError

log = logging.getLogger("distill")

STAGES = {
    "run": "all stages in order: generate, capture (with teacher.cache), student, train, eval, report",
    "generate": "the teacher answers data.prompts (resumable)",
    "train": "distil the student (resumes from the newest checkpoint)",
    "eval": "measure teacher and student; write report.json and print the table",
    "filter": "keep the teacher answers that pass the recipe's filter section (writes a report)",
    "capture": "cache the teacher's top-k log-probs on the training data (teacher.cache; resumable)",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description="Distil a large teacher LLM into a small student.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("recipe", type=Path, help="recipe YAML file")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe key, e.g. --set train.lr=1e-4 (repeatable)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        # SUPPRESS: a subcommand's default must not overwrite `distill --debug COMMAND`
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        if name == "filter":
            p.add_argument("--out", type=Path, help="with a records file instead of a recipe: where to write the "
                                                    "kept records (settings: --set filter.KEY=VALUE)")
        if name in ("run", "eval"):
            p.add_argument("--lm-eval", metavar="TASKS",
                           help="also run lm-evaluation-harness tasks (same as --set eval.lm_eval=TASKS): lm-eval "
                                "names, or NAME=PATH.jsonl:KIND for local files (docs/eval.md)")
        if name in ("run", "train"):
            p.add_argument("--resume", action="store_true",
                           help="continue from the newest checkpoint (the default when one exists)")
            p.add_argument("--restart", action="store_true", help="discard existing checkpoints and start over")
    stu = sub.add_parser("student", help="build the recipe's student (cut from the teacher, or new) without training",
                         description="Build the recipe's student and save it: <run>/student_init, or --out.")
    stu.add_argument("recipe", type=Path, help="recipe YAML file")
    stu.add_argument("--out", type=Path, help="directory to save the student in (default: <run>/student_init)")
    stu.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe key (repeatable)")
    stu.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    plan = sub.add_parser("plan", help="predict a recipe's parameters, FLOPs, memory and training time (runs nothing)")
    plan.add_argument("recipe", type=Path, help="recipe YAML file")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a recipe key, e.g. --set train.batch_size=4 (repeatable)")
    plan.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    conv = sub.add_parser("convert", help="convert a .gguf model to a Hugging Face directory (safetensors)")
    conv.add_argument("gguf", help="path to a .gguf file, or pkg://PACKAGE/FILE.gguf")
    conv.add_argument("out_dir", type=Path)
    conv.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    exp = sub.add_parser("export", help="export a run's student (or a model directory): HF safetensors or GGUF",
                         description="Write the student as safetensors + tokenizer + model card (hf), or as one "
                                     "llama.cpp GGUF file, loaded back and compared with the source (gguf).")
    exp.add_argument("source", type=Path, help="run directory (recipe.yaml, student/) or HF model directory")
    exp.add_argument("--out", type=Path,
                     help="directory to write (hf), or a .gguf file / a directory for model-QUANT.gguf (gguf); "
                          "default for a run: <run>/exports/FORMAT[-QUANT], where `distill eval` measures it")
    exp.add_argument("--format", dest="fmt", default="hf", help="output format: hf (default) or gguf")
    exp.add_argument("--quant", default=None,
                     help="hf: int8 or int4 (weight-only; pip install distill[quantize]); "
                          "gguf: f32, f16 (default), bf16, q8_0, q5_1, q5_0, q4_1 or q4_0")
    exp.add_argument("--no-verify", action="store_true", help="gguf: skip loading the file back to compare logits")
    exp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    srv = sub.add_parser("serve", help="serve a local model over an OpenAI-compatible HTTP API (/v1/chat/completions)",
                         description="An OpenAI-compatible server (/v1/models, /v1/chat/completions, /v1/completions "
                                     "with logprobs) over a local model, batching concurrent requests.")
    srv.add_argument("model", help="hub id, local HF directory, .gguf file or pkg://PACKAGE/FILE.gguf")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--batch-size", type=int, default=8, help="most requests answered together")
    srv.add_argument("--api-key-env", metavar="VAR", help="require `Authorization: Bearer $VAR` on every request")
    srv.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    rep = sub.add_parser("report", help="write a run's report.html (self-contained, with plots) and report.md",
                         description="Write <run>/report.html and <run>/report.md from the run's files.")
    rep.add_argument("run_dir", type=Path, help="run directory")
    rep.add_argument("--compare", dest="compare_with", type=Path, nargs="+", default=[], metavar="RUN",
                     help="other run directories to place on the quality-vs-size and quality-vs-speed charts")
    rep.add_argument("--out", type=Path, help="HTML file to write (default: <run>/report.html)")
    rep.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    cmp = sub.add_parser("compare", help="print a table comparing several runs")
    cmp.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN", help="run directories")
    cmp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    return parser


def setup_logging(log_file: Path | None = None) -> None:
    """INFO to stderr, and to the run's log.txt when there is one."""
    log.setLevel(logging.INFO)
    log.handlers.clear()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("distill: %(message)s"))
    log.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
    log.propagate = False


def _dispatch(args: argparse.Namespace) -> None:
    from distill import stages
    from distill.recipe import load_recipe

    if args.command == "convert":
        from distill.models import convert_gguf

        setup_logging()
        out = convert_gguf(args.gguf, args.out_dir)
        print(f"converted {args.gguf} -> {out}")
        return
    if args.command == "export":
        from distill.export import export_model

        setup_logging()
        out = export_model(args.source, args.out, args.fmt, args.quant, verify=not args.no_verify)
        print(f"exported {args.source} -> {out}")
        return
    if args.command == "serve":
        from distill.teachers.server import serve

        setup_logging()
        serve(args.model, host=args.host, port=args.port, batch_size=args.batch_size, api_key_env=args.api_key_env)
        return
    if args.command == "report":
        from distill.report.html import write_report

        out = write_report(args.run_dir, out=args.out, compare_with=args.compare_with)
        print(f"report: {out}")
        return
    if args.command == "compare":
        from distill.report.compare import compare_runs

        print(compare_runs(args.run_dirs))
        return
    if args.command == "filter" and args.recipe.suffix.lower() in (".jsonl", ".json"):
        _filter_file(args)
        return
    if getattr(args, "lm_eval", None):
        args.overrides.append(f"eval.lm_eval={args.lm_eval}")
    recipe = load_recipe(args.recipe, args.overrides)
    if args.command == "plan":  # reads configs and data; writes nothing
        from distill.plan import format_plan, plan_recipe

        print(format_plan(plan_recipe(recipe)))
        return
    if args.command == "student":
        setup_logging()
        if args.out is None:
            stages.prepare_run_dir(recipe)
        out = stages.build_student(recipe, out_dir=args.out)
        print(f"student saved to {out}")
        return
    if getattr(args, "resume", False) and getattr(args, "restart", False):
        raise DistillError("--resume and --restart exclude each other")
    if args.command == "eval":  # reads a run; makes none
        setup_logging(recipe.run_dir / "log.txt" if recipe.run_dir.is_dir() else None)
    else:
        stages.prepare_run_dir(recipe, restart=getattr(args, "restart", False))
        setup_logging(recipe.run_dir / "log.txt")
    progress = not args.no_progress
    if args.command == "run":
        stages.run(recipe, progress=progress)  # the run directory is prepared above (--restart included)
        print(f"report: {recipe.run_dir / 'report.html'}")
    elif args.command == "generate":
        stages.generate(recipe, progress=progress)
    elif args.command == "filter":
        if recipe.filter is None:
            raise DistillError(f"{args.recipe}: no filter section; add `filter: {{}}` for the default filters")
        result = stages.filter_data(recipe)
        if result is None:
            raise DistillError(f"{args.recipe}: no data.prompts, so no teacher answers to filter")
        print(f"kept {result.total_out} of {result.total_in} teacher answers -> "
              f"{recipe.run_dir / 'teacher_data.filtered.jsonl'}")
    elif args.command == "train":
        stages.train(recipe, progress=progress)
    elif args.command == "eval":
        stages.evaluate(recipe, progress=progress)
    elif args.command == "capture":
        stats = stages.capture(recipe, progress=progress)
        hint = "" if recipe.teacher.cache else f"; set teacher.cache: {stats.path} to train from it"
        print(f"teacher cache: {stats.path} ({stats.examples} examples, {stats.bytes / 1e6:.1f} MB){hint}")


def _filter_file(args: argparse.Namespace) -> None:
    """`distill filter RECORDS.jsonl --out KEPT.jsonl`: the default filters (or --set filter.*) on any file."""
    from pydantic import ValidationError

    from distill.data.filters import FilterSpec, filter_file, format_filter_report
    from distill.recipe import apply_overrides

    if args.out is None:
        raise DistillError(f"{args.recipe}: a records file needs --out FILE for the kept records")
    settings = apply_overrides({}, args.overrides).get("filter", {})
    try:
        spec = FilterSpec.model_validate(settings)
    except ValidationError as err:
        first = err.errors()[0]
        raise DistillError(f"--set filter.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    result = filter_file(args.recipe, args.out, spec, base_dir=Path.cwd())
    print(format_filter_report(result))
    print(f"kept {result.total_out} of {result.total_in} records -> {args.out}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `distill` console script."""
    args = _parser().parse_args(argv)
    try:
        _dispatch(args)
    except DistillError as err:
        if args.debug:
            raise
        print(f"distill: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distill: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
