"""int8 / int4 weight-only quantization (optimum-quanto): quality bounds, exact reload, generation, bad input.

Bounds were measured with optimum-quanto 0.2.7 and set about 3x above what was seen:
- tiny random Llama (hidden 128): int8 mean KL 2e-6, int4 6e-4 (group 128)
- stories260K on TinyStories text: int8 KL 5e-4 (top-1 agreement 0.99), int4 0.10 (agreement 0.82; its 64-wide
  layers get one int4 scale per row, so int4 costs this small model ~11% perplexity)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import STORIES260K, make_tiny_llama, require_shared, tinystories_split
from distill.errors import DistillError
from distill.export import quantize as q

TINY_INT8_KL, TINY_INT4_KL = 1e-4, 2e-3
REAL_INT8_KL, REAL_INT4_KL = 2e-3, 0.3


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():  # not inference_mode: quanto's int4 weights fail there (optimum-quanto#304)
        return model(input_ids=ids).logits


def _mean_kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    p, r = reference.log_softmax(-1), other.log_softmax(-1)
    return float((p.exp() * (p - r)).sum(-1).mean())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """hidden 128, FFN 256: the down projections get two int4 groups of 128, the rest one scale per row."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny128"), tiny_tokenizer_dir, hidden=128, layers=2, heads=4,
                           kv_heads=2, intermediate=256, seed=5)


@pytest.fixture(scope="module")
def tiny_ids() -> torch.Tensor:
    return torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def quantized_tiny(tiny_dir, tmp_path_factory) -> dict:
    """The tiny model quantized to int8 and int4 once, with their reports."""
    pytest.importorskip("optimum.quanto")
    out = tmp_path_factory.mktemp("quantized")
    return {bits: (out / f"int{bits}", q.quantize_model(tiny_dir, out / f"int{bits}", bits, measure_speed=False))
            for bits in q.BITS}


def test_int8_logits_close_to_fp32(quantized_tiny, tiny_dir, tiny_ids):
    from distill.models import load_model

    out, report = quantized_tiny[8]
    kl = _mean_kl(_logits(load_model(str(tiny_dir)), tiny_ids), _logits(q.load_quantized(out), tiny_ids))
    assert kl < TINY_INT8_KL
    assert report.kl_to_source < TINY_INT8_KL and report.top1_agreement > 0.97
    assert report.quantized_bytes < 0.5 * report.source_bytes


def test_int4_within_looser_bound_and_smaller_than_int8(quantized_tiny, tiny_dir, tiny_ids):
    from distill.models import load_model

    out, report = quantized_tiny[4]
    kl = _mean_kl(_logits(load_model(str(tiny_dir)), tiny_ids), _logits(q.load_quantized(out), tiny_ids))
    assert TINY_INT8_KL / 100 < kl < TINY_INT4_KL  # int4 is really coarser than int8, and still close
    assert report.quantized_bytes < quantized_tiny[8][1].quantized_bytes
    assert abs(report.quantized_perplexity / report.source_perplexity - 1) < 0.05


@pytest.mark.parametrize("bits", q.BITS)
def test_reload_gives_the_in_memory_logits(quantized_tiny, tiny_dir, tiny_ids, bits):
    from distill.models import load_model

    in_memory = load_model(str(tiny_dir))
    q.quantize_in_place(in_memory, bits)
    reloaded = q.load_quantized(quantized_tiny[bits][0])
    assert torch.equal(_logits(in_memory, tiny_ids), _logits(reloaded, tiny_ids))
    assert not [name for name, t in reloaded.state_dict().items() if t.device.type == "meta"]


def test_generate_works_and_matches_in_memory(quantized_tiny, tiny_dir, tiny_ids):
    from distill.models import load_model

    in_memory = load_model(str(tiny_dir))
    q.quantize_in_place(in_memory, 4)
    reloaded = q.load_quantized(quantized_tiny[4][0])
    prompt = tiny_ids[:1, :6]
    kwargs = {"max_new_tokens": 8, "do_sample": False, "min_new_tokens": 8}
    out = reloaded.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    assert out.shape == (1, 14)
    assert torch.equal(out, in_memory.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs))


def test_directory_layout_and_record(quantized_tiny):
    from transformers import AutoModelForCausalLM

    out, report = quantized_tiny[4]
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer.json", q.INFO_FILE, q.WEIGHTS_FILE} <= files
    assert "model.safetensors" not in files
    info = json.loads((out / q.INFO_FILE).read_text())
    assert (info["library"], info["bits"], info["group_size"], info["weights"]) == ("optimum-quanto", 4, 128, "qint4")
    modules = info["quantized_modules"]
    assert len(modules) == report.quantized_modules == 14  # 7 linears in each of 2 blocks
    assert not [m for m in modules if "embed" in m or "lm_head" in m]
    assert modules["model.layers.0.mlp.down_proj"] == 128 and modules["model.layers.0.self_attn.q_proj"] is None
    assert info["report"]["quantized_bytes"] == (out / q.WEIGHTS_FILE).stat().st_size
    with pytest.raises(OSError):  # plain transformers must refuse, not load a broken float model
        AutoModelForCausalLM.from_pretrained(out)


def test_smaller_group_is_recorded_and_reloads(tiny_dir, tmp_path, tiny_ids):
    pytest.importorskip("optimum.quanto")
    from distill.models import load_model

    report = q.quantize_model(tiny_dir, tmp_path / "g32", 4, group_size=32, measure_speed=False)
    info = json.loads((tmp_path / "g32" / q.INFO_FILE).read_text())
    assert set(info["quantized_modules"].values()) == {32}
    in_memory = load_model(str(tiny_dir))
    q.quantize_in_place(in_memory, 4, group_size=32)
    assert torch.equal(_logits(in_memory, tiny_ids), _logits(q.load_quantized(tmp_path / "g32"), tiny_ids))
    assert report.kl_to_source < TINY_INT4_KL


def test_speed_is_measured_for_both(tiny_dir, tmp_path, monkeypatch):
    pytest.importorskip("optimum.quanto")
    for name, value in [("SPEED_PROMPT_TOKENS", 8), ("SPEED_NEW_TOKENS", 8), ("SPEED_ROUNDS", 1)]:
        monkeypatch.setattr(q, name, value)  # the plumbing, not the numbers: keep the test short
    report = q.quantize_model(tiny_dir, tmp_path / "int8", 8)
    assert report.source_decode_tokens_per_s > 0 and report.quantized_decode_tokens_per_s > 0
    assert report.speedup == pytest.approx(report.quantized_decode_tokens_per_s / report.source_decode_tokens_per_s)


@pytest.mark.parametrize(("in_features", "group_size", "expected"),
                         [(256, 128, 128), (172, 128, 86), (576, 128, 96), (128, 128, None), (64, 128, None),
                          (128, 32, 32)])
def test_group_for(in_features, group_size, expected):
    assert q.group_for(in_features, group_size) == expected


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("bits", [3, 16, 0])
def test_bits_outside_8_and_4_name_the_choices(tiny_dir, tmp_path, bits):
    with pytest.raises(DistillError, match=r"bits %d: not supported \(choose one of: 8, 4\)" % bits):
        q.quantize_model(tiny_dir, tmp_path / "out", bits)
    assert not (tmp_path / "out").exists()


def test_directory_without_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DistillError, match="no model here"):
        q.quantize_model(tmp_path / "empty", tmp_path / "out", 8)
    with pytest.raises(DistillError, match="no model here"):
        q.quantize_model(tmp_path / "missing", tmp_path / "out", 8)
    assert not (tmp_path / "out").exists()


def test_library_missing_says_what_to_install(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optimum.quanto", None)  # makes `import optimum.quanto` raise ImportError
    with pytest.raises(DistillError, match=r"optimum-quanto: run `pip install 'distill\[quantize\]'`"):
        q.quantize_model(tiny_dir, tmp_path / "out", 4)
    assert not (tmp_path / "out").exists()


def test_out_dir_must_not_replace_the_source(tiny_dir):
    for out in (tiny_dir, tiny_dir.parent):
        with pytest.raises(DistillError, match="would replace the source model"):
            q.quantize_model(tiny_dir, out, 8)
    assert (tiny_dir / "config.json").is_file()


def test_quantizing_a_quantized_directory_is_refused(quantized_tiny, tmp_path):
    with pytest.raises(DistillError, match="already quantized"):
        q.quantize_model(quantized_tiny[8][0], tmp_path / "again", 4)


def test_failed_write_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    pytest.importorskip("optimum.quanto")

    def half_written(model, tokenizer, out):
        (out / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(q, "_save", half_written)
    with pytest.raises(OSError, match="disk full"):
        q.quantize_model(tiny_dir, tmp_path / "out", 8, measure_speed=False)
    assert list(tmp_path.iterdir()) == []


def test_load_refuses_a_plain_or_damaged_directory(quantized_tiny, tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(DistillError, match="not a quantized model"):
        q.load_quantized(tiny_dir)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    source = quantized_tiny[8][0]
    for path in source.iterdir():
        (damaged / path.name).write_bytes(path.read_bytes())
    state = load_file(str(source / q.WEIGHTS_FILE))
    del state["model.layers.1.mlp.up_proj.weight._data"]
    save_file(state, str(damaged / q.WEIGHTS_FILE))
    with pytest.raises(DistillError, match=r"does not match.*up_proj\.weight"):
        q.load_quantized(damaged)


# ---------------------------------------------------------------- a real model


@pytest.fixture(scope="module")
def stories_texts(tmp_path_factory) -> list[str]:
    _, held_out = tinystories_split(tmp_path_factory.mktemp("stories"), train=0, held_out=3)
    return held_out.read_text().split("\n\n")


@pytest.mark.parametrize(("bits", "bound"), [(8, REAL_INT8_KL), (4, REAL_INT4_KL)])
def test_stories260k_quality(tmp_path, stories_texts, bits, bound):
    pytest.importorskip("optimum.quanto")
    model_dir = require_shared(STORIES260K)
    report = q.quantize_model(model_dir, tmp_path / "out", bits, calibration=stories_texts, measure_speed=False)
    assert report.kl_to_source < bound
    assert report.top1_agreement > (0.97 if bits == 8 else 0.7)
    assert report.quantized_perplexity < report.source_perplexity * (1.01 if bits == 8 else 1.3)
    assert report.quantized_bytes < report.source_bytes * (0.45 if bits == 8 else 0.35)
    model = q.load_quantized(tmp_path / "out")
    prompt = torch.tensor([[1, 403, 407]])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, min_new_tokens=6,
                         do_sample=False)
    assert out.shape == (1, 9)
