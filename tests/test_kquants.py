"""GGUF K-quants: our numpy block quantizer, llama.cpp's per-tensor mixes, the importance matrix."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGMLQuantizationType as Q, LlamaFileType, quants
from transformers import AutoTokenizer

from conftest import CORPUS, make_tiny_llama
from distill.cli import main
from distill.errors import DistillError
from distill.export import export_model, imatrix_from_tokens
from distill.export.gguf import check_imatrix, export_gguf, verify_gguf
from distill.export.imatrix import read_imatrix, write_imatrix
from distill.export.kquants import K_TYPES, WEIGHTED_LEGACY, quantize, weighted_error
from distill.export.quant_mix import ModelShape, tensor_type

# Relative RMS error of N(0, 1) weights after a round trip, measured: q2_k 0.296, q3_k 0.152, q4_k 0.071,
# q5_k 0.036, q6_k 0.018 (as llama.cpp's own K-quants of Gaussians); bounds 1.15x.
RELATIVE_RMS_BOUND = {Q.Q2_K: 0.34, Q.Q3_K: 0.175, Q.Q4_K: 0.082, Q.Q5_K: 0.042, Q.Q6_K: 0.021}


def _gaussian(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, cols)) * 0.02).astype(np.float32)


def _relative_rms(x: np.ndarray, packed: np.ndarray, qtype) -> float:
    restored = quants.dequantize(packed, qtype).reshape(x.shape)
    return float(np.sqrt(np.mean((restored - x) ** 2) / np.mean(x ** 2)))


# ---------------------------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_k_quant_blocks_round_trip_through_gguf_dequantize(qtype):
    x = _gaussian(96, 512, seed=int(qtype))
    packed = quantize(x, qtype)
    assert packed.dtype == np.uint8 and packed.shape == quants.quant_shape_to_byte_shape(x.shape, qtype)
    # gguf's dequantizer reads llama.cpp's block layout: a wrong field order or bit position would blow this up
    assert _relative_rms(x, packed, qtype) < RELATIVE_RMS_BOUND[qtype]
    # per block, no value strays further than a few of its block's steps
    restored = quants.dequantize(packed, qtype).reshape(x.shape)
    blocks = np.abs(x.reshape(-1, 256)).max(axis=1)
    assert (np.abs(restored - x).reshape(-1, 256).max(axis=1) <= blocks * 0.75).all()


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_k_quant_edge_blocks(qtype):
    x = np.zeros((3, 256), dtype=np.float32)
    x[1, :16] = 1.0  # one spike sub-block, the rest zero
    x[2] = np.linspace(-1, 1, 256, dtype=np.float32) * 1e-3  # tiny values: fp16 scales must not flush them to nan
    restored = quants.dequantize(quantize(x, qtype), qtype).reshape(x.shape)
    assert np.isfinite(restored).all()
    assert np.array_equal(restored[0], x[0])
    assert np.abs(restored[1] - x[1]).max() < 0.07
    assert np.abs(restored[2] - x[2]).max() < 2e-3 * {Q.Q2_K: 0.5, Q.Q3_K: 0.3}.get(qtype, 0.1)


def test_quantize_refuses_rows_that_do_not_fit_the_block():
    with pytest.raises(ValueError, match="not a multiple of the Q4_K block size 256"):
        quantize(_gaussian(2, 576), Q.Q4_K)


@pytest.mark.parametrize("qtype", [*K_TYPES, *WEIGHTED_LEGACY], ids=lambda t: t.name)
def test_imatrix_lowers_the_weighted_error_against_uniform_weights(qtype):
    x = _gaussian(128, 512, seed=3)
    importance = np.random.default_rng(4).lognormal(0, 1.5, 512).astype(np.float32)  # a few columns dominate
    uniform = quantize(x, qtype, np.ones(512, np.float32) if qtype in WEIGHTED_LEGACY else None)
    weighted = quantize(x, qtype, importance)
    assert weighted_error(x, weighted, qtype, importance) < 0.95 * weighted_error(x, uniform, qtype, importance)


# ---------------------------------------------------------------------------------------------- mixes


def test_q4_k_m_mix_follows_llama_cpp():
    shape = ModelShape(n_layers=32, n_gqa=4, tied=False)
    more_bits = [i for i in range(32) if tensor_type(f"blk.{i}.attn_v.weight", 4096, "q4_k_m", shape)[0] == Q.Q6_K]
    assert more_bits == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]  # llama.cpp's use_more_bits
    assert tensor_type("blk.5.ffn_down.weight", 11008, "q4_k_m", shape)[0] == Q.Q4_K
    assert tensor_type("blk.6.ffn_down.weight", 11008, "q4_k_m", shape)[0] == Q.Q6_K
    assert tensor_type("blk.0.attn_q.weight", 4096, "q4_k_m", shape)[0] == Q.Q4_K
    assert tensor_type("output.weight", 4096, "q4_k_m", shape) == (Q.Q6_K, "output head kept wider")
    assert tensor_type("token_embd.weight", 4096, "q4_k_m", shape)[0] == Q.Q4_K  # untied: not the head
    assert tensor_type("token_embd.weight", 4096, "q4_k_m", ModelShape(32, 4, tied=True))[0] == Q.Q6_K
    assert tensor_type("blk.0.attn_v.weight", 4096, "q4_k_s", shape)[0] == Q.Q5_K
    assert tensor_type("blk.9.attn_v.weight", 4096, "q2_k", shape)[0] == Q.Q4_K  # n_gqa >= 4
    assert tensor_type("blk.9.attn_output.weight", 4096, "q3_k_m", shape)[0] == Q.Q4_K
    assert tensor_type("blk.9.ffn_down.weight", 4096, "q6_k", shape)[0] == Q.Q6_K


def test_rows_that_do_not_fit_fall_back_as_llama_cpp_does():
    shape = ModelShape(n_layers=30, n_gqa=3, tied=True)  # SmolLM2-135M: hidden 576 is no multiple of 256
    assert tensor_type("blk.0.attn_q.weight", 576, "q4_k_m", shape)[0] == Q.Q5_0
    assert tensor_type("blk.0.attn_v.weight", 576, "q4_k_m", shape)[0] == Q.Q8_0  # q6_k -> q8_0
    assert tensor_type("blk.0.attn_q.weight", 576, "q5_k_s", shape)[0] == Q.Q5_1
    assert tensor_type("blk.0.attn_q.weight", 576, "q2_k", shape)[0] == Q.Q4_0
    kind, note = tensor_type("token_embd.weight", 576, "q4_k_m", shape)
    assert kind == Q.Q8_0 and "not a multiple" in note
    assert tensor_type("blk.0.ffn_down.weight", 1536, "q4_k_m", shape)[0] == Q.Q6_K  # layer 0: more bits
    assert tensor_type("blk.0.ffn_down.weight", 172, "q4_k_m", shape)[0] == Q.F16  # not even 32-wide


# ---------------------------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def kq_model(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """8 layers with 256-wide rows, so the K-quant blocks fit; untied; one KV head for four query heads."""
    return make_tiny_llama(tmp_path_factory.mktemp("kq"), tiny_tokenizer_dir, hidden=256, layers=8, heads=4,
                           kv_heads=1, intermediate=512, tie=False)


@pytest.fixture(scope="module")
def kq_imatrix(kq_model):
    tok = AutoTokenizer.from_pretrained(kq_model)
    return imatrix_from_tokens(kq_model, [tok(text)["input_ids"] for text in CORPUS], 1 << 16)


def test_imatrix_sums_squared_inputs_and_round_trips_the_llama_cpp_format(kq_model, kq_imatrix, tmp_path):
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(kq_model)
    sequences = [tok(text)["input_ids"] for text in CORPUS]
    assert kq_imatrix.tokens == sum(len(s) for s in sequences) and kq_imatrix.chunks == len(sequences)
    assert len(kq_imatrix.sums) == 8 * 7 + 1  # q k v o gate up down per layer, and the head
    model = AutoModelForCausalLM.from_pretrained(kq_model, dtype=torch.float32)
    with torch.no_grad():  # the head's input is the final norm's output: recompute it the plain way
        hidden = torch.cat([model.model(input_ids=torch.tensor([s])).last_hidden_state[0] for s in sequences])
    expected = hidden.double().square().sum(0).numpy()
    np.testing.assert_allclose(kq_imatrix.sums["output.weight"], expected, rtol=1e-5)
    back = read_imatrix(write_imatrix(kq_imatrix, tmp_path / "m.imatrix"))
    assert back.tokens == kq_imatrix.tokens and back.chunks == kq_imatrix.chunks
    for name, values in kq_imatrix.sums.items():
        np.testing.assert_allclose(back.sums[name], values, rtol=1e-6)
    fields = GGUFReader(tmp_path / "m.imatrix").fields
    assert fields["general.type"].contents() == "imatrix"


def test_q4_k_m_export_with_imatrix_verifies_and_ships_a_modelfile(kq_model, kq_imatrix, tmp_path):
    path = export_model(kq_model, tmp_path / "m-q4_k_m.gguf", "gguf", "q4_k_m", imatrix=kq_imatrix)
    types = {t.name: t.tensor_type for t in GGUFReader(path).tensors}
    assert types["output.weight"] == Q.Q6_K and types["token_embd.weight"] == Q.Q4_K
    assert types["blk.0.attn_v.weight"] == Q.Q6_K and types["blk.1.attn_v.weight"] == Q.Q4_K  # n_layers/8 = 1
    assert types["blk.0.attn_q.weight"] == Q.Q4_K and types["blk.7.ffn_down.weight"] == Q.Q6_K
    assert GGUFReader(path).fields["general.file_type"].contents() == LlamaFileType.MOSTLY_Q4_K_M
    report = verify_gguf(kq_model, path, texts=CORPUS[:2])
    assert report["mean_kl"] < 2e-3 and report["tokenizer_match"]
    assert (tmp_path / "m-q4_k_m.imatrix").is_file() and (tmp_path / "m-q4_k_m.gguf.verify.json").is_file()
    assert "FROM ./m-q4_k_m.gguf" in (tmp_path / "m-q4_k_m.Modelfile").read_text()


def test_imatrix_lowers_the_export_kl(kq_model, kq_imatrix, tmp_path):
    plain = export_gguf(kq_model, tmp_path / "plain.gguf", "q2_k")
    weighted = export_gguf(kq_model, tmp_path / "weighted.gguf", "q2_k", imatrix=kq_imatrix.weights())
    texts = CORPUS[4:8]
    kl_plain = verify_gguf(kq_model, plain, texts=texts)["mean_kl"]
    kl_weighted = verify_gguf(kq_model, weighted, texts=texts)["mean_kl"]
    assert kl_weighted < kl_plain


def test_imatrix_of_another_model_is_refused(kq_model, kq_imatrix, tmp_path, tiny_tokenizer_dir):
    other = make_tiny_llama(tmp_path / "other", tiny_tokenizer_dir, hidden=256, layers=2, intermediate=512)
    with pytest.raises(DistillError, match=r"imatrix: tensor blk\.2\..* not in this model"):
        export_gguf(other, tmp_path / "x.gguf", "q4_k_m", imatrix=kq_imatrix.weights())
    wrong = {"blk.0.attn_q.weight": np.ones(64, np.float32)}
    with pytest.raises(DistillError, match="has 64 values but the model's rows have 256 columns"):
        export_gguf(kq_model, tmp_path / "x.gguf", "q4_k_m", imatrix=wrong)
    assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(DistillError, match="holds no tensors"):
        check_imatrix({}, [])


def test_cli_unknown_quant_lists_the_known_ones(kq_model, tmp_path, capsys):
    code = main(["export", str(kq_model), "--format", "gguf", "--quant", "q4_k", "--out", str(tmp_path / "x.gguf")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "q4_k_m" in err[0] and "q2_k" in err[0] and "q8_0" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_cli_imatrix_auto_without_calibration_data_is_one_line(kq_model, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["export", str(kq_model), "--format", "gguf", "--quant", "q4_k_m", "--imatrix", "auto",
                 "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--imatrix auto: no calibration data" in err[0] and "--imatrix none" in err[0]
    assert not out.exists()
