"""`distill export` into <run>/exports/ by default, and `distill eval` measuring each export like the student."""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path

import pytest

from conftest import tiny_recipe
from distill import stages
from distill.cli import main
from distill.export.found import find_exports
from distill.export import default_export_dir, export_model
from distill.recipe import recipe_from_dict
from distill.report.html import write_report
from distill.report.table import format_table

HAS_QUANTO = importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.quanto") is not None
QUANTS = ("int8", "int4") if HAS_QUANTO else ()


class _Lines(logging.Handler):
    """Keeps the messages of the distill logger (the CLI turns its propagation off, so caplog misses them)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_teacher_dir):
    """A trained tiny run, exported to GGUF f32 (and int8/int4 with optimum-quanto) in exports/, then evaluated."""
    base = tmp_path_factory.mktemp("eval_exports")
    data = base / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} plus {i}?",
                                        "response": f"The answer is {2 * i}."}) + "\n" for i in range(24)))
    recipe = recipe_from_dict(tiny_recipe(base / "run", tiny_teacher_dir, data, train={"steps": 4},
                                          eval={"speed_batch_sizes": [1, 2]}))
    stages.prepare_run_dir(recipe)
    stages.train(recipe, progress=False)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DISTILL_CACHE", str(base / "cache"))  # the dequantized GGUF copy stays out of ~/.cache
        env.setenv("DISTILL_LLAMA_PYTHON", str(base / "no-python"))  # no llama.cpp, even where it is installed
        written = {"gguf-f32": export_model(recipe.run_dir, None, "gguf", "f32", verify=False)}
        for quant in QUANTS:
            written[f"hf-{quant}"] = export_model(recipe.run_dir, None, "hf", quant)
        (recipe.run_dir / "exports" / "notes").mkdir()
        (recipe.run_dir / "exports" / "notes" / "todo.txt").write_text("ship the int8 one")
        lines, logger = _Lines(), logging.getLogger("distill")
        level = logger.level
        logger.addHandler(lines)
        logger.setLevel(logging.INFO)
        try:
            report = stages.evaluate(recipe, progress=False)
        finally:
            logger.removeHandler(lines)
            logger.setLevel(level)
    return recipe, report, written, lines.lines


def test_exports_land_in_the_default_place(evaluated):
    recipe, _, written, _ = evaluated
    exports = recipe.run_dir / "exports"
    assert written["gguf-f32"] == exports / "gguf-f32" / "model-f32.gguf"
    for quant in QUANTS:
        assert written[f"hf-{quant}"] == exports / f"hf-{quant}"
    assert default_export_dir(recipe.run_dir) == exports / "hf"
    assert default_export_dir(recipe.run_dir, "gguf") == exports / "gguf-f16"
    assert default_export_dir(recipe.run_dir, "gguf", "Q8_0") == exports / "gguf-q8_0"


def test_eval_measures_every_export(evaluated):
    _, report, _, _ = evaluated
    exports = report["exports"]
    assert set(exports) == {"gguf-f32", *(f"hf-{q}" for q in QUANTS)}
    for name, row in exports.items():
        assert row["bytes_on_disk"] > 0, name
        assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1, name
        assert 0 <= row["top1_agreement"] <= 1 and row["kl_to_teacher"] >= 0, name
        assert row["ratios"]["quality_pct_of_teacher"] is not None and row["older_than_student"] is False, name
        assert "calibration" not in row and 0 <= row["ece"] <= 1, name
    gguf = exports["gguf-f32"]
    assert (gguf["format"], gguf["quant"], gguf["path"]) == ("gguf", "f32", "exports/gguf-f32/model-f32.gguf")
    assert gguf["decode_tokens_per_s"] is None and "llama.cpp" in gguf["speed_not_measured"]
    assert "DISTILL_LLAMA_PYTHON" in gguf["speed_not_measured"]  # and why llama.cpp did not time it


def test_gguf_f32_scores_exactly_like_the_student(evaluated):
    _, report, _, _ = evaluated
    gguf, student = report["exports"]["gguf-f32"], report["student"]
    assert abs(gguf["perplexity"] - student["perplexity"]) <= 1e-3 * student["perplexity"]
    assert gguf["top1_agreement"] == student["top1_agreement"]
    assert gguf["rougeL_teacher"] == student["rougeL_teacher"]  # the same greedy answers
    assert gguf["ratios"]["quality_pct_of_teacher"] == pytest.approx(report["ratios"]["quality_pct_of_teacher"],
                                                                     rel=1e-3)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_exports_are_smaller_and_timed(evaluated, quant):
    if not HAS_QUANTO:
        pytest.skip("optimum-quanto is not installed")
    _, report, _, _ = evaluated
    row, student = report["exports"][f"hf-{quant}"], report["student"]
    assert (row["format"], row["quant"], row["path"]) == ("hf", quant, f"exports/hf-{quant}")
    assert row["bytes_on_disk"] < student["bytes_on_disk"]
    assert row["weight_bytes"] < student["weight_bytes"]  # quanto's int8 / packed int4 data, not float sizes
    assert row["params"] == student["params"]
    assert row["decode_tokens_per_s"] > 0 and row["decode_tokens_per_s_b2"] > 0
    assert row["peak_memory_mb"] > row["weight_bytes"] / 2**20
    assert "speed_not_measured" not in row


def test_table_and_html_show_the_exports(evaluated):
    recipe, report, _, _ = evaluated
    table = format_table(report)
    assert "exports (<run>/exports/" in table
    block = table.split("exports (")[1].splitlines()
    names = [line.split()[0] for line in block[2:] if line.strip() and not line.startswith("  ")]
    assert names[:2] == ["student", "gguf-f32"] and set(names) >= set(report["exports"])
    gguf_line = next(line for line in block if line.startswith("gguf-f32"))
    assert f"{report['exports']['gguf-f32']['perplexity']:,.2f}" in gguf_line
    assert "gguf-f32: speed not measured" in table
    page = write_report(recipe.run_dir).read_text()
    assert '<section id="exports"><h2>Exported files</h2>' in page and "<td>gguf-f32</td>" in page
    assert "exports (&lt;run&gt;/exports/" not in page  # the section is a table of its own, not the text table
    assert "exports (<run>/exports/" in (recipe.run_dir / "report.md").read_text()


def test_an_unrecognised_folder_is_skipped_with_a_log_line(evaluated):
    recipe, report, _, lines = evaluated
    assert "notes" not in report["exports"]
    assert any("skipping" in line and "notes" in line for line in lines)
    assert [e.name for e in find_exports(recipe.run_dir)] == sorted(report["exports"])


def test_find_exports_reads_loose_and_grouped_gguf_files(evaluated, tmp_path):
    recipe, _, written, _ = evaluated
    exports = tmp_path / "run" / "exports"
    (exports / "two").mkdir(parents=True)
    for name in ("a.gguf", "b.gguf"):
        shutil.copyfile(written["gguf-f32"], exports / "two" / name)
    shutil.copyfile(written["gguf-f32"], exports / "loose.gguf")
    (exports / ".hf.abc123.tmp").mkdir()  # an export being written
    found = find_exports(tmp_path / "run")
    assert [(e.name, e.fmt, e.quant) for e in found] == [
        ("loose.gguf", "gguf", "f32"), ("two/a.gguf", "gguf", "f32"), ("two/b.gguf", "gguf", "f32")]
    assert find_exports(tmp_path / "no_run") == []


def test_cli_export_of_a_run_without_out(evaluated, tmp_path, capsys):
    recipe, _, _, _ = evaluated
    run = tmp_path / "copy"
    run.mkdir()
    shutil.copyfile(recipe.run_dir / "recipe.yaml", run / "recipe.yaml")
    shutil.copytree(recipe.run_dir / "student", run / "student")
    assert main(["export", str(run)]) == 0
    assert (run / "exports" / "hf" / "model.safetensors").is_file()
    assert main(["export", str(run), "--format", "gguf", "--quant", "q8_0", "--no-verify"]) == 0
    assert (run / "exports" / "gguf-q8_0" / "model-q8_0.gguf").is_file()
    assert str(run / "exports" / "gguf-q8_0" / "model-q8_0.gguf") in capsys.readouterr().out


def test_a_model_directory_without_out_is_a_one_line_error(tiny_student_dir, capsys):
    before = sorted(p.name for p in tiny_student_dir.iterdir())
    assert main(["export", str(tiny_student_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "give --out" in err and str(tiny_student_dir) in err
    assert sorted(p.name for p in tiny_student_dir.iterdir()) == before
    assert main(["export", str(tiny_student_dir / "absent")]) == 2
    assert "not found" in capsys.readouterr().err


def test_an_export_that_does_not_load_gets_a_row_with_the_error(evaluated, tmp_path):
    from types import SimpleNamespace

    import torch

    from distill.stages.evaluation import measure_exports

    recipe, report, _, _ = evaluated
    broken = tmp_path / "exports" / "hf-int8"
    broken.mkdir(parents=True)
    (broken / "distill_quantization.json").write_text("{not json")
    (broken / "model.quanto.safetensors").write_bytes(b"x" * 10)
    moved = recipe.model_copy(update={"output_dir": str(tmp_path)})
    reference = SimpleNamespace(device=torch.device("cpu"), shared_vocab=report["meta"]["shared_vocab"])
    section = measure_exports(moved.run_dir, reference, report["teacher"], recipe.run_dir / "student", torch.float32, False)
    row = section["exports"]["hf-int8"]
    assert (row["format"], row["quant"], row["bytes_on_disk"]) == ("hf", None, 10)
    assert "distill_quantization.json" in row["error"] or "optimum-quanto" in row["error"]
    assert row["older_than_student"] is False


def test_recipe_export_section_ships_after_training_and_keeps_fresh_exports(tmp_path, tiny_teacher_dir,
                                                                            pairs_jsonl, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    recipe = recipe_from_dict(tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl, train={"steps": 2},
                                          export={"formats": ["gguf:f32", "hf"]}))
    stages.prepare_run_dir(recipe)
    stages.train(recipe, progress=False)
    written = stages.export(recipe)
    assert [p.relative_to(recipe.run_dir).as_posix() for p in written] == ["exports/gguf-f32/model-f32.gguf",
                                                                          "exports/hf"]
    assert stages.export(recipe) == []  # newer than the student: kept, not redone
    assert {e.name for e in find_exports(recipe.run_dir)} >= {"hf"}


@pytest.mark.parametrize("target, message", [
    ("onnx", r"export.formats\[0\]: onnx: unknown format 'onnx'"),
    ("gguf:q3_k", r"export.formats\[0\]: --quant q3_k: unknown GGUF type"),
    ("hf:int2", r"export.formats\[0\]: hf:int2: unknown quantization 'int2'"),
])
def test_a_bad_export_target_fails_before_anything_runs(tmp_path, tiny_teacher_dir, pairs_jsonl, target, message):
    from distill.errors import DistillError

    recipe = recipe_from_dict(tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl,
                                          export={"formats": [target]}))
    with pytest.raises(DistillError, match=message):
        stages.run(recipe, progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


FAKE_LLAMA_CPP = '''
import numpy as np

class Llama:
    """Stands in for llama_cpp.Llama: the calls distill's worker makes, no model (FAIL in FILE.mode fails to load)."""

    def __init__(self, path, n_ctx, n_threads, n_threads_batch, logits_all, verbose):
        if "FAIL" in open(path + ".mode").read():
            raise ValueError("unknown model architecture: 'nope'")
        self.n_tokens, self.scores = 0, np.zeros((n_ctx, 8), np.float32)

    def reset(self):
        self.n_tokens = 0

    def eval(self, tokens):
        for token in tokens:
            self.scores[self.n_tokens, token % 8] = 1.0
            self.n_tokens += 1
'''


def _fake_llama_python(tmp_path) -> str:
    """A python whose `llama_cpp` is FAKE_LLAMA_CPP (a wrapper script over this interpreter)."""
    package = tmp_path / "fake" / "llama_cpp"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_LLAMA_CPP)
    script = tmp_path / "python"
    script.write_text(f'#!/bin/sh\nPYTHONPATH={package.parent} exec {sys.executable} "$@"\n')
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize("mode", ["runs", "FAIL"])
def test_eval_times_gguf_files_in_llama_cpp_when_it_is_found(evaluated, tmp_path, monkeypatch, mode):
    """The whole path (find the python, run the worker, fill the row) with a stand-in llama_cpp; a file llama.cpp
    cannot run leaves the row's speed empty with the reason, and eval goes on."""
    recipe, _, written, _ = evaluated
    gguf = written["gguf-f32"]
    Path(str(gguf) + ".mode").write_text(mode)
    monkeypatch.setenv("DISTILL_LLAMA_PYTHON", _fake_llama_python(tmp_path))
    monkeypatch.setenv("DISTILL_CACHE", str(recipe.run_dir.parent / "cache"))
    try:
        row = stages.evaluate(recipe, progress=False)["exports"]["gguf-f32"]
    finally:
        Path(str(gguf) + ".mode").unlink()
    if mode == "FAIL":
        assert row["decode_tokens_per_s"] is None
        assert "could not run it: ValueError: unknown model architecture: 'nope'" in row["speed_not_measured"]
        return
    assert "speed_not_measured" not in row and row["speed_runtime"] == "llama.cpp"
    assert row["speed_threads"] == (recipe.eval.speed_threads or os.cpu_count())
    assert row["decode_tokens_per_s"] > 0 and row["decode_tokens_per_s_1_thread"] > 0
    assert row["prefill_tokens_per_s"] == pytest.approx(recipe.eval.speed_prompt_tokens / row["time_to_first_token_s"])
