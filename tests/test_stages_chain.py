"""Training stages in one recipe (`stages:`): merged and validated per stage, chained students, the run directory's
per-stage layout, exact resume mid-second-stage, bad stage lists refused at the command line, eval/report columns."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import STORIES260K, require_shared, tiny_recipe

from distill.cli import main
from distill.data.teacher_records import latest_records
from distill.errors import DistillError
from distill.models import load_model
from distill.recipe import recipe_from_dict
from distill.report.html import curve_series, write_report
from distill.report.compare import load_run
from distill.report.table import format_table
from distill.stages import build_pairs, generate, prepare_run_dir, stage_recipes, train, train_stages
from distill.stages.pairs import weights_fingerprint

# ---------------------------------------------------------------- the recipe


def base(tmp_path: Path, data: Path, **extra) -> dict:
    return {"output_dir": str(tmp_path / "run"), "teacher": {"model": "t"}, "student": {"preset": "tiny"},
            "data": {"train": str(data)}, "method": {"kind": "kd", "alpha": 0.3}, "train": {"steps": 10, "lr": 1e-3},
            **extra}


def test_each_stage_is_the_recipe_with_its_sections_merged_in(tmp_path, pairs_jsonl):
    recipe = recipe_from_dict(base(tmp_path, pairs_jsonl, stages=[
        {"name": "kd", "train": {"steps": 3}},
        {"name": "dpo", "method": {"kind": "dpo"}, "data": {"pairs": str(pairs_jsonl)}, "pairs": {"batch_size": 2}},
    ]))
    kd, dpo = stage_recipes(recipe)
    assert (kd.stage, kd.final_stage, kd.own_data, dpo.stage, dpo.final_stage, dpo.own_data) == \
        ("kd", False, False, "dpo", True, True)
    assert (kd.train.steps, kd.train.lr, kd.method.alpha, kd.student.preset) == (3, 1e-3, 0.3, "tiny")
    # dpo's beta default (0.1, not kd's 0.5): the stage's method is validated as written, not over kd's defaults
    assert (dpo.train.steps, dpo.method.kind, dpo.method.beta, dpo.method.alpha) == (10, "dpo", 0.1, 0.3)
    assert (dpo.data.train, dpo.data.pairs, dpo.pairs.batch_size) == (str(pairs_jsonl), str(pairs_jsonl), 2)
    assert dpo.student.model == str((tmp_path / "run" / "stages" / "kd" / "student").resolve())
    assert "stage" not in yaml.safe_load(kd.dump()) and "stages" not in yaml.safe_load(kd.dump())


def test_a_recipe_without_stages_is_its_own_only_stage_and_dumps_as_before(tmp_path, pairs_jsonl):
    recipe = recipe_from_dict(base(tmp_path, pairs_jsonl))
    assert stage_recipes(recipe) == [recipe]
    assert "stages" not in yaml.safe_load(recipe.dump())


@pytest.mark.parametrize("stages, message", [
    ([], "stages: Value error, an empty list"),
    ([{"name": "a"}, {"name": "a"}], "the stage name 'a' is used twice"),
    ([{"name": "kd"}, {"name": "x", "method": {"kind": "orpo"}}],
     "stages[1].method.kind: Input should be 'kd', 'on_policy', 'sft', 'dpo' or 'kto'"),
    ([{"name": "kd", "train": {"stepz": 3}}], "stages[0].train.stepz: unknown key"),
    ([{"name": "kd", "teacher": {"model": "x"}}], "stages[0].teacher: unknown key"),
    ([{"name": "../up"}], "stages[0].name: String should match pattern"),
    ([{"name": "kd", "data": {"eval": "/no/such/file.jsonl"}}], "stages[0].data.eval: file not found"),
])
def test_a_bad_stage_list_names_the_stage_and_key(tmp_path, pairs_jsonl, stages, message):
    with pytest.raises(DistillError, match=None) as err:
        recipe_from_dict(base(tmp_path, pairs_jsonl, stages=stages))
    assert message in str(err.value) and len(str(err.value).splitlines()) == 1


# ---------------------------------------------------------------- bad input at the command line


def run_cli(tmp_path: Path, raw: dict, command: str, capsys) -> tuple[int, str]:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = main([command, str(path), "--no-progress"])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("command", ["run", "train"])
@pytest.mark.parametrize("stages, message", [
    ([], "stages: Value error, an empty list"),
    ([{"name": "kd"}, {"name": "kd", "method": {"kind": "sft"}}], "the stage name 'kd' is used twice"),
    ([{"name": "kd"}, {"name": "x", "method": {"kind": "orpo"}}], "stages[1].method.kind: Input should be"),
    ([{"name": "kd"}, {"name": "dpo", "method": {"kind": "dpo"}}],
     "stages[1] (dpo): method.kind: dpo needs preference pairs"),
    ([{"name": "kd"}, {"name": "dpo", "method": {"kind": "dpo"}, "pairs": {"source": "teacher_vs_student"}}],
     "stages[1] (dpo): pairs.source: teacher_vs_student needs data.prompts"),
])
def test_bad_stage_lists_are_one_line_and_exit_2_before_writing(tmp_path, tiny_teacher_dir, pairs_jsonl, capsys,
                                                                  command, stages, message):
    raw = tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl)
    raw["stages"] = stages
    code, err = run_cli(tmp_path, raw, command, capsys)
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_the_pairs_command_points_a_stages_recipe_to_train(tmp_path, tiny_teacher_dir, pairs_jsonl, capsys):
    raw = tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl)
    raw["stages"] = [{"name": "kd"}]
    code, err = run_cli(tmp_path, raw, "pairs", capsys)
    assert code == 2 and "run `distill train` or `distill run`" in err and not (tmp_path / "run").exists()


# ---------------------------------------------------------------- two stages on a tiny model, eval and report


def two_stage_recipe(tmp_path: Path, teacher_dir: Path, data: Path) -> dict:
    raw = tiny_recipe(tmp_path / "run", teacher_dir, data, train={"steps": 4, "checkpoint_every": 2})
    raw["stages"] = [{"name": "sft", "method": {"kind": "sft"}, "train": {"steps": 3}},
                     {"name": "kd", "train": {"lr": 1e-3}}]
    raw["eval"].update(measure_speed=False, general_text=False)
    return raw


def test_stages_train_in_order_each_in_its_directory_and_eval_compares_them(tmp_path, tiny_teacher_dir,
                                                                             pairs_jsonl, capsys):
    code, _ = run_cli(tmp_path, two_stage_recipe(tmp_path, tiny_teacher_dir, pairs_jsonl), "run", capsys)
    assert code == 0
    run = tmp_path / "run"
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    for name, steps in (("sft", 3), ("kd", 4)):
        rows = [json.loads(line) for line in (run / "stages" / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if r.get("split") != "eval"] == list(range(1, steps + 1))
        assert (run / "stages" / name / "checkpoints" / f"step_{steps}").is_dir()
    first = {name: json.loads((run / "stages" / name / "metrics.jsonl").read_text().splitlines()[0])
             for name in ("sft", "kd")}
    assert first["sft"]["kd"] == 0.0 and first["kd"]["kd"] > 0  # each stage trained with its own method
    assert (run / "stages" / "sft" / "student" / "config.json").is_file() and (run / "student" / "config.json").is_file()
    assert not (run / "stages" / "kd" / "student").exists()  # the final stage's student is the run's
    # the second stage started from the first's student, not from the built one
    sft = load_model(str(run / "stages" / "sft" / "student"), dtype=torch.float32)
    init = load_model(str(run / "student_init"), dtype=torch.float32)
    assert weights_fingerprint(sft) != weights_fingerprint(init)

    report = json.loads((run / "report.json").read_text())
    assert report["final_stage"] == "kd" and set(report["stages"]) == {"sft"}
    assert report["stages"]["sft"]["perplexity"] > 0 and report["stages"]["sft"]["perplexity"] != \
        report["student"]["perplexity"]
    table = format_table(report)
    header = next(line for line in table.splitlines() if line.startswith("metric"))
    assert header.split()[-3:] == ["training", "after", "sft"] and "student (after kd)" in header
    html = (run / "report.html").read_text()
    assert "after sft" in html and "sft (sft, 3 steps) → kd (kd, 4 steps)" in html
    series = curve_series(load_run(run).metrics)
    assert {"sft", "kd"} <= set(series["loss"])
    sft_steps = [s for s, _ in series["loss"]["sft"]]
    kd_steps = [s for s, _ in series["loss"]["kd"]]
    assert sft_steps == [1, 2, 3] and kd_steps == [4, 5, 6, 7]  # the curves go on from stage to stage

    # re-running trains nothing again: each stage's student is already there
    stamps = {p: p.stat().st_mtime for p in (run / "stages" / "sft" / "student", run / "student")}
    assert train_stages(recipe_from_dict(two_stage_recipe(tmp_path, tiny_teacher_dir, pairs_jsonl)),
                        progress=False).steps == 4
    assert all(p.stat().st_mtime == t for p, t in stamps.items())


def test_a_changed_stage_list_refuses_the_old_run_directory(tmp_path, tiny_teacher_dir, pairs_jsonl):
    raw = two_stage_recipe(tmp_path, tiny_teacher_dir, pairs_jsonl)
    recipe = recipe_from_dict(raw)
    prepare_run_dir(recipe)
    train_stages(recipe, progress=False, stop_after=1)
    raw["stages"][0]["train"]["steps"] = 2
    with pytest.raises(DistillError, match="stages differs"):
        prepare_run_dir(recipe_from_dict(raw))
    prepare_run_dir(recipe_from_dict(raw), restart=True)
    assert not (tmp_path / "run" / "stages" / "sft" / "checkpoints").exists()


# ---------------------------------------------------------------- kd then dpo on a real tiny model: exact resume


def kd_then_dpo(tmp_path: Path, out: str) -> dict:
    model_dir = require_shared(STORIES260K)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about {w}."}) + "\n" for w in (
        "the sea", "the sky", "a fox", "a robot", "Paris", "fruit", "a poem", "the moon", "a cat", "rain")))
    raw = tiny_recipe(tmp_path / out, model_dir, prompts)
    raw["student"] = {"model": str(model_dir)}
    raw["data"] = {"prompts": str(prompts), "max_length": 64, "eval_fraction": 0.2}
    raw["generate"] = {"max_new_tokens": 8, "batch_size": 4, "temperature": 1.0}  # sampled: unlike greedy
    raw["train"].update(steps=4, batch_size=2, checkpoint_every=2)
    raw["stages"] = [
        {"name": "kd", "train": {"steps": 3}},
        {"name": "dpo", "method": {"kind": "dpo", "beta": 0.5, "sft_weight": 0.1}, "train": {"lr": 1e-2},
         "pairs": {"source": "teacher_vs_student", "max_new_tokens": 8, "batch_size": 2}},
    ]
    return raw


def stage_losses(run: Path, name: str) -> list[float]:
    rows = [json.loads(line) for line in (run / "stages" / name / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("split") != "eval"]


def test_kd_then_dpo_killed_mid_second_stage_resumes_to_the_uninterrupted_result(tmp_path):
    whole = recipe_from_dict(kd_then_dpo(tmp_path, "whole"))
    generate(whole, progress=False)
    assert train_stages(whole, progress=False).steps == 4
    run = whole.run_dir
    pairs = latest_records(run / "stages" / "dpo" / "pairs")
    kd_student = load_model(str(run / "stages" / "kd" / "student"), dtype=torch.float32)
    # the dpo stage's pairs come from the kd stage's student: it wrote the rejected answers and is the reference
    assert pairs and {r["reference"] for r in pairs.values()} == {weights_fingerprint(kd_student)}
    assert not (run / "pairs").exists() and len(stage_losses(run, "dpo")) == 4

    killed = recipe_from_dict(kd_then_dpo(tmp_path, "killed"))
    prepare_run_dir(killed)
    generate(killed, progress=False)
    kd, dpo = stage_recipes(killed)
    assert train(kd, progress=False) is not None  # the first stage finished
    build_pairs(dpo, progress=False, stop_after=1)  # killed while building the second stage's pairs
    assert train_stages(killed, progress=False, stop_after=2) is None  # then killed mid-way through its training
    assert len(stage_losses(killed.run_dir, "dpo")) == 2
    prepare_run_dir(killed)  # a re-run checks the run directory's recipe against the stages' checkpoints
    train_stages(killed, progress=False)
    assert stage_losses(killed.run_dir, "kd") == stage_losses(run, "kd")
    assert stage_losses(killed.run_dir, "dpo") == pytest.approx(stage_losses(run, "dpo"), rel=1e-6)
    resumed_pairs = latest_records(killed.run_dir / "stages" / "dpo" / "pairs")
    assert {k: r["rejected"] for k, r in resumed_pairs.items()} == {k: r["rejected"] for k, r in pairs.items()}
    a = load_model(str(run / "student"), dtype=torch.float32).state_dict()
    b = load_model(str(killed.run_dir / "student"), dtype=torch.float32).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    write_report(killed.run_dir)  # no report.json yet: the curves still draw a line per stage
    assert {"kd", "dpo"} <= set(curve_series(load_run(killed.run_dir).metrics)["loss"])
