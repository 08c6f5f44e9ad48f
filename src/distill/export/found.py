"""The exports a run holds under <run>/exports/ (what `distill export` wrote there), and loading them back."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
from gguf import GGUFReader, LlamaFileType

from distill.errors import DistillError
from distill.export import EXPORTS_DIR
from distill.export.quantize import INFO_FILE, load_quantized
from distill.models import load_model

log = logging.getLogger("distill")


@dataclass
class Export:
    """One export found under <run>/exports/."""

    name: str  # the folder's (or file's) name; "folder/file.gguf" when a folder holds several .gguf files
    path: Path  # the HF directory or the .gguf file
    kind: Literal["hf", "quanto", "gguf", "executorch"]
    quant: Optional[str]  # None for a float HF export; "int8" / "int4"; the GGUF file type ("f16", "q8_0", ...);
    # an ExecuTorch program's fp32 / int8 / int4 (from its name, model-<quant>.pte)

    @property
    def fmt(self) -> str:
        """`--format` that wrote it: a quanto directory is an `hf` export with `--quant int8|int4`."""
        return self.kind if self.kind in ("gguf", "executorch") else "hf"


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
            log.info("eval: skipping %s: not an export (an HF or quantized model directory, .gguf or .pte files)",
                     path)
        found += recognised
    return found


def _recognise(path: Path) -> list[Export]:
    if path.is_file():
        return [_gguf(path.name, path)] if path.suffix == ".gguf" else []
    if not path.is_dir():
        return []
    if (path / INFO_FILE).is_file():  # before the plain check: model.quanto.safetensors ends in .safetensors too
        return [Export(path.name, path, "quanto", _quanto_quant(path / INFO_FILE))]
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return [Export(path.name, path, "hf", None)]
    programs = sorted(path.glob("*.pte"))
    if programs:
        return [Export(f"{path.name}/{file.name}" if len(programs) > 1 else path.name, file, "executorch",
                       file.stem.removeprefix("model-")) for file in programs]
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
    try:
        field = GGUFReader(file).fields.get("general.file_type")
        if field is None:
            return None
        name = LlamaFileType(int(field.contents())).name.lower()
    except (OSError, ValueError, KeyError, IndexError):
        return None
    return name.removeprefix("mostly_").removeprefix("all_")


def load_export(export: Export, dtype: torch.dtype, device: torch.device, shared_vocab: int) -> torch.nn.Module:
    """The export as a causal LM; a GGUF file comes back dequantized, so it scores the quality of its weights."""
    if export.kind == "executorch":
        raise DistillError("an ExecuTorch program does not load as a torch model; distill eval reports its size, "
                           "its .verify.json and its speed in the ExecuTorch runtime instead")
    if export.kind == "quanto":
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
