"""`distill generate` and `distill capture` on several processes (torchrun, CPU, gloo) equal one process's work.

Every test launches real processes: torchrun for the launcher users run, or the ranks started by hand (the
environment torchrun gives them) where each rank's own exit code is checked.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import STORIES260K, require_shared, tinystories_split
from distill.data.teacher_records import TOPK_DIR, latest_records, load_topk, shard_paths
from distill.recipe import load_recipe
from distill.stages import capture

pytestmark = pytest.mark.slow

SRC = Path(__file__).resolve().parents[1] / "src"
WORDS = ["cat", "dog", "bird", "girl", "boy", "tree", "king", "queen", "frog", "ball", "car", "sun", "moon", "fish",
         "cake", "boat", "hat", "shoe", "duck", "bear"]
TIMEOUT_S = 180  # far above a run's few seconds: reaching it means a rank hung


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _command(world: int, args: list[str]) -> list[str]:
    if world == 1:
        return [sys.executable, "-m", "distill.cli", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
            "-m", "distill.cli", *args]


def _distill(world: int, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`distill ARGS` as one process, or as `world` processes under torchrun; it must succeed."""
    done = subprocess.run(_command(world, [*args, "--no-progress"]), cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def _prompts(tmp_path: Path, n: int) -> Path:
    file = tmp_path / "prompts.jsonl"
    file.write_text("".join(json.dumps({"prompt": f"Once upon a time there was a {WORDS[i % len(WORDS)]} "
                                                  f"number {i}"}) + "\n" for i in range(n)))
    return file


def _generation_recipe(folder: Path, prompts: Path, **generate) -> Path:
    """A recipe in `folder` (its run directory and cache go beside it)."""
    folder.mkdir(exist_ok=True)
    return _write_recipe(folder / "gen.yaml", {
        "output_dir": "run", "seed": 5,
        "teacher": {"model": str(require_shared(STORIES260K)), "cache": "cache", "cache_k": 4},
        "student": {"preset": "micro"},
        "data": {"prompts": str(prompts), "max_length": 64},
        "generate": {"max_new_tokens": 8, "batch_size": 2, "capture_topk": True, **generate},
    })


def _answers(run_dir: Path) -> dict:
    """Every record, with the top-k arrays kept beside it (npz files carry timestamps: compare the arrays)."""
    records = latest_records(run_dir / "teacher_data")
    topk = {}
    for file in sorted((run_dir / "teacher_data" / TOPK_DIR).glob("*.npz")):
        rows = load_topk(file)
        topk[file.stem] = {k: np.asarray(v).tolist() for k, v in vars(rows).items()}
    return {"records": records, "topk": topk}


def test_two_processes_answer_like_one(tmp_path):
    """Same records (sampled answers too: the same batches, the same seeds) and the same kept log-probs; no file is
    written by two processes."""
    one, two = tmp_path / "one", tmp_path / "two"
    prompts = _prompts(tmp_path, 12)
    _distill(1, "generate", str(_generation_recipe(one, prompts, samples=2, temperature=0.8)), cwd=one)
    _distill(2, "generate", str(_generation_recipe(two, prompts, samples=2, temperature=0.8)), cwd=two)
    expected = _answers(one / "run")
    assert len(expected["records"]) == 24 and len(expected["topk"]) == 24
    assert _answers(two / "run") == expected
    names = [p.name for p in shard_paths(two / "run" / "teacher_data")]
    assert names == ["shard-00000-rank0.jsonl", "shard-00000-rank1.jsonl"]
    per_rank = [{json.loads(line)["id"] for line in (two / "run" / "teacher_data" / n).read_text().splitlines()}
                for n in names]
    assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1]  # both worked, never on the same answer
    assert (two / "run" / "log.txt").read_text().count("generate (") == 1  # rank 0 alone writes the log


def _line_count(data_dir: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in shard_paths(data_dir)) if data_dir.is_dir() else 0


def _kill_with_children(launcher: subprocess.Popen) -> None:
    """SIGKILL torchrun's workers (each in a session of its own) and torchrun, and wait until all are gone."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    for pid in map(int, children):
        os.kill(pid, signal.SIGKILL)
    launcher.kill()
    launcher.wait(timeout=30)
    for pid in map(int, children):
        while Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]:
            time.sleep(0.01)


def test_killed_two_process_generation_resumes(tmp_path):
    """Killed with SIGKILL mid-way, re-run on 2 processes (then 3): the records equal an uninterrupted run's."""
    n = 40
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    prompts = _prompts(tmp_path, n)
    recipe = _generation_recipe(killed, prompts, batch_size=1, max_new_tokens=24)
    data_dir = killed / "run" / "teacher_data"
    run = subprocess.Popen(_command(2, ["generate", str(recipe), "--no-progress"]), cwd=killed, env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while _line_count(data_dir) < 4 and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        _kill_with_children(run)  # torchrun and both ranks at once, as a lost machine would
    partial = len(latest_records(data_dir))
    assert 0 < partial < n, f"the kill came too late to test resuming ({partial} of {n} answered)"
    with open(shard_paths(data_dir)[-1], "a") as f:
        f.write('{"id": "cut-off mid-wr')  # a line a kill cut short; the next run removes it
    _distill(2, "generate", str(recipe), cwd=killed)
    _distill(1, "generate", str(_generation_recipe(whole, prompts, batch_size=1, max_new_tokens=24)), cwd=whole)
    assert _answers(killed / "run") == _answers(whole / "run")
    shards = shard_paths(data_dir)
    _distill(3, "generate", str(recipe), cwd=killed)  # another world size: nothing is left to answer
    assert shard_paths(data_dir) == shards and _answers(killed / "run") == _answers(whole / "run")


def _cache_files(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache.iterdir())}


def test_two_processes_capture_the_same_cache_bytes_and_resume(tmp_path):
    """3 shards over 2 processes: the same bytes as 1 process; with shards lost (a killed run), 2 processes redo
    only those and the cache is the same again."""
    train, _ = tinystories_split(tmp_path, train=600, held_out=1)
    one, two = tmp_path / "one", tmp_path / "two"
    recipes = {}
    for folder in (one, two):
        folder.mkdir()
        recipes[folder] = _write_recipe(folder / "cap.yaml", {
            "output_dir": "run", "teacher": {"model": str(require_shared(STORIES260K)), "cache": "cache",
                                             "cache_k": 8},
            "student": {"preset": "micro"}, "data": {"train": str(train), "max_length": 48, "eval_fraction": 0.0},
            "train": {"batch_size": 8},
        })
    _distill(1, "capture", str(recipes[one]), cwd=one)
    recipe = recipes[two]
    done = _distill(2, "capture", str(recipe), cwd=two)
    expected = _cache_files(one / "cache")
    assert sorted(expected) == ["cache.json", "shard_00000.bin", "shard_00001.bin", "shard_00002.bin"]
    assert _cache_files(two / "cache") == expected
    assert done.stdout.count("teacher cache:") == 1  # rank 0 alone reports
    (two / "cache" / "shard_00001.bin").unlink()  # rank 1's, never written
    (two / "cache" / "shard_00002.bin").write_bytes(expected["shard_00002.bin"][:-7])  # rank 0's, cut short
    again = _distill(2, "capture", str(recipe), cwd=two)
    assert "2 new shard(s), 1 already there" in again.stderr
    assert _cache_files(two / "cache") == expected


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks_by_hand(world: int, args: list[str], cwd: Path, master: bool = True) -> list[subprocess.CompletedProcess]:
    """Start `world` ranks with the environment torchrun gives them; each one's own exit code comes back."""
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)}
        if master:
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "distill.cli", *args, "--no-progress"], cwd=cwd,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise AssertionError("a rank hung") from None
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("distill: error:")]


def test_bad_input_stops_every_rank_with_one_line(tmp_path):
    """A cache captured with other settings, a launch without a rendezvous address, vLLM's own parallelism: every
    rank exits 2 with the same one line, none waits for another, nothing is written."""
    train, _ = tinystories_split(tmp_path, train=40, held_out=1)
    recipe = _write_recipe(tmp_path / "cap.yaml", {
        "output_dir": "run", "teacher": {"model": str(require_shared(STORIES260K)), "cache": "cache", "cache_k": 8},
        "student": {"preset": "micro"}, "data": {"train": str(train), "max_length": 32, "eval_fraction": 0.0},
    })
    capture(load_recipe(recipe), progress=False)  # one process, in this one
    before = _cache_files(tmp_path / "cache")
    clashing = _ranks_by_hand(2, ["capture", str(recipe), "--set", "teacher.cache_k=4"], tmp_path)
    for rank in clashing:
        assert rank.returncode == 2, rank.stderr[-2000:]
        assert _error_lines(rank.stderr) == [
            f"distill: error: {tmp_path / 'cache'}: this cache was captured with a different k (8, now 4); delete "
            "it or set another teacher.cache"]
    assert _cache_files(tmp_path / "cache") == before

    gen = _generation_recipe(tmp_path, _prompts(tmp_path, 4))
    for rank in _ranks_by_hand(2, ["generate", str(gen)], tmp_path, master=False):
        assert rank.returncode == 2
        assert _error_lines(rank.stderr) == ["distill: error: WORLD_SIZE=2 but MASTER_ADDR and MASTER_PORT not "
                                             "set: launch several processes with torchrun or accelerate launch, "
                                             "which set them"]
    assert not shard_paths(tmp_path / "run" / "teacher_data")
    # Under torchrun the launcher fails too (its own exit code is 1), with the one line of each rank that got to say
    # it: torchrun stops the other rank as soon as the first one exits, so the second line may never be printed.
    launched = subprocess.run(_command(2, ["generate", str(gen), "--set", "teacher.engine=vllm", "--no-progress"]),
                              cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert launched.returncode != 0
    lines = _error_lines(launched.stderr)
    assert 1 <= len(lines) <= 2 and all("teacher.engine: vllm" in line and "as one process, not as 2" in line
                                   for line in lines)
    assert "exitcode  : 2" in launched.stderr
