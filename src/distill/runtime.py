"""Device, dtype, seeding and atomic file writes shared by every stage."""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, NoReturn, Optional

import numpy as np
import torch
import torch.distributed as dist

from distill.errors import DistillError

# What atomic_file/atomic_directory leave when killed: ".NAME.<8 mkstemp chars>.tmp" (file or folder) and, for a
# directory replaced mid-way, the previous version set aside as ".NAME.old-<8 hex>".
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?:[a-z0-9_]{8}\.tmp|old-[0-9a-f]{8})")
# In a folder other runs may write into too (a shared teacher cache, the GGUF cache), a temporary left untouched
# this long is taken as abandoned: a live writer's temporary changes while it is written, within seconds.
SHARED_IDLE_S = 600.0


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU; under torchrun a bare `cuda` is this process's GPU (LOCAL_RANK)."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on GPUs that support it and fp32 elsewhere (bf16 is ~200x slower on our CPUs)."""
    if spec == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec]


def process_rank() -> tuple[int, int]:
    """(this process's rank, the number of processes) as torchrun and accelerate launch set them; (0, 1) alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def name_cpu_for_deepspeed(device: Optional[torch.device] = None) -> None:
    """Tell DeepSpeed its accelerator is the CPU when `device` is the CPU (a ZeRO run there), or with no device when
    there is no CUDA: read when deepspeed is first imported (transformers' save_pretrained imports it through
    accelerate when installed), and its own detection would warn "Setting accelerator to CPU" on every run."""
    on_cpu = device.type == "cpu" if device is not None else not torch.cuda.is_available()
    if on_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def is_main_process() -> bool:
    """True in the process that writes a run's shared files (rank 0), and when running alone."""
    return process_rank()[0] == 0


# A data-parallel stage waits at its end for the slowest rank: give it hours, not torch's 30 minutes. A rank that
# dies closes its sockets, so the others fail at once instead of waiting this long.
RANK_WAIT = timedelta(hours=12)
_gloo_group: Any = None  # a gloo group beside a default group of another backend (NCCL), made once


def _rank_group() -> Any:
    """The process group that barrier and gather_from_ranks use (gloo: CPU objects), joined on first use."""
    global _gloo_group
    if not dist.is_initialized():
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise DistillError(f"WORLD_SIZE={process_rank()[1]} but {' and '.join(missing)} not set: launch several "
                               "processes with torchrun or accelerate launch, which set them")
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=RANK_WAIT)
    if "gloo" in str(dist.get_backend()):
        return None  # the default group
    if _gloo_group is None:
        _gloo_group = dist.new_group(backend="gloo", timeout=RANK_WAIT)
    return _gloo_group


def barrier() -> None:
    """Wait until every process of a torchrun/accelerate launch reaches this point; returns at once when alone."""
    if process_rank()[1] > 1:
        dist.barrier(group=_rank_group())


def gather_from_ranks(value: Any) -> list[Any]:
    """Every rank's value (picklable), in rank order, on every rank; [value] when running alone."""
    world = process_rank()[1]
    if world == 1:
        return [value]
    values: list[Any] = [None] * world
    dist.all_gather_object(values, value, group=_rank_group())
    return values


def continue_alone() -> None:
    """After the work all processes share (training): they meet once more, then each goes on as if run alone
    (rank 0 exports and evaluates; the others stop), so no later barrier waits for a process that has left."""
    global _gloo_group
    if process_rank()[1] > 1:
        barrier()
        if dist.is_initialized():
            dist.destroy_process_group()
        _gloo_group = None
        os.environ["WORLD_SIZE"] = "1"


def end_launched_process(code: int) -> NoReturn:
    """End one process of a torchrun/accelerate launch now: logs and output flushed, the interpreter's teardown
    skipped."""
    # gloo's worker threads outlive destroy_process_group while DTensor's sharding caches (C++ ones among them)
    # still hold the group; the interpreter's teardown then races those threads and now and then aborts ("terminate
    # called without an active exception"), and torchrun fails a launch whose work is done and saved.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block before the other processes do (what it writes, say to a shared cache, they then read).

    Every process must enter it at the same point; alone, the block just runs."""
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside path for a writer to fill; it replaces path only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; the result should read like any file
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file so that readers see either the old or the whole new content, never a part."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_directory(out_dir: Path) -> Iterator[Path]:
    """Yield a temp dir beside out_dir; when the block succeeds it replaces out_dir by a rename."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DistillError(f"{out_dir}: exists and is not a directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        yield tmp
        _readable_like_any_folder(tmp)
        old = None
        if out_dir.exists():
            # Linux cannot swap two directories in one step: out_dir is briefly absent, never half-written.
            old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _readable_like_any_folder(folder: Path) -> None:
    """mkdtemp/mkstemp (here and in libraries' own atomic saves) make things private: give them the umask modes."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def remove_stale_temporaries(directory: str | Path, name: str | None = None, idle_s: float = 0.0) -> int:
    """Delete the temporaries killed atomic writes left in directory (only those of `name` if given); return how many.

    With idle_s = 0 every one goes: call it so only where no other process writes (a run's own folders, as the run
    starts writing). Elsewhere pass idle_s: a temporary whose newest content changed within it is left alone.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    removed = 0
    for path in directory.iterdir():
        match = _TEMPORARY.fullmatch(path.name)
        if match is None or (name is not None and match["name"] != name):
            continue
        if idle_s and time.time() - _newest_mtime(path) < idle_s:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed += not path.exists()
    return removed


def _newest_mtime(path: Path) -> float:
    """When path, or anything in a folder path, last changed; now if it vanished meanwhile (its writer renamed it)."""
    try:
        times = [path.lstat().st_mtime]
        if path.is_dir() and not path.is_symlink():
            times += [p.lstat().st_mtime for p in path.rglob("*")]
        return max(times)
    except FileNotFoundError:
        return time.time()
