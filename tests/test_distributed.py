"""Training on several processes (torchrun, CPU, gloo): N processes with the global batch split across them take the
same optimizer steps as one process; rank 0 alone writes; a killed run resumes, on any number of processes."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

from conftest import logged_evals, logged_steps, tiny_recipe
from distill.models import load_model
from distill.recipe import recipe_from_dict
from distill.stages import build_preference_data, capture, prepare_run_dir, train
from distill.training.checkpoint import list_checkpoints, read_best

pytestmark = pytest.mark.slow

TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
DISTILL = shutil.which("distill") or str(Path(sys.executable).with_name("distill"))
TIMEOUT_S = 180  # a hung rank fails the test instead of the suite
NEEDS_DEEPSPEED = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (pip install 'distill[deepspeed]')")


def _zero(*values: str):
    """A test parameter under DeepSpeed ZeRO (train.parallel: zero2, zero3), skipped without deepspeed."""
    return pytest.param(*values, marks=NEEDS_DEEPSPEED)


def _torchrun(args: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N ARGS` with one thread per process, as a user launches it on a CPU machine."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [TORCHRUN, "--standalone", "--nproc_per_node", str(processes), *args]  # a free port of its own
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)


def _write(spec: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def _spec(tmp_path: Path, name: str, teacher: Path, data: Path, case: str = "kd", **train_keys) -> dict:
    """The fixture recipe with a global micro-batch of 8, 2 accumulation steps, held-out losses every 3 steps."""
    train_section = {"steps": 6, "batch_size": 8, "grad_accum": 2, "checkpoint_every": 3, "eval_every": 3,
                     "threads": 1, **train_keys}
    spec = tiny_recipe(tmp_path / name, teacher, data, train=train_section)
    if case == "kd_lora":  # adapters on an existing model (no dropout: ranks would draw different masks)
        spec["student"] = {"model": str(teacher)}
        spec["train"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}
    if case == "kd_best":  # held-out loss every step; at this rate the best (saved) step is not the last
        spec["train"].update(steps=3, eval_every=1, keep_best="eval_loss", lr=0.1)
    if case == "on_policy":  # the student answers half the micro-batches, the teacher the others (seq_kd); each rank's
        # answers end at their first "e" or at the room its longest prompt leaves: ranks generate different lengths
        kd = {k: v for k, v in spec["method"].items() if k != "divergence"}
        spec["method"] = {**kd, "kind": "on_policy", "lmbda": 0.5, "seq_kd": True,
                          "sampling": {"max_new_tokens": 8, "stop": ["e"]}}
    if case == "sft":
        spec["method"]["kind"] = "sft"
    if case == "kd_cache":
        spec["teacher"]["cache"] = str(tmp_path / "cache")
    if case == "dpo":  # pairs of the prompts' answers: the data's response (chosen) vs a wrong one (rejected)
        rows = [json.loads(line) for line in data.read_text().splitlines()]
        pairs = tmp_path / "dpo_pairs.jsonl"
        pairs.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["response"],
                                             "rejected": r["response"][::-1]}) + "\n" for r in rows))
        spec["student"] = {"model": str(teacher)}
        spec["data"] = {"pairs": str(pairs), "max_length": 48, "eval_fraction": 0.0}
        spec["method"] = {"kind": "dpo", "beta": 0.5, "chunk_size": 16}
        spec["train"]["eval_every"] = 0
    if case == "kto":  # the data's answers labelled desirable, reversed ones undesirable, alternately
        rows = [json.loads(line) for line in data.read_text().splitlines()]
        labelled = tmp_path / "kto.jsonl"
        labelled.write_text("".join(json.dumps({"prompt": r["prompt"], "label": i % 2 == 0,
                                                "completion": r["response"] if i % 2 == 0 else r["response"][::-1]})
                                    + "\n" for i, r in enumerate(rows)))
        spec["student"] = {"model": str(teacher)}
        spec["data"] = {"pairs": str(labelled), "max_length": 48, "eval_fraction": 0.0}
        spec["method"] = {"kind": "kto", "beta": 0.5, "chunk_size": 16}
        spec["train"]["eval_every"] = 0
    return spec


def _assert_same_run(one: Path, two: Path, tol: float = 1e-5, weight_tol: float = 1e-6) -> None:
    """Per-step losses, gradient norms and held-out losses within tol; the saved students within weight_tol; the
    same train.keep_best step."""
    for rows_one, rows_two in ((logged_steps(one), logged_steps(two)), (logged_evals(one), logged_evals(two))):
        assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two]
        for a, b in zip(rows_one, rows_two):
            for key in a:
                if key.startswith(("loss", "kd", "ce", "grad_norm", "eval_", "margin", "accuracy", "chosen", "rejected",
                                   "kl")):
                    assert a[key] == pytest.approx(b[key], abs=tol), (a["step"], key)
            assert a.get("tokens") == b.get("tokens")  # each rank trained its share, not the whole micro-batch
    for student in ("student", "student_last"):  # student_last/: the last step's, with train.keep_best
        if not (one / student).exists() and not (two / student).exists():
            continue
        student_one, student_two = load_model(str(one / student)), load_model(str(two / student))
        for (name, p), q in zip(student_one.state_dict().items(), student_two.state_dict().values()):
            torch.testing.assert_close(p, q, atol=weight_tol, rtol=0, msg=name)
    best_one, best_two = read_best(list_checkpoints(one / "checkpoints")[-1]), read_best(
        list_checkpoints(two / "checkpoints")[-1])
    assert (best_one is None) == (best_two is None)
    if best_one is not None:  # the same best step, its held-out value within tol
        assert best_one["step"] == best_two["step"] and best_one["value"] == pytest.approx(best_two["value"], abs=tol)


def _assert_only_adapters_trained(run_dir: Path, base_dir: Path) -> None:
    """The last checkpoint's frozen weights are the base model's as loaded; its adapters moved from their start."""
    saved = safetensors.torch.load_file(str(list_checkpoints(run_dir / "checkpoints")[-1] / "model.safetensors"))
    base = load_model(str(base_dir)).state_dict()
    adapters = [name for name in saved if ".lora_B." in name]
    assert adapters and all(saved[name].abs().max() > 0 for name in adapters)  # LoRA's B starts at zero
    for name, tensor in saved.items():
        if ".lora_" not in name:
            plain = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            torch.testing.assert_close(tensor, base[plain], atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("case, parallel", [("kd", "ddp"), ("kd_lora", "ddp"), ("sft", "ddp"), ("kd_cache", "ddp"),
                                            ("dpo", "ddp"), ("kto", "ddp"), ("kd", "fsdp"), ("kd_lora", "fsdp"),
                                            ("kd_best", "fsdp"), ("kd_cache", "fsdp"), ("dpo", "fsdp"),
                                            _zero("kd", "zero2"), _zero("kd", "zero3"), _zero("kd_best", "zero3"),
                                            _zero("dpo", "zero2"), _zero("kd_cache", "zero2")])
def test_two_processes_take_the_same_steps_as_one(tmp_path, tiny_teacher_dir, pairs_jsonl, case, parallel):
    # FSDP: the student's and the live teacher's decoder blocks are sharded across the two processes (with LoRA the
    # frozen base too); with train.keep_best every rank evaluates, rank 0 gathers the best step's student and writes it.
    spec_two = _spec(tmp_path, "two", tiny_teacher_dir, pairs_jsonl, case, parallel=parallel)
    recipe_one = recipe_from_dict(_spec(tmp_path, "one", tiny_teacher_dir, pairs_jsonl, case))
    if case == "kd_cache":
        capture(recipe_one, progress=False)  # one cache, read by both runs
    if case in ("dpo", "kto"):  # each run's pairs (labelled answers) with the reference log-probs, on one process
        build_preference_data(recipe_from_dict(spec_two), progress=False)
        build_preference_data(recipe_one, progress=False)
    prepare_run_dir(recipe_one)
    train(recipe_one, progress=False)

    done = _torchrun([DISTILL, "train", str(_write(spec_two, tmp_path / "two.yaml")), "--no-progress"])
    assert done.returncode == 0, done.stderr[-3000:]
    # At kd_best's 30x higher rate, Adam carries the float differences of the ranks' sums 30x further.
    _assert_same_run(tmp_path / "one", tmp_path / "two", weight_tol=3e-5 if case == "kd_best" else 1e-6)
    if case == "kd_best":  # the student is the best step's, not the last one's
        assert read_best(tmp_path / "two" / "checkpoints" / "step_3")["step"] < 3
    if case == "kd_lora":
        _assert_only_adapters_trained(tmp_path / "two", tiny_teacher_dir)
    # Rank 0 alone logs to the run's log.txt: one "student saved" line, not one per process.
    assert (tmp_path / "two" / "log.txt").read_text().count("student saved to") == 1


@pytest.mark.parametrize("parallel, case", [("ddp", "kd"), ("fsdp", "kd"), ("fsdp", "kd_lora"), _zero("zero2", "kd"),
                                            _zero("zero3", "kd")])
def test_a_killed_two_process_run_resumes_on_two_or_one_process(tmp_path, tiny_teacher_dir, pairs_jsonl, parallel,
                                                                case):
    # FSDP with LoRA and train.keep_best: the resumed ranks gather the best-so-far (step 3, the checkpoint's own).
    best = {"keep_best": "eval_loss"} if case == "kd_lora" else {}
    whole = recipe_from_dict(_spec(tmp_path, "whole", tiny_teacher_dir, pairs_jsonl, case, **best))
    prepare_run_dir(whole)
    train(whole, progress=False)
    for name, resumed_on in (("again2", 2), ("again1", 1))[:1 if case == "kd_lora" else 2]:
        # FSDP's checkpoints hold whole tensors, the files one process writes: one process resumes them too.
        spec = _spec(tmp_path, name, tiny_teacher_dir, pairs_jsonl, case, parallel=parallel, **best)
        path = _write(spec, tmp_path / f"{name}.yaml")
        # Killed after step 3's checkpoint (train's stop_after ends the call as a kill would, checkpoint written).
        script = tmp_path / "stop_after_3.py"
        script.write_text(textwrap.dedent(f"""
            from distill.recipe import load_recipe
            from distill.runtime import continue_alone, end_launched_process
            from distill.stages import prepare_run_dir, train
            recipe = load_recipe({str(path)!r}, [])
            prepare_run_dir(recipe)
            assert train(recipe, progress=False, stop_after=3) is None
            continue_alone()  # the ranks leave the process group together and end, as `distill train` has them do
            end_launched_process(0)
        """))
        first = _torchrun([str(script)])
        assert first.returncode == 0, first.stderr[-3000:]
        assert [r["step"] for r in logged_steps(tmp_path / name)] == [1, 2, 3]
        if resumed_on == 2:
            second = _torchrun([DISTILL, "train", str(path), "--no-progress"])
        else:  # the global batch is the recipe's, so one process continues the same steps
            second = subprocess.run([DISTILL, "train", str(path), "--no-progress"], capture_output=True, text=True,
                                    timeout=TIMEOUT_S)
        assert second.returncode == 0, second.stderr[-3000:]
        assert "resumed from" in second.stderr
        _assert_same_run(tmp_path / "whole", tmp_path / name)


def test_a_batch_that_does_not_split_across_processes_is_refused_on_every_rank(tmp_path, tiny_teacher_dir,
                                                                              pairs_jsonl):
    spec = _spec(tmp_path, "odd", tiny_teacher_dir, pairs_jsonl, batch_size=5)
    done = _torchrun([DISTILL, "train", str(_write(spec, tmp_path / "odd.yaml")), "--no-progress"])
    assert done.returncode != 0
    line = "distill: error: train.batch_size: 5 rows do not split across 2 processes; use a multiple of 2"
    # Each rank says it and exits, none waits for the other; torchrun stops the slower rank once the first exits, so
    # its line may never be printed.
    assert 1 <= done.stderr.count(line) <= 2
    assert not (tmp_path / "odd" / "checkpoints").exists() and not (tmp_path / "odd" / "student").exists()


def test_zero_without_deepspeed_is_refused_in_one_line(monkeypatch):
    from distill.errors import DistillError
    from distill.training.zero import zero_accelerator

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed now raises ImportError
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # what zero_accelerator would set, restored after the test
    with pytest.raises(DistillError, match=r"^train\.parallel: zero3 needs deepspeed, which is not installed .*; "
                                           r"pip install 'distill\[deepspeed\]' \(deepspeed==0\.19\.8\)$"):
        zero_accelerator(torch.device("cpu"), 3, micro_batch=4, grad_accum=1, max_grad_norm=1.0)


def test_on_policy_under_fsdp_samples_what_ddp_samples(tmp_path, tiny_teacher_dir, pairs_jsonl):
    # Each rank samples its own rows (one process's samples would differ); FSDP's ranks generate in step, each until
    # all ranks' answers are done, so they sample and train as DDP's ranks do.
    for parallel in ("ddp", "fsdp"):
        spec = _spec(tmp_path, parallel, tiny_teacher_dir, pairs_jsonl, "on_policy", parallel=parallel)
        done = _torchrun([DISTILL, "train", str(_write(spec, tmp_path / f"{parallel}.yaml")), "--no-progress"])
        assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_run(tmp_path / "ddp", tmp_path / "fsdp")
    rows_ddp, rows_fsdp = logged_steps(tmp_path / "ddp"), logged_steps(tmp_path / "fsdp")
    assert any("sample_length" in r for r in rows_fsdp)  # the student sampled
    assert [r.get("sample_length") for r in rows_ddp] == [r.get("sample_length") for r in rows_fsdp]


def test_distill_run_on_two_processes_trains_together_and_evaluates_once(tmp_path, tiny_teacher_dir, pairs_jsonl):
    spec = _spec(tmp_path, "run", tiny_teacher_dir, pairs_jsonl)
    spec["eval"].update({"measure_speed": False, "before_training": False, "general_text": False})
    done = _torchrun([DISTILL, "run", str(_write(spec, tmp_path / "run.yaml")), "--no-progress"])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["student"]["perplexity"] > 0
    log_text = (tmp_path / "run" / "log.txt").read_text()
    assert log_text.count("student saved to") == 1 and done.stdout.count("report: ") == 1


def test_each_process_of_a_launch_takes_its_own_gpu(monkeypatch):
    from distill.runtime import resolve_device

    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is the user's choice
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("cuda") == torch.device("cuda")
