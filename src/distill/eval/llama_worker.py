"""Runs a GGUF file in llama.cpp (llama-cpp-python): `python llama_worker.py < request.json` prints the answers.

Standard library, numpy and llama_cpp only, and no distill import: distill.eval.llama_runtime runs this file by
its path under whichever python has llama-cpp-python (this one, or another named by DISTILL_LLAMA_PYTHON), in a process of
its own, so llama.cpp's threads never compete with torch's inside one process.

Request: "gguf", "n_threads", "n_ctx", "kv_f32" (an f32 KV cache instead of llama.cpp's default f16), "tasks".

Tasks: {"kind": "info"} -> vocab and embedding sizes, training context and the file's metadata (strings);
{"kind": "tokenize", "texts"} -> ids per text (the file's own bos/eos rule, special tokens parsed);
{"kind": "greedy", "prompts", "new_tokens"} -> greedy token ids after each prompt (ids), never stopping early;
{"kind": "logits", "sequences", "out"} -> writes every position's logits to out (.npz, arr_0, ...);
{"kind": "nll", "sequences"} -> per sequence the summed next-token NLL, its count and each position's argmax;
{"kind": "speed", "prompt", "new_tokens", "repeats"} -> prefill and decode tokens/s and time to first token, the
median of repeats after one warm-up run (as distill's decode_speed times a torch model);
{"kind": "quantize", "out", "ftype"} -> llama.cpp's own quantizer (llama-quantize without an imatrix) writes the
request's file as ftype (a llama_ftype name such as "Q4_K_M") to out; does not load the model.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

DEFAULT_THREADS, DEFAULT_CTX = 2, 512


def answer(request: dict) -> list:
    """Load request["gguf"] in llama.cpp and answer each of request["tasks"] in order."""
    from llama_cpp import Llama

    threads, n_ctx = request.get("n_threads", DEFAULT_THREADS), request.get("n_ctx", DEFAULT_CTX)
    # llama.cpp keeps its KV cache in f16 by default; "kv_f32" asks for f32, to compare logits with a float model
    kv_type = {"type_k": 0, "type_v": 0} if request.get("kv_f32") else {}  # 0 is GGML_TYPE_F32
    models: dict[bool, Any] = {}

    def model(all_logits: bool) -> Any:
        if all_logits not in models:
            models[all_logits] = Llama(request["gguf"], n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                       logits_all=all_logits, verbose=False, **kv_type)
        return models[all_logits]

    handlers = {
        "info": lambda t: {"n_vocab": model(False).n_vocab(), "n_embd": model(False).n_embd(),
                           "n_ctx_train": model(False)._model.n_ctx_train(), "metadata": model(False).metadata},
        "tokenize": lambda t: [model(False).tokenize(text.encode(), add_bos=True, special=True)
                               for text in t["texts"]],
        "greedy": lambda t: [greedy(model(False), prompt, t["new_tokens"]) for prompt in t["prompts"]],
        "logits": lambda t: _save_logits(model(True), t["sequences"], t["out"]),
        "nll": lambda t: [_nll(model(True), ids) for ids in t["sequences"]],
        "speed": lambda t: speed(model(False), t["prompt"], t["new_tokens"], t.get("repeats", 3)),
        "quantize": lambda t: quantize(request["gguf"], t["out"], t["ftype"], threads),
    }
    return [handlers[task["kind"]](task) for task in request["tasks"]]


def greedy(llm: Any, prompt: list[int], new_tokens: int) -> list[int]:
    """new_tokens greedy ids after prompt (no reuse of an earlier call's cached prefix)."""
    tokens = []
    for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True):
        tokens.append(int(token))
        if len(tokens) == new_tokens:
            break
    return tokens


def _timed_generation(llm: Any, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """Seconds for the prefill (up to the first greedy token) and for new_tokens one-token decode steps."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    token = int(llm.scores[llm.n_tokens - 1].argmax())
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([token])
        token = int(llm.scores[llm.n_tokens - 1].argmax())
    return prefill_s, time.perf_counter() - start


def speed(llm: Any, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    """Prefill/decode tokens per second and time to first token: the median of repeats after a warm-up run."""
    _timed_generation(llm, prompt, new_tokens)
    runs = [_timed_generation(llm, prompt, new_tokens) for _ in range(max(1, repeats))]
    prefill_s = statistics.median(r[0] for r in runs)
    decode_s = statistics.median(r[1] for r in runs)
    return {"prefill_tokens_per_s": len(prompt) / prefill_s, "decode_tokens_per_s": new_tokens / decode_s,
            "time_to_first_token_s": prefill_s}


def quantize(source: str, out: str, ftype: str, threads: int) -> str:
    """llama.cpp's llama_model_quantize: source (an f32/f16 GGUF) written as ftype to out."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
    params.nthread = threads
    if llama_cpp.llama_model_quantize(source.encode(), out.encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed on {source} as {ftype}")
    return out


def _logits(llm: Any, ids: list[int]) -> Any:
    llm.reset()
    llm.eval(ids)
    return llm.scores[:len(ids)].copy()


def _save_logits(llm: Any, sequences: list[list[int]], out: str) -> str:
    import numpy as np

    np.savez(out, *[_logits(llm, ids) for ids in sequences])
    return out


def _nll(llm: Any, ids: list[int]) -> dict:
    import numpy as np

    logits = _logits(llm, ids).astype(np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    nll = -log_probs[np.arange(len(ids) - 1), ids[1:]].sum()
    return {"nll": float(nll), "targets": len(ids) - 1, "argmax": logits.argmax(-1).tolist()}


if __name__ == "__main__":
    json.dump(answer(json.load(sys.stdin)), sys.stdout)
