"""Prompts from a Hugging Face Hub dataset (hf://OWNER/NAME), with datasets.load_dataset faked: never the network."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")

from distill.data.examples import read_prompts  # noqa: E402
from distill.errors import DistillError  # noqa: E402

# Like an Arrow table, every row has every column: the layouts a row does not use are None.
ROWS = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "messages": None},
    {"instruction": "Name a colour.", "input": "", "output": "Blue", "messages": None},
    {"instruction": None, "input": None, "output": None,
     "messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
]


@pytest.fixture()
def hub(monkeypatch):
    """Fake load_dataset: returns `hub.rows` as a Dataset and records each call in `hub.calls`."""
    class Hub:
        rows, calls, error = list(ROWS), [], None

    def load_dataset(name, config=None, split=None):
        Hub.calls.append((name, config, split))
        if Hub.error is not None:
            raise Hub.error
        return datasets.Dataset.from_list(Hub.rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return Hub


def test_hub_rows_become_prompts_with_references(hub):
    prompts = read_prompts("hf://tatsu-lab/alpaca")
    assert hub.calls == [("tatsu-lab/alpaca", None, "train")]
    assert [p.user_text for p in prompts] == ["Add the numbers.\n\n2 and 3", "Name a colour.", "Hi?"]
    assert [p.reference for p in prompts] == ["5", "Blue", None]
    assert prompts[2].messages == [{"role": "user", "content": "Hi?"}]  # the answer turn is dropped


def test_split_config_and_field_mapping(hub):
    hub.rows = [{"question": "What is 6 x 7?", "answer": "#### 42", "id": "q1"}]
    [prompt] = read_prompts("hf://openai/gsm8k", fields={"prompt": "question", "reference": "answer"},
                            split="test", config="main")
    assert hub.calls == [("openai/gsm8k", "main", "test")]
    assert (prompt.id, prompt.user_text, prompt.reference) == ("q1", "What is 6 x 7?", "#### 42")


def test_bad_rows_stop_with_their_row_or_are_skipped_and_counted(hub, caplog):
    hub.rows = ROWS + [{"instruction": "   ", "input": None, "output": "x", "messages": None}]
    with pytest.raises(DistillError, match=r"^hf://o/n\[train\]:row 4: empty 'instruction' \(or set data.on_error"):
        read_prompts("hf://o/n")
    with caplog.at_level(logging.WARNING):
        prompts = read_prompts("hf://o/n", on_error="skip")
    assert len(prompts) == 3
    assert "skipped 1 malformed record(s) (first: hf://o/n[train]:row 4" in caplog.text


def test_load_failure_and_missing_package_are_one_line(hub, monkeypatch):
    hub.error = ConnectionError("Couldn't reach 'o/missing' on the Hub (LocalEntryNotFoundError)\ndetails")
    with pytest.raises(DistillError) as err:
        read_prompts("hf://o/missing", split="validation")
    assert str(err.value) == ("data.prompts: could not load hf://o/missing (split 'validation'): "
                              "Couldn't reach 'o/missing' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DistillError, match=r"^data.prompts: hf:// prompts need the datasets package"):
        read_prompts("hf://o/n")


def test_recipe_with_hub_prompts_validates_and_reads_them(hub, tmp_path, tiny_teacher_dir):
    from conftest import tiny_recipe
    from distill import stages
    from distill.recipe import recipe_from_dict

    raw = tiny_recipe(tmp_path / "run", tiny_teacher_dir, Path("unused"))
    raw["data"] = {"prompts": "hf://tatsu-lab/alpaca", "prompts_split": "train[:2]", "prompts_config": "plain",
                   "max_length": 48}
    raw["generate"] = {"max_prompts": 2}
    recipe = recipe_from_dict(raw, base_dir=tmp_path)
    assert recipe.path(recipe.data.prompts) == "hf://tatsu-lab/alpaca"  # not a file under the recipe's folder
    prompts = stages.recipe_prompts(recipe)
    assert [p.user_text for p in prompts] == ["Add the numbers.\n\n2 and 3", "Name a colour."]
    assert hub.calls == [("tatsu-lab/alpaca", "plain", "train[:2]")]
    raw["data"]["train"] = "hf://o/n"  # only prompts may come from the hub
    with pytest.raises(DistillError, match=r"data.train: hf:// datasets are read only for data.prompts"):
        recipe_from_dict(raw, base_dir=tmp_path)
