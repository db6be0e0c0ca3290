"""The fenced code blocks of the docs and the README, with the mark written above each.

Every block carries an HTML comment on the line above its fence (invisible on the site):
``<!-- runs in test_NAME -->`` names the test in tests/test_docs.py that runs it, and
``<!-- not run: why -->`` says why no test can (it needs a trained run, a GPU, downloads,
or it is output, not input).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_BLOCK = re.compile(r"^(?:<!-- (?P<mark>[^\n]*?) -->\n)?```(?P<lang>[\w-]*)[^\n]*\n(?P<code>.*?)^```[ \t]*$",
                    re.S | re.M)


@dataclass(frozen=True)
class Block:
    page: str  # "README.md" or a page of docs/
    line: int  # of the opening fence, 1-based
    lang: str
    mark: str | None
    code: str


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    found = []
    for match in _BLOCK.finditer(text):
        fence = match.start("lang") - 3
        found.append(Block(path.name, text.count("\n", 0, fence) + 1, match.group("lang"), match.group("mark"),
                           match.group("code")))
    return found


def run_by(test_name: str) -> list[Block]:
    """The blocks marked ``runs in test_name``, in page order."""
    return [b for path in pages() for b in blocks(path) if b.mark == f"runs in {test_name}"]
