"""The report stage: <run>/report.html (self-contained, with plots) and report.md from the run's files."""
from __future__ import annotations

from pathlib import Path

from distill.recipe import Recipe
from distill.report.html import write_report


def report(recipe: Recipe) -> Path:
    """Write the run's HTML and Markdown reports; return the HTML file."""
    return write_report(recipe.run_dir)
