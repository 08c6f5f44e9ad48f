"""The `distill` command end to end on tiny models, and its bad-input behaviour."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from distill.cli import main
from conftest import logged_steps, tiny_recipe

REPORT_KEYS = {"params", "perplexity", "top1_agreement", "kl_to_teacher", "rougeL_ref", "rougeL_teacher",
               "decode_tokens_per_s", "peak_memory_mb"}


def _recipe_file(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _prompts(tmp_path: Path, n: int = 12) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Tell me about number {i}."}) + "\n"
                            for i in range(n)))
    return path


def test_run_end_to_end_writes_every_artifact(tmp_path, tiny_teacher_dir, capsys, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))  # the GGUF export's dequantized copy
    recipe = tiny_recipe(tmp_path / "run", tiny_teacher_dir, _prompts(tmp_path))
    recipe["data"] = {"prompts": recipe["data"].pop("train"), "max_length": 48, "eval_fraction": 0.25}
    recipe["generate"] = {"max_new_tokens": 6, "batch_size": 4, "temperature": 1.0}  # greedy: only newlines
    recipe["export"] = {"formats": ["gguf:f32"]}
    path = _recipe_file(tmp_path, recipe)
    assert main(["run", str(path), "--no-progress", "--set", "train.steps=3"]) == 0
    run = tmp_path / "run"
    for name in ("recipe.yaml", "teacher_data/shard-00000.jsonl", "metrics.jsonl", "log.txt", "report.json", "samples.jsonl",
                 "report.html", "report.md", "exports/gguf-f32/model-f32.gguf",
                 "student/config.json", "student/model.safetensors", "student/tokenizer.json"):
        assert (run / name).exists(), name
    assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["steps"] == 3  # resolved, with --set
    assert len((run / "teacher_data/shard-00000.jsonl").read_text().splitlines()) == 12
    report = json.loads((run / "report.json").read_text())
    for side in ("teacher", "student"):
        assert REPORT_KEYS <= set(report[side]), side
    assert report["teacher"]["top1_agreement"] == 1.0
    assert report["exports"]["gguf-f32"]["perplexity"] == pytest.approx(
        report["student"]["perplexity"], rel=1e-3)  # shipped by the run, measured by its eval
    assert report["teacher"]["kl_to_teacher"] < 1e-6
    assert report["student"]["params"] < report["teacher"]["params"]
    assert {"compression", "speedup", "quality_pct_of_teacher"} <= set(report["ratios"])
    assert report["ratios"]["compression"] == report["student"]["params"] / report["teacher"]["params"]
    out = capsys.readouterr().out
    assert "teacher" in out and "student" in out  # the table is printed

    # Re-running a finished run resumes: no step is trained twice, nothing is regenerated, re-saved or re-exported.
    saved = {p: p.stat().st_mtime_ns for p in (run / "student/model.safetensors",
                                                run / "exports/gguf-f32/model-f32.gguf")}
    assert main(["run", str(path), "--no-progress", "--set", "train.steps=3"]) == 0
    assert {p: p.stat().st_mtime_ns for p in saved} == saved
    steps = [r["step"] for r in logged_steps(run)]
    assert steps == [1, 2, 3]
    assert len((run / "teacher_data/shard-00000.jsonl").read_text().splitlines()) == 12


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.cli", *args], capture_output=True, text=True)


def test_bad_recipe_is_one_line_exit_2(tmp_path, tiny_teacher_dir, pairs_jsonl):
    recipe = tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl, train={"stepz": 3})
    result = _cli("train", str(_recipe_file(tmp_path, recipe)))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.stepz: unknown key" in lines[0] and "recipe.yaml" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_missing_model_path_exit_2_and_debug_shows_traceback(tmp_path, pairs_jsonl):
    recipe = tiny_recipe(tmp_path / "run", tmp_path / "no_such_model", pairs_jsonl)
    path = _recipe_file(tmp_path, recipe)
    result = _cli("train", str(path), "--no-progress")
    assert result.returncode == 2
    assert "no_such_model" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    debug = _cli("--debug", "train", str(path), "--no-progress")
    assert "Traceback" in debug.stderr


def test_bad_data_line_is_named(tmp_path, tiny_teacher_dir):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n{not json\n')
    recipe = tiny_recipe(tmp_path / "run", tiny_teacher_dir, data)
    result = _cli("train", str(_recipe_file(tmp_path, recipe)), "--no-progress")
    assert result.returncode == 2
    assert "data.jsonl:2" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "student").exists()


def test_empty_dataset_exit_2(tmp_path, tiny_teacher_dir):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    recipe = tiny_recipe(tmp_path / "run", tiny_teacher_dir, data)
    result = _cli("train", str(_recipe_file(tmp_path, recipe)), "--no-progress")
    assert result.returncode == 2 and "empty.jsonl" in result.stderr and "Traceback" not in result.stderr


def test_cross_tokenizer_method_that_cannot_apply_refused(tmp_path, tiny_teacher_dir, pairs_jsonl):
    """Differing tokenizers train (method.cross_tokenizer, docs/cross_tokenizer.md), but `text` learns no logits:
    with teacher.cache it is one line and exit 2, before anything is written."""
    from conftest import STORIES260K, require_shared

    other = require_shared(STORIES260K)
    recipe = tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl, student={"model": str(other),
                                                                                    "config": None},
                         method={"cross_tokenizer": "text"}, teacher={"cache": str(tmp_path / "cache")})
    result = _cli("train", str(_recipe_file(tmp_path, recipe)), "--no-progress")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "text trains on the teacher's text alone" in result.stderr
    assert not (tmp_path / "run" / "student").exists()


def test_eval_without_a_trained_student(tmp_path, tiny_teacher_dir, pairs_jsonl):
    recipe = tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl)
    result = _cli("eval", str(_recipe_file(tmp_path, recipe)))
    assert result.returncode == 2 and "no trained student" in result.stderr
    assert not (tmp_path / "run").exists()


def test_convert_missing_file(tmp_path):
    result = _cli("convert", str(tmp_path / "missing.gguf"), str(tmp_path / "out"))
    assert result.returncode == 2 and "model not found" in result.stderr
    assert not (tmp_path / "out").exists()


def test_killed_training_resumes_without_losing_or_repeating_steps(tmp_path, tiny_teacher_dir, pairs_jsonl):
    import signal
    import time

    recipe = tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl,
                         train={"steps": 400, "checkpoint_every": 5, "log_every": 1})
    path = _recipe_file(tmp_path, recipe)
    proc = subprocess.Popen([sys.executable, "-m", "distill.cli", "train", str(path), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "run" / "checkpoints"
    deadline = time.monotonic() + 120
    while not any(checkpoints.glob("step_*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert not (tmp_path / "run" / "student").exists()

    assert main(["train", str(path), "--no-progress"]) == 0
    steps = [r["step"] for r in logged_steps(tmp_path / "run")]
    assert steps == list(range(1, 401))
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()


def test_generate_filter_train_uses_only_kept_answers(tmp_path, tiny_teacher_dir, capsys):
    from distill.stages.data import recipe_examples
    from distill.recipe import load_recipe

    recipe = tiny_recipe(tmp_path / "run", tiny_teacher_dir, _prompts(tmp_path))
    recipe["data"] = {"prompts": recipe["data"].pop("train"), "max_length": 48, "eval_fraction": 0.0}
    recipe["generate"] = {"max_new_tokens": 6, "batch_size": 4, "temperature": 1.0}
    # The random teacher writes word salad: keep only answers of 2+ words, no other filter.
    recipe["filter"] = {"truncated": False, "garbled": False, "refusal": False, "repetition": False,
                        "near_dedup": False, "length": {"min_words": 2}}
    path = _recipe_file(tmp_path, recipe)
    assert main(["generate", str(path), "--no-progress"]) == 0
    assert main(["train", str(path), "--no-progress"]) == 2  # filtered data missing: says so
    assert "run `distill filter` first" in capsys.readouterr().err
    assert main(["filter", str(path), "--no-progress"]) == 0
    run = tmp_path / "run"
    report = json.loads((run / "teacher_data.filtered.jsonl.report.json").read_text())
    kept = [json.loads(x) for x in (run / "teacher_data.filtered.jsonl").read_text().splitlines()]
    assert report["total_in"] == 12 and report["total_out"] == len(kept)
    assert all(len(r["response"].split()) >= 2 for r in kept)
    rejected = {f["name"]: f["rejected"] for f in report["filters"]}
    assert report["total_in"] - report["failed"] - sum(rejected.values()) == len(kept)
    if kept:
        train, _ = recipe_examples(load_recipe(path))
        assert {e.id for e in train} <= {r["id"] for r in kept}


VALID_RECIPE = ("output_dir: run\nteacher: {model: some/teacher}\nstudent: {model: some/student}\n"
                "data: {train: data.jsonl}\n")


@pytest.mark.parametrize("recipe_text, overrides, expected", [
    (VALID_RECIPE, ["train.lr={a: 1"], "--set train.lr: not valid YAML (expected ',' or '}'"),
    (VALID_RECIPE, ["data.train=[a"], "--set data.train: not valid YAML (expected ',' or ']'"),
    (VALID_RECIPE, [".steps=1"], "--set '.steps=1': expected KEY=VALUE"),
    (VALID_RECIPE, ["train.steps=true"], "recipe.yaml: train.steps: Input should be a number, not a boolean (true)"),
    ("- teacher\n- student\n", ["train.lr=1"], "recipe.yaml: a recipe must be a mapping of sections, got list"),
    ("teacher:\n  model: a\n student: [\n", [], "recipe.yaml:3: not valid YAML (expected <block end>"),
    ("output_dir: run\nseed: 1\x07\n", [], "recipe.yaml:2: not valid YAML (unacceptable character #x0007"),
    (b"output_dir: run\nteacher: {model: \xff}\n", [], "recipe.yaml:2: not UTF-8 text"),
])
def test_bad_recipe_file_or_set_is_one_line_exit_2(tmp_path, pairs_jsonl, capsys, recipe_text, overrides, expected):
    (tmp_path / "data.jsonl").write_text(pairs_jsonl.read_text())
    path = tmp_path / "recipe.yaml"
    if isinstance(recipe_text, bytes):
        path.write_bytes(recipe_text)
    else:
        path.write_text(recipe_text)
    args = ["train", str(path), "--no-progress"]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_filter_records_file_takes_only_filter_settings(tmp_path, capsys):
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"id": "a", "prompt": "p", "response": "a fine answer", "status": "ok"}) + "\n")
    out = tmp_path / "kept.jsonl"
    assert main(["filter", str(records), "--out", str(out), "--set", "train.lr=1"]) == 2
    assert capsys.readouterr().err.strip() == \
        "distill: error: --set train.lr: a records file takes only filter.KEY=VALUE settings"
    assert main(["filter", str(records), "--out", str(out), "--set", "filter.length.min_words=yes"]) == 2
    assert "--set filter.length.min_words: Input should be a number, not a boolean" in capsys.readouterr().err
    assert main(["filter", str(records), "--out", str(out), "--set", "filter=3"]) == 2
    assert capsys.readouterr().err.startswith("distill: error: --set filter: ")
    assert not out.exists()
    assert main(["filter", str(records), "--out", str(out), "--set", "filter.length.min_words=2"]) == 0
    assert "kept 1 of 1 records" in capsys.readouterr().out and out.is_file()


def test_every_command_has_a_handler_and_help():
    from distill.cli import COMMANDS, _parser

    names = [c.name for c in COMMANDS]
    assert names == ["run", "generate", "train", "eval", "filter", "pairs", "capture", "student", "plan", "convert",
                     "export", "serve", "report", "compare"]
    help_text = _parser().format_help()
    for command in COMMANDS:
        assert command.name in help_text and callable(command.handle)
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed (the test extra) is not here")
def test_saving_a_model_does_not_make_deepspeed_warn(tmp_path, tiny_teacher_dir):
    """save_pretrained imports DeepSpeed through accelerate when it is installed; on a CPU machine its accelerator
    detection warned "Setting accelerator to CPU" in every run's output."""
    done = _cli("export", str(tiny_teacher_dir), "--out", str(tmp_path / "hf"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "hf" / "config.json").is_file()
    assert "Setting accelerator" not in done.stdout + done.stderr


def test_a_launched_process_ends_with_its_code_and_its_output_and_log_flushed(tmp_path):
    # What `distill` does at the end of each process of a torchrun launch (the interpreter's teardown skipped).
    script = tmp_path / "end.py"
    script.write_text(textwrap.dedent(f"""
        import logging, sys
        from distill.runtime import end_launched_process
        logging.basicConfig(filename={str(tmp_path / "run.log")!r}, level=logging.INFO)
        logging.getLogger("distill").info("saved the student")
        sys.stdout.write("no newline yet")
        sys.stderr.write("nor here")
        end_launched_process(3)
        print("not reached")
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (3, "no newline yet", "nor here")
    assert (tmp_path / "run.log").read_text() == "INFO:distill:saved the student\n"
