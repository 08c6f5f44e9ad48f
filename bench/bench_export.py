"""Every export of one student side by side: HF fp32, int8/int4 (optimum-quanto), GGUF f32/f16/q8_0/q4_0.

    python bench/bench_export.py --model ../shared/models/stories260K \\
        --llama-python /work/lcp-venv/bin/python          # GGUF decode speed and perplexity in real llama.cpp

One markdown table: size on disk, batch-1 greedy decode tokens/s on this CPU, perplexity on --text and its delta
against fp32, and top-1 agreement / mean KL against fp32 on the same token ids. Every model scores the same
sequences (the first --texts paragraphs of --text, each tokenized by the source tokenizer and cut to 256 tokens);
every position of every sequence counts for agreement and KL, every next token for perplexity.

- fp32, int8, int4 run in torch (quanto dequantizes per step); they take turns for --rounds rounds of
  32 greedy tokens after a 32-token prompt, and each keeps its best round.
- GGUF files are checked by `verify_gguf` (transformers loads them back, dequantized to float): ppl, agreement,
  KL, and how many of its greedy answers match the source's. With --llama-python (a python where `llama_cpp`
  imports, e.g. a venv with llama-cpp-python) each file also runs in llama.cpp itself (--threads, n_ctx 512,
  its default f16 KV cache): decode tokens/s (same prompt ids, median of --rounds after a warm-up), llama.cpp's own perplexity and
  top-1 agreement with fp32, and on how many paragraphs llama.cpp's tokenization equals the source tokenizer's.
- Threads: torch and llama.cpp both use --threads. Their OpenMP threads spin while they wait for each other, so
  on a CPU busy with other work, more threads than idle cores makes decoding erratic (llama.cpp on 2 busy
  cores: 2 to 1,300 tokens/s for the same file); use --threads 1 there. OMP_WAIT_POLICY=PASSIVE avoids the
  collapse but costs 1.5-5x on an idle machine. The header line gives the load average to judge by.

llama.cpp runs through distill.eval.llama_runtime (its worker, src/distill/eval/llama_worker.py, needs only the
standard library, numpy and llama_cpp in that other python).
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
TINYSTORIES = REPO.parent / "shared" / "data" / "tinystories" / "tinystories_val_part1.txt"
GENERAL_TEXT = REPO / "src" / "distill" / "eval" / "data" / "general.txt"
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
EVAL_MAX_TOKENS = 256
LLAMA_THREADS = 2


# ---------------------------------------------------------------------------------------------- measuring


def read_texts(path: Path, count: int) -> list[str]:
    paragraphs = [p.strip() for p in path.read_text().split("\n\n") if p.strip()]
    return paragraphs[:count]


def torch_rows(model_dir: Path, work: Path, texts: list[str], sequences: list[list[int]], group_size: int,
               rounds: int) -> list[dict]:
    """fp32 and quanto int8/int4 rows: size, torch decode speed, and quality against fp32 on sequences."""
    from distill.export.gguf import compare_logits
    from distill.export.quantize import decode_tokens_per_s, load_quantized, quantize_model
    from distill.models import bytes_on_disk, load_model, load_tokenizer

    sizes = {"fp32": bytes_on_disk(model_dir)}
    for bits in (8, 4):
        # one paragraph: quantize_model's own quality report is not used, every row is scored on sequences below
        report = quantize_model(model_dir, work / f"int{bits}", bits, group_size=group_size,
                                calibration=texts[:1], measure_speed=False)
        sizes[f"int{bits}"] = report.quantized_bytes
    source = load_model(str(model_dir))
    models = {"fp32": source, "int8": load_quantized(work / "int8"), "int4": load_quantized(work / "int4")}
    speeds = decode_tokens_per_s(list(models.values()), load_tokenizer(str(model_dir)), rounds=rounds)
    rows = []
    for (name, model), speed in zip(models.items(), speeds):
        quality = compare_logits(source, model, sequences)  # its "ppl_gguf" is the second model's perplexity
        runtime = "torch" if name == "fp32" else "torch + quanto"
        label = f"int4 (group {group_size})" if name == "int4" else name
        rows.append({"format": label, "runtime": runtime, "bytes": sizes[name], "tokens_per_s": speed,
                     "ppl": quality["ppl_gguf"], "top1": quality["top1_agreement"], "kl": quality["mean_kl"]})
    return rows


def gguf_rows(model_dir: Path, work: Path, sequences: list[list[int]], texts: list[str], tokenizer: Any,
              llama_python: Optional[str], rounds: int, threads: int) -> list[dict]:
    """GGUF rows: verify_gguf's transformers load-back, and llama.cpp itself when llama_python is given."""
    import torch

    from distill.eval.llama_runtime import run_llama
    from distill.eval.metrics import speed_prompt_ids
    from distill.export.gguf import export_gguf, verify_gguf
    from distill.export.quantize import SPEED_NEW_TOKENS, SPEED_PROMPT_TOKENS
    from distill.models import load_model

    source = load_model(str(model_dir))
    with torch.no_grad():
        source_argmax = [source(input_ids=torch.tensor([ids])).logits[0].argmax(-1).tolist() for ids in sequences]
    rows = []
    for qtype in GGUF_TYPES:
        path = export_gguf(model_dir, work / f"model-{qtype}.gguf", qtype)
        check = verify_gguf(model_dir, path, texts=(), token_ids=sequences)
        row = {"format": f"gguf {qtype}", "runtime": "llama.cpp" if llama_python else "(transformers)",
               "bytes": check["bytes"], "tokens_per_s": None, "ppl": check["ppl_gguf"],
               "top1": check["top1_agreement"], "kl": check["mean_kl"],
               "greedy": f"{check['greedy']['same']}/{check['greedy']['prompts']}"}
        if llama_python:
            tasks = [{"kind": "tokenize", "texts": texts}, {"kind": "nll", "sequences": sequences},
                     {"kind": "speed", "prompt": speed_prompt_ids(tokenizer, SPEED_PROMPT_TOKENS),
                      "new_tokens": SPEED_NEW_TOKENS, "repeats": rounds}]
            tokenized, nll, speed = run_llama(llama_python, path, tasks, threads=threads)
            hf_ids = [tokenizer(text)["input_ids"] for text in texts]
            row.update(tokens_per_s=speed["decode_tokens_per_s"], llama_ppl=_perplexity(nll),
                       llama_top1=_agreement([r["argmax"] for r in nll], source_argmax),
                       tokenizer=f"{sum(a == b for a, b in zip(tokenized, hf_ids))}/{len(texts)}")
        rows.append(row)
    return rows


def _perplexity(nll: list[dict]) -> float:
    return math.exp(sum(r["nll"] for r in nll) / sum(r["targets"] for r in nll))


def _agreement(argmax: list[list[int]], reference: list[list[int]]) -> float:
    pairs = [(a, b) for row, ref in zip(argmax, reference) for a, b in zip(row, ref)]
    return sum(a == b for a, b in pairs) / len(pairs)


# ---------------------------------------------------------------------------------------------- table


def table(rows: list[dict]) -> str:
    """The rows as markdown; deltas and ratios against the first (fp32) row."""
    base = rows[0]
    lines = ["| format | runtime | size MB | vs fp32 | decode tok/s | ppl | ppl delta | top-1 vs fp32 | KL to fp32 "
             "| llama.cpp ppl | llama.cpp ppl delta | llama.cpp top-1 | llama.cpp tokens | greedy (transformers) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        llama_ppl = row.get("llama_ppl")
        cells = [
            row["format"], row["runtime"], f"{row['bytes'] / 1e6:.3f}", f"{row['bytes'] / base['bytes']:.2f}x",
            _number(row["tokens_per_s"], ".1f"), f"{row['ppl']:.3f}", _delta(row["ppl"], base["ppl"], row is base),
            _number(row["top1"], ".3f"), _number(row["kl"], ".2e"),
            _number(llama_ppl, ".3f"), "" if llama_ppl is None else _delta(llama_ppl, base["ppl"], False),
            _number(row.get("llama_top1"), ".3f"), row.get("tokenizer", ""), row.get("greedy", ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _number(value: Optional[float], spec: str) -> str:
    return "" if value is None else format(value, spec)


def _delta(value: float, base: float, is_base: bool) -> str:
    return "" if is_base else f"{100 * (value / base - 1):+.2f}%"


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a saved HF student directory (fp32)")
    parser.add_argument("--text", type=Path, help="plain text, paragraphs separated by blank lines (default: "
                        "TinyStories validation in ../shared when present, else distill's general.txt)")
    parser.add_argument("--texts", type=int, default=20, help="paragraphs to score")
    parser.add_argument("--out", type=Path, help="keep the exported models here (default: a temp directory)")
    parser.add_argument("--llama-python", help="a python where llama_cpp imports: run the GGUF files in llama.cpp")
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size")
    parser.add_argument("--rounds", type=int, default=3, help="decode-speed rounds (each model keeps its best)")
    parser.add_argument("--threads", type=int, default=LLAMA_THREADS, help="CPU threads of torch and llama.cpp")
    args = parser.parse_args()
    if args.model is None:
        parser.error("--model is required")
    bench(args)


def bench(args: argparse.Namespace) -> None:
    import torch

    from distill.export.quantize import SPEED_NEW_TOKENS, SPEED_PROMPT_TOKENS
    from distill.models import load_tokenizer

    torch.set_num_threads(args.threads)
    text = args.text or (TINYSTORIES if TINYSTORIES.is_file() else GENERAL_TEXT)
    texts = read_texts(text, args.texts)
    tokenizer = load_tokenizer(str(args.model))
    sequences = [tokenizer(t)["input_ids"][:EVAL_MAX_TOKENS] for t in texts]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = torch_rows(args.model, work, texts, sequences, args.group_size, args.rounds)
        rows += gguf_rows(args.model, work, sequences, texts, tokenizer, args.llama_python, args.rounds,
                          args.threads)
    print("$ python " + " ".join(shlex.quote(a) for a in sys.argv))
    policy = os.environ.get("OMP_WAIT_POLICY", "default")
    print(f"{args.model}: {len(texts)} paragraphs of {text.name} ({sum(map(len, sequences))} tokens); decode: best "
          f"of {args.rounds} rounds of {SPEED_NEW_TOKENS} greedy tokens after a {SPEED_PROMPT_TOKENS}-token prompt, "
          f"batch 1, {args.threads} threads "
          f"(OMP_WAIT_POLICY {policy}, load average {os.getloadavg()[0]:.1f} at the end)")
    print(table(rows))


if __name__ == "__main__":
    main()
