"""The export stage: the trained student in each of the recipe's export.formats, under <run>/exports/."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from distill.errors import DistillError
from distill.export import (
    Imatrix,
    default_export_dir,
    export_model,
    imatrix_from_tokens,
    is_k_quant,
    load_imatrix,
    older_than,
    parse_target,
)
from distill.recipe import Recipe
from distill.stages.data import training_set
from distill.stages.facts import run_files

log = logging.getLogger("distill")


def export_targets(recipe: Recipe) -> list[tuple[str, Optional[str]]]:
    """(format, quantization) of every export.formats entry; a bad one fails before anything runs."""
    targets = []
    for i, target in enumerate(recipe.export.formats):
        try:
            targets.append(parse_target(target))
        except DistillError as err:
            raise DistillError(f"export.formats[{i}]: {err}") from None
    setting = recipe.export.imatrix
    if setting not in ("auto", "none") and not recipe.path(setting).is_file():
        raise DistillError(f"export.imatrix: file not found: {recipe.path(setting)} (or say auto or none)")
    return targets


def gguf_imatrix(recipe: Recipe, quant: Optional[str], setting: Optional[str] = None,
                 max_tokens: Optional[int] = None) -> Optional[Imatrix]:
    """The importance matrix a GGUF export of quant uses under export.imatrix (or `setting`), None for none.

    auto: for K-quants and IQ4, computed on the student over the run's training examples (its filtered teacher data),
    up to export.imatrix_tokens; a run without training data gets uniform weights and a log line.
    """
    setting = setting or recipe.export.imatrix
    if quant is None or quant.lower() in ("f32", "f16", "bf16") or setting == "none":
        return None
    if setting != "auto":
        return load_imatrix(recipe.path(setting))
    if not is_k_quant(quant):
        return None
    files = run_files(recipe)
    try:
        from transformers import AutoTokenizer

        examples = training_set(recipe, AutoTokenizer.from_pretrained(files.student))
    except DistillError as err:
        log.info("imatrix: no calibration data (%s); %s uses uniform weights", err, quant)
        return None
    sequences = [e.input_ids for e in examples.encoded]
    return imatrix_from_tokens(files.root, sequences, max_tokens or recipe.export.imatrix_tokens,
                               dataset=f"{recipe.run_dir} training data")


def export(recipe: Recipe) -> list[Path]:
    """Each export.formats entry of the trained student, kept while it is newer than the student."""
    files, written = run_files(recipe), []
    imatrices: dict[bool, Optional[Imatrix]] = {}  # computed once, shared by every K-quant target
    for fmt, quant in export_targets(recipe):
        target = default_export_dir(files.root, fmt, quant)
        if target.exists() and files.student.is_dir() and not older_than(target, files.student):
            log.info("export: %s is newer than the student; kept", target)
            continue
        imatrix = None
        if fmt == "gguf":
            key = is_k_quant(quant or "")
            if key not in imatrices:
                imatrices[key] = gguf_imatrix(recipe, quant)
            imatrix = imatrices[key]
        written.append(export_model(files.root, None, fmt, quant, imatrix=imatrix))
    return written
