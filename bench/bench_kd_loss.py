"""Forward+backward time and peak extra memory of the chunked KD loss vs the naive full-logits loss (CPU, fp32).

Each case runs in a fresh subprocess so that one case's freed memory cannot hide another's peak:
    python bench/bench_kd_loss.py                       # the full table (a few minutes)
    python bench/bench_kd_loss.py --vocabs 49152 --tokens 2048 --chunk-sizes 128 256 512
Peak extra memory = VmHWM (peak resident set) minus VmRSS right after the inputs are allocated, with the
peak counter reset (`/proc/self/clear_refs`) at that moment; it includes the gradients of h and W.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HIDDEN = 576


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak_rss() -> None:
    """Make VmHWM start again from the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def naive_step(h_s, w_s, h_t, w_t, labels, temperature: float, alpha: float) -> None:
    """What people write: full logits for both models, then F.kl_div on log-softmaxes, plus CE."""
    import torch
    import torch.nn.functional as F

    student_logits = h_s @ w_s.t()
    with torch.no_grad():
        teacher_logits = h_t @ w_t.t()
    student_in = student_logits if temperature == 1.0 else student_logits / temperature
    teacher_in = teacher_logits if temperature == 1.0 else teacher_logits / temperature
    kd = F.kl_div(
        F.log_softmax(student_in, dim=-1),
        F.log_softmax(teacher_in, dim=-1),
        reduction="batchmean",
        log_target=True,
    ) * temperature**2
    ce = F.cross_entropy(student_logits, labels)
    (alpha * ce + (1 - alpha) * kd).backward()


def chunked_step(h_s, w_s, h_t, w_t, labels, temperature: float, alpha: float, chunk_size: int) -> None:
    from distill.losses import kd_loss_chunked

    kd_loss_chunked(
        h_s, w_s, h_t, w_t, labels, temperature=temperature, alpha=alpha, chunk_size=chunk_size
    ).loss.backward()


def run_case(impl: str, vocab: int, tokens: int, chunk_size: int, temperature: float, mem_cap_gb: float) -> dict:
    """One measured forward+backward in this process; returns time and peak extra memory."""
    import torch

    torch.manual_seed(0)
    h_s = torch.randn(tokens, HIDDEN, requires_grad=True)
    w_s = (torch.randn(vocab, HIDDEN) * HIDDEN**-0.5).requires_grad_()
    h_t, w_t = torch.randn(tokens, HIDDEN), torch.randn(vocab, HIDDEN) * HIDDEN**-0.5
    labels = torch.randint(0, vocab, (tokens,))

    def step(h_s, w_s, h_t, w_t, labels):
        if impl == "naive":
            naive_step(h_s, w_s, h_t, w_t, labels, temperature=temperature, alpha=0.5)
        else:
            chunked_step(h_s, w_s, h_t, w_t, labels, temperature=temperature, alpha=0.5, chunk_size=chunk_size)

    # A small warm-up so thread pools and library workspaces are not counted as the loss's memory.
    small = [t[:64].detach().requires_grad_(t.requires_grad) for t in (h_s, w_s, h_t, w_t)]
    step(*small, labels[:64] % 64)
    # An address-space cap turns "does not fit" into a clean allocation error instead of the OOM killer.
    cap = int(_status_mb("VmSize") * 2**20 + mem_cap_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    _reset_peak_rss()
    baseline = _status_mb("VmRSS")
    start = time.perf_counter()
    try:
        step(h_s, w_s, h_t, w_t, labels)
    except RuntimeError as err:
        if "alloc" not in str(err).lower():
            raise
        return {"impl": impl, "vocab": vocab, "tokens": tokens, "oom": True, "cap_gb": mem_cap_gb}
    seconds = time.perf_counter() - start
    assert h_s.grad is not None and w_s.grad is not None
    result = {"impl": impl, "vocab": vocab, "tokens": tokens, "temperature": temperature}
    if impl == "chunked":
        result["chunk_size"] = chunk_size
    return {**result, "seconds": seconds, "peak_extra_mb": _status_mb("VmHWM") - baseline}


def _in_subprocess(impl: str, vocab: int, tokens: int, chunk_size: int, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, __file__, "--case", impl, str(vocab), str(tokens), "--chunk-sizes", str(chunk_size),
        "--temperature", str(args.temperature), "--mem-cap-gb", str(args.mem_cap_gb),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fastest(results: list[dict]) -> dict:
    return min(results, key=lambda r: r.get("seconds", float("inf")))


def _fmt_time(r: dict) -> str:
    return "OOM" if r.get("oom") else f"{r['seconds']:.2f}"


def _fmt_mem(r: dict) -> str:
    return f"> {r['cap_gb']:,.0f} GB (OOM)" if r.get("oom") else f"{r['peak_extra_mb']:,.0f}"


def table(rows: list[tuple[dict, dict]]) -> str:
    """Markdown table, one line per (vocab, tokens, chunk size): naive vs chunked, with ratios."""
    lines = [
        "| vocab | tokens | chunk | naive s | chunked s | time chunked/naive "
        "| naive peak MB | chunked peak MB | memory naive/chunked |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for naive, chunked in rows:
        both = not naive.get("oom") and not chunked.get("oom")
        time_ratio = f"{chunked['seconds'] / naive['seconds']:.2f}" if both else "n/a"
        mem_ratio = f"{naive['peak_extra_mb'] / chunked['peak_extra_mb']:.1f}x" if both else "n/a"
        lines.append(
            f"| {naive['vocab']:,} | {naive['tokens']:,} | {chunked.get('chunk_size', '')} | {_fmt_time(naive)} "
            f"| {_fmt_time(chunked)} | {time_ratio} | {_fmt_mem(naive)} | {_fmt_mem(chunked)} | {mem_ratio} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[49152, 151936])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[192], help="one chunked run per size")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=1, help="runs per case; the fastest is reported")
    parser.add_argument("--mem-cap-gb", type=float, default=16.0, help="per-case memory cap beyond the inputs")
    parser.add_argument("--case", nargs=3, metavar=("IMPL", "VOCAB", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        impl, vocab, tokens = args.case[0], int(args.case[1]), int(args.case[2])
        print(json.dumps(run_case(impl, vocab, tokens, args.chunk_sizes[0], args.temperature, args.mem_cap_gb)))
        return
    import torch

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; hidden {HIDDEN}, "
        f"fp32, forward_kl, T={args.temperature}, alpha=0.5, all positions valid; "
        f"best of {args.repeats}; load average before: {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    rows = []
    for vocab in args.vocabs:
        for tokens in args.tokens:
            # Interleave the runs and keep each case's fastest: other load on the machine only adds time.
            naive_runs: list[dict] = []
            chunked_runs: dict[int, list[dict]] = {size: [] for size in args.chunk_sizes}
            for _ in range(args.repeats):
                if not any(r.get("oom") for r in naive_runs):  # an OOM will not fit the next time either
                    naive_runs.append(_in_subprocess("naive", vocab, tokens, args.chunk_sizes[0], args))
                for size, runs in chunked_runs.items():
                    runs.append(_in_subprocess("chunked", vocab, tokens, size, args))
            naive = _fastest(naive_runs)
            print(f"  {json.dumps(naive)}", flush=True)
            for runs in chunked_runs.values():
                print(f"  {json.dumps(_fastest(runs))}", flush=True)
                rows.append((naive, _fastest(runs)))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(table(rows))


if __name__ == "__main__":
    main()
