"""On-policy distillation across tokenizers (method.kind: on_policy with method.cross_tokenizer uld or align): the
student's samples are rebuilt as examples and scored by the same cross-tokenizer path as the data's responses."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import logged_steps, tiny_recipe

from distill.cli import main
from distill.data.tokenize import IGNORE, collate
from distill.errors import DistillError
from distill.models import load_tokenizer
from distill.recipe import recipe_from_dict
from distill.signals.cross_tokenizer import CrossTokenizerTeacher
from distill.stages.cross_tokenizer import (
    ON_POLICY_SAMPLED_TOKEN,
    ON_POLICY_SEQ_KD,
    ON_POLICY_SERVED,
    ON_POLICY_TEXT,
    crossing,
)
from distill.stages.training import setup, train
from distill.training.step import loss_on_batch


def cross_recipe(run_dir: Path, teacher: Path, student: Path, data: Path, **method) -> dict:
    """The tiny recipe with an existing student on its own tokenizer, on-policy across tokenizers."""
    recipe = tiny_recipe(run_dir, teacher, data)
    recipe["student"] = {"model": str(student)}
    recipe["method"] = {"kind": "on_policy", "divergence": "forward_kl", "temperature": 2.0, "chunk_size": 16,
                        "alpha": 0.5, "cross_tokenizer": "uld", "uld_top_k": 64, "sampling": {"max_new_tokens": 6},
                        **method}
    return recipe


# ---------------------------------------------------------------- one path for samples and data


@pytest.mark.parametrize("mode", ["uld", "align"])
def test_loss_on_samples_equals_the_off_policy_loss_on_their_text(tmp_path, tiny_teacher_dir, sp_student_dir,
                                                                  pairs_jsonl, monkeypatch, mode):
    spec = cross_recipe(tmp_path / "on", tiny_teacher_dir, sp_student_dir, pairs_jsonl, cross_tokenizer=mode)
    spec["data"].update(max_length=96, eval_fraction=0.0)
    training, _ = setup(recipe_from_dict(spec), None)
    training.student.double()
    training.signal.model.double()
    sampler = training.sampler
    seen = []
    rebuild = sampler.across.rebuild

    def recorded(indices, responses, ended):
        seen.append((list(indices), list(responses), list(ended)))
        return rebuild(indices, responses, ended)

    monkeypatch.setattr(sampler.across, "rebuild", recorded)
    idx = [0, 1, 2]
    drawn = sampler.batch_for(training.student, collate([training.items[i] for i in idx], training.pad_id), 0, 0, idx)
    assert drawn.by_student and isinstance(drawn.signal, CrossTokenizerTeacher)
    (_, responses, ended), = seen
    prompts = [sampler.across.examples[i].messages[0]["content"] for i in idx]
    answers = [sampler.across.examples[i].messages[1]["content"] for i in idx]
    assert responses != answers and all(responses)  # the student's own (random) text, not the data's

    # The same texts given as data, through the off-policy path (crossing_signal's views by example index).
    data = tmp_path / "sampled.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in zip(prompts, responses)))
    kd_spec = cross_recipe(tmp_path / "kd", tiny_teacher_dir, sp_student_dir, data, kind="kd", cross_tokenizer=mode,
                           alpha=0.0)
    kd_spec["data"].update(max_length=96, eval_fraction=0.0)
    kd_spec["method"].pop("sampling")
    kd, _ = setup(recipe_from_dict(kd_spec), None)
    kd.signal.model.double()
    kd_batch = collate(kd.items[:3], kd.pad_id)
    assert drawn.batch["input_ids"].tolist() == kd_batch["input_ids"].tolist()
    for row, done in enumerate(ended):  # a sample cut at the limit does not train the end-of-turn the data has
        trained, data_trained = (b["labels"][row] != IGNORE for b in (drawn.batch, kd_batch))
        assert int(data_trained.sum()) - int(trained.sum()) == (0 if done else 1)

    on = loss_on_batch(training.student, drawn.signal, drawn.batch, training.objective.for_student_samples(),
                       indices=[0, 1, 2])
    off = loss_on_batch(training.student, kd.signal, kd_batch, kd.objective, indices=[0, 1, 2])
    assert float(off.kd) > 0 and drawn.signal.views != training.signal.views[:3]
    assert float(on.loss.detach()) == pytest.approx(float(off.loss.detach()), rel=1e-12, abs=1e-12)
    assert float(on.kd) == pytest.approx(float(off.kd), rel=1e-12, abs=1e-12)


def test_lmbda_zero_is_off_policy_cross_tokenizer_kd_exactly(tmp_path, tiny_teacher_dir, sp_student_dir, pairs_jsonl):
    kd_spec = cross_recipe(tmp_path / "kd", tiny_teacher_dir, sp_student_dir, pairs_jsonl, kind="kd")
    kd_spec["method"].pop("sampling")
    train(recipe_from_dict(kd_spec), progress=False)
    train(recipe_from_dict(cross_recipe(tmp_path / "on", tiny_teacher_dir, sp_student_dir, pairs_jsonl, lmbda=0.0)),
          progress=False)
    keys = ("loss", "kd", "ce", "grad_norm")
    kd_rows, on_rows = logged_steps(tmp_path / "kd"), logged_steps(tmp_path / "on")
    assert len(on_rows) == 6 and all(r["kd"] > 0 for r in on_rows)
    assert [[r[k] for k in keys] for r in on_rows] == [[r[k] for k in keys] for r in kd_rows]


# ---------------------------------------------------------------- training runs


@pytest.mark.parametrize("mode, temperature, lr", [("uld", 1.0, 3e-3), ("align", 0.0, 1e-2)])
def test_on_policy_across_tokenizers_trains(tmp_path, tiny_teacher_dir, sp_student_dir, pairs_jsonl, mode,
                                            temperature, lr):
    spec = cross_recipe(tmp_path / "r", tiny_teacher_dir, sp_student_dir, pairs_jsonl, divergence="reverse_kl",
                        cross_tokenizer=mode, sampling={"max_new_tokens": 6, "temperature": temperature})
    spec["train"].update(steps=10, lr=lr)
    train(recipe_from_dict(spec), progress=False)
    rows = logged_steps(tmp_path / "r")
    assert len(rows) == 10 and all(math.isfinite(r["loss"]) and r["kd"] > 0 for r in rows)
    assert all(r["loss"] == pytest.approx(r["kd"]) for r in rows)  # no CE term on the student's own samples
    assert all({"sample_length", "eos_share", "loop_share", "sample_tokens_per_s"} <= set(r) for r in rows)
    assert sum(r["kd"] for r in rows[-3:]) < sum(r["kd"] for r in rows[:3])


def test_on_policy_align_across_tokenizers_resumes_exactly(tmp_path, tiny_teacher_dir, sp_student_dir, pairs_jsonl):
    whole = recipe_from_dict(cross_recipe(tmp_path / "a", tiny_teacher_dir, sp_student_dir, pairs_jsonl,
                                          cross_tokenizer="align", lmbda=0.5))
    train(whole, progress=False)
    split = recipe_from_dict({**whole.model_dump(mode="json"), "output_dir": str(tmp_path / "b")})
    assert train(split, progress=False, stop_after=3) is None
    train(split, progress=False)
    a, b = logged_steps(tmp_path / "a"), logged_steps(tmp_path / "b")
    assert len(a) == len(b) == 6 and all(math.isfinite(r["loss"]) for r in a)
    assert any("sample_length" in r for r in a) and any("sample_length" not in r for r in a)  # lmbda mixes
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5)
        assert rb.get("sample_length") == ra.get("sample_length")


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("change, line", [
    ({"cross_tokenizer": "text"}, ON_POLICY_TEXT),
    ({"cross_tokenizer": None}, ON_POLICY_TEXT),  # text is the default across tokenizers
    ({"seq_kd": True, "lmbda": 0.5}, ON_POLICY_SEQ_KD),
    ({"estimator": "sampled_token"}, ON_POLICY_SAMPLED_TOKEN),
    ({"teacher": {"endpoint": "http://127.0.0.1:9/v1"}}, ON_POLICY_SERVED),
])
def test_on_policy_across_tokenizers_refusals(tmp_path, tiny_teacher_dir, sp_student_dir, pairs_jsonl, capsys,
                                              change, line):
    spec = cross_recipe(tmp_path / "r", tiny_teacher_dir, sp_student_dir, pairs_jsonl)
    teacher = change.pop("teacher", {})
    spec["teacher"].update(teacher)
    spec["method"] = {k: v for k, v in {**spec["method"], **change}.items() if v is not None}
    recipe = recipe_from_dict(spec)
    with pytest.raises(DistillError) as refused:
        crossing(recipe, load_tokenizer(str(tiny_teacher_dir)), load_tokenizer(str(sp_student_dir)))
    assert str(refused.value) == line and "\n" not in line
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["train", str(path), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"distill: error: {line}"]
    assert not (tmp_path / "r" / "checkpoints").exists()
