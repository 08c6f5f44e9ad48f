"""Several scoring teachers routed by tag (method.teachers): the routed loss is each teacher's loss on its own rows,
one teacher's rows alone are its run exactly, runs resume exactly, and what cannot route is refused in one line."""
import json
import math

import pytest
import torch
import yaml
from conftest import logged_evals, logged_steps, tiny_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.cli import main
from distill.losses.objective import LossSettings
from distill.recipe import recipe_from_dict
from distill.signals.routed import RoutedScores, RoutedTeacher
from distill.signals.teacher_signal import LiveTeacher, ServedTeacher
from distill.stages import train
from distill.teachers.local import LocalBackend
from distill.training.step import BatchObjective, loss_on_batch

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "tvd"]


@pytest.fixture(scope="module")
def second_teacher_dir(tmp_path_factory, tiny_teacher_dir):
    """The fixture teacher with perturbed weights: another teacher on the same tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator))
    out = tmp_path_factory.mktemp("teacher_b")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_teacher_dir).save_pretrained(out)
    return out


def _float64(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()


def _batch(seed=0):
    """Four rows with prompts, answers and right padding (two rows shorter than the others)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (4, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:], mask[3, 5:] = 0, 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _rows(batch, rows):
    return {k: v[rows] for k, v in batch.items()}


def _grads(student, out):
    student.zero_grad(set_to_none=True)
    out.loss.backward()
    return [p.grad.clone() for p in student.parameters()]


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("on_samples", [False, True])
def test_routed_loss_is_each_teachers_loss_on_its_own_rows(tiny_teacher_dir, second_teacher_dir, divergence,
                                                           on_samples):
    """Float64: rows 0, 3 -> teacher B, rows 1, 2 -> teacher A; the routed loss and gradient equal the two
    single-teacher losses on the hand-split batch, weighted by their trained tokens."""
    a, b = LiveTeacher(_float64(tiny_teacher_dir)), LiveTeacher(_float64(second_teacher_dir))
    student = _float64(tiny_teacher_dir).train()
    torch.manual_seed(5)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    objective = BatchObjective(LossSettings(divergence=divergence, temperature=1.5, alpha=0.3, chunk_size=7),
                               kd=True)
    objective = objective.for_student_samples() if on_samples else objective
    batch, routed = _batch(), RoutedTeacher([b, a], route=[1, 0, 1, 1, 0])  # examples 1 and 4 are B's, 0 and 2 A's
    indices = [4, 0, 2, 1]  # the batch's rows are these examples: rows 0, 3 -> B; rows 1, 2 -> A

    out = loss_on_batch(student, routed, batch, objective, indices=indices)
    grads = _grads(student, out)
    alone_b = loss_on_batch(student, b, _rows(batch, [0, 3]), objective)
    grads_b = _grads(student, alone_b)
    alone_a = loss_on_batch(student, a, _rows(batch, [1, 2]), objective)
    grads_a = _grads(student, alone_a)

    n = alone_a.n_tokens + alone_b.n_tokens
    share_a, share_b = alone_a.n_tokens / n, alone_b.n_tokens / n
    assert out.n_tokens == n == int((batch["labels"][:, 1:] != -100).sum())
    for key in ("loss", "kd", "ce"):
        want = share_a * float(getattr(alone_a, key).detach()) + share_b * float(getattr(alone_b, key).detach())
        assert float(getattr(out, key)) == pytest.approx(want, rel=1e-10, abs=1e-12)
    # Gradients to 1e-7: a batch split by hand differs by that much even with one teacher (the student's float64
    # forward on other batch shapes), far below what a row scored by the wrong teacher moves.
    for got, ga, gb in zip(grads, grads_a, grads_b):
        torch.testing.assert_close(got, share_a * ga + share_b * gb, rtol=1e-6, atol=1e-7)
    # the teachers differ, so routing matters
    assert float(loss_on_batch(student, a, batch, objective).loss) != pytest.approx(float(out.loss), rel=1e-6)


def test_routed_sampled_token_estimate_takes_each_rows_teacher(tiny_teacher_dir, second_teacher_dir):
    a, b = LiveTeacher(_float64(tiny_teacher_dir)), LiveTeacher(_float64(second_teacher_dir))
    batch = _batch(1)
    signal, _ = RoutedTeacher([b, a], route=[1, 0, 0, 1]).for_batch(batch, [0, 1, 2, 3])
    assert isinstance(signal, RoutedScores)
    labels = batch["labels"][:, 1:].reshape(-1)
    got = signal.token_log_probs(labels, chunk_size=5).reshape(4, -1)
    for rows, teacher in (([0, 3], a), ([1, 2], b)):
        sub = _rows(batch, rows)
        want, _ = teacher.for_batch(sub)
        want = want.token_log_probs(sub["labels"][:, 1:].reshape(-1), 5).reshape(2, -1)
        torch.testing.assert_close(got[rows], want.float())


def test_a_served_and_a_local_teacher_route_in_one_batch(tiny_teacher_dir, second_teacher_dir):
    """A served part (sparse top-k) and a live part (dense) in one batch: each part's loss, token-weighted."""
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    local = LiveTeacher(AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval())
    served = ServedTeacher(LocalBackend(AutoModelForCausalLM.from_pretrained(second_teacher_dir).eval(), tok,
                                        name="b", batch_size=4), k=8, vocab_size=len(tok))
    student = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    objective = BatchObjective(LossSettings(divergence="reverse_kl", alpha=0.0, chunk_size=6), kd=True)
    batch = _batch(2)
    out = loss_on_batch(student, RoutedTeacher([served, local], route=[0, 1, 0, 1]), batch, objective,
                        indices=[0, 1, 2, 3])
    parts = [loss_on_batch(student, t, _rows(batch, rows), objective)
             for t, rows in ((served, [0, 2]), (local, [1, 3]))]
    n = sum(p.n_tokens for p in parts)
    want = sum(float(p.loss) * p.n_tokens / n for p in parts)
    assert out.n_tokens == n and float(out.loss) == pytest.approx(want, rel=1e-5)


def test_rows_of_one_teacher_give_its_signal_exactly(tiny_teacher_dir, second_teacher_dir):
    a, b = LiveTeacher(_float64(tiny_teacher_dir)), LiveTeacher(_float64(second_teacher_dir))
    student = _float64(tiny_teacher_dir)
    objective = BatchObjective(LossSettings(divergence="forward_kl", chunk_size=7), kd=True)
    batch = _batch(3)
    routed = loss_on_batch(student, RoutedTeacher([b, a], route=[1, 1, 1, 1]), batch, objective,
                           indices=[0, 1, 2, 3])
    alone = loss_on_batch(student, a, batch, objective)
    assert torch.equal(routed.loss, alone.loss) and torch.equal(routed.kd, alone.kd)


# ---------------------------------------------------------------- training runs


def _tagged(tmp_path, tag_of):
    """24 prompt/response rows; row i has the tags tag_of(i)."""
    path = tmp_path / "tagged.jsonl"
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "response": f"The answer is {2 * i}.",
             "tags": tag_of(i)} for i in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(tmp_path, name, teacher, data, student_dir, *, teachers=(), **method):
    recipe = tiny_recipe(tmp_path / name, teacher, data)
    recipe["student"] = {"model": str(student_dir)}
    kd = {k: v for k, v in recipe["method"].items() if k != "divergence"}
    recipe["method"] = {**kd, "kind": "on_policy", "sampling": {"max_new_tokens": 6}, **method,
                        "teachers": [dict(t) for t in teachers]}
    return recipe_from_dict(recipe)


def test_every_row_routed_to_one_teacher_is_its_own_run(tmp_path, tiny_teacher_dir, second_teacher_dir,
                                                       tiny_student_dir):
    """teacher A with B scoring every tag equals B as the only teacher, step for step (held-out rows included)."""
    data = _tagged(tmp_path, lambda i: ["math"])
    routed = _recipe(tmp_path, "routed", tiny_teacher_dir, data, tiny_student_dir, lmbda=0.5,
                     teachers=[{"model": str(second_teacher_dir), "tags": ["math"]}])
    alone = _recipe(tmp_path, "alone", second_teacher_dir, data, tiny_student_dir, lmbda=0.5)
    train(routed, progress=False)
    train(alone, progress=False)
    keys = ("loss", "kd", "ce", "grad_norm", "sample_length")
    assert [[r.get(k) for k in keys] for r in logged_steps(tmp_path / "routed")] == \
        [[r.get(k) for k in keys] for r in logged_steps(tmp_path / "alone")]
    assert logged_evals(tmp_path / "routed") == logged_evals(tmp_path / "alone")


def test_routed_run_resumes_exactly_and_kd_routes_the_same(tmp_path, tiny_teacher_dir, second_teacher_dir,
                                                          tiny_student_dir):
    data = _tagged(tmp_path, lambda i: ["math"] if i % 2 else ["chat"])
    teachers = [{"model": str(second_teacher_dir), "tags": ["math"]}]
    whole = _recipe(tmp_path, "a", tiny_teacher_dir, data, tiny_student_dir, lmbda=0.5, teachers=teachers)
    train(whole, progress=False)
    split = recipe_from_dict({**whole.model_dump(mode="json"), "output_dir": str(tmp_path / "b")})
    assert train(split, progress=False, stop_after=3) is None
    train(split, progress=False)
    a, b = logged_steps(tmp_path / "a"), logged_steps(tmp_path / "b")
    assert len(a) == len(b) == 6 and all(math.isfinite(r["loss"]) for r in a)
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5)
        assert rb.get("sample_length") == ra.get("sample_length")

    # off-policy: lmbda 0 routes as method.kind kd does, and both differ from teacher A alone
    off = _recipe(tmp_path, "off", tiny_teacher_dir, data, tiny_student_dir, lmbda=0.0, divergence="forward_kl",
                  teachers=teachers)
    kd = recipe_from_dict({**off.model_dump(mode="json"), "output_dir": str(tmp_path / "kd"),
                           "method": {**off.method.model_dump(mode="json"), "kind": "kd", "lmbda": 1.0}})
    one = recipe_from_dict({**kd.model_dump(mode="json"), "output_dir": str(tmp_path / "one"),
                            "method": {**kd.method.model_dump(mode="json"), "teachers": []}})
    for recipe in (off, kd, one):
        train(recipe, progress=False)
    keys = ("loss", "kd", "ce", "grad_norm")
    rows = {name: [[r[k] for k in keys] for r in logged_steps(tmp_path / name)] for name in ("off", "kd", "one")}
    assert rows["off"] == rows["kd"] and rows["kd"][0] != rows["one"][0]


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("change, line", [
    ({"method": {"kind": "kd"}, "teacher": {"cache": "cache"}},
     "teacher.cache: method.teachers score live, and a cache holds one teacher's top-k; remove teacher.cache"),
    ({"method": {"hidden": {"weight": 1.0}}},
     "method.hidden: hidden-state KD matches one teacher's blocks; remove method.hidden or method.teachers"),
    ({"method": {"seq_kd": True}},
     "method.seq_kd: the teacher alone samples responses; method.teachers only score, so remove one"),
    ({"method": {"kind": "kd"}, "train": {"packing": True}},
     "train.packing: method.teachers routes whole examples; set train.packing: false"),
    ({"train": {"parallel": "fsdp"}},
     "train.parallel: fsdp shards the teacher, which method.teachers do not support yet; use ddp"),
    ({"student": {"tokenizer": "another/tokenizer"}},
     "method.teachers: scoring teachers need the student's tokenizer; a student on another tokenizer learns from "
     "teacher alone"),
    ({"method": {"kind": "kd", "teachers": [{"model": "m", "endpoint": "http://127.0.0.1:9/v1", "tags": ["x"]}]}},
     "method.teachers[0].endpoint: a served teacher scores the student's samples (method.kind: on_policy), got "
     "method.kind: kd"),
    ({"method": {"kind": "sft"}}, "method.teachers: scoring teachers apply to method.kind kd or on_policy, not sft"),
    ({"method": {"teachers": [{"model": "m"}]}},
     "method.teachers[0].tags: a scoring teacher needs at least one tag (rows without a matching tag go to "
     "`teacher`)"),
])
def test_what_cannot_route_is_refused_in_one_line(tmp_path, tiny_teacher_dir, second_teacher_dir, pairs_jsonl,
                                                 capsys, change, line):
    recipe = tiny_recipe(tmp_path / "r", tiny_teacher_dir, pairs_jsonl)
    recipe["method"] = {"kind": "on_policy", "teachers": [{"model": str(second_teacher_dir), "tags": ["math"]}]}
    for key, value in change.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith(line), err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_scoring_teacher_on_another_tokenizer_is_refused(tmp_path, tiny_teacher_dir, sp_student_dir, pairs_jsonl,
                                                           capsys):
    recipe = tiny_recipe(tmp_path / "r", tiny_teacher_dir, pairs_jsonl)
    recipe["method"] = {"kind": "on_policy", "teachers": [{"model": str(sp_student_dir), "tags": ["math"]}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "method.teachers[0].model: its tokenizer differs from teacher.model's, which the student uses (" in err
    assert err.endswith("); every scoring teacher needs the student's tokenizer")
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_teacher_records_keep_their_prompts_tags_and_one_yaml_anchor_names_both_lists(tmp_path, tiny_teacher_dir):
    from distill.data.examples import load_teacher_data, read_examples

    record = {"id": "r1", "prompt_id": "p1", "tags": ["math"], "status": "ok",
              "messages": [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}]}
    (tmp_path / "answers.jsonl").write_text(json.dumps(record) + "\n")
    assert load_teacher_data(tmp_path / "answers.jsonl")[0].tags == ["math"]
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "a", "response": "b", "tags": "code"}) + "\n")
    assert read_examples(tmp_path / "train.jsonl")[0].tags == ["code"]

    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "1 + 1?", "tags": ["math"]}) + "\n")
    text = f"""
output_dir: {tmp_path / 'run'}
teacher: {{model: {tiny_teacher_dir}}}
student: {{preset: tiny}}
data: {{prompts: {tmp_path / 'prompts.jsonl'}}}
generate:
  teachers: &experts
    - {{model: org/math-teacher, tags: [math]}}
    - {{model: coder, endpoint: "http://box:8000/v1", tags: [code]}}
method:
  kind: on_policy
  teachers: *experts
"""
    recipe = recipe_from_dict(yaml.safe_load(text))
    assert [(t.model, t.endpoint, t.tags) for t in recipe.method.teachers] == \
        [(t.model, t.endpoint, t.tags) for t in recipe.generate.teachers]
