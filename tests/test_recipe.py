"""Recipe schema: validation errors name the file and key path; --set overrides any key."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from distill.errors import DistillError
from distill.recipe import apply_overrides, load_recipe

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture()
def minimal(tmp_path, pairs_jsonl) -> dict:
    return {
        "output_dir": str(tmp_path / "run"),
        "teacher": {"model": "some/teacher"},
        "student": {"config": {"num_layers": 1, "hidden_size": 32, "num_heads": 2}},
        "data": {"train": str(pairs_jsonl)},
    }


def test_minimal_recipe_gets_defaults(tmp_path, minimal):
    recipe = load_recipe(_write(tmp_path, minimal))
    assert recipe.method.divergence == "forward_kl"
    assert recipe.train.steps == 200 and recipe.train.lora is None
    assert recipe.run_dir == tmp_path / "run"


def test_unknown_key_names_file_and_path(tmp_path, minimal):
    minimal["train"] = {"learning_rate": 0.1}
    path = _write(tmp_path, minimal)
    with pytest.raises(DistillError, match=r"recipe\.yaml: train\.learning_rate: unknown key"):
        load_recipe(path)


def test_wrong_type_names_key(tmp_path, minimal):
    minimal["train"] = {"steps": "many"}
    with pytest.raises(DistillError, match=r"train\.steps: .*integer"):
        load_recipe(_write(tmp_path, minimal))


def test_bad_enum_and_range(tmp_path, minimal):
    minimal["method"] = {"divergence": "kl"}
    with pytest.raises(DistillError, match=r"method\.divergence"):
        load_recipe(_write(tmp_path, minimal))
    minimal["method"] = {"alpha": 1.5}
    with pytest.raises(DistillError, match=r"method\.alpha"):
        load_recipe(_write(tmp_path, minimal))


def test_missing_section_and_student_source(tmp_path, minimal):
    del minimal["teacher"]
    with pytest.raises(DistillError, match=r"teacher: missing required key"):
        load_recipe(_write(tmp_path, minimal))


def test_student_needs_exactly_one_source(tmp_path, minimal):
    minimal["student"]["model"] = "x/y"
    with pytest.raises(DistillError, match=r"student: .*exactly one of student\.model, .*\(got model, config\)"):
        load_recipe(_write(tmp_path, minimal))


def test_from_teacher_takes_layers_or_keep_layers(tmp_path, minimal):
    minimal["student"] = {"from_teacher": {"layers": 2, "keep_layers": [0, 1]}}
    with pytest.raises(DistillError, match=r"student\.from_teacher: .*layers or keep_layers, not both"):
        load_recipe(_write(tmp_path, minimal))
    minimal["student"] = {"from_teacher": {"keep_layers": [0, 0]}}
    with pytest.raises(DistillError, match=r"listed twice"):
        load_recipe(_write(tmp_path, minimal))
    minimal["student"] = {"from_teacher": {"layers": 2, "hidden_size": 32}}
    spec = load_recipe(_write(tmp_path, minimal)).student
    assert spec.from_teacher.layers == 2 and spec.from_teacher.calibration.samples == 64
    assert spec.built_from_teacher


def test_hidden_state_spec(tmp_path, minimal):
    minimal["method"] = {"hidden": {"loss": "cosine", "layer_map": [[0, 1], [1, 3]]}}
    hidden = load_recipe(_write(tmp_path, minimal)).method.hidden
    assert hidden.layer_map == [(0, 1), (1, 3)] and hidden.weight == 1.0
    minimal["method"] = {"hidden": {"loss": "l1"}}
    with pytest.raises(DistillError, match=r"method\.hidden\.loss"):
        load_recipe(_write(tmp_path, minimal))


def test_missing_data_file_is_named(tmp_path, minimal):
    minimal["data"]["train"] = str(tmp_path / "nope.jsonl")
    with pytest.raises(DistillError, match=r"data\.train: file not found: .*nope\.jsonl"):
        load_recipe(_write(tmp_path, minimal))


def test_invalid_yaml_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("teacher:\n  model: a\n student: [\n")
    with pytest.raises(DistillError, match=r"bad\.yaml:\d+: not valid YAML"):
        load_recipe(path)


def test_set_overrides_parse_types(tmp_path, minimal):
    recipe = load_recipe(
        _write(tmp_path, minimal),
        ["train.lr=1e-4", "train.steps=7", "train.lora.r=4", "method.divergence=jsd", "data.text_files=[]"],
    )
    assert recipe.train.lr == pytest.approx(1e-4) and isinstance(recipe.train.lr, float)
    assert recipe.train.steps == 7
    assert recipe.train.lora.r == 4
    assert recipe.method.divergence == "jsd"


def test_set_unknown_key_is_reported(tmp_path, minimal):
    with pytest.raises(DistillError, match=r"train\.lrr: unknown key"):
        load_recipe(_write(tmp_path, minimal), ["train.lrr=1"])
    with pytest.raises(DistillError, match="KEY=VALUE"):
        apply_overrides({}, ["train.lr"])


def test_relative_paths_resolve_against_recipe_dir(tmp_path, pairs_jsonl):
    sub = tmp_path / "recipes"
    sub.mkdir()
    (tmp_path / "data.jsonl").write_text(pairs_jsonl.read_text())
    recipe = {
        "output_dir": "../runs/x",
        "teacher": {"model": "a/b"},
        "student": {"model": "c/d"},
        "data": {"train": "../data.jsonl"},
    }
    loaded = load_recipe(_write(sub, recipe))
    assert loaded.path(loaded.data.train).resolve() == (tmp_path / "data.jsonl").resolve()
    assert loaded.run_dir.resolve() == (tmp_path / "runs" / "x").resolve()


def test_shipped_recipes_validate():
    shared = (REPO.parent / "shared").is_dir()
    for path in (REPO / "recipes").glob("*.yaml"):
        if "../shared/" in path.read_text() and not shared:
            continue  # an example over the development machine's ../shared data (test_gsm8k_recipe_without_shared)
        recipe = load_recipe(path)
        assert recipe.output_dir


def test_gsm8k_recipe_without_shared_names_the_missing_file(tmp_path):
    import shutil

    copy = tmp_path / "recipes" / "gsm8k_rejection.yaml"
    copy.parent.mkdir()
    shutil.copy(REPO / "recipes" / "gsm8k_rejection.yaml", copy)
    with pytest.raises(DistillError, match=r"data.prompts: file not found: .*gsm8k/train.jsonl"):
        load_recipe(copy)
