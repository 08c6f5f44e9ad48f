"""What killed atomic writes leave (checkpoints, teacher-cache shards, saved students) is removed when writing resumes."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import distill
from distill.models import save_model
from distill.runtime import SHARED_IDLE_S, remove_stale_temporaries
from distill.signals.cache import CacheHeader, TopKCacheWriter, shard_name
from distill.training.checkpoint import list_checkpoints, save_checkpoint

# Enters atomic_directory (dir:PATH) or atomic_file (file:PATH) for each argument, writes, then dies as a kill would.
KILLED_WRITER = """
import os, sys
from pathlib import Path
from distill.runtime import atomic_directory, atomic_file
writes = []  # held: a collected context manager would clean up, as a kill does not
for arg in sys.argv[1:]:
    kind, target = arg.split(":", 1)
    writes.append(atomic_directory(Path(target)) if kind == "dir" else atomic_file(target))
    tmp = writes[-1].__enter__()
    (tmp / "model.safetensors" if kind == "dir" else tmp).write_bytes(b"x" * 4096)
os._exit(9)
"""


def _kill_while_writing(*targets: str) -> None:
    """Leave what a kill in the middle of these atomic writes leaves (the real temporaries, by the real code)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(distill.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, *targets], env=env, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _age(path: Path, seconds: float) -> None:
    """Make path and everything in it look untouched for `seconds`."""
    stamp = time.time() - seconds
    for p in [*path.rglob("*"), path] if path.is_dir() else [path]:
        os.utime(p, (stamp, stamp))


def test_only_the_temporaries_of_atomic_writes_are_removed(tmp_path):
    _kill_while_writing(f"dir:{tmp_path / 'model'}", f"file:{tmp_path / 'a.json'}", f"dir:{tmp_path / 'other'}")
    (tmp_path / ".model.old-0123abcd").mkdir()  # a replaced directory set aside, then a kill
    for name in (".hidden", ".a.json.tmp", "notes.tmp", "a.json"):  # not what atomic writes leave
        (tmp_path / name).write_text("keep")
    assert len(_hidden(tmp_path)) == 6

    assert remove_stale_temporaries(tmp_path, name="model") == 2  # the temp dir and the set-aside copy
    assert not any(n.startswith(".model.") for n in _hidden(tmp_path))
    assert remove_stale_temporaries(tmp_path) == 2  # every name: a.json's and other's
    assert _hidden(tmp_path) == [".a.json.tmp", ".hidden"]
    assert (tmp_path / "notes.tmp").is_file() and (tmp_path / "a.json").read_text() == "keep"
    assert remove_stale_temporaries(tmp_path / "absent") == 0


def test_with_idle_s_a_temporary_still_being_written_is_kept(tmp_path):
    _kill_while_writing(f"dir:{tmp_path / 'model'}", f"file:{tmp_path / 'a.json'}")
    assert remove_stale_temporaries(tmp_path, idle_s=60) == 0  # both just written: maybe a live writer's
    (folder,) = tmp_path.glob(".model.*.tmp")
    _age(folder, 3600)
    (folder / "model.safetensors").touch()  # a file inside still being written keeps the folder
    assert remove_stale_temporaries(tmp_path, idle_s=60) == 0
    _age(folder, 3600)
    _age(next(tmp_path.glob(".a.json.*.tmp")), 3600)
    assert remove_stale_temporaries(tmp_path, idle_s=60) == 2 and _hidden(tmp_path) == []


def _training_objects():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def test_a_killed_checkpoint_save_is_cleared_by_the_next_save(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    save_checkpoint(checkpoints, 2, *_training_objects(), keep=3)
    _kill_while_writing(f"dir:{checkpoints / 'step_4'}")
    assert len(_hidden(checkpoints)) == 1 and [p.name for p in list_checkpoints(checkpoints)] == ["step_2"]
    save_checkpoint(checkpoints, 4, *_training_objects(), keep=3)
    assert _hidden(checkpoints) == []
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step_2", "step_4"]


def test_the_teacher_cache_writer_clears_abandoned_shards_but_not_fresh_ones(tmp_path):
    header = CacheHeader(teacher="t", teacher_weights="w", tokenizer="tok", chat_template="none", vocab_size=320,
                         k=4, step=None, compressor="lzma2", dataset="d", n_examples=4, shard_examples=2)
    cache = tmp_path / "teacher_cache"
    TopKCacheWriter(cache, header)
    _kill_while_writing(f"file:{cache / shard_name(0)}", f"file:{cache / shard_name(1)}")
    abandoned, fresh = sorted(cache.glob(".shard_*.tmp"))
    _age(abandoned, SHARED_IDLE_S + 60)
    TopKCacheWriter(cache, header)  # a resumed capture; `fresh` may be another run's live write (a shared cache)
    assert not abandoned.exists() and fresh.exists()
    _age(fresh, SHARED_IDLE_S + 60)
    TopKCacheWriter(cache, header)
    assert _hidden(cache) == []


def test_saving_the_student_clears_copies_a_killed_save_left(tmp_path, tiny_student_dir):
    run = tmp_path / "run"
    _kill_while_writing(f"dir:{run / 'student'}", f"dir:{run / 'student'}", f"dir:{run / 'student_init'}")
    assert len(_hidden(run)) == 3
    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    save_model(model, AutoTokenizer.from_pretrained(tiny_student_dir), run / "student")
    assert (run / "student" / "config.json").is_file()
    remaining = _hidden(run)
    assert len(remaining) == 1 and remaining[0].startswith(".student_init.")  # another directory's: not this save's


def test_a_killed_export_is_cleared_by_the_next_export_of_the_same_target(tmp_path, tiny_teacher_dir):
    from distill.export import export_model

    out = tmp_path / "exports" / "hf"
    _kill_while_writing(f"dir:{out}")
    assert len(list(out.parent.glob(".hf.*.tmp"))) == 1
    export_model(tiny_teacher_dir, out, "hf", verify=False)
    assert not list(out.parent.glob(".hf.*.tmp")) and (out / "config.json").is_file()

    gguf_file = Path(export_model(tiny_teacher_dir, tmp_path / "gguf", "gguf", "f16", verify=False))
    gguf_file = gguf_file if gguf_file.is_file() else next(gguf_file.glob("*.gguf"))
    _kill_while_writing(f"file:{gguf_file}")
    assert len(list(gguf_file.parent.glob(f".{gguf_file.name}.*.tmp"))) == 1
    export_model(tiny_teacher_dir, tmp_path / "gguf", "gguf", "f16", verify=False)
    assert not list(gguf_file.parent.glob(f".{gguf_file.name}.*.tmp"))
