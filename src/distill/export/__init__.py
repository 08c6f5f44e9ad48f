"""Export a trained student for use outside distill: `distill export RUN_DIR --out OUT_DIR [--format hf]`."""
from __future__ import annotations

from pathlib import Path

from distill.errors import DistillError
from distill.export.hf import export_hf, model_card

FORMATS = ("hf",)


def export_model(source: Path, out_dir: Path, fmt: str = "hf") -> Path:
    """Export source (a run directory or an HF model directory) to out_dir in the given format."""
    if fmt not in FORMATS:
        raise DistillError(f"--format {fmt}: not yet supported (supported: {', '.join(FORMATS)})")
    return export_hf(Path(source), Path(out_dir))


__all__ = ["FORMATS", "export_hf", "export_model", "model_card"]
