"""Regenerate the token and config tables in README.md from the registry and the config schema.

    python scripts/update_readme.py          # rewrite README.md
    python scripts/update_readme.py --check  # exit 1 if README.md is out of date (used by the tests)
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


def render(text: str) -> str:
    for name, table in (("tokens", token_table()), ("config", config_table())):
        pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md has no <!-- {name}:start --> ... <!-- {name}:end --> block")
        text = pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), text)
    return text


def main() -> int:
    readme = ROOT / "README.md"
    current = readme.read_text(encoding="utf-8")
    updated = render(current)
    if "--check" in sys.argv:
        if updated != current:
            print("README.md is out of date: run `python scripts/update_readme.py`")
            return 1
        return 0
    readme.write_text(updated, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
