"""`distill export --format executorch`: a .pte program that the ExecuTorch runtime runs like the source model.

The export tests need the `executorch` extra (skipped without it); the refusals run everywhere."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest

from conftest import STORIES260K, require_shared, tiny_recipe
from distill import stages
from distill.cli import main
from distill.export.found import find_exports
from distill.recipe import recipe_from_dict
from distill.report.table import format_table

HAS_EXECUTORCH = importlib.util.find_spec("executorch") is not None
needs_executorch = pytest.mark.skipif(not HAS_EXECUTORCH,
                                      reason='executorch is not installed (pip install -e ".[executorch]")')
# measured on stories260K: fp32 KL 7e-13, int8 (8-bit dynamic activations, per-channel weights) 1.1e-3
KL_BOUND = {"fp32": 1e-6, "int8": 5e-3}


@needs_executorch
@pytest.mark.slow
@pytest.mark.parametrize("quant", ["fp32", "int8"])
def test_executorch_program_runs_like_the_source(quant, tmp_path):
    out = tmp_path / "exported"
    assert main(["export", str(require_shared(STORIES260K)), "--format", "executorch", "--quant", quant,
                 "--out", str(out)]) == 0
    pte = out / f"model-{quant}.pte"
    check = json.loads((out / f"model-{quant}.pte.verify.json").read_text())
    assert pte.is_file() and check["bytes"] == pte.stat().st_size
    assert check["mean_kl"] < KL_BOUND[quant]
    assert check["greedy"]["prompts"] == 3
    if quant == "fp32":  # int8 rounds the activations too, which flips near-ties of this 260K model (1 of 3 kept)
        assert check["greedy"]["same"] == 3
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_unknown_executorch_quantization_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--format", "executorch", "--quant", "q4_k_m",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fp32, int8, int4" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(HAS_EXECUTORCH, reason="executorch is installed here")
def test_executorch_missing_says_how_to_install(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--format", "executorch", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install -e ".[executorch]"' in err[0]
    assert not (tmp_path / "out").exists()


def test_eval_finds_an_executorch_export_by_its_name(tmp_path):
    folder = tmp_path / "exports" / "executorch-int8"
    folder.mkdir(parents=True)
    (folder / "model-int8.pte").write_bytes(b"\0" * 16)
    [found] = find_exports(tmp_path)
    assert (found.name, found.kind, found.quant, found.fmt) == ("executorch-int8", "executorch", "int8",
                                                                 "executorch")
    shutil.rmtree(folder)


def _trained_run(tmp_path, teacher_dir):
    """The recipe of a trained tiny run, ready for exports."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} plus {i}?",
                                        "response": f"The answer is {2 * i}."}) + "\n" for i in range(16)))
    recipe = recipe_from_dict(tiny_recipe(tmp_path / "run", teacher_dir, data, train={"steps": 2},
                                          eval={"speed_prompt_tokens": 8, "speed_new_tokens": 4}))
    stages.prepare_run_dir(recipe)
    stages.train(recipe, progress=False)
    return recipe


def test_eval_reports_a_program_by_its_size_and_its_check_against_the_student(tmp_path, tiny_teacher_dir):
    recipe = _trained_run(tmp_path, tiny_teacher_dir)
    folder = recipe.run_dir / "exports" / "executorch-int8"
    folder.mkdir(parents=True)
    (folder / "model-int8.pte").write_bytes(b"\0" * 16)  # not a program: executorch, where installed, refuses it
    check = {"mean_kl": 0.0012, "top1_agreement": 0.97, "positions": 40,
             "greedy": {"same": 2, "prompts": 3, "new_tokens": 16}, "bytes": 16}
    (folder / "model-int8.pte.verify.json").write_text(json.dumps(check))
    row = stages.evaluate(recipe, progress=False)["exports"]["executorch-int8"]
    assert (row["format"], row["quant"]) == ("executorch", "int8")
    assert row["path"] == "exports/executorch-int8/model-int8.pte"
    assert row["bytes_on_disk"] == 16 and row["vs_student"] == check and "perplexity" not in row
    assert "does not run an ExecuTorch program over the held-out set" in row["quality_not_measured"]
    if HAS_EXECUTORCH:
        assert row["speed_not_measured"].startswith("ExecuTorch could not run it: ")
    else:
        assert row["speed_not_measured"] == 'executorch is not installed (pip install -e ".[executorch]")'
    table = format_table(json.loads((recipe.run_dir / "report.json").read_text()))
    assert ("executorch-int8: quality not measured on the held-out set; vs the student when exported: mean KL "
            "0.0012, top-1 0.970, greedy answers equal on 2 of 3 prompts") in table
    # a check from before the program was written again (--no-verify), and a cache too short for the speed run
    (folder / "model-int8.pte.verify.json").write_text(json.dumps({**check, "cache_positions": 10}))
    os.utime(folder / "model-int8.pte.verify.json", (1, 1))
    row = stages.evaluate(recipe, progress=False)["exports"]["executorch-int8"]
    assert "vs_student" not in row
    assert ("executorch-int8: quality not measured; no check against the student beside it (export it again)"
            in format_table(json.loads((recipe.run_dir / "report.json").read_text())))
    (folder / "model-int8.pte.verify.json").write_text(json.dumps({**check, "cache_positions": 10}))
    row = stages.evaluate(recipe, progress=False)["exports"]["executorch-int8"]
    assert row["vs_student"]["cache_positions"] == 10
    assert row["speed_not_measured"] == ("the program's KV cache holds 10 positions, fewer than "
                                         "eval.speed_prompt_tokens + eval.speed_new_tokens (8 + 4)")


@needs_executorch
@pytest.mark.slow
def test_eval_times_an_exported_program_in_executorch(tmp_path, tiny_teacher_dir):
    recipe = _trained_run(tmp_path, tiny_teacher_dir)
    assert main(["export", str(recipe.run_dir), "--format", "executorch", "--quant", "fp32"]) == 0
    report = stages.evaluate(recipe, progress=False)
    row = report["exports"]["executorch-fp32"]
    assert row["speed_runtime"] == "ExecuTorch (XNNPACK)" and "speed_not_measured" not in row
    assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0 and row["time_to_first_token_s"] > 0
    assert row["vs_student"]["mean_kl"] < KL_BOUND["fp32"]
    assert "executorch-fp32: speed in ExecuTorch (XNNPACK)" in format_table(report)
