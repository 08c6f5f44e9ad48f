"""Recipe schema: validation errors name the file and key path; --set overrides any key."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distill.errors import DistillError
from distill.recipe import (
    CONTAMINATION_NGRAM,
    HUB_DATASET,
    Endpoint,
    FilterSpec,
    GenerationTeacherSpec,
    JudgeSpec,
    ModelSource,
    ServedModel,
    TeacherSpec,
    apply_overrides,
    load_recipe,
)

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


def test_lora_under_deepspeed_zero_is_refused(tmp_path, minimal):
    minimal["train"] = {"parallel": "zero3", "lora": {"r": 4}}
    with pytest.raises(DistillError, match=r"train\.parallel: zero3 with train\.lora is not supported yet; use ddp"):
        load_recipe(_write(tmp_path, minimal))
    minimal["train"]["parallel"] = "fsdp"
    assert load_recipe(_write(tmp_path, minimal)).train.parallel == "fsdp"


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


def test_booleans_are_not_numbers_but_numeric_strings_are(tmp_path, minimal):
    cases = [("train.steps=true", r"train\.steps: Input should be a number, not a boolean \(true\)"),
             ("train.lr=false", r"train\.lr: Input should be a number, not a boolean \(false\)"),
             ("eval.speed_batch_sizes=[1, true]", r"eval\.speed_batch_sizes\.1: .*not a boolean"),
             ("generate.max_prompts=true", r"generate\.max_prompts: .*not a boolean"),
             ("teacher.concurrency=true", r"teacher\.concurrency: .*not a boolean"),
             ("filter.near_dedup.seed=false", r"filter\.near_dedup\.seed: .*not a boolean")]
    path = _write(tmp_path, minimal)
    for override, message in cases:
        with pytest.raises(DistillError, match=message):
            load_recipe(path, [override])
    minimal["train"] = {"steps": "3", "lr": "0.5"}  # YAML strings that are numbers still read as numbers
    recipe = load_recipe(_write(tmp_path, minimal), ["eval.lm_eval_fewshot=0"])
    assert recipe.train.steps == 3 and recipe.train.lr == 0.5 and recipe.eval.lm_eval_fewshot == 0


def test_recipe_that_is_not_a_mapping_is_named_with_or_without_set(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- teacher\n- student\n")
    for overrides in ([], ["train.lr=1"]):
        with pytest.raises(DistillError, match=r"list\.yaml: a recipe must be a mapping of sections, got list"):
            load_recipe(path, overrides)


def test_set_value_that_is_not_yaml_names_the_key():
    for override, key in (("train.lr={a: 1", "train.lr"), ("data.train=[a", "data.train"), ("seed=@", "seed")):
        with pytest.raises(DistillError, match=rf"^--set {re.escape(key)}: not valid YAML \(.+\)$"):
            apply_overrides({}, [override])
    with pytest.raises(DistillError, match=r"--set 'train\.\.lr=1': expected KEY=VALUE with a dotted key"):
        apply_overrides({}, ["train..lr=1"])


def test_unreadable_recipe_files_name_the_line(tmp_path):
    control = tmp_path / "control.yaml"
    control.write_text("output_dir: run\nseed: 1\nnote: a\x07b\n")
    with pytest.raises(DistillError, match=r"control\.yaml:3: not valid YAML \(unacceptable character"):
        load_recipe(control)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("output_dir: run\nteacher: {model: caf\u00e9}\n".encode("latin-1"))
    with pytest.raises(DistillError, match=r"latin1\.yaml:2: not UTF-8 text"):
        load_recipe(latin1)


def test_teachers_and_judges_share_the_model_and_server_settings(tmp_path, minimal):
    assert issubclass(TeacherSpec, ModelSource) and issubclass(TeacherSpec, ServedModel)
    assert issubclass(GenerationTeacherSpec, ModelSource) and issubclass(GenerationTeacherSpec, ServedModel)
    assert issubclass(JudgeSpec, Endpoint) and not issubclass(JudgeSpec, ServedModel)
    minimal["generate"] = {"teachers": [{"model": "other/teacher", "endpoint": "http://127.0.0.1:9/v1",
                                         "concurrency": 2}]}
    minimal["eval"] = {"judge": {"endpoint": "http://127.0.0.1:9/v1", "api_key_env": "JUDGE_KEY"}}
    recipe = load_recipe(_write(tmp_path, minimal))
    extra = recipe.generate.teachers[0]
    assert (extra.concurrency, extra.timeout_s, extra.max_retries, extra.dtype) == (2, 120.0, 5, "auto")
    assert (recipe.teacher.concurrency, recipe.teacher.timeout_s, recipe.teacher.max_retries) == (8, 120.0, 5)
    assert recipe.eval.judge.api_key_env == "JUDGE_KEY" and recipe.eval.judge.model is None
    minimal["generate"]["teachers"][0]["timeout_s"] = 0
    with pytest.raises(DistillError, match=r"generate\.teachers\.0\.timeout_s: Input should be greater than 0"):
        load_recipe(_write(tmp_path, minimal))
    minimal["generate"] = {}
    minimal["eval"]["judge"]["concurrency"] = 4  # the pairwise judge takes no request settings
    with pytest.raises(DistillError, match=r"eval\.judge\.concurrency: unknown key"):
        load_recipe(_write(tmp_path, minimal))


def test_filter_section_schema_lives_in_the_recipe():
    from distill.data import contamination, examples, filters

    assert not hasattr(filters, "FilterSpec")  # the filters read the section; they do not define or build it
    assert FilterSpec().contamination.n == contamination.DEFAULT_N == CONTAMINATION_NGRAM
    assert HUB_DATASET == examples.HUB_DATASET
    assert set(FilterSpec.model_fields) == {"dedup_scope", *filters.FILTER_ORDER}


def test_recipe_schema_imports_no_data_code():
    """The schema is below the code it configures: importing it loads neither distill.data nor torch."""
    code = "import sys, distill.recipe; print(' '.join(sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = result.stdout.split()
    assert "distill.recipe" in loaded
    assert not [m for m in loaded if m.startswith("distill.data") or m == "torch"]


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_a_shipped_recipe_reloads_from_the_recipe_yaml_its_run_keeps(name, tmp_path):
    """<run>/recipe.yaml (Recipe.dump: every default written out), read where the run keeps it, is the same recipe:
    its relative paths still name the same files (`distill export <run>` reads it for the imatrix's data)."""
    try:
        recipe = load_recipe(REPO / "recipes" / name)
    except DistillError as err:
        if "../shared" in str(err) or "does not exist" in str(err) or "not found" in str(err):
            pytest.skip(f"{name} names files absent here: {err}")
        raise
    kept = tmp_path / "elsewhere" / "run" / "recipe.yaml"
    kept.parent.mkdir(parents=True)
    kept.write_text(recipe.dump())
    again = load_recipe(kept)
    assert again.dump() == recipe.dump()
    assert again.run_dir == recipe.run_dir
    for key in ("prompts", "train", "eval", "pairs"):
        value = getattr(recipe.data, key)
        if value is not None:
            assert again.path(value) == recipe.path(value), key
