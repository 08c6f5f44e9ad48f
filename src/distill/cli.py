"""The `distill` command: a thin layer over distill.stages; user errors print one line and exit 2.

Each subcommand is a `Command` in COMMANDS: its help, a function declaring its arguments and a handler. Handlers
import the code they run when they run it: most of it pulls in torch, which `distill --help` need not load.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable

from pydantic import ValidationError

from distill.errors import DistillError
from distill.recipe import FilterSpec, Recipe, apply_overrides, load_recipe

log = logging.getLogger("distill")

RECORDS_SUFFIXES = (".jsonl", ".json")  # `distill filter` on a records file instead of a recipe

AddArguments = Callable[[argparse.ArgumentParser], None]
Handler = Callable[[argparse.Namespace], None]


@dataclass(frozen=True)
class Command:
    """One `distill` subcommand: its help, how its arguments are declared, and the handler that runs it."""

    name: str
    help: str
    add_arguments: AddArguments
    handle: Handler
    description: str | None = None  # the subcommand's --help text above its arguments


def _stages() -> ModuleType:
    """The stage functions the recipe commands call (imported on first use: they load torch)."""
    from distill import stages

    return stages


# ---------------------------------------------------------------- arguments


def _debug_flag(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand's default must not overwrite `distill --debug COMMAND`
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")


def _recipe_arguments(p: argparse.ArgumentParser, set_help: str) -> None:
    p.add_argument("recipe", type=Path, help="recipe YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=set_help)


def _stage_arguments(p: argparse.ArgumentParser) -> None:
    """What every stage command takes: the recipe, --set, --no-progress, --debug."""
    _recipe_arguments(p, "override a recipe key, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _debug_flag(p)


def _lm_eval_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lm-eval", metavar="TASKS",
                   help="also run lm-evaluation-harness tasks (same as --set eval.lm_eval=TASKS): lm-eval "
                        "names, or NAME=PATH.jsonl:KIND for local files (docs/eval.md)")


def _resume_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint (the default when one exists)")
    p.add_argument("--restart", action="store_true", help="discard existing checkpoints and start over")


def _run_arguments(p: argparse.ArgumentParser) -> None:
    _stage_arguments(p)
    _lm_eval_argument(p)
    _resume_arguments(p)


def _train_arguments(p: argparse.ArgumentParser) -> None:
    _stage_arguments(p)
    _resume_arguments(p)


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    _stage_arguments(p)
    _lm_eval_argument(p)


def _filter_arguments(p: argparse.ArgumentParser) -> None:
    _stage_arguments(p)
    p.add_argument("--out", type=Path, help="with a records file instead of a recipe: where to write the "
                                            "kept records (settings: --set filter.KEY=VALUE)")


def _student_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", type=Path, help="recipe YAML file")
    p.add_argument("--out", type=Path, help="directory to save the student in (default: <run>/student_init)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key (repeatable)")
    _debug_flag(p)


def _plan_arguments(p: argparse.ArgumentParser) -> None:
    _recipe_arguments(p, "override a recipe key, e.g. --set train.batch_size=4 (repeatable)")
    p.add_argument("--processes", type=int, default=None, metavar="N",
                   help="also predict one rank's memory on N processes under DDP, FSDP and ZeRO-3 (default: "
                        "WORLD_SIZE, else 1: one process only)")
    _debug_flag(p)


def _convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("gguf", help="path to a .gguf file, or pkg://PACKAGE/FILE.gguf")
    p.add_argument("out_dir", type=Path)
    _debug_flag(p)


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", type=Path, help="run directory (recipe.yaml, student/) or HF model directory")
    p.add_argument("--out", type=Path,
                   help="directory to write (hf), or a .gguf file / a directory for model-QUANT.gguf (gguf); "
                        "default for a run: <run>/exports/FORMAT[-QUANT], where `distill eval` measures it")
    p.add_argument("--format", dest="fmt", default="hf", help="output format: hf (default), gguf or executorch")
    p.add_argument("--quant", default=None,
                   help="hf: int8 or int4 (weight-only; pip install distill[quantize]); "
                        "gguf: f32, f16 (default), bf16, q8_0, q5_1, q5_0, q4_1, q4_0, or a K-quant or IQ4 mix "
                        "as llama.cpp's: q6_k, q5_k_m, q5_k_s, q4_k_m, q4_k_s, q3_k_l, q3_k_m, q3_k_s, q2_k, "
                        "iq4_xs, iq4_nl; "
                        "executorch: fp32 (default), int8, int4 (pip install distill[executorch])")
    p.add_argument("--imatrix", default=None,
                   help="gguf: importance matrix: auto (a run's export.imatrix; for a run, by default computed "
                        "for K-quants and IQ4 over its training data), none, or an imatrix GGUF file")
    p.add_argument("--imatrix-tokens", type=int, default=None,
                   help="gguf: calibration tokens for --imatrix auto (default: the recipe's export.imatrix_tokens)")
    p.add_argument("--no-verify", action="store_true", help="gguf: skip loading the file back to compare logits")
    _debug_flag(p)


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="hub id, local HF directory, .gguf file or pkg://PACKAGE/FILE.gguf")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=8, help="most requests answered together")
    p.add_argument("--api-key-env", metavar="VAR", help="require `Authorization: Bearer $VAR` on every request")
    p.add_argument("--insecure", action="store_true",
                   help="allow a --host other than loopback without --api-key-env (anyone who can reach the "
                        "port can use the model)")
    _debug_flag(p)


def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="run directory")
    p.add_argument("--compare", dest="compare_with", type=Path, nargs="+", default=[], metavar="RUN",
                   help="other run directories to place on the quality-vs-size and quality-vs-speed charts")
    p.add_argument("--out", type=Path, help="HTML file to write (default: <run>/report.html)")
    _debug_flag(p)


def _compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN", help="run directories")
    _debug_flag(p)


# ---------------------------------------------------------------- handlers


def setup_logging(log_file: Path | None = None) -> None:
    """INFO to stderr, and to the run's log.txt when there is one (under torchrun: rank 0's; the others warn only)."""
    from distill.runtime import is_main_process, name_cpu_for_deepspeed  # runtime imports torch: not for --help

    name_cpu_for_deepspeed()
    main = is_main_process()
    log_file = log_file if main else None
    log.setLevel(logging.INFO if main else logging.WARNING)
    log.handlers.clear()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("distill: %(message)s"))
    log.addHandler(console)
    if log_file is not None and _is_main_process():  # one writer: the other ranks of torchrun log to stderr alone
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
    log.propagate = False


def _is_main_process() -> bool:
    """runtime.is_main_process, imported when asked: distill.runtime loads torch, which `distill --help` need not."""
    from distill.runtime import is_main_process

    return is_main_process()


def _recipe(args: argparse.Namespace) -> Recipe:
    """The recipe named on the command line, with --set (and --lm-eval, its shorthand) applied."""
    overrides = list(args.overrides)
    if getattr(args, "lm_eval", None):
        overrides.append(f"eval.lm_eval={args.lm_eval}")
    return load_recipe(args.recipe, overrides)


def _prepare_run(recipe: Recipe, args: argparse.Namespace) -> None:
    """Make (or check) the recipe's run directory, --restart included, and log to its log.txt."""
    restart = getattr(args, "restart", False)
    if restart and getattr(args, "resume", False):
        raise DistillError("--resume and --restart exclude each other")
    _stages().prepare_run_dir(recipe, restart=restart)
    setup_logging(recipe.run_dir / "log.txt")


def _run(args: argparse.Namespace) -> None:
    recipe = _recipe(args)
    _prepare_run(recipe, args)
    result = _stages().run(recipe, progress=not args.no_progress)  # the run directory is prepared above
    if result:  # under torchrun, rank 0's (the other processes only help train)
        print(f"report: {recipe.run_dir / 'report.html'}")


def _generate(args: argparse.Namespace) -> None:
    recipe = _recipe(args)
    _prepare_run(recipe, args)
    _stages().generate(recipe, progress=not args.no_progress)


def _train(args: argparse.Namespace) -> None:
    recipe = _recipe(args)
    _prepare_run(recipe, args)
    if recipe.stages is not None:  # every stage in order, with the pairs a dpo stage builds from the one before
        _stages().train_stages(recipe, progress=not args.no_progress)
        return
    _stages().train(recipe, progress=not args.no_progress)


def _eval(args: argparse.Namespace) -> None:
    recipe = _recipe(args)
    setup_logging(recipe.run_dir / "log.txt" if recipe.run_dir.is_dir() else None)  # reads a run; makes none
    _stages().evaluate(recipe, progress=not args.no_progress)


def _filter(args: argparse.Namespace) -> None:
    if args.recipe.suffix.lower() in RECORDS_SUFFIXES:
        _filter_file(args)
        return
    recipe = _recipe(args)
    if recipe.filter is None:
        raise DistillError(f"{args.recipe}: no filter section; add `filter: {{}}` for the default filters")
    _prepare_run(recipe, args)
    result = _stages().filter_data(recipe)
    if result is None:
        raise DistillError(f"{args.recipe}: no data.prompts, so no teacher answers to filter")
    print(f"kept {result.total_out} of {result.total_in} teacher answers -> "
          f"{recipe.run_dir / 'teacher_data.filtered.jsonl'}")


def _filter_file(args: argparse.Namespace) -> None:
    """`distill filter RECORDS.jsonl --out KEPT.jsonl`: the default filters (or --set filter.*) on any file."""
    from distill.data.filters import filter_file, format_filter_report

    if args.out is None:
        raise DistillError(f"{args.recipe}: a records file needs --out FILE for the kept records")
    settings = apply_overrides({}, args.overrides)  # a malformed KEY=VALUE is reported here
    for item in args.overrides:
        key = item.split("=", 1)[0].strip()
        if key.split(".")[0] != "filter":
            raise DistillError(f"--set {key}: a records file takes only filter.KEY=VALUE settings")
    try:
        spec = FilterSpec.model_validate(settings.get("filter", {}))
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(["filter", *map(str, first["loc"])])
        raise DistillError(f"--set {key}: {first['msg']}") from None
    result = filter_file(args.recipe, args.out, spec, base_dir=Path.cwd())
    print(format_filter_report(result))
    print(f"kept {result.total_out} of {result.total_in} records -> {args.out}")


def _capture(args: argparse.Namespace) -> None:
    recipe = _recipe(args)
    _prepare_run(recipe, args)
    stats = _stages().capture(recipe, progress=not args.no_progress)
    if not _is_main_process():  # every rank holds the same stats: one line for the user
        return
    hint = "" if recipe.teacher.cache else f"; set teacher.cache: {stats.path} to train from it"
    print(f"teacher cache: {stats.path} ({stats.examples} examples, {stats.bytes / 1e6:.1f} MB){hint}")


def _pairs(args: argparse.Namespace) -> None:
    recipe = _recipe(args)
    if recipe.stages is not None:
        raise DistillError(f"{args.recipe}: a `stages:` recipe builds each dpo stage's pairs from the stage before's "
                           "student; run `distill train` or `distill run`")
    _prepare_run(recipe, args)
    stats = _stages().build_preference_data(recipe, progress=not args.no_progress)  # dpo pairs or kto answers
    dropped = ", ".join(f"{n} {reason}" for reason, n in stats.dropped.items()) or "none"
    print(f"pairs ({stats.source}): {stats.planned} planned, {stats.existing} already built, {stats.built} built "
          f"now; dropped: {dropped} -> {recipe.run_dir / 'pairs'}")
    if stats.source == "judged":  # over every run's records: what the judge or verifier decided
        t = stats.totals
        print(f"judged: {t.get('ok', 0)} kept, {t.get('tie', 0)} ties, {t.get('unparseable', 0)} unparseable")
    if stats.filtered:
        print("filtered out of training: " + ", ".join(f"{n} by {name}" for name, n in stats.filtered.items()))


def _student(args: argparse.Namespace) -> None:
    recipe = load_recipe(args.recipe, args.overrides)
    setup_logging()
    if args.out is None:
        _stages().prepare_run_dir(recipe)
    out = _stages().build_student(recipe, out_dir=args.out)
    print(f"student saved to {out}")


def _plan(args: argparse.Namespace) -> None:
    from distill.plan import format_stage_plans, plan_stages

    plans = plan_stages(load_recipe(args.recipe, args.overrides), processes=args.processes)  # configs and data only
    print(format_stage_plans(plans))


def _convert(args: argparse.Namespace) -> None:
    from distill.models import convert_gguf

    setup_logging()
    out = convert_gguf(args.gguf, args.out_dir)
    print(f"converted {args.gguf} -> {out}")


def _export(args: argparse.Namespace) -> None:
    from distill.export import export_model, is_k_quant, load_imatrix, parse_target

    setup_logging()
    if args.fmt in ("gguf", "executorch"):  # an unknown type, or executorch not installed, fails before any work
        parse_target(f"{args.fmt}:{args.quant}" if args.quant else args.fmt)
    imatrix = None
    if args.fmt == "gguf" and args.imatrix not in ("none",):
        recipe_file = Path(args.source) / "recipe.yaml"
        if args.imatrix not in (None, "auto"):
            imatrix = load_imatrix(Path(args.imatrix))
        elif recipe_file.is_file():
            from distill.stages.exports import gguf_imatrix

            imatrix = gguf_imatrix(load_recipe(recipe_file), args.quant, args.imatrix, args.imatrix_tokens)
        if args.imatrix == "auto" and imatrix is None and is_k_quant(args.quant or ""):  # asked for, none to make
            raise DistillError(f"--imatrix auto: no calibration data in {args.source} (a run directory with training "
                               "data has it); give --imatrix FILE (e.g. from llama-imatrix) or --imatrix none")
    elif args.imatrix not in (None, "none"):
        raise DistillError("--imatrix: only for --format gguf")
    out = export_model(args.source, args.out, args.fmt, args.quant, verify=not args.no_verify, imatrix=imatrix)
    print(f"exported {args.source} -> {out}")


def _serve(args: argparse.Namespace) -> None:
    from distill.teachers.server import serve

    setup_logging()
    serve(args.model, host=args.host, port=args.port, batch_size=args.batch_size, api_key_env=args.api_key_env,
          insecure=args.insecure)


def _report(args: argparse.Namespace) -> None:
    from distill.report.html import write_report

    out = write_report(args.run_dir, out=args.out, compare_with=args.compare_with)
    print(f"report: {out}")


def _compare(args: argparse.Namespace) -> None:
    from distill.report.compare import compare_runs

    print(compare_runs(args.run_dirs))


def _stage(name: str, help_text: str, add_arguments: AddArguments, handle: Handler) -> Command:
    """A command that runs one stage of a recipe (its --help repeats the one-line help)."""
    return Command(name, help_text, add_arguments, handle, description=help_text)


COMMANDS: tuple[Command, ...] = (
    _stage("run", "all stages in order: generate, capture (with teacher.cache), student, train, eval, report",
           _run_arguments, _run),
    _stage("generate", "the teacher answers data.prompts (resumable)", _stage_arguments, _generate),
    _stage("train", "distil the student (resumes from the newest checkpoint)", _train_arguments, _train),
    _stage("eval", "measure teacher and student; write report.json and print the table", _eval_arguments, _eval),
    _stage("filter", "keep the teacher answers that pass the recipe's filter section (writes a report)",
           _filter_arguments, _filter),
    _stage("pairs", "build the preference pairs of method.kind: dpo with their reference log-probs (resumable)",
           _stage_arguments, _pairs),
    _stage("capture", "cache the teacher's top-k log-probs on the training data (teacher.cache; resumable)",
           _stage_arguments, _capture),
    Command("student", "build the recipe's student (cut from the teacher, or new) without training",
            _student_arguments, _student,
            description="Build the recipe's student and save it: <run>/student_init, or --out."),
    Command("plan", "predict a recipe's parameters, FLOPs, memory and training time (runs nothing)",
            _plan_arguments, _plan),
    Command("convert", "convert a .gguf model to a Hugging Face directory (safetensors)", _convert_arguments,
            _convert),
    Command("export", "export a run's student (or a model directory): HF safetensors or GGUF", _export_arguments,
            _export,
            description="Write the student as safetensors + tokenizer + model card (hf), or as one llama.cpp GGUF "
                        "file, loaded back and compared with the source (gguf)."),
    Command("serve", "serve a local model over an OpenAI-compatible HTTP API (/v1/chat/completions)",
            _serve_arguments, _serve,
            description="An OpenAI-compatible server (/v1/models, /v1/chat/completions, /v1/completions with "
                        "logprobs) over a local model, batching concurrent requests."),
    Command("report", "write a run's report.html (self-contained, with plots) and report.md", _report_arguments,
            _report, description="Write <run>/report.html and <run>/report.md from the run's files."),
    Command("compare", "print a table comparing several runs", _compare_arguments, _compare),
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description="Distil a large teacher LLM into a small student.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.description)
        command.add_arguments(p)
        p.set_defaults(handle=command.handle)
    return parser


def _leave_process_group() -> None:
    """Under torchrun every rank leaves the process group together, so none exits while gloo is still tearing down."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "torch.distributed" in sys.modules:
        import torch.distributed as dist

        from distill.runtime import continue_alone

        if dist.is_initialized():
            continue_alone()


def console_main() -> None:
    """Entry point of the `distill` console script: main(), then the process ends (at once under torchrun)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))  # read first: continue_alone sets it to 1 when ranks part
    code = main()
    if launched > 1 and "torch.distributed" in sys.modules:
        from distill.runtime import end_launched_process

        end_launched_process(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    """Run one `distill` command; its exit code (errors printed as one line)."""
    args = _parser().parse_args(argv)
    try:
        args.handle(args)
        _leave_process_group()
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
    console_main()
