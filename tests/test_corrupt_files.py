"""Damaged or foreign weight files are one error line naming the file (CLI exit 2), never a loader traceback."""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from distill.cli import main
from distill.errors import DistillError
from distill.export.gguf import export_gguf
from distill.models import load_model, load_tokenizer
from distill.models.weight_files import check_gguf, check_safetensors


def _one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI, check it exits 2, and return its single stderr line."""
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def _copy_with_weights(src: Path, dst: Path, weights: bytes) -> Path:
    shutil.copytree(src, dst)
    (dst / "model.safetensors").write_bytes(weights)
    return dst


@pytest.fixture(scope="module")
def teacher_gguf(tmp_path_factory, tiny_teacher_dir) -> Path:
    """The tiny teacher written by the project's own GGUF writer."""
    return export_gguf(tiny_teacher_dir, tmp_path_factory.mktemp("gguf") / "teacher.gguf", "f32")


# ---------------------------------------------------------------- safetensors


def test_whole_files_pass_the_checks(tiny_teacher_dir, teacher_gguf):
    check_safetensors(tiny_teacher_dir / "model.safetensors")
    check_gguf(teacher_gguf)


@pytest.mark.parametrize("keep", [0, 5, 100, 50_000, -1])
def test_truncated_safetensors_is_named_and_called_truncated(tmp_path, tiny_teacher_dir, capsys, keep):
    whole = (tiny_teacher_dir / "model.safetensors").read_bytes()
    model_dir = _copy_with_weights(tiny_teacher_dir, tmp_path / "model", whole[:keep])
    with pytest.raises(DistillError, match="truncated") as err:
        load_model(str(model_dir))
    assert str(model_dir / "model.safetensors") in str(err.value) and "\n" not in str(err.value)
    line = _one_line_error(capsys, ["export", str(model_dir), "--out", str(tmp_path / "out")])
    assert "model.safetensors: truncated" in line
    assert not (tmp_path / "out").exists()


def test_random_bytes_are_not_a_safetensors_file(tmp_path, tiny_teacher_dir, capsys):
    model_dir = _copy_with_weights(tiny_teacher_dir, tmp_path / "model", random.Random(0).randbytes(4096))
    with pytest.raises(DistillError, match=r"model\.safetensors: not a safetensors file"):
        load_model(str(model_dir))
    line = _one_line_error(capsys, ["export", str(model_dir), "--format", "gguf", "--out", str(tmp_path / "x.gguf")])
    assert line.endswith("model.safetensors: not a safetensors file")


def test_json_header_that_is_not_a_tensor_index(tmp_path, tiny_teacher_dir):
    header = b'{"weight": 3}'
    model_dir = _copy_with_weights(tiny_teacher_dir, tmp_path / "model", len(header).to_bytes(8, "little") + header)
    with pytest.raises(DistillError, match="not a safetensors file"):
        load_model(str(model_dir))


def test_bin_only_directory_is_refused(tmp_path, tiny_teacher_dir, capsys):
    model_dir = tmp_path / "bin_only"
    shutil.copytree(tiny_teacher_dir, model_dir)
    (model_dir / "model.safetensors").rename(model_dir / "pytorch_model.bin")
    with pytest.raises(DistillError, match="has only pytorch_model.bin: distill loads safetensors only"):
        load_model(str(model_dir))
    line = _one_line_error(capsys, ["export", str(model_dir), "--out", str(tmp_path / "out")])
    assert f"{model_dir}: has only pytorch_model.bin" in line


def test_directory_that_is_not_a_model(tmp_path, tiny_tokenizer_dir):
    with pytest.raises(DistillError, match=r"not a model directory \(no config\.json\)"):
        load_model(str(tiny_tokenizer_dir))  # a tokenizer alone
    assert load_tokenizer(str(tiny_tokenizer_dir)) is not None  # ... which still loads as a tokenizer


def test_directory_without_weights(tmp_path, tiny_teacher_dir):
    model_dir = tmp_path / "no_weights"
    shutil.copytree(tiny_teacher_dir, model_dir)
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(DistillError, match=r"no_weights: no model\.safetensors"):
        load_model(str(model_dir))


# ---------------------------------------------------------------- GGUF


@pytest.mark.parametrize("fraction", [0.0005, 0.01, 0.2, 0.6, 0.99])
def test_truncated_gguf_is_named_and_called_truncated(tmp_path, teacher_gguf, capsys, monkeypatch, fraction):
    monkeypatch.setenv("DISTILL_NO_CACHE", "1")
    whole = teacher_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:max(1, int(len(whole) * fraction))])
    line = _one_line_error(capsys, ["convert", str(cut), str(tmp_path / "hf")])
    assert f"{cut}: truncated" in line
    assert not (tmp_path / "hf").exists()
    for load in (load_model, load_tokenizer):  # what train and generate call for a GGUF teacher
        with pytest.raises(DistillError, match=f"{cut}: truncated"):
            load(str(cut))


def test_gguf_cut_inside_its_header_and_inside_its_data(tmp_path, teacher_gguf):
    whole = teacher_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:64])
    with pytest.raises(DistillError, match="ends inside its GGUF header"):
        check_gguf(cut)
    cut.write_bytes(whole[:-1])
    with pytest.raises(DistillError, match=f"its GGUF header promises {len(whole)}"):
        check_gguf(cut)


def test_random_bytes_are_not_a_gguf_file(tmp_path, capsys):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(random.Random(0).randbytes(10_000))
    line = _one_line_error(capsys, ["convert", str(fake), str(tmp_path / "hf")])
    assert line.endswith(f"{fake}: not a GGUF file")
