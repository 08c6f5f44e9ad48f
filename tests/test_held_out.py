"""Held-out evaluation while training (train.eval_every), the best checkpoint (train.keep_best, train.patience) and
their bad input: rows at the right steps, values equal to independent calls, best != last picked, resume, early stop."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

from distill.data.tokenize import collate, padding_id
from distill.errors import DistillError
from distill.eval.metrics import agreement, perplexity
from distill.models import load_model
from distill.recipe import recipe_from_dict
from distill.signals.teacher_signal import LiveTeacher
from distill.stages import train
from distill.stages.data import encode, recipe_examples
from distill.stages.facts import load_teacher, teacher_tokenizer
from distill.stages.training import batch_objective
from distill.training.held_out import HeldOut, evaluate_held_out
from distill.training.loop import last_logged_loss
from distill.training.step import loss_on_batch
from conftest import logged_evals, logged_steps, tiny_recipe


def _recipe(tmp_path: Path, teacher_dir: Path, data_file: Path, name: str = "r", data: dict | None = None,
            **sections):
    spec = tiny_recipe(tmp_path / name, teacher_dir, data_file, **sections)
    spec["data"].update(data or {})
    return recipe_from_dict(spec)


@pytest.mark.parametrize("train_keys,steps", [({"eval_every": 2}, [2, 4, 6]), ({}, [2, 4, 6]),
                                              ({"eval_every": 4}, [4, 6]), ({"eval_every": 0}, [])])
def test_eval_rows_at_the_right_steps(tmp_path, tiny_teacher_dir, pairs_jsonl, train_keys, steps):
    recipe = _recipe(tmp_path, tiny_teacher_dir, pairs_jsonl, train=train_keys)  # checkpoint_every 2, 6 steps
    train(recipe, progress=False)
    evals = logged_evals(recipe.run_dir)
    assert [r["step"] for r in evals] == steps
    for row in evals:
        assert row["split"] == "eval"
        assert set(row) == {"step", "split", "eval_loss", "eval_kd", "eval_ce", "eval_agreement"}
        assert 0.0 <= row["eval_agreement"] <= 1.0 and row["eval_kd"] > 0
    assert [r["step"] for r in logged_steps(recipe.run_dir)] == [1, 2, 3, 4, 5, 6]
    assert last_logged_loss(recipe.run_dir / "metrics.jsonl") == logged_steps(recipe.run_dir)[-1]["loss"]


def test_evaluating_does_not_change_training(tmp_path, tiny_teacher_dir, pairs_jsonl):
    every = _recipe(tmp_path, tiny_teacher_dir, pairs_jsonl, "every", train={"eval_every": 1})
    never = _recipe(tmp_path, tiny_teacher_dir, pairs_jsonl, "never", train={"eval_every": 0})
    train(every, progress=False)
    train(never, progress=False)
    assert len(logged_evals(every.run_dir)) == 6
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert strip(logged_steps(every.run_dir)) == strip(logged_steps(never.run_dir))


def _held_out_batch(recipe, tokenizer) -> dict:
    """Every held-out example `distill eval` measures, as one batch (the loop takes several)."""
    held_out = recipe_examples(recipe)[1]
    return collate(encode(recipe, held_out, tokenizer), padding_id(tokenizer))


def test_eval_row_equals_the_loss_and_distill_evals_metrics_on_the_same_examples(tmp_path, tiny_teacher_dir,
                                                                                   pairs_jsonl):
    recipe = _recipe(tmp_path, tiny_teacher_dir, pairs_jsonl, method={"temperature": 1.0},
                     train={"eval_every": 6})
    train(recipe, progress=False)
    (row,) = logged_evals(recipe.run_dir)
    tokenizer = teacher_tokenizer(recipe)
    student = load_model(str(recipe.run_dir / "student")).eval()
    teacher = load_teacher(recipe)
    batch = _held_out_batch(recipe, tokenizer)
    with torch.no_grad():
        out = loss_on_batch(student, LiveTeacher(teacher), batch, batch_objective(recipe.method), count_agreement=True)
    assert row["eval_loss"] == pytest.approx(float(out.loss), rel=1e-5)
    assert row["eval_kd"] == pytest.approx(float(out.kd), rel=1e-5)
    assert row["eval_ce"] == pytest.approx(float(out.ce), rel=1e-5)
    assert row["eval_agreement"] == pytest.approx(out.top1_matches / out.n_tokens)
    # `distill eval`'s measures on the same examples: NLL = CE, KL(teacher || student) = KD at T = 1, agreement.
    vocab = min(student.config.vocab_size, teacher.config.vocab_size)
    assert row["eval_ce"] == pytest.approx(perplexity(student, [batch])["nll"], rel=1e-5)
    measured = agreement(student, teacher, [batch], vocab)
    assert row["eval_kd"] == pytest.approx(measured["kl_to_teacher"], rel=1e-4)
    assert row["eval_agreement"] == pytest.approx(measured["top1_agreement"])


def test_evaluation_restores_train_mode_and_leaves_no_gradient(tmp_path, tiny_teacher_dir, pairs_jsonl):
    recipe = _recipe(tmp_path, tiny_teacher_dir, pairs_jsonl)
    tokenizer = teacher_tokenizer(recipe)
    student, teacher = load_model(str(tiny_teacher_dir)), load_teacher(recipe)
    student.train()
    batch = _held_out_batch(recipe, tokenizer)
    objective = batch_objective(recipe.method)
    live = evaluate_held_out(student, HeldOut([batch], LiveTeacher(teacher)), objective, torch.float32,
                             torch.device("cpu"))
    assert student.training and all(p.grad is None for p in student.parameters())
    assert set(live) == {"eval_loss", "eval_kd", "eval_ce", "eval_agreement"}
    # No teacher rows for held-out examples (a teacher cache): cross-entropy alone, the same value.
    labels_only = evaluate_held_out(student, HeldOut([batch], None), objective, torch.float32, torch.device("cpu"))
    assert labels_only == {"eval_ce": pytest.approx(live["eval_ce"], rel=1e-6)}


def _yes_no_data(tmp_path: Path) -> tuple[Path, Path]:
    """Training answers 'yes', held-out answers 'no' to the same questions: fitting the first hurts the second."""
    train_file, eval_file = tmp_path / "yes.jsonl", tmp_path / "no.jsonl"
    rows = lambda answer, n: "".join(json.dumps({"prompt": f"Question {i}: is {i} even?",  # noqa: E731
                                                 "response": f"{answer} {answer} {answer}."}) + "\n" for i in range(n))
    train_file.write_text(rows("yes", 24))
    eval_file.write_text(rows("no", 6))
    return train_file, eval_file


BEST = {"eval_every": 1, "keep_best": "eval_ce", "steps": 10, "lr": 1e-2, "schedule": "constant", "warmup_steps": 0,
        "checkpoint_every": 4}


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(directory / "model.safetensors"))


def _held_out_ce(recipe, model_dir: Path) -> float:
    tokenizer = teacher_tokenizer(recipe)
    with torch.no_grad():
        return float(perplexity(load_model(str(model_dir)), [_held_out_batch(recipe, tokenizer)])["nll"])


def test_keep_best_saves_the_best_step_not_the_last(tmp_path, tiny_teacher_dir):
    train_file, eval_file = _yes_no_data(tmp_path)
    recipe = _recipe(tmp_path, tiny_teacher_dir, train_file, data={"eval": str(eval_file)}, train=BEST)
    result = train(recipe, progress=False)
    evals = logged_evals(recipe.run_dir)
    ce = {r["step"]: r["eval_ce"] for r in evals}
    best = min(ce, key=ce.get)
    assert best < 10 and ce[10] > ce[best] + 1e-3  # the construction: the best step is not the last
    assert result.steps == 10
    assert _held_out_ce(recipe, recipe.run_dir / "student") == pytest.approx(ce[best], rel=1e-5)
    assert _held_out_ce(recipe, recipe.run_dir / "student_last") == pytest.approx(ce[10], rel=1e-5)
    last_checkpoint = recipe.run_dir / "checkpoints" / "step_10"
    assert json.loads((last_checkpoint / "best.json").read_text())["step"] == best

    # Killed after the best step and resumed: the best-so-far comes back from the checkpoint.
    resumed = _recipe(tmp_path, tiny_teacher_dir, train_file, "resumed", data={"eval": str(eval_file)}, train=BEST)
    assert train(resumed, progress=False, stop_after=best + 1) is None
    train(resumed, progress=False)
    for name in ("student", "student_last"):
        a, b = _weights(recipe.run_dir / name), _weights(resumed.run_dir / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_patience_stops_early_and_a_rerun_keeps_the_result(tmp_path, tiny_teacher_dir):
    train_file, eval_file = _yes_no_data(tmp_path)
    recipe = _recipe(tmp_path, tiny_teacher_dir, train_file, data={"eval": str(eval_file)},
                     train={**BEST, "patience": 2})
    result = train(recipe, progress=False)
    evals = logged_evals(recipe.run_dir)
    ce = {r["step"]: r["eval_ce"] for r in evals}
    best = min(ce, key=ce.get)
    assert result.steps == best + 2 < 10  # two evaluations without a better eval_ce
    assert [r["step"] for r in logged_steps(recipe.run_dir)] == list(range(1, best + 3))
    assert _held_out_ce(recipe, recipe.run_dir / "student") == pytest.approx(ce[best], rel=1e-5)
    saved = (recipe.run_dir / "student" / "model.safetensors").stat().st_mtime_ns
    again = train(recipe, progress=False)  # finished: neither trains on nor re-saves
    assert again.steps == best + 2
    assert (recipe.run_dir / "student" / "model.safetensors").stat().st_mtime_ns == saved
    assert len(logged_evals(recipe.run_dir)) == len(evals)


def test_bad_input_is_refused_before_any_model_loads(tmp_path, pairs_jsonl):
    missing = tmp_path / "no_such_teacher"  # loading it would fail with another message
    cases = [
        ({"data": {"eval_fraction": 0.0}, "train": {"eval_every": 2}}, r"train\.eval_every: .*no held-out"),
        ({"data": {"eval_fraction": 0.0}, "train": {"keep_best": "eval_loss"}}, r"train\.keep_best: .*no held-out"),
        ({"method": {"kind": "sft"}, "train": {"keep_best": "eval_agreement"}}, r"train\.keep_best: eval_agreement"),
        ({"teacher": {"cache": str(tmp_path / "cache")}, "train": {"keep_best": "eval_kd"}},
         r"train\.keep_best: eval_kd .*teacher\.cache"),
    ]
    for sections, match in cases:
        with pytest.raises(DistillError, match=match):
            train(_recipe(tmp_path, missing, pairs_jsonl, **sections), progress=False)
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")  # too few examples to hold one out
    with pytest.raises(DistillError, match=r"train\.eval_every: .*no held-out"):
        train(_recipe(tmp_path, missing, one, train={"eval_every": 1}), progress=False)


@pytest.mark.parametrize("train_keys,says", [({"keep_best": "eval_best"}, "train.keep_best"),
                                             ({"eval_every": 2}, "train.eval_every")])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, tiny_teacher_dir, pairs_jsonl, train_keys, says):
    recipe = tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl, train=train_keys)
    recipe["data"]["eval_fraction"] = 0.0
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = subprocess.run([sys.executable, "-m", "distill.cli", "train", str(path), "--no-progress"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_keep_best_with_lora_saves_plain_models(tmp_path, tiny_teacher_dir, tiny_student_dir, pairs_jsonl):
    from transformers import AutoModelForCausalLM

    recipe = _recipe(tmp_path, tiny_teacher_dir, pairs_jsonl, student={"model": str(tiny_student_dir), "config": None},
                     train={"lora": {"r": 4, "alpha": 8}, "steps": 3, "eval_every": 1, "keep_best": "eval_loss"})
    train(recipe, progress=False)
    loss = {r["step"]: r["eval_loss"] for r in logged_evals(recipe.run_dir)}
    assert list(loss) == [1, 2, 3]
    for name in ("student", "student_last"):
        saved = AutoModelForCausalLM.from_pretrained(recipe.run_dir / name)
        assert not any("lora" in n for n, _ in saved.named_parameters())
