"""A model directory's own Python code never runs unless the recipe sets trust_remote_code."""
from __future__ import annotations

import json
import shutil

from distill.models import load_model
from distill.recipe import recipe_from_dict
from conftest import tiny_recipe


def test_model_code_shipped_in_a_directory_is_not_run(tmp_path, tiny_teacher_dir, pairs_jsonl):
    model_dir = shutil.copytree(tiny_teacher_dir, tmp_path / "model")
    marker = tmp_path / "code_ran"
    (model_dir / "modeling_custom.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaForCausalLM\n\n\nclass CustomForCausalLM(LlamaForCausalLM):\n    pass\n")
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (model_dir / "config.json").write_text(json.dumps(config))

    recipe = recipe_from_dict(tiny_recipe(tmp_path / "run", model_dir, pairs_jsonl))
    assert recipe.teacher.trust_remote_code is False  # off unless the recipe turns it on
    model = load_model(str(model_dir), trust_remote_code=recipe.teacher.trust_remote_code)
    assert type(model).__name__ == "LlamaForCausalLM"  # the library's own class, not the directory's
    assert not marker.exists()
