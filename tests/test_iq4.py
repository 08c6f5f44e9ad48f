"""GGUF IQ4_NL / IQ4_XS: our numpy port of llama.cpp's non-linear 4-bit quantizers and the iq4 mixes.

Byte parity with llama.cpp's own quantizer (with and without an importance matrix) is in tests/test_llama_cpp.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGMLQuantizationType as Q, LlamaFileType, quants
from transformers import AutoTokenizer

from conftest import CORPUS, make_tiny_llama
from distill.cli import main
from distill.export import imatrix_from_tokens, is_k_quant
from distill.export.gguf import export_gguf, verify_gguf
from distill.export.kquants import IQ4_MIDPOINTS, IQ4_TYPES, KVALUES_IQ4NL, iq4_level_index, quantize, weighted_error
from distill.export.quant_mix import ModelShape, tensor_type

# Relative RMS error of N(0, 1) weights after a round trip, measured 0.0765 (iq4_nl) and 0.077 (iq4_xs); bound 1.15x.
# The worst value of a 32-value block was off by 0.094 to 0.134 of the block's peak; bound 0.2.
RELATIVE_RMS_BOUND, BLOCK_ERROR_BOUND = 0.088, 0.2
# verify_gguf's mean KL(source || load-back) on the 8-layer test model, measured 1.9e-3 (iq4_xs with an imatrix)
# and 2.0e-3 (iq4_nl without); bound 2.5x
IQ4_KL_BOUND = 5e-3


def _gaussian(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, cols)) * 0.02).astype(np.float32)


def _decode_float64(packed: np.ndarray, qtype) -> np.ndarray:
    """The blocks' values read from llama.cpp's layout in float64, independently of gguf's dequantizer."""
    block, size = {Q.IQ4_NL: (32, 18), Q.IQ4_XS: (256, 136)}[qtype]
    b = packed.reshape(-1, size)
    d = b[:, :2].copy().view(np.float16).astype(np.float64)[:, 0]
    if qtype == Q.IQ4_NL:
        sub_scales, qs = d[:, None], b[:, 2:].reshape(-1, 1, 16)
    else:
        high = b[:, 2].astype(np.int64) | (b[:, 3].astype(np.int64) << 8)  # scales_h, little-endian uint16
        low = np.stack([b[:, 4:8] & 0xF, b[:, 4:8] >> 4], axis=-1).reshape(-1, 8).astype(np.int64)
        six = low | (((high[:, None] >> (2 * np.arange(8))) & 3) << 4)
        sub_scales, qs = d[:, None] * (six - 32), b[:, 8:].reshape(-1, 8, 16)
    index = np.concatenate([qs & 0xF, qs >> 4], axis=-1)  # each 32 values: 16 low nibbles, then 16 high
    values = sub_scales[..., None] * KVALUES_IQ4NL.astype(np.float64)[index]
    return values.reshape(-1, block)


def _best_index_int8(v: float) -> int:
    """llama.cpp's best_index_int8, line by line (float32 arithmetic): the plain reference for the nearest level."""
    values = KVALUES_IQ4NL
    v = np.float32(v)
    if v <= values[0]:
        return 0
    if v >= values[-1]:
        return len(values) - 1
    low, high = 0, len(values) - 1
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if v < values[middle] else (middle, high)
    return high - 1 if v - values[high - 1] < values[high] - v else high


def test_iq4_nearest_level_matches_llama_cpp_best_index():
    rng = np.random.default_rng(0)
    near = [np.nextafter(m, np.float32(direction * np.inf)) for m in IQ4_MIDPOINTS for direction in (1, -1)]
    v = np.concatenate([IQ4_MIDPOINTS, near, KVALUES_IQ4NL, [-1e9, -127.5, 113.5, 1e9, 0.0, -0.0],
                        rng.uniform(-140, 130, 4000)]).astype(np.float32)
    assert iq4_level_index(v).tolist() == [_best_index_int8(x) for x in v]


@pytest.mark.parametrize("qtype", IQ4_TYPES, ids=lambda t: t.name)
def test_iq4_blocks_round_trip_through_gguf_dequantize(qtype):
    x = _gaussian(96, 512, seed=int(qtype))
    packed = quantize(x, qtype)
    assert packed.dtype == np.uint8 and packed.shape == quants.quant_shape_to_byte_shape(x.shape, qtype)
    restored = quants.dequantize(packed, qtype).reshape(x.shape)
    # gguf's reader and a float64 one written from the block layout agree: field order and bit positions are right
    np.testing.assert_allclose(restored.reshape(-1), _decode_float64(packed, qtype).reshape(-1), rtol=1e-6, atol=0)
    relative_rms = np.sqrt(np.mean((restored.astype(np.float64) - x) ** 2) / np.mean(x.astype(np.float64) ** 2))
    assert relative_rms < RELATIVE_RMS_BOUND
    worst = np.abs(restored - x).reshape(-1, 32).max(axis=1) / np.abs(x).reshape(-1, 32).max(axis=1)
    assert worst.max() < BLOCK_ERROR_BOUND


def test_iq4_xs_sub_block_scales_use_the_full_6_bit_range():
    """llama.cpp maps the largest sub-block scale to -32 of the signed 6-bit range: one sub-block per super-block
    is stored as 0 (scales_l nibble 0, scales_h bits 0), which a misplaced bit would not give."""
    packed = quantize(_gaussian(16, 1024, seed=5), Q.IQ4_XS).reshape(-1, 136)
    high = packed[:, 2].astype(np.int64) | (packed[:, 3].astype(np.int64) << 8)
    low = np.stack([packed[:, 4:8] & 0xF, packed[:, 4:8] >> 4], axis=-1).reshape(-1, 8)
    six = low | (((high[:, None] >> (2 * np.arange(8))) & 3) << 4)
    assert (six.min(axis=1) == 0).all() and (six.max(axis=1) > 32).all()


@pytest.mark.parametrize("qtype", IQ4_TYPES, ids=lambda t: t.name)
def test_iq4_edge_blocks(qtype):
    x = np.zeros((4, 256), dtype=np.float32)
    x[1, :32] = 1.0  # one spike block, the rest zero
    x[2] = np.linspace(-1, 1, 256, dtype=np.float32) * 1e-3  # tiny values: fp16 scales must not flush them
    x[3, :40] = 1e-20  # under llama.cpp's GROUP_MAX_EPS: stored as zero
    packed = quantize(x, qtype)
    restored = quants.dequantize(packed, qtype).reshape(x.shape)
    assert np.isfinite(restored).all()
    assert np.array_equal(restored[0], x[0]) and not restored[3].any()
    assert np.abs(restored[1] - x[1]).max() < 1e-3
    assert np.abs(restored[2] - x[2]).max() < 1e-4
    if qtype == Q.IQ4_NL:  # a zero block: scale 0, every index on the table's level nearest 0 (index 8)
        assert (packed.reshape(-1, 18)[0, 2:] == 0x88).all()


def test_iq4_refuses_rows_that_do_not_fit_the_block():
    with pytest.raises(ValueError, match="not a multiple of the IQ4_XS block size 256"):
        quantize(_gaussian(2, 288), Q.IQ4_XS)
    assert quantize(_gaussian(2, 288), Q.IQ4_NL).shape == (2, 288 // 32 * 18)


@pytest.mark.parametrize("qtype", IQ4_TYPES, ids=lambda t: t.name)
def test_imatrix_lowers_the_weighted_iq4_error_against_uniform_weights(qtype):
    x = _gaussian(128, 512, seed=3)
    importance = np.random.default_rng(4).lognormal(0, 1.5, 512).astype(np.float32)  # a few columns dominate
    for uniform in (quantize(x, qtype), quantize(x, qtype, np.ones(512, np.float32))):
        # measured 0.74 (iq4_nl) and 0.75 (iq4_xs) against the plain path, 0.76 against an all-ones imatrix
        assert weighted_error(x, quantize(x, qtype, importance), qtype, importance) < 0.85 * weighted_error(
            x, uniform, qtype, importance)


# ---------------------------------------------------------------------------------------------- mixes


def test_iq4_mixes_follow_llama_cpp():
    gqa4, gqa3 = ModelShape(n_layers=32, n_gqa=4, tied=False), ModelShape(n_layers=32, n_gqa=3, tied=False)
    for scheme, base in (("iq4_xs", Q.IQ4_XS), ("iq4_nl", Q.IQ4_NL)):
        assert tensor_type("blk.9.attn_q.weight", 4096, scheme, gqa4)[0] == base
        assert tensor_type("blk.9.attn_v.weight", 4096, scheme, gqa4)[0] == Q.Q5_K  # n_gqa >= 4
        assert tensor_type("blk.9.attn_v.weight", 4096, scheme, gqa3)[0] == base
        # the first eighth of ffn_down gets q5_k, but only without an importance matrix
        assert tensor_type("blk.3.ffn_down.weight", 11008, scheme, gqa4)[0] == Q.Q5_K
        assert tensor_type("blk.3.ffn_down.weight", 4096, scheme, gqa4, has_imatrix=True)[0] == base
        assert tensor_type("blk.4.ffn_down.weight", 4096, scheme, gqa4)[0] == base
        assert tensor_type("blk.9.attn_output.weight", 4096, scheme, gqa4)[0] == base
        assert tensor_type("output.weight", 4096, scheme, gqa4) == (Q.Q6_K, "output head kept wider")
        assert tensor_type("token_embd.weight", 4096, scheme, gqa4)[0] == base  # untied: not the head


def test_iq4_rows_that_do_not_fit_fall_back_as_llama_cpp_does():
    shape = ModelShape(n_layers=30, n_gqa=3, tied=True)  # SmolLM2-135M: hidden 576 is no multiple of 256
    kind, note = tensor_type("blk.0.attn_q.weight", 576, "iq4_xs", shape)
    assert kind == Q.IQ4_NL and "not a multiple of the IQ4_XS block size 256" in note
    assert tensor_type("blk.0.attn_q.weight", 576, "iq4_nl", shape) == (Q.IQ4_NL, None)
    assert tensor_type("token_embd.weight", 576, "iq4_nl", shape)[0] == Q.Q8_0  # tied head: q6_k -> q8_0
    assert tensor_type("blk.9.ffn_down.weight", 1536, "iq4_xs", shape)[0] == Q.IQ4_XS
    assert tensor_type("blk.0.ffn_down.weight", 172, "iq4_nl", shape)[0] == Q.F16  # not even 32-wide


def test_iq4_schemes_take_an_auto_imatrix_like_the_k_quants():
    assert is_k_quant("iq4_xs") and is_k_quant("IQ4_NL") and is_k_quant("q4_k_m")
    assert not is_k_quant("q4_0") and not is_k_quant("iq4") and not is_k_quant("f16")


# ---------------------------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def kq_model(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """8 layers with 256-wide rows (IQ4_XS blocks fit); untied; one KV head for four query heads."""
    return make_tiny_llama(tmp_path_factory.mktemp("iq4"), tiny_tokenizer_dir, hidden=256, layers=8, heads=4,
                           kv_heads=1, intermediate=512, tie=False)


def test_iq4_xs_export_with_imatrix_verifies(kq_model, tmp_path):
    tok = AutoTokenizer.from_pretrained(kq_model)
    imatrix = imatrix_from_tokens(kq_model, [tok(text)["input_ids"] for text in CORPUS], 1 << 16)
    path = export_gguf(kq_model, tmp_path / "m-iq4_xs.gguf", "iq4_xs", imatrix=imatrix.weights())
    reader = GGUFReader(path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["output.weight"] == Q.Q6_K and types["token_embd.weight"] == Q.IQ4_XS
    assert types["blk.0.attn_v.weight"] == Q.Q5_K and types["blk.0.attn_q.weight"] == Q.IQ4_XS
    assert types["blk.0.ffn_down.weight"] == Q.IQ4_XS  # with an imatrix: no q5_k for the first eighth
    assert reader.fields["general.file_type"].contents() == LlamaFileType.MOSTLY_IQ4_XS
    report = verify_gguf(kq_model, path, texts=CORPUS[:2])
    print(f"iq4_xs with imatrix: mean KL {report['mean_kl']:.3g}")
    assert report["mean_kl"] < IQ4_KL_BOUND and report["tokenizer_match"]


def test_iq4_nl_export_without_imatrix_raises_the_first_ffn_down(kq_model, tmp_path):
    path = export_gguf(kq_model, tmp_path / "m-iq4_nl.gguf", "iq4_nl")
    reader = GGUFReader(path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == Q.Q5_K and types["blk.1.ffn_down.weight"] == Q.IQ4_NL
    assert reader.fields["general.file_type"].contents() == LlamaFileType.MOSTLY_IQ4_NL
    report = verify_gguf(kq_model, path, texts=CORPUS[:2])
    print(f"iq4_nl: mean KL {report['mean_kl']:.3g}")
    assert report["mean_kl"] < IQ4_KL_BOUND


def test_cli_unknown_quant_lists_the_iq4_types(kq_model, tmp_path, capsys):
    code = main(["export", str(kq_model), "--format", "gguf", "--quant", "iq4", "--out", str(tmp_path / "x.gguf")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "iq4_xs" in err[0] and "iq4_nl" in err[0]
    assert list(tmp_path.iterdir()) == []
