"""GGUF files in real llama.cpp: find a python with llama-cpp-python, run llama_worker.py there, time decoding.

Not named llama_cpp.py: llama_worker.py runs as a script, so this folder comes first on its sys.path and a
llama_cpp.py here would shadow the llama_cpp package."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from distill.errors import DistillError
from distill.eval import llama_worker

LLAMA_PYTHON_ENV = "DISTILL_LLAMA_PYTHON"
INSTALL_HINT = ("llama-cpp-python is not installed (pip install -e '.[llama-cpp]', which builds llama.cpp from "
                f"source in about 10 minutes; or name a python that has it in {LLAMA_PYTHON_ENV})")


def find_llama_python() -> tuple[Optional[str], str]:
    """(a python where `import llama_cpp` works, or None; why not): $DISTILL_LLAMA_PYTHON first, then this one."""
    named = os.environ.get(LLAMA_PYTHON_ENV)
    if named:
        try:
            probe = subprocess.run([named, "-c", "import llama_cpp"], capture_output=True, text=True)
        except OSError as err:
            return None, f"{LLAMA_PYTHON_ENV}={named} cannot run ({err.strerror})"
        if probe.returncode == 0:
            return named, ""
        return None, f"{LLAMA_PYTHON_ENV}={named} cannot import llama_cpp ({_last_line(probe.stderr)})"
    if importlib.util.find_spec("llama_cpp") is not None:
        return sys.executable, ""
    return None, INSTALL_HINT


def run_llama(python: str, gguf: Path, tasks: list[dict], *, threads: int, kv_f32: bool = False,
              n_ctx: int = llama_worker.DEFAULT_CTX) -> list:
    """Answers to tasks (see llama_worker) for the file gguf, from llama.cpp in a process of its own."""
    request = {"gguf": str(gguf), "n_threads": threads, "n_ctx": n_ctx, "kv_f32": kv_f32, "tasks": tasks}
    # OMP/MKL settings are torch's; llama.cpp takes its thread count from the request
    done = subprocess.run([python, llama_worker.__file__], input=json.dumps(request), capture_output=True, text=True)
    if done.returncode != 0:
        raise DistillError(f"{gguf}: llama.cpp ({python}) could not run it: {_last_line(done.stderr)}")
    return json.loads(done.stdout)


def _last_line(stderr: str) -> str:
    """What a failed python said last (its exception), for a one-line error."""
    return (stderr.strip().splitlines() or ["no output"])[-1]


def llama_speed(python: str, gguf: Path, prompt: list[int], new_tokens: int, thread_counts: list[int],
                repeats: int = 3) -> dict[int, dict]:
    """Prefill/decode tokens per second and time to first token in llama.cpp, per thread count."""
    n_ctx = max(llama_worker.DEFAULT_CTX, len(prompt) + new_tokens + 8)
    task = {"kind": "speed", "prompt": prompt, "new_tokens": new_tokens, "repeats": repeats}
    return {threads: run_llama(python, gguf, [task], threads=threads, n_ctx=n_ctx)[0] for threads in thread_counts}


def llama_quantize(python: str, source: Path, out: Path, ftype: str) -> Path:
    """llama.cpp's own quantizer (as llama-quantize, no imatrix): source written as ftype (e.g. "q4_k_m") to out."""
    run_llama(python, source, [{"kind": "quantize", "out": str(out), "ftype": ftype}], threads=os.cpu_count() or 1)
    return out
