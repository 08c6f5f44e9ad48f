"""The README's two set-up commands stay true: CI runs the README's test command verbatim."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    return [b.strip() for b in blocks if "python3 -m venv" in b]


def test_readme_has_exactly_two_setup_commands():
    commands = _commands()
    assert len(commands) == 2
    assert commands[0].endswith("distill run recipes/quickstart.yaml")
    assert "pytest" in commands[1]
    assert (REPO / "recipes" / "quickstart.yaml").is_file()


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert _commands()[1] in ci.splitlines()
