"""`distill export --format executorch`: a .pte program that the ExecuTorch runtime runs like the source model.

The export tests need the `executorch` extra (skipped without it); the refusals run everywhere."""
from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from conftest import STORIES260K, require_shared
from distill.cli import main
from distill.export.found import find_exports

HAS_EXECUTORCH = importlib.util.find_spec("executorch") is not None
needs_executorch = pytest.mark.skipif(not HAS_EXECUTORCH,
                                      reason='executorch is not installed (pip install -e ".[executorch]")')
# measured on stories260K: fp32 KL 7e-13, int8 (8-bit dynamic activations, per-channel weights) 1.1e-3
KL_BOUND = {"fp32": 1e-6, "int8": 5e-3}


@needs_executorch
@pytest.mark.slow
@pytest.mark.parametrize("quant", ["fp32", "int8"])
def test_executorch_program_runs_like_the_source(quant, tmp_path):
    out = tmp_path / "exported"
    assert main(["export", str(require_shared(STORIES260K)), "--format", "executorch", "--quant", quant,
                 "--out", str(out)]) == 0
    pte = out / f"model-{quant}.pte"
    check = json.loads((out / f"model-{quant}.pte.verify.json").read_text())
    assert pte.is_file() and check["bytes"] == pte.stat().st_size
    assert check["mean_kl"] < KL_BOUND[quant]
    assert check["greedy"]["prompts"] == 3
    if quant == "fp32":  # int8 rounds the activations too, which flips near-ties of this 260K model (1 of 3 kept)
        assert check["greedy"]["same"] == 3
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_unknown_executorch_quantization_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--format", "executorch", "--quant", "q4_k_m",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fp32, int8, int4" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(HAS_EXECUTORCH, reason="executorch is installed here")
def test_executorch_missing_says_how_to_install(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--format", "executorch", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install -e ".[executorch]"' in err[0]
    assert not (tmp_path / "out").exists()


def test_eval_finds_an_executorch_export_and_says_it_does_not_run_it(tmp_path):
    folder = tmp_path / "exports" / "executorch-int8"
    folder.mkdir(parents=True)
    (folder / "model-int8.pte").write_bytes(b"\0" * 16)
    [found] = find_exports(tmp_path)
    assert (found.name, found.kind, found.quant, found.fmt) == ("executorch-int8", "executorch", "int8",
                                                                 "executorch")
    shutil.rmtree(folder)
