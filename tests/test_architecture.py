"""The layers of docs/architecture.md hold: import-linter's contract (pyproject.toml) and no import cycles."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def test_the_layers_contract_is_kept():
    """cli -> stages -> recipe -> building blocks -> runtime, errors: a lower layer never imports a higher one."""
    command = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    done = subprocess.run([sys.executable, "-c", command, "--config", str(ROOT / "pyproject.toml")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_no_module_imports_itself_through_another():
    """No import cycle between any two modules (module-level imports; TYPE_CHECKING ones excluded)."""
    graph = grimp.build_graph("distill", exclude_type_checking_imports=True)
    cycles = sorted({tuple(sorted((m, i))) for m in graph.modules for i in graph.find_modules_directly_imported_by(m)
                     if graph.chain_exists(importer=i, imported=m)})
    assert cycles == []


def test_building_blocks_never_read_the_recipe():
    """Only the stages (and plan, cli) import distill.recipe at run time; building blocks take plain arguments."""
    graph = grimp.build_graph("distill", exclude_type_checking_imports=True)
    readers = {m.split(".")[1] for m in graph.find_modules_that_directly_import("distill.recipe") if m.count(".")}
    assert readers <= {"cli", "plan", "stages"}, readers
