"""The files `distill export` wrote under <run>/exports/, measured like the student: size, quality, speed."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional

import torch

from distill.errors import DistillError
from distill.export import EXPORTS_DIR, older_than
from distill.recipe import Recipe

if TYPE_CHECKING:
    from distill.eval.stage import Reference

log = logging.getLogger("distill")

# Why a GGUF export has no speed row (report.json's `speed_not_measured`).
GGUF_SPEED = ("transformers runs a GGUF file dequantized to float, which says nothing of its speed in llama.cpp "
              "(bench/bench_export.py measures that)")


@dataclass
class Export:
    """One export found under <run>/exports/."""

    name: str  # the folder's (or file's) name; "folder/file.gguf" when a folder holds several .gguf files
    path: Path  # the HF directory or the .gguf file
    kind: Literal["hf", "quanto", "gguf"]
    quant: Optional[str]  # None for a float HF export; "int8" / "int4"; the GGUF file type ("f16", "q8_0", ...)

    @property
    def fmt(self) -> str:
        """`--format` that wrote it: a quanto directory is an `hf` export with `--quant int8|int4`."""
        return "gguf" if self.kind == "gguf" else "hf"


def find_exports(run_dir: Path) -> list[Export]:
    """Every export under <run>/exports/, in name order; anything else there is skipped with a log line."""
    root = Path(run_dir) / EXPORTS_DIR
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):
            continue  # an export being written: atomic writes fill a hidden temp file or folder first
        recognised = _recognise(path)
        if not recognised:
            log.info("eval: skipping %s: not an export (an HF or quantized model directory, or .gguf files)", path)
        found += recognised
    return found


def _recognise(path: Path) -> list[Export]:
    from distill.export.quantize import INFO_FILE

    if path.is_file():
        return [_gguf(path.name, path)] if path.suffix == ".gguf" else []
    if not path.is_dir():
        return []
    if (path / INFO_FILE).is_file():  # before the plain check: model.quanto.safetensors ends in .safetensors too
        return [Export(path.name, path, "quanto", _quanto_quant(path / INFO_FILE))]
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return [Export(path.name, path, "hf", None)]
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return [_gguf(path.name, ggufs[0])]
    return [_gguf(f"{path.name}/{file.name}", file) for file in ggufs]


def _quanto_quant(info: Path) -> Optional[str]:
    """int8 / int4 from distill_quantization.json; None when unreadable (loading it then says why)."""
    try:
        return f"int{json.loads(info.read_text())['bits']}"
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _gguf(name: str, file: Path) -> Export:
    return Export(name, file, "gguf", _gguf_type(file))


def _gguf_type(file: Path) -> Optional[str]:
    """The file type a GGUF file declares (`general.file_type`) as a --quant name: f32, f16, q8_0, ..."""
    from gguf import GGUFReader, LlamaFileType

    try:
        field = GGUFReader(file).fields.get("general.file_type")
        if field is None:
            return None
        name = LlamaFileType(int(field.contents())).name.lower()
    except (OSError, ValueError, KeyError, IndexError):
        return None
    return name.removeprefix("mostly_").removeprefix("all_")


def measure_exports(recipe: Recipe, reference: Reference, teacher_row: dict, student_dir: Path, dtype: torch.dtype,
                    progress: bool) -> dict:
    """report.json's `exports` section (export name -> row like the student's), or {} when there are none."""
    exports = find_exports(recipe.run_dir)
    if not exports:
        return {}
    section = {}
    for export in exports:
        log.info("eval: measuring export %s", export.name)
        row = _export_row(recipe, export, reference, teacher_row, dtype, progress)
        row["older_than_student"] = older_than(export.path, student_dir)
        if row["older_than_student"]:
            log.warning("eval: %s was written before the student was last saved; export it again to measure the "
                        "current student", export.path)
        section[export.name] = row
    return {"exports": section}


def _export_row(recipe: Recipe, export: Export, ref: Reference, teacher_row: dict, dtype: torch.dtype,
                progress: bool) -> dict:
    """One export's row: loaded, answered and measured like the student, with ratios against the teacher."""
    from distill.eval.report import build_report
    from distill.eval.stage import _answers, measure_model
    from distill.models import bytes_on_disk

    head = {"format": export.fmt, "quant": export.quant, "path": str(export.path.relative_to(recipe.run_dir))}
    try:
        model = _load(export, dtype, ref.device, ref.shared_vocab)
    except DistillError as err:
        log.warning("eval: export %s not measured: %s", export.name, err)
        return {**head, "bytes_on_disk": bytes_on_disk(export.path), "error": str(err)}
    answers = _answers(model, ref.tokenizer, ref.data.conversations, recipe, f"{export.name} answers", progress)
    row = measure_model(recipe, model, export.path, answers, ref, speed=export.kind != "gguf")
    row.pop("calibration", None)  # the reliability bins are drawn for teacher and student; the ECE stays
    measured = build_report(teacher_row, row, meta={})  # the student's null rules and ratios, for this model
    speed_note = {"speed_not_measured": GGUF_SPEED} if export.kind == "gguf" and recipe.eval.measure_speed else {}
    return {**head, **measured["student"], **speed_note, "ratios": measured["ratios"]}


def _load(export: Export, dtype: torch.dtype, device: torch.device, shared_vocab: int) -> torch.nn.Module:
    """The export as a causal LM; a GGUF file comes back dequantized, so it scores the quality of its weights."""
    from distill.models import load_model

    if export.kind == "quanto":
        from distill.export.quantize import load_quantized

        # quanto's int4 weights fail under inference_mode (which the metrics use) unless they were made in it
        # (optimum-quanto#304); loaded there, they work in it and give the numbers no_grad gives.
        with torch.inference_mode():
            model = load_quantized(export.path).to(device)
    else:
        model = load_model(str(export.path), dtype=dtype, device=device)
    if model.config.vocab_size < shared_vocab:
        raise DistillError(f"{export.path}: vocabulary of {model.config.vocab_size} tokens, fewer than the "
                           f"{shared_vocab} the student shares with the teacher; not an export of this student")
    return model
