"""Reading the README's fenced code blocks, with the skip markers that stand before some of them.

A block that cannot run here is preceded by a line
`<!-- readme-test: skip REASON -->`; every other sh, python and toml block is run by
tests/docs/test_readme_examples.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
SKIP = re.compile(r"^<!-- readme-test: skip (?P<reason>.+?) -->$")


@dataclass(frozen=True)
class Block:
    """One fenced block: its language, text, line number and skip reason (if marked)."""

    language: str
    text: str
    line: int
    skip: str = ""

    @property
    def label(self) -> str:
        return f"README.md:{self.line} ({self.language})"


def blocks(path: Path = README) -> list[Block]:
    """Every fenced block, in order."""
    found: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("```") and len(lines[i]) > 3:
            language, start = lines[i][3:].strip(), i
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            marker = next((SKIP.match(lines[k]) for k in range(start - 1, -1, -1) if lines[k].strip()), None)
            skip = marker["reason"] if marker else ""
            found.append(Block(language, "\n".join(lines[start + 1 : end]) + "\n", start + 1, skip))
            i = end
        i += 1
    return found


def shell_commands(text: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments and blank lines dropped."""
    commands, current = [], ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        commands.append((current + line).strip())
        current = ""
    return commands
