"""fp32 vs int8 vs int4 weight-only (optimum-quanto) of one model: size on disk, batch-1 decode speed, quality.

    python bench/bench_quantize.py --model ../shared/models/stories260K \\
        --text ../shared/data/tinystories/tinystories_val_part1.txt

Perplexity is measured on the first --texts paragraphs of --text (blank-line separated, each cut to 256 tokens);
agreement and KL compare each quantized model with the fp32 one on the same positions. Decode speed is greedy,
KV-cached, batch 1, on the CPU: the three models take turns for --rounds rounds and each keeps its best, so
other work on a shared machine does not favour one of them. Size is the weight file(s) only.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch


def _texts(path: Path, count: int) -> list[str]:
    paragraphs = [p.strip() for p in path.read_text().split("\n\n") if p.strip()]
    return paragraphs[:count]


def run(model_dir: Path, texts: list[str], group_size: int, rounds: int) -> list[dict]:
    """One row per variant: fp32 source, int8, int4."""
    from distill.export.quantize import BITS, decode_tokens_per_s, load_quantized, quantize_model
    from distill.models import bytes_on_disk, load_model, load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        reports = {bits: quantize_model(model_dir, Path(tmp) / f"int{bits}", bits, group_size=group_size,
                                        calibration=texts, measure_speed=False) for bits in BITS}
        models = [load_model(str(model_dir))] + [load_quantized(Path(tmp) / f"int{bits}") for bits in BITS]
        speeds = decode_tokens_per_s(models, load_tokenizer(str(model_dir)), rounds=rounds)
    source = reports[8]
    rows = [{"variant": "fp32", "bytes": bytes_on_disk(model_dir), "tokens_per_s": speeds[0],
             "perplexity": source.source_perplexity, "agreement": 1.0, "kl": 0.0}]
    for bits, speed in zip(BITS, speeds[1:]):
        report = reports[bits]
        name = f"int{bits}" + (f" (group {group_size})" if bits == 4 else "")
        rows.append({"variant": name, "bytes": report.quantized_bytes, "tokens_per_s": speed,
                     "perplexity": report.quantized_perplexity, "agreement": report.top1_agreement,
                     "kl": report.kl_to_source})
    return rows


def table(rows: list[dict]) -> str:
    base = rows[0]
    lines = ["| variant | size MB | size vs fp32 | decode tok/s | speed vs fp32 | ppl | ppl delta | top-1 agreement "
             "| KL to fp32 |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        delta = row["perplexity"] / base["perplexity"] - 1
        lines.append(
            f"| {row['variant']} | {row['bytes'] / 1e6:.3f} | {row['bytes'] / base['bytes']:.2f}x | "
            f"{row['tokens_per_s']:.1f} | {row['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
            f"{row['perplexity']:.3f} | {100 * delta:+.2f}% | {row['agreement']:.3f} | {row['kl']:.2e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="an HF model directory (fp32 source)")
    parser.add_argument("--text", type=Path, required=True, help="plain text, paragraphs separated by blank lines")
    parser.add_argument("--texts", type=int, default=20, help="paragraphs to measure perplexity on")
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size")
    parser.add_argument("--rounds", type=int, default=5, help="decode-speed rounds (each model keeps its best)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    texts = _texts(args.text, args.texts)
    rows = run(args.model, texts, args.group_size, args.rounds)
    from distill.export.quantize import SPEED_NEW_TOKENS, SPEED_PROMPT_TOKENS

    print(f"{args.model}: {len(texts)} paragraphs of {args.text.name}, {args.threads} threads, best of "
          f"{args.rounds} rounds of {SPEED_NEW_TOKENS} greedy tokens after a {SPEED_PROMPT_TOKENS}-token prompt")
    print(table(rows))


if __name__ == "__main__":
    main()
