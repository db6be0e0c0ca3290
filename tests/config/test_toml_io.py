"""config/toml_io.py: -mem --write edits a TOML config in place, keeping every other line."""

import sys
from pathlib import Path

import pytest

from flexvae.config import load_config, set_batch_size_text, write_batch_size
from flexvae.errors import FlexVAEError

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def repo_root(monkeypatch):
    """Structure paths in the configs are relative to the repository root."""
    monkeypatch.chdir(ROOT)


# ------------------------------------------------------------------ writing the result
def changed_lines(before: str, after: str) -> list[tuple[str, str]]:
    return [(a, b) for a, b in zip(before.splitlines(), after.splitlines()) if a != b]


def test_write_batch_size_changes_only_that_value(tmp_path):
    path = tmp_path / "config.toml"
    original = (ROOT / "configs" / "config.toml").read_text()
    path.write_text(original)
    write_batch_size(path, 123)
    text = path.read_text()
    assert len(text.splitlines()) == len(original.splitlines())
    assert changed_lines(original, text) == [("batch_size = 16", "batch_size = 123")]
    cfg = load_config(path)
    assert cfg.train.batch_size == 123
    assert cfg.encode.batch_size == load_config(ROOT / "configs" / "config.toml").encode.batch_size


def test_write_batch_size_keeps_comments_and_other_sections(tmp_path):
    path = tmp_path / "run.toml"
    original = ("# my run\n[encode]\nbatch_size = 32  # encoding\n\n"
                "[train]\n# images per step\n  batch_size=8   # tuned by hand\nlr = 0.001\n")
    path.write_text(original)
    write_batch_size(path, 40)
    assert changed_lines(original, path.read_text()) == [
        ("  batch_size=8   # tuned by hand", "  batch_size=40   # tuned by hand")]


def test_write_batch_size_adds_a_missing_key(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[train]\n# rate\nlr = 0.001\n\n# latents\n[encode]\nbatch_size = 32\n")
    write_batch_size(path, 7)
    assert path.read_text() == "[train]\n# rate\nlr = 0.001\nbatch_size = 7\n\n# latents\n[encode]\nbatch_size = 32\n"
    assert load_config(path).train.batch_size == 7


def test_write_batch_size_adds_a_missing_section(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("# data only\n[data]\nimage_size = 16")  # no final newline
    write_batch_size(path, 9)
    assert path.read_text() == "# data only\n[data]\nimage_size = 16\n\n[train]\nbatch_size = 9\n"
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    write_batch_size(empty, 3)
    assert load_config(empty).train.batch_size == 3


def test_write_batch_size_keeps_windows_line_endings(tmp_path):
    path = tmp_path / "run.toml"
    path.write_bytes(b"[train]\r\nbatch_size = 4 # small\r\nlr = 0.1\r\n")
    write_batch_size(path, 12)
    assert path.read_bytes() == b"[train]\r\nbatch_size = 12 # small\r\nlr = 0.1\r\n"


def test_write_batch_size_errors(tmp_path):
    with pytest.raises(FlexVAEError, match="-c/--config"):
        write_batch_size(None, 8)
    with pytest.raises(FlexVAEError, match="not found"):
        write_batch_size(tmp_path / "missing.toml", 8)
    inline = tmp_path / "inline.toml"
    inline.write_text("train = { lr = 0.1 }\n")  # a form the line editor leaves alone
    with pytest.raises(FlexVAEError, match="by hand"):
        write_batch_size(inline, 8)
    assert inline.read_text() == "train = { lr = 0.1 }\n"
    assert list(tmp_path.glob(".*.tmp")) == []


def test_write_batch_size_dotted_key_at_the_top(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("train.batch_size = 4  # dotted\n[data]\nimage_size = 16\n")
    write_batch_size(path, 5)
    assert path.read_text() == "train.batch_size = 5  # dotted\n[data]\nimage_size = 16\n"


def test_write_batch_size_agrees_with_tomlkit_where_the_key_exists():
    """Where ``batch_size`` is already in the file, tomlkit (a round-trip TOML editor, the
    reference here) and our line editor give the same text, byte for byte, on every shipped
    config and on hand-written layouts. Where the key or the table is missing they differ, by
    design: tomlkit puts a new key after a comment that heads the next table and adds no blank
    line before a new ``[train]``; and when ``[[stage]]`` tables lie on both sides of ``[train]``
    it moves them together even to change a value. Ours keeps each line where it was (the tests
    above and below)."""
    tomlkit = pytest.importorskip("tomlkit")

    def reference(text: str, n: int) -> str:
        doc = tomlkit.parse(text)
        doc["train"]["batch_size"] = n
        return tomlkit.dumps(doc)

    texts = [p.read_text() for p in sorted((ROOT / "configs").glob("*.toml"))]
    texts += ["[train]\r\nbatch_size = 4 # small\r\nlr = 0.1\r\n",
              "# top\n[model]\nz = 1  # c\n\n[train]\n  batch_size=8   # tuned\nlr = 0.001\n",
              "[train.sub]\nx = 1\n[train]\n\"batch_size\" = 3\n"]
    compared = 0
    for text in texts:
        if "batch_size" not in tomllib.loads(text).get("train", {}):
            continue
        assert set_batch_size_text(text, 77) == reference(text, 77)
        compared += 1
    assert compared >= 10


def test_write_batch_size_keeps_stage_tables_where_they_are():
    text = "[[stage]]\nsteps = 1\n[train]\nbatch_size = 2\n[[stage]]\nsteps = 2\n"
    assert set_batch_size_text(text, 5) == text.replace("batch_size = 2", "batch_size = 5")
