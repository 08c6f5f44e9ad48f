"""The export stage: the trained student in each of the recipe's export.formats, under <run>/exports/."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from distill.errors import DistillError
from distill.export import default_export_dir, export_model, older_than, parse_target
from distill.recipe import Recipe
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
    return targets


def export(recipe: Recipe) -> list[Path]:
    """Each export.formats entry of the trained student, kept while it is newer than the student."""
    files, written = run_files(recipe), []
    for fmt, quant in export_targets(recipe):
        target = default_export_dir(files.root, fmt, quant)
        if target.exists() and files.student.is_dir() and not older_than(target, files.student):
            log.info("export: %s is newer than the student; kept", target)
            continue
        written.append(export_model(files.root, None, fmt, quant))
    return written
