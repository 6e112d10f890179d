"""The README's test command is exactly what CI runs, and the CLI it documents exists."""

import re

from conftest import REPO
from skincluster.cli import build_parser


def _readme_commands():
    return re.findall(r"```bash\n(python3\.11 -m venv[^\n]+)\n```", (REPO / "README.md").read_text())


def test_ci_runs_the_readme_test_command():
    commands = _readme_commands()
    test_command = next(c for c in commands if c.rstrip().endswith("pytest"))
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert test_command.strip() in ci_lines


def test_readme_main_command_runs_the_comparison():
    main_command = next(c for c in _readme_commands() if "skincluster compare" in c)
    for part in main_command.split("&&"):
        words = part.split()
        if words and words[0] == "skincluster":
            build_parser().parse_args(words[1:])  # exits on a flag the CLI does not have
