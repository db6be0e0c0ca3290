"""Regenerate the reference tables of the docs from the code: every token (docs/structures.md)
from the registry, every config key (docs/configuration.md) from the config schema, every CLI
mode and option (docs/reference.md) from the parsers, and the public Python API
(docs/reference.md) from ``flexvae.__all__``'s signatures and docstrings.

    python scripts/update_docs.py          # rewrite the pages
    python scripts/update_docs.py --check  # exit 1 if a page is out of date (the tests run this)
"""

import dataclasses
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from flexvae import build  # noqa: E402,F401  (registers the built-in tokens)
from flexvae.config import describe_fields  # noqa: E402
from flexvae.registry import LAYERS  # noqa: E402


def _cell(text: str) -> str:
    """Text for a Markdown table cell: pipes escaped, and ``<`` so that ``<run>`` is not taken
    for an HTML tag."""
    return text.replace("|", "\\|").replace("<", "&lt;")


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


def _options() -> list:
    """The options of train.py's parser (every mode's), the mode flags left out."""
    from flexvae.cli.modes import MODES, train_py_parser

    flags = {mode.flag for mode in MODES}
    return [a for a in train_py_parser()._actions
            if a.option_strings and not flags & set(a.option_strings) and a.dest not in ("help", "version")]


def cli_table() -> str:
    from flexvae.cli.modes import MODES, OPTION_MODES

    lines = ["`python train.py FLAG [options]` and `flexvae SUBCOMMAND [options]` run the same modes; "
             "`-h` after a subcommand lists the options it reads.", "",
             "| `train.py` | `flexvae` | what it does |", "|---|---|---|"]
    for mode in MODES:
        value = f" {mode.value[1]}" if mode.value else ""
        lines.append(f"| `{mode.flag}{value}` | `{mode.name}{value}` | {_cell(mode.help)} |")
    by_name = {mode.name: mode for mode in MODES}
    lines += ["", "| option | value | read by | meaning |", "|---|---|---|---|"]
    for action in _options():
        if action.nargs == 0:
            value = "-"
        elif action.choices:
            value = " \\| ".join(f"`{c}`" for c in action.choices)
        else:
            value = f"`{action.metavar or action.dest.upper()}`"
        modes = OPTION_MODES.get(action.dest)
        users = ("every mode" if modes is None else
                 ", ".join(f"`{by_name[m].flag}`" for m in sorted(modes, key=[x.name for x in MODES].index)))
        flags = ", ".join(f"`{f}`" for f in action.option_strings)
        lines.append(f"| {flags} | {value} | {users} | {_cell(action.help or '')} |")
    return "\n".join(lines)


def _first_paragraph(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    if doc.startswith(f"{getattr(obj, '__name__', '')}("):  # the text dataclasses make up, not a doc
        return ""
    return " ".join(doc.split("\n\n")[0].split())


def _default(value) -> str:
    """A parameter's default as the reader would write it: a class by its name, a long or
    object-like repr as ``...``."""
    if inspect.isclass(value):
        return value.__name__
    text = repr(value)
    if value is dataclasses.MISSING or text.startswith("<") or len(text) > 40:
        return "..."
    return text


def _annotation(annotation) -> str:
    if isinstance(annotation, str):
        return annotation.strip("'\"")
    return annotation.__name__ if inspect.isclass(annotation) else inspect.formatannotation(annotation)


def _signature(obj) -> str:
    """``(name: type = default, ...) -> type`` with annotations as written in the source."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return ""
    parts, keyword_only_marked = [], False
    for param in signature.parameters.values():
        text = param.name
        if param.kind is param.VAR_POSITIONAL:
            text, keyword_only_marked = "*" + text, True
        elif param.kind is param.VAR_KEYWORD:
            text = "**" + text
        elif param.kind is param.KEYWORD_ONLY and not keyword_only_marked:
            parts.append("*")
            keyword_only_marked = True
        if param.annotation is not param.empty:
            annotation = param.annotation
            text += f": {_annotation(annotation)}"
        if param.default is not param.empty:
            text += f" = {_default(param.default)}" if param.annotation is not param.empty else f"={_default(param.default)}"
        parts.append(text)
    result = f"({', '.join(parts)})"
    returned = signature.return_annotation
    if returned is not signature.empty and returned is not None and returned != "None":
        result += f" -> {_annotation(returned)}"
    return result


def api_reference() -> str:
    """Every name of ``flexvae.__all__``: its signature and the first paragraph of its doc; for
    a class, each public method's signature and first sentence."""
    import flexvae

    lines = []
    for name in sorted(n for n in flexvae.__all__ if n != "__version__"):
        obj = getattr(flexvae, name)
        module = getattr(obj, "__module__", "")
        if inspect.isclass(obj):
            lines += [f"### `{name}`", "", f"`class flexvae.{name}{_signature(obj)}` (from `{module}`)", ""]
        elif callable(obj):
            lines += [f"### `{name}`", "", f"`flexvae.{name}{_signature(obj)}` (from `{module}`)", ""]
        else:
            lines += [f"### `{name}`", "", f"`flexvae.{name}`: {type(obj).__name__} (from `{flexvae._EXPORTS[name]}`)", ""]
        doc = _first_paragraph(obj) if (inspect.isclass(obj) or callable(obj)) else ""
        if doc:
            lines += [doc, ""]
        if inspect.isclass(obj):
            methods = [(m, f) for m, f in vars(obj).items() if not m.startswith("_")
                       and (inspect.isfunction(f) or isinstance(f, (classmethod, staticmethod, property)))]
            if methods:
                lines += ["| member | what it does |", "|---|---|"]
                for method, f in sorted(methods):
                    target = f.fget if isinstance(f, property) else getattr(f, "__func__", f)
                    shown = method if isinstance(f, property) else f"{method}{_signature(target)}"
                    first = _first_paragraph(target).split(". ")[0].rstrip(".")
                    code = shown.replace("|", "\\|")  # a code span: only the pipes need escaping
                    lines.append(f"| `{code}` | {_cell(first)} |")
                lines.append("")
    return "\n".join(lines).rstrip()


# page -> the generated tables it holds between <!-- NAME:start --> and <!-- NAME:end -->
PAGES = {"structures.md": {"tokens": token_table}, "configuration.md": {"config": config_table},
         "reference.md": {"cli": cli_table, "api": api_reference}}


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
