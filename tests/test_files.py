"""files.py: written files honour the umask."""

from __future__ import annotations

from helpers.inprocess import run_in_process
from helpers.runs import make_images, tiny


def test_files_honour_the_umask(tmp_path):
    import os

    images = make_images(tmp_path / "images", 2)
    run = tmp_path / "run"
    previous = os.umask(0o027)
    try:
        assert run_in_process(["-t", *tiny(images, run, "--set", "train.max_steps=1")]).returncode == 0
    finally:
        os.umask(previous)
    written = [run / "config.toml", run / "metrics.csv", *run.glob("checkpoints/*"), *run.glob("samples/*")]
    assert len(written) >= 4
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {oct(0o640)}
