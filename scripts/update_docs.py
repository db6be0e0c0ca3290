"""Regenerate the reference tables of the docs from the code: every token (docs/structures.md)
from the registry, every config key (docs/configuration.md) from the config schema.

    python scripts/update_docs.py          # rewrite the pages
    python scripts/update_docs.py --check  # exit 1 if a page is out of date (the tests run this)
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from flexvae import build  # noqa: E402,F401  (registers the built-in tokens)
from flexvae.config import describe_fields  # noqa: E402
from flexvae.registry import LAYERS  # noqa: E402


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def token_table() -> str:
    lines = ["| token | arguments (in order; `name=default` is optional) | what it does |", "|---|---|---|"]
    for layer in sorted(LAYERS, key=lambda t: t.name.lower()):
        args = ", ".join(f"`{a.describe()}`" + (" (`?`)" if a.infer else "") for a in layer.args) or "none"
        lines.append(f"| `{layer.name}` | {args} | {_cell(layer.doc)} |")
    return "\n".join(lines)


def config_table() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, doc in describe_fields():
        lines.append(f"| `{key}` | `{_cell(default)}` | {_cell(doc)} |")
    return "\n".join(lines)


# page -> the generated tables it holds between <!-- NAME:start --> and <!-- NAME:end -->
PAGES = {"structures.md": {"tokens": token_table}, "configuration.md": {"config": config_table}}


def render(text: str, tables: dict, page: str = "the page") -> str:
    for name, make in tables.items():
        pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{page} has no <!-- {name}:start --> ... <!-- {name}:end --> block")
        table = make()
        text = pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), text)
    return text


def main() -> int:
    stale = []
    for page, tables in PAGES.items():
        path = ROOT / "docs" / page
        current = path.read_text(encoding="utf-8")
        updated = render(current, tables, f"docs/{page}")
        if updated != current:
            stale.append(page)
            if "--check" not in sys.argv:
                path.write_text(updated, encoding="utf-8")
    if stale and "--check" in sys.argv:
        print(f"out of date: {', '.join('docs/' + page for page in stale)}: run `python scripts/update_docs.py`")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
